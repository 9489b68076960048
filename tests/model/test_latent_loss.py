"""The training unit through the model (design §6): loss parts, gradients, alignment targets, the
stage switch, mixed precision, and overfitting a few samples."""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch
from helpers import MIXED, collate_samples, fire_at, make_sample, set_stage

from latentvl import LatentCollator, LatentSettings, build_tiny_model, set_latent_fields
from latentvl.budget import compute_latent_budget
from latentvl.errors import LatentConfigError

TINY_LATENT = {"latent_budget_alpha": 0.5, "latent_budget_gamma": 0.5, "latent_budget_max": 6}  # the `tiny` fixture


def test_losses_and_gradients(tiny):
    model, processor = tiny
    batch = collate_samples(model, processor, [make_sample(i, m) for i, m in MIXED])
    set_stage(model, "A")
    model.zero_grad()
    out = model.latent_loss(batch)
    out.latent.ce_patch_vec.retain_grad()
    out.loss.backward()
    assert out.ce > 0 and out.align > 0 and out.stop == 0 and out.cost == 0
    assert out.latent.ce_patch_vec.grad.abs().sum() > 0  # CE/align reach the latent vectors
    assert model.latent_stop_head.weight.grad is None  # no stop-head gradient in stage A

    set_stage(model, "C")
    out = model.latent_loss(batch)
    head_grad = torch.autograd.grad(out.loss, model.latent_stop_head.weight)[0]
    assert head_grad.abs().sum() > 0  # the stop head trains in stage C
    assert out.stop > 0
    assert out.cost.item() == pytest.approx(np.mean([sum(u) for u in out.latent.latent_used_lens]))
    set_stage(model, "A")


def _pooled_by_hand(features: torch.Tensor, groups: int) -> torch.Tensor:
    """D4's raster-order groups, written out: group g averages tokens [floor(gN/u), ceil((g+1)N/u))."""
    n = features.shape[0]
    return torch.stack([features[(g * n) // groups: -((-(g + 1) * n) // groups)].mean(0) for g in range(groups)])


@pytest.mark.parametrize("stage", ["A", "C"])
def test_loss_sum_and_alignment_targets_as_wired_in_latent_loss(tiny, stage):
    """``latent_loss`` against an independent recomputation: each active latent is aligned with its own
    CoT image (encoded alone), pooled into as many groups as its segment has active latents, and the
    total is ce + w_align * align + w_stop * stop + w_cost * cost, the stop and cost terms in stage C only."""
    model, processor = tiny
    set_stage(model, stage)
    set_latent_fields(model.config, latent_align_weight=0.7)
    if stage == "C":
        set_latent_fields(model.config, latent_stop_loss_weight=1.3, latent_cost_weight=0.01)
    samples = [make_sample(i, m) for i, m in [(1, 3), (2, 0), (3, 2)]]
    batch = collate_samples(model, processor, samples)
    handle = fire_at(model, {0: [0], 2: [1]}) if stage == "C" else None
    try:
        with torch.no_grad():
            out = model.latent_loss(batch)
    finally:
        if handle is not None:
            handle.remove()
        set_stage(model, "A")
        set_latent_fields(model.config, latent_align_weight=1.0)
    p1 = out.latent
    if stage == "C":
        assert any(u < b for us, bs in zip(p1.latent_used_lens, batch["latent_budgets"]) for u, b in zip(us, bs))
    # every CoT image encoded on its own, in the order the samples list them
    grids = batch["cot_image_grid_thw"]
    sizes = [int(g.prod()) for g in grids]
    pixels = batch["cot_pixel_values"].split(sizes)
    with torch.no_grad():
        feats = [model.model.get_image_features(px, g[None]).pooler_output[0] for px, g in zip(pixels, grids)]
    first = np.cumsum([0] + [len(sample["cot_images"]) for sample in samples])
    costs = []
    for (b, col), vec in zip(p1.ce_patch_pos.tolist(), p1.ce_patch_vec):
        (k, (s, _e, img)), = [(k, seg) for k, seg in enumerate(sorted(batch["latent_segments"][b]))
                              if seg[0] <= col < seg[1]]
        used = p1.latent_used_lens[b][k]
        assert col - s < used  # only active slots are aligned
        target = _pooled_by_hand(feats[first[b] + img], used)[col - s]
        costs.append(1 - torch.nn.functional.cosine_similarity(vec, target, dim=0))
    assert len(costs) == sum(sum(u) for u in p1.latent_used_lens)
    assert out.align.item() == pytest.approx(torch.stack(costs).mean().item(), abs=1e-5)
    if stage == "A":
        assert out.stop == 0 and out.cost == 0
        want = out.ce + 0.7 * out.align
    else:
        assert out.stop > 0 and out.cost.item() == pytest.approx(np.mean([sum(u) for u in p1.latent_used_lens]))
        want = out.ce + 0.7 * out.align + 1.3 * out.stop + 0.01 * out.cost
    assert out.loss.item() == pytest.approx(want.item(), abs=1e-5)


def test_switching_to_stage_c_alone_trains_the_stop_head():
    """The config's own defaults (1.0, 1e-3) make ``latent_mode_stage="C"`` train the stop head."""
    model, processor = build_tiny_model(seed=0, num_layers=2)
    set_latent_fields(model.config, latent_budget_alpha=0.5, latent_budget_max=6)
    set_latent_fields(model.config, latent_mode_stage="C")
    out = model.latent_loss(collate_samples(model, processor, [make_sample(1, 3)]))
    assert out.stop > 0
    assert out.loss.item() == pytest.approx((out.ce + out.align + out.stop + 1e-3 * out.cost).item(), abs=1e-5)
    assert torch.autograd.grad(out.loss, model.latent_stop_head.weight)[0].abs().sum() > 0


def test_collator_and_model_merge_the_same_patches(tiny):
    """The collator's merge size is the model's: as many <|image_pad|> tokens per image as the vision
    tower returns features, and budgets from the same count; a processor that merges differently is refused."""
    from latentvl.budget import num_visual_tokens
    from latentvl.model.tiny import build_tiny_image_processor
    from latentvl.processor import LatentProcessor

    model, processor = tiny
    collator = LatentCollator(processor, model.config)
    assert collator.merge_size == model.config.vision_config.spatial_merge_size
    batch = collator([make_sample(i, m) for i, m in [(1, 2), (3, 1)]])
    with torch.no_grad():
        feats = model.model.get_image_features(batch["pixel_values"], batch["image_grid_thw"]).pooler_output
        cot = model.model.get_image_features(batch["cot_pixel_values"], batch["cot_image_grid_thw"]).pooler_output
    assert int((batch["input_ids"] == model.config.image_token_id).sum()) == sum(f.shape[0] for f in feats)
    s = LatentSettings.from_config(model.config)
    budgets = [b for per_sample in batch["latent_budgets"] for b in per_sample]
    assert [num_visual_tokens(g.tolist(), collator.merge_size) for g in batch["cot_image_grid_thw"]] == [
        f.shape[0] for f in cot]
    assert budgets == [compute_latent_budget(f.shape[0], s.latent_budget_alpha, s.latent_budget_gamma,
                                             s.latent_budget_min, s.latent_budget_max) for f in cot]
    other = build_tiny_image_processor()
    other.merge_size = 1
    with pytest.raises(ValueError, match="merge_size=1 .*spatial_merge_size=2"):
        LatentCollator(LatentProcessor(tokenizer=processor.tokenizer, image_processor=other), model.config)


def test_ce_gradient_flows_through_latent_vectors_only_when_used(tiny):
    model, processor = tiny
    set_stage(model, "A")
    set_latent_fields(model.config, latent_align_weight=0.0)
    try:
        batch = collate_samples(model, processor, [make_sample(1, 3)])
        out = model.latent_loss(batch)
        vec_grad = torch.autograd.grad(out.loss, out.latent.ce_patch_vec)[0]
        assert vec_grad.abs().sum() > 0
    finally:
        set_latent_fields(model.config, latent_align_weight=1.0)


def test_expected_cost_is_differentiable(tiny):
    model, processor = tiny
    set_stage(model, "C", latent_cost_mode="expected")
    set_latent_fields(model.config, latent_stop_loss_weight=0.0)
    try:
        batch = collate_samples(model, processor, [make_sample(1, 3)])
        out = model.latent_loss(batch)
        g = torch.autograd.grad(out.loss, model.latent_stop_head.bias)[0]
        assert g.item() < 0  # raising the stop bias lowers the expected length
    finally:
        set_stage(model, "A", latent_cost_mode="count")


@pytest.mark.parametrize("min_used", [1, 2, 4])
def test_min_used_raises_stop_labels_and_drops_early_decisions_from_the_expected_cost(min_used):
    """Stop labels start at ``max(target, m)`` (at most the budget), for the ratio target and given targets
    alike; the expected cost treats the first ``m - 1`` decisions as never stopping (no gradient there)."""
    from latentvl.model.losses import expected_length
    from latentvl.model.objective import _expected_cost, _stop_label_tensors

    settings = LatentSettings(latent_min_used=min_used, latent_stop_target_ratio=0.2)
    model = types.SimpleNamespace(latent_settings=settings)
    segs = [[(0, 5, 0), (6, 9, 1)]]  # budgets 5 and 3
    batch = {"input_ids": torch.zeros(1, 10, dtype=torch.long), "latent_segments": segs}
    logits = torch.linspace(-1.0, 1.0, 10)[None].requires_grad_(True)
    p1 = types.SimpleNamespace(stop_logits=logits)
    for targets in (None, [[1, 2]]):
        labels, weights = _stop_label_tensors(model, batch, p1, targets)
        first = [1, 1] if targets is None else targets[0]  # ratio 0.2: round(0.2 * 5) = 1, max(1, 0.6) = 1
        for (start, end, _i), t in zip(segs[0], first):
            t = min(end - start, max(t, min_used))
            assert labels[0, start:end].tolist() == [0.0] * (t - 1) + [1.0] * (end - start - t + 1)
            assert weights[0, start:end].tolist() == [1.0] * (end - start)
    cost = _expected_cost(model, batch, p1)
    probs = torch.sigmoid(logits[0].detach())
    want = 0.0
    for start, end, _i in segs[0]:
        seg = probs[start:end].clone()
        seg[: min_used - 1] = 0.0
        want += float(expected_length(seg))
    assert cost.item() == pytest.approx(want, rel=1e-6)
    grad = torch.autograd.grad(cost, logits)[0][0]
    for start, end, _i in segs[0]:
        early = grad[start:start + min(min_used - 1, end - start)]
        assert early.abs().sum() == 0
        assert grad[start:end].abs().sum() > 0 or min_used > end - start


def test_overfit_four_samples():
    model, processor = build_tiny_model(seed=1)
    set_latent_fields(model.config, latent_budget_alpha=0.5, latent_budget_gamma=0.5, latent_budget_max=4)
    model.train()
    batch = collate_samples(model, processor, [make_sample(i, m) for i, m in [(0, 1), (1, 2), (2, 0), (3, 1)]])
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(40):
        out = model.latent_loss(batch)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())
    assert losses[-1] < 0.3 * losses[0]


@pytest.mark.parametrize("stage", ["A", "C"])
def test_latent_loss_under_bf16_autocast(tiny, stage, one_thread):
    """The trainer's default on a GPU (bf16 autocast over float32 weights), here on the CPU: both passes
    and the K/V store's backward run, with finite gradients, and the loss stays near the float32 one."""
    model, processor = tiny
    set_stage(model, stage)
    batch = collate_samples(model, processor, [make_sample(i, m) for i, m in MIXED])
    try:
        ref = model.latent_loss(batch).loss.item()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model.latent_loss(batch)
        out.loss.backward()
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        assert len(grads) > 50 and all(torch.isfinite(g).all() for g in grads)
        assert any(g.abs().max() > 0 for g in grads)
        assert out.loss.item() == pytest.approx(ref, rel=0.05)
    finally:
        model.zero_grad(set_to_none=True)
        set_stage(model, "A")


def test_bf16_weights_give_the_float32_gradients_to_bf16_precision(one_thread):
    """A model held in bf16 (as FSDP's bf16 policy or a bf16 checkpoint runs it): the K/V store keeps bf16
    keys and values, accumulates their gradients in float32, and the gradient matches float32's."""
    grads = {}
    for dtype in (torch.float32, torch.bfloat16):
        model, processor = build_tiny_model(seed=0)
        model = model.to(dtype)
        batch = collate_samples(model, processor, [make_sample(i, m) for i, m in MIXED])
        batch = {k: v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v for k, v in batch.items()}
        model.latent_loss(batch).loss.backward()
        grads[dtype] = torch.cat([p.grad.float().flatten() for p in model.model.language_model.parameters()])
    a, b = grads[torch.float32], grads[torch.bfloat16]
    assert torch.isfinite(b).all()
    assert torch.nn.functional.cosine_similarity(a, b, dim=0) > 0.99
    assert (a - b).norm() / a.norm() < 0.05


# ---------------------------------------------------------------- latent_full_budget_ce_weight (D18)
@pytest.mark.parametrize("name", ["latent_full_budget_ce_weight", "latent_full_budget_align_weight"])
@pytest.mark.parametrize("value", [-0.5, True, "1", None])
def test_full_budget_weights_are_numbers_at_least_zero(name, value):
    assert getattr(LatentSettings(), name) == 0.0
    with pytest.raises(LatentConfigError, match=name):
        LatentSettings(**{name: value}).validate()


HALT_EARLY = {0: [0], 2: [1]}  # stop-head calls where rows fire: sample 0 after its first slot, 1 after its third


def _stage_c(model, batch, weight: float, training: bool = True, **extra):
    """``latent_loss`` in stage C with ``latent_full_budget_ce_weight=weight`` and early stops (HALT_EARLY),
    the model in training mode (or not); its stage and mode are restored."""
    set_stage(model, "C", latent_full_budget_ce_weight=weight, **extra)
    handle = fire_at(model, HALT_EARLY)
    was_training = model.training
    model.train(training)
    try:
        return model.latent_loss(batch)
    finally:
        model.train(was_training)
        handle.remove()
        set_stage(model, "A", latent_full_budget_ce_weight=0.0, latent_full_budget_align_weight=0.0,
                  latent_stop_target_mode="ratio")


def test_full_budget_ce_is_stage_a_ce_and_adds_to_the_stage_c_loss(tiny):
    """In stage-C training ``ce_full`` is the CE with every slot active (stage A's CE on the same batch), the
    halted CE is unchanged, and the total grows by exactly ``w * ce_full``; stage A and evaluation ignore
    the weight."""
    model, processor = tiny
    batch = collate_samples(model, processor, [make_sample(i, m) for i, m in [(1, 3), (2, 2), (3, 1)]])
    was_training = model.training
    model.train()  # stage A in training: no teacher forcing or tail dropout in the fixture, so deterministic
    try:
        with torch.no_grad():
            set_stage(model, "A", latent_full_budget_ce_weight=2.0)
            a = model.latent_loss(batch)
            set_stage(model, "A", latent_full_budget_ce_weight=0.0)
            a0 = model.latent_loss(batch)
            off, on = _stage_c(model, batch, 0.0), _stage_c(model, batch, 1.5)
            evaluated = _stage_c(model, batch, 1.5, training=False)
    finally:
        model.train(was_training)
    assert a.ce_full == 0 and a.loss == a0.loss
    assert evaluated.ce_full == 0 and evaluated.loss == off.loss  # a training signal only
    assert off.ce_full == 0
    assert on.latent.latent_used_lens == off.latent.latent_used_lens
    assert any(u < b for us, bs in zip(on.latent.latent_used_lens, batch["latent_budgets"]) for u, b in zip(us, bs))
    assert on.ce_full.item() == pytest.approx(a.ce.item(), abs=1e-5)
    assert abs(on.ce.item() - on.ce_full.item()) > 1e-4  # the stops changed the halted answer
    assert on.ce == off.ce and on.stop == off.stop
    assert on.loss.item() == pytest.approx((off.loss + 1.5 * on.ce_full).item(), abs=1e-5)


@pytest.mark.parametrize("field", ["latent_full_budget_ce_weight", "latent_full_budget_align_weight"])
def test_full_budget_gradient_is_linear_in_its_weight_and_spares_the_stop_head(tiny, field):
    """grad(L_w) = grad(L_0) + w * grad(part) for either full-budget weight (D18's CE, D20's alignment):
    nonzero on the language model, zero on the stop head (a full budget never consults it)."""
    model, processor = tiny
    batch = collate_samples(model, processor, [make_sample(i, m) for i, m in [(1, 3), (2, 2)]])
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    params = [p for _n, p in named]
    grads = {}
    for w in (0.0, 1.0, 3.0):
        ce_weight, extra = (w, {}) if field == "latent_full_budget_ce_weight" else (0.0, {field: w})
        out = _stage_c(model, batch, ce_weight, **extra)
        grads[w] = [g if g is not None else torch.zeros_like(p)
                    for g, p in zip(torch.autograd.grad(out.loss, params, allow_unused=True), params)]
    moved = 0.0
    for (name, _p), g0, g1, g3 in zip(named, grads[0.0], grads[1.0], grads[3.0]):
        d1, d3 = g1 - g0, g3 - g0
        torch.testing.assert_close(d3, 3 * d1, atol=1e-5, rtol=1e-3, msg=name)
        if "latent_stop_head" in name:
            assert d1.abs().max() < 1e-7, name
        elif "language_model" in name:
            moved += float(d1.abs().sum())
    assert moved > 0


def test_answer_stop_targets_reuse_the_full_budget_pass(tiny):
    """With the weight on, the answer stop targets come from the full-budget CE's own pass 1: the same
    targets, that pass's model calls not spent twice."""
    model, processor = tiny
    batch = collate_samples(model, processor, [make_sample(i, m) for i, m in [(1, 3), (2, 2), (3, 1)]])
    with torch.no_grad():
        off = _stage_c(model, batch, 0.0, latent_stop_target_mode="answer")
        on = _stage_c(model, batch, 1.0, latent_stop_target_mode="answer")
    assert on.stop_targets == off.stop_targets and on.stop_targets is not None
    assert on.stop.item() == pytest.approx(off.stop.item(), abs=1e-6)
    assert off.target_model_calls - on.target_model_calls == on.latent.num_model_calls > 0


# ---------------------------------------------------------------- latent_full_budget_align_weight (D19)
def test_full_budget_alignment_is_stage_a_alignment_and_adds_to_the_stage_c_loss(tiny):
    """In stage-C training ``align_full`` is the alignment loss with every slot active against the CoT image
    pooled into the full budget (stage A's alignment on the same batch), nothing else changes, and the total
    grows by exactly ``w * align_full``; stage A and evaluation ignore the weight."""
    model, processor = tiny
    batch = collate_samples(model, processor, [make_sample(i, m) for i, m in [(1, 3), (2, 2), (3, 1)]])
    was_training = model.training
    model.train()
    try:
        with torch.no_grad():
            set_stage(model, "A", latent_full_budget_align_weight=2.0)
            a = model.latent_loss(batch)
            set_stage(model, "A", latent_full_budget_align_weight=0.0)
            a0 = model.latent_loss(batch)
            off = _stage_c(model, batch, 0.0)
            on = _stage_c(model, batch, 0.0, latent_full_budget_align_weight=1.5)
            evaluated = _stage_c(model, batch, 0.0, training=False, latent_full_budget_align_weight=1.5)
    finally:
        model.train(was_training)
    assert a.align_full == 0 and a.loss == a0.loss and a.align > 0
    assert evaluated.align_full == 0 and evaluated.loss == off.loss  # a training signal only
    assert off.align_full == 0 and on.ce_full == 0
    assert any(u < b for us, bs in zip(on.latent.latent_used_lens, batch["latent_budgets"]) for u, b in zip(us, bs))
    assert on.align_full.item() == pytest.approx(a.align.item(), rel=1e-5)
    assert on.ce == off.ce and on.align == off.align and on.stop == off.stop
    assert on.loss.item() == pytest.approx((off.loss + 1.5 * on.align_full).item(), abs=1e-5)
