"""``latent_teacher_forcing``: in stage-A training a slot may take its alignment target instead of the fed-back
state; the alignment loss keeps scoring the model's own state, and pass 2 sees what pass 1 saw."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import MIXED, collate_samples, hidden_before_slots, make_sample, patched_embeds, set_stage

from latentvl import LatentSettings
from latentvl.errors import LatentConfigError
from latentvl.model.losses import alignment_loss
from latentvl.model.objective import _alignment_targets, _tail_dropout

TINY_LATENT = {"latent_budget_alpha": 0.5, "latent_budget_gamma": 0.5, "latent_budget_max": 6}


@pytest.mark.parametrize("value", [-0.1, 1.5, True, "0.5"])
def test_field_is_a_probability(value):
    assert LatentSettings().latent_teacher_forcing == 0.0
    with pytest.raises(LatentConfigError, match="latent_teacher_forcing"):
        LatentSettings(latent_teacher_forcing=value).validate()


def test_pause_tokens_have_nothing_to_force():
    with pytest.raises(LatentConfigError, match="latent_teacher_forcing.*latent_feedback"):
        LatentSettings(latent_teacher_forcing=0.5, latent_feedback=False).validate()


def _loss(model, processor, p: float, stage: str = "A", train: bool = True, seed: int = 0):
    set_stage(model, stage, latent_teacher_forcing=p)
    batch = collate_samples(model, processor, [make_sample(i, m) for i, m in MIXED])
    model.train(train)
    torch.manual_seed(seed)
    try:
        out = model.latent_loss(batch)
    finally:
        set_stage(model, "A", latent_teacher_forcing=0.0)
        model.train()
    targets = _alignment_targets(model, batch, out.latent).detach()
    return batch, out, targets


def _forced_rows(p1, targets) -> torch.Tensor:
    """Which active slots took their target: a forced input is parallel to its target."""
    return F.cosine_similarity(p1.ce_patch_vec.float(), targets.float(), dim=-1) > 1 - 1e-5


def test_every_slot_forced_at_one(tiny):
    """p = 1: each slot's input is its target at the norm of the model's own state, the alignment loss
    scores the own states (not the forced inputs, which would score 0)."""
    model, processor = tiny
    _, out, targets = _loss(model, processor, 1.0)
    p1 = out.latent
    assert _forced_rows(p1, targets).all()
    torch.testing.assert_close(p1.ce_patch_vec.norm(dim=-1), p1.align_vec.norm(dim=-1), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(p1.ce_patch_vec, p1.align_vec)
    torch.testing.assert_close(out.align, alignment_loss(p1.align_vec, targets).detach())
    assert out.align > 0.05


@pytest.mark.parametrize("p, stage, train", [(0.0, "A", True), (1.0, "A", False), (1.0, "C", True)])
def test_no_forcing_off_stage_a_training(tiny, p, stage, train):
    """At p = 0, in evaluation and in stage C every slot takes the model's own state."""
    model, processor = tiny
    _, out, targets = _loss(model, processor, p, stage, train)
    p1 = out.latent
    assert torch.equal(p1.ce_patch_vec, p1.align_vec)
    assert not _forced_rows(p1, targets).any()


def test_forced_share_follows_p(tiny):
    """p = 0.5: about half the slots are forced, and the others take the own state exactly."""
    model, processor = tiny
    _, out, targets = _loss(model, processor, 0.5, seed=3)
    p1 = out.latent
    forced = _forced_rows(p1, targets)
    n = forced.numel()
    assert 0.2 * n < forced.sum() < 0.8 * n, (int(forced.sum()), n)
    assert torch.equal(p1.ce_patch_vec[~forced], p1.align_vec[~forced])


@torch.no_grad()
def test_pass_two_sees_what_pass_one_saw(tiny):
    """With forcing, pass 2's hidden state before each slot is the own state pass 1 produced there: pass 1's
    keys and values came from the forced inputs, exactly as pass 2 places them."""
    model, processor = tiny
    batch, out, _ = _loss(model, processor, 0.5, seed=1)
    p1 = out.latent
    before = hidden_before_slots(model, batch, p1)
    assert (before - p1.align_vec).abs().max().item() <= 1e-5



# ------------------------------------------------------------------------------------ latent_tail_dropout
@pytest.mark.parametrize("value", [-0.5, 2.0, True])
def test_tail_dropout_is_a_probability(value):
    assert LatentSettings().latent_tail_dropout == 0.0
    with pytest.raises(LatentConfigError, match="latent_tail_dropout"):
        LatentSettings(latent_tail_dropout=value).validate()


def test_tail_dropout_masks_a_tail_of_every_length(tiny):
    """q = 1: each segment keeps a prefix of 1..B latents, every length occurs, and nothing else is masked."""
    model, processor = tiny
    set_stage(model, "A", latent_tail_dropout=1.0)
    try:
        batch = collate_samples(model, processor, [make_sample(i, m) for i, m in MIXED])
        slots = batch["input_ids"] == model.config.latent_token_id
        seen: dict[int, set[int]] = {}
        for seed in range(40):
            torch.manual_seed(seed)
            keep = _tail_dropout(model, batch, batch["input_ids"])
            assert keep[~slots].all()
            for b, segs in enumerate(batch["latent_segments"]):
                for start, end, _img in segs:
                    row = keep[b, start:end].tolist()
                    kept = sum(row)
                    assert kept >= 1 and row == [True] * kept + [False] * (end - start - kept)
                    seen.setdefault(end - start, set()).add(kept)
        assert all(lengths == set(range(1, budget + 1)) for budget, lengths in seen.items())
    finally:
        set_stage(model, "A", latent_tail_dropout=0.0)


def test_tail_dropout_gates_pass_two_in_stage_a_training_only(tiny):
    """A stage-A training step's pass 2 runs under the drawn mask; evaluation ignores the option."""
    from latentvl.model.objective import _pass2_forward

    model, processor = tiny
    batch = collate_samples(model, processor, [make_sample(i, m) for i, m in MIXED])
    set_stage(model, "A", latent_tail_dropout=1.0)
    model.train()
    try:
        with torch.no_grad():
            torch.manual_seed(5)
            out = model.latent_loss(batch)
            torch.manual_seed(5)
            keep = _tail_dropout(model, batch, batch["input_ids"])
            p1 = out.latent
            embeds, visual = patched_embeds(model, batch, p1, return_visual=True)
            args = (model, embeds, batch["attention_mask"], p1.position_ids, batch["labels"])
            ref = _pass2_forward(*args, model._gating_kwargs(keep), visual).logits
            full = _pass2_forward(*args, {}, visual).logits
            assert not keep.all()
            torch.testing.assert_close(out.logits, ref, rtol=1e-4, atol=1e-4)
            assert (out.logits - full).abs().max() > 1e-2
            model.eval()
            torch.testing.assert_close(model.latent_loss(batch).logits, full, rtol=1e-4, atol=1e-4)
    finally:
        model.train()
        set_stage(model, "A", latent_tail_dropout=0.0)


# ------------------------------------------------------------------------------------ latent_tail_dropout_mode
def test_tail_dropout_mode_is_named():
    assert LatentSettings().latent_tail_dropout_mode == "any"
    with pytest.raises(LatentConfigError, match="latent_tail_dropout_mode"):
        LatentSettings(latent_tail_dropout_mode="tail").validate()


@pytest.mark.parametrize("rows, lengths", [
    ("abbb", [2, 3, 4]),
    ("abab", [4]),
    ("aaa", [1, 2, 3]),
    ("a", [1]),
    ("abcc", [3, 4]),
])
def test_repeating_lengths_by_hand(rows, lengths):
    from latentvl.model.objective import _repeating_lengths

    basis = {c: torch.eye(4)[i] * (i + 1) for i, c in enumerate("abc")}
    assert _repeating_lengths(torch.stack([basis[c] for c in rows])) == lengths


def test_repeating_lengths_tolerance_is_relative_to_the_kept_target():
    from latentvl.model.objective import REPEAT_TOLERANCE, _repeating_lengths

    kept = torch.tensor([3.0, 4.0])  # norm 5
    near = kept + torch.tensor([0.0, 5 * REPEAT_TOLERANCE * 0.9])
    far = kept + torch.tensor([0.0, 5 * REPEAT_TOLERANCE * 1.1])
    other = torch.tensor([-4.0, 3.0])
    assert _repeating_lengths(torch.stack([other, kept, near])) == [2, 3]
    assert _repeating_lengths(torch.stack([other, kept, far])) == [3]


def test_repeat_tail_dropout_keeps_only_lengths_whose_dropped_targets_repeat(tiny):
    """q = 1, mode "repeat": with CoT features whose pooled targets repeat from slot r on, each segment keeps
    a prefix of r + 1 .. B latents, every such length occurs, and nothing else is masked; without CoT
    features nothing is masked; the same RNG draws as mode "any"."""
    model, processor = tiny
    set_stage(model, "A", latent_tail_dropout=1.0, latent_tail_dropout_mode="repeat")
    try:
        batch = collate_samples(model, processor, [make_sample(i, m) for i, m in MIXED])
        slots = batch["input_ids"] == model.config.latent_token_id
        hidden = model.config.text_config.hidden_size
        feats, first_repeat = [], {}
        for b, (segs, budgets) in enumerate(zip(batch["latent_segments"], batch["latent_budgets"])):
            by_img = {img: (start, end) for start, end, img in segs}
            for img in range(len(budgets)):
                start, end = by_img[img]
                n = end - start
                r = (b + img) % n  # targets r, r+1, ... equal target r
                rows = torch.randn(n, hidden, generator=torch.Generator().manual_seed(10 * b + img)) * 3
                rows[r:] = rows[r]
                feats.append(rows)
                first_repeat[(b, start)] = r
        seen: dict[tuple[int, int], set[int]] = {}
        for seed in range(60):
            torch.manual_seed(seed)
            keep = _tail_dropout(model, batch, batch["input_ids"], feats)
            assert keep[~slots].all()
            for b, segs in enumerate(batch["latent_segments"]):
                for start, end, _img in segs:
                    row = keep[b, start:end].tolist()
                    kept = sum(row)
                    assert row == [True] * kept + [False] * (end - start - kept)
                    assert kept >= first_repeat[(b, start)] + 1
                    seen.setdefault((b, start), set()).add(kept)
            torch.manual_seed(seed)
            assert _tail_dropout(model, batch, batch["input_ids"], []).all()
        for (b, start), lengths in seen.items():
            end = next(e for s, e, _i in batch["latent_segments"][b] if s == start)
            assert lengths == set(range(first_repeat[(b, start)] + 1, end - start + 1))
    finally:
        set_stage(model, "A", latent_tail_dropout=0.0, latent_tail_dropout_mode="any")


@pytest.mark.parametrize("mode", ["any", "repeat"])
def test_latent_loss_hands_tail_dropout_the_cot_features_in_repeat_mode_only(tiny, monkeypatch, mode):
    import latentvl.model.objective as objective

    model, processor = tiny
    batch = collate_samples(model, processor, [make_sample(i, m) for i, m in MIXED])
    seen = []
    real = objective._tail_dropout

    def spy(model, batch, input_ids, feats=None):
        seen.append(feats)
        return real(model, batch, input_ids, feats)

    monkeypatch.setattr(objective, "_tail_dropout", spy)
    set_stage(model, "A", latent_tail_dropout=1.0, latent_tail_dropout_mode=mode)
    model.train()
    try:
        with torch.no_grad():
            model.latent_loss(batch)
    finally:
        set_stage(model, "A", latent_tail_dropout=0.0, latent_tail_dropout_mode="any")
    assert len(seen) == 1
    if mode == "any":
        assert seen[0] is None
    else:
        assert len(seen[0]) == sum(len(x) for x in batch["latent_budgets"]) > 0
