"""Stage C's stop labels and stop targets: what the stop head is trained towards, wired inside the model."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from latentvl import LatentCollator, build_tiny_model, set_latent_fields


@pytest.fixture(scope="module")
def tiny():
    model, processor = build_tiny_model(seed=0)
    set_latent_fields(model.config, latent_budget_alpha=0.5, latent_budget_gamma=0.5, latent_budget_max=6)
    return model, processor


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
                      latent_stop_target_ratio=0.7)


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
