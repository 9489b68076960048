"""Stage C's stop labels and stop targets: what the stop head is trained towards, wired inside the model."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import fire_at, patched_embeds
from PIL import Image

from latentvl import LatentCollator, set_latent_fields

TINY_LATENT = {"latent_budget_alpha": 0.5, "latent_budget_gamma": 0.5, "latent_budget_max": 6}  # the `tiny` fixture


def _image(w: int, h: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((h, w, 3)) * 255).astype("uint8"))


def _sample(i: int, cot_sizes: list[tuple[int, int]]) -> dict:
    return {
        "id": f"s{i}",
        "question": f"Q{i}?",
        "images": [_image(84, 56, seed=100 + i)],
        "cot_images": [_image(w, h, seed=200 + 10 * i + k) for k, (w, h) in enumerate(cot_sizes)],
        "answer": "ABCD"[: 1 + i % 4],
    }


SIZES = [[(224, 224), (280, 224)], [(112, 112)], [(280, 280), (56, 56), (224, 168)]]


def _batch(model, processor):
    return LatentCollator(processor, model.config)([_sample(i, s) for i, s in enumerate(SIZES)])


def _stage_c(model, **extra):
    set_latent_fields(model.config, latent_mode_stage="C", latent_stop_loss_weight=1.0, latent_cost_weight=1e-3,
                      **extra)


def _stage_a(model):
    set_latent_fields(model.config, latent_mode_stage="A", latent_stop_loss_weight=0.0, latent_cost_weight=0.0,
                      latent_stop_target_ratio=0.7, latent_stop_target_mode="ratio", latent_stop_target_tolerance=0.1,
                      latent_stop_target_points=8)


@torch.no_grad()
def test_stop_labels_inside_latent_loss_cover_every_stepped_slot(tiny):
    """The stop loss latent_loss reports, recomputed from its stop logits with labels written by hand.

    Threshold 0 stops every segment after its first slot, so a loss over the taken steps only would
    see one label per segment; the design note labels every slot the pass stepped.
    """
    model, processor = tiny
    _stage_c(model, latent_stop_target_ratio=0.5)
    try:
        batch = _batch(model, processor)
        out = model.latent_loss(batch, threshold=0.0)
        assert all(u == 1 for us in out.latent.latent_used_lens for u in us)  # every segment stopped at once
        terms = []
        for b, segs in enumerate(batch["latent_segments"]):
            for start, end, _img in segs:
                budget = end - start
                t = max(1, math.floor(0.5 * budget + 0.5))
                for k in range(budget):
                    logit = out.latent.stop_logits[b, start + k]
                    label = 0.0 if k < t - 1 else 1.0
                    terms.append(F.binary_cross_entropy_with_logits(logit, torch.tensor(label)).item())
        assert len(terms) == sum(batch["latent_budget_total"]) > sum(map(len, batch["latent_segments"]))
        assert out.stop.item() == pytest.approx(sum(terms) / len(terms), rel=1e-5)
    finally:
        _stage_a(model)


# ---------------------------------------------------------------- the content-aware target, by hand


@pytest.mark.parametrize(
    "lengths, losses, full, budget, tol, target",
    [
        ([1, 2, 3], [2.0, 1.2, 1.05], 1.0, 4, 0.1, 3),  # shortest within tolerance
        ([1, 2, 3], [2.0, 1.1, 1.05], 1.0, 4, 0.1, 2),  # exactly at the tolerance counts
        ([1, 2, 3], [2.0, 1.5, 1.3], 1.0, 4, 0.1, 4),  # only the full budget is good enough
        ([1, 2, 3], [0.7, 0.7, 0.7], 0.7, 4, 0.0, 1),  # no length helps: the fewest latents
        ([1, 2, 3], [3.0, 3.0, 3.0], 3.0, 4, 0.1, 1),  # wrong at every length alike: nothing helps either
        ([1, 2, 3], [0.5, 0.9, 0.95], 1.0, 4, 0.0, 1),  # a shorter segment even does better
        ([1, 2, 3, 4], [2.0, 1.0, 1.5, 1.0], 1.0, 5, 0.0, 4),  # right at 2 by coincidence, wrong at 3: settled at 4
        ([4, 1, 3, 2], [1.0, 2.0, 1.0, 1.0], 1.0, 5, 0.0, 2),  # candidates in any order
        ([1, 2, 3, 4], [1.0, 1.0, 1.0, 1.5], 1.0, 5, 0.0, 5),  # the longest tried length breaks it: full budget
        ([2, 2, 1], [1.0, 1.0, 1.4], 1.0, 3, 0.1, 2),  # repeated candidates
        ([3, 3, 3], [1.0, 1.0, 1.0], 1.0, 3, 0.0, 3),  # padded with the budget itself
    ],
)
def test_answer_stop_target_on_hand_made_losses(lengths, losses, full, budget, tol, target):
    from latentvl.model.losses import answer_stop_target

    assert answer_stop_target(lengths, losses, full, budget, tol) == target


def test_answer_stop_target_rejects_bad_input():
    from latentvl.model.losses import answer_stop_target

    with pytest.raises(ValueError, match="2 lengths but 1 losses"):
        answer_stop_target([1, 2], [1.0], 1.0, 3, 0.1)
    with pytest.raises(ValueError, match="truncated length 4"):
        answer_stop_target([4], [1.0], 1.0, 3, 0.1)


@pytest.mark.parametrize(
    "budget, points, expected",
    [
        (1, 3, [1, 1, 1]),
        (4, 8, [1, 2, 3, 4, 4, 4, 4, 4]),
        (9, 8, [1, 2, 3, 4, 5, 6, 7, 8]),
        (16, 8, [1, 3, 5, 7, 9, 11, 13, 15]),
        (32, 8, [1, 5, 10, 14, 18, 22, 27, 31]),
        (32, 1, [1]),
    ],
)
def test_answer_target_candidates(budget, points, expected):
    from latentvl.model.losses import answer_target_candidates

    got = answer_target_candidates(budget, points)
    assert got == expected and len(got) == points


def test_stop_labels_for_length():
    from latentvl.model.losses import stop_labels_for_length

    assert stop_labels_for_length(4, 1) == [1, 1, 1, 1]
    assert stop_labels_for_length(4, 3) == [0, 0, 1, 1]
    assert stop_labels_for_length(4, 4) == [0, 0, 0, 1]
    with pytest.raises(ValueError, match="stop target 5"):
        stop_labels_for_length(4, 5)


@pytest.mark.parametrize("field, value", [
    ("latent_stop_target_mode", "oracle"),
    ("latent_stop_target_tolerance", -0.1),
    ("latent_stop_target_points", 0),
    ("latent_stop_target_points", 2.5),
])
def test_stop_target_fields_validated(field, value):
    from latentvl import LatentSettings
    from latentvl.errors import LatentConfigError

    with pytest.raises(LatentConfigError, match=field):
        LatentSettings().replace(**{field: value}).validate()


# ---------------------------------------------------------------- the content-aware target, in the model


def _independent_answer_losses(model, batch):
    """Answer CE of every sample for every truncation of every segment, one sample and one length at a time.

    The latents come from a stage-A pass 1 (every slot active); the truncated slots are masked in a
    plain pass-2 forward through the model's public keywords.
    """
    set_latent_fields(model.config, latent_mode_stage="A", latent_stop_loss_weight=0.0, latent_cost_weight=0.0)
    try:
        p1 = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   pixel_values=batch["pixel_values"], image_grid_thw=batch["image_grid_thw"],
                   mm_token_type_ids=batch["mm_token_type_ids"], latent_mode=True,
                   latent_segments=batch["latent_segments"], latent_budgets=batch["latent_budgets"])
    finally:
        _stage_c(model)
    embeds = patched_embeds(model, batch, p1)

    def ce(b, mask):
        return model(inputs_embeds=embeds[b:b + 1], attention_mask=batch["attention_mask"][b:b + 1],
                     position_ids=p1.position_ids[:, b:b + 1], latent_kv_mask=mask[None],
                     labels=batch["labels"][b:b + 1]).loss.item()

    full, trunc = [], []
    for b, segs in enumerate(batch["latent_segments"]):
        keep = torch.ones(batch["input_ids"].shape[1], dtype=torch.bool)
        full.append(ce(b, keep))
        per_seg = []
        for start, end, _img in segs:
            row = {}
            for length in range(1, end - start):
                mask = keep.clone()
                mask[start + length:end] = False
                row[length] = ce(b, mask)
            per_seg.append(row)
        trunc.append(per_seg)
    return full, trunc


def _tolerance_away_from_every_gap(full, trunc) -> float:
    """A tolerance in the middle of the widest gap between the observed CE differences (no near-ties)."""
    gaps = sorted({round(loss - full[b], 9) for b, segs in enumerate(trunc) for row in segs for loss in row.values()})
    inner = [g for g in gaps if g > 0]
    assert len(inner) >= 3
    pairs = list(zip(inner[:-1], inner[1:]))
    lo, hi = max(pairs[: len(pairs) // 2 + 1], key=lambda p: p[1] - p[0])  # a gap in the lower half
    return (lo + hi) / 2


# points=2: budgets 4 and 5 are searched on the grid [1, 3] and [1, 4]; budget 2 tries its one length
GRID = {2: {1: [], 2: [1], 4: [1, 3], 5: [1, 4]}}


@pytest.mark.parametrize("points", [8, 2])
@torch.no_grad()
def test_answer_targets_and_labels_inside_latent_loss_recomputed_independently(tiny, points):
    model, processor = tiny
    _stage_c(model, latent_stop_target_mode="answer", latent_stop_target_points=points)
    try:
        batch = _batch(model, processor)
        full, trunc = _independent_answer_losses(model, batch)
        tol = _tolerance_away_from_every_gap(full, trunc)
        _stage_c(model, latent_stop_target_mode="answer", latent_stop_target_tolerance=tol)
        out = model.latent_loss(batch, threshold=0.0)
        expected = []
        for b, segs in enumerate(batch["latent_segments"]):
            row = []
            for (start, end, _img), losses in zip(segs, trunc[b]):
                tried = GRID[points][end - start] if points in GRID else range(1, end - start)
                good = [n for n in tried if losses[n] <= full[b] + tol]
                row.append(min(good, default=end - start))
            expected.append(row)
        assert out.stop_targets == expected
        assert len({t for row in expected for t in row}) >= 2  # the targets differ between segments
        assert any(t < end - start for row, segs in zip(expected, batch["latent_segments"])
                   for t, (start, end, _i) in zip(row, segs))  # and some truncation is good enough
        # the stop loss uses those targets on every slot
        terms = []
        for b, segs in enumerate(batch["latent_segments"]):
            for (start, end, _img), t in zip(segs, expected[b]):
                for k in range(end - start):
                    label = torch.tensor(0.0 if k < t - 1 else 1.0)
                    terms.append(F.binary_cross_entropy_with_logits(out.latent.stop_logits[b, start + k], label))
        assert out.stop.item() == pytest.approx(torch.stack(terms).mean().item(), rel=1e-5)
    finally:
        _stage_a(model)


def _count_calls(module):
    count = {"n": 0}

    def hook(*_args):
        count["n"] += 1

    return count, module.register_forward_hook(hook)




@torch.no_grad()
def test_extra_model_calls_do_not_depend_on_where_samples_halt(tiny):
    model, processor = tiny
    _stage_c(model, latent_stop_target_mode="answer", latent_stop_target_points=3)
    try:
        batch = _batch(model, processor)
        M = max(map(len, batch["latent_segments"]))
        counts, used, reported = [], [], []
        for schedule in ({}, {0: [0, 1, 2]}, {1: [2], 3: [0], 9: [1]}):
            count, handle = _count_calls(model.model.language_model)
            fire = fire_at(model, schedule)
            try:
                out = model.latent_loss(batch)
            finally:
                handle.remove()
                fire.remove()
            counts.append(count["n"])
            used.append(str(out.latent.latent_used_lens))
            reported.append(out.target_model_calls)
        assert len(set(used)) == 3  # three different halting patterns
        assert len(set(counts)) == 1 and len(set(reported)) == 1
        p1_calls = out.latent.num_model_calls
        assert reported[0] == p1_calls + 1 + M  # full-budget pass 1, the reference, one call per segment index
        assert counts[0] == p1_calls + 1 + reported[0]  # plus the halting pass 1 and pass 2
    finally:
        _stage_a(model)


@torch.no_grad()
def test_ratio_mode_makes_no_extra_calls(tiny):
    model, processor = tiny
    _stage_c(model)
    try:
        batch = _batch(model, processor)
        count, handle = _count_calls(model.model.language_model)
        try:
            out = model.latent_loss(batch)
        finally:
            handle.remove()
        assert out.stop_targets is None and out.target_model_calls == 0
        assert count["n"] == out.latent.num_model_calls + 1
    finally:
        _stage_a(model)
