"""``latent_feedback=False``: pause tokens, the control arm of latent thoughts.

The latent slots stay where they are (same layout, positions, gating and stop head), but each slot's input
is one learned vector (``latent_pause_embedding``) instead of the previous position's hidden state.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import lora_trained_copies, save_and_load
from PIL import Image

from latentvl import LatentCollator, LatentSettings, set_latent_fields
from latentvl.errors import LatentConfigError

TINY_LATENT = {"latent_budget_alpha": 1.0, "latent_budget_gamma": 0.5, "latent_budget_max": 3}  # `fresh_tiny`


def _image(w: int, h: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((h, w, 3)) * 255).astype("uint8"))


def _batch(model, processor, seed: int = 0):
    samples = [
        {
            "id": f"s{i}",
            "question": f"Q{i + seed}?",
            "images": [_image(56, 56, seed * 10 + i)],
            "cot_images": [_image(56, 56, 100 + seed * 10 + i + k) for k in range(1 + i)],
            "answer": "AB"[: 1 + i],
        }
        for i in range(2)
    ]
    return LatentCollator(processor, model.config)(samples)


def _pass1(model, batch):
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                 pixel_values=batch["pixel_values"], image_grid_thw=batch["image_grid_thw"],
                 mm_token_type_ids=batch["mm_token_type_ids"], latent_mode=True,
                 latent_segments=batch["latent_segments"], latent_budgets=batch["latent_budgets"])


def test_feedback_field_defaults_on_and_must_be_bool():
    assert LatentSettings().latent_feedback is True
    with pytest.raises(LatentConfigError, match="latent_feedback"):
        LatentSettings(latent_feedback="no").validate()


def test_pause_slots_hold_the_pause_embedding_whatever_the_input(fresh_tiny):
    model, processor = fresh_tiny
    set_latent_fields(model.config, latent_feedback=False)
    pause = model.latent_pause_embedding.weight[0].detach()
    with torch.no_grad():
        vec_a = _pass1(model, _batch(model, processor, seed=0)).ce_patch_vec
        vec_b = _pass1(model, _batch(model, processor, seed=3)).ce_patch_vec
    assert vec_a.shape[0] == 2 + 2 * 2  # budgets of 2 per 56x56 CoT image, 1 + 2 images
    assert torch.equal(vec_a, pause.expand_as(vec_a))
    assert torch.equal(vec_a, vec_b)  # other images and questions: the same slot inputs
    set_latent_fields(model.config, latent_feedback=True)
    with torch.no_grad():
        fed = _pass1(model, _batch(model, processor, seed=0)).ce_patch_vec
    assert not torch.allclose(fed, pause.expand_as(fed))


def test_no_hidden_state_reaches_the_next_slot(fresh_tiny):
    """The slot inputs have no gradient path to the language model: nothing computed is fed back."""
    model, processor = fresh_tiny
    set_latent_fields(model.config, latent_feedback=False)
    out = _pass1(model, _batch(model, processor))
    weights = [p for p in model.model.language_model.parameters()]
    grads = torch.autograd.grad(out.ce_patch_vec.sum(), [*weights, model.latent_pause_embedding.weight],
                                allow_unused=True)
    assert all(g is None or g.abs().max() == 0 for g in grads[:-1])
    assert grads[-1] is not None and grads[-1].abs().max() > 0


@pytest.mark.parametrize("stage", ["A", "C"])
def test_training_loss_reaches_the_pause_embedding(fresh_tiny, stage):
    model, processor = fresh_tiny
    weights = {"latent_stop_loss_weight": 1.0, "latent_cost_weight": 1e-3} if stage == "C" else {}
    set_latent_fields(model.config, latent_feedback=False, latent_align_weight=0.0, latent_mode_stage=stage,
                      **weights)
    model.train()
    out = model.latent_loss(_batch(model, processor))
    out.loss.backward()
    grad = model.latent_pause_embedding.weight.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().max() > 0
    assert float(out.align) == 0.0


def test_pause_embedding_survives_save_and_load(fresh_tiny, tmp_path):
    model, processor = fresh_tiny
    set_latent_fields(model.config, latent_feedback=False)
    with torch.no_grad():
        model.latent_pause_embedding.weight.fill_(0.25)
    loaded = save_and_load(model, processor, tmp_path / "m")
    assert loaded.config.latent_feedback is False
    assert torch.equal(loaded.latent_pause_embedding.weight, model.latent_pause_embedding.weight)


def test_lora_trains_the_pause_embedding(fresh_tiny):
    """Under LoRA the pause vector is one of the modules saved in full: the loss reaches its trainable copy."""
    model, processor = fresh_tiny
    set_latent_fields(model.config, latent_feedback=False, latent_align_weight=0.0)
    trained = lora_trained_copies(model, _batch(model, processor), "latent_pause_embedding")
    assert trained, "the pause embedding has no trainable copy under LoRA"
    assert all(p.grad is not None and p.grad.abs().max() > 0 for p in trained)


def test_pause_pass_without_model_calls_equals_the_step_loop(fresh_tiny, monkeypatch):
    """At fixed budgets pass 1 of pause tokens makes no model call; its slot inputs, gating, loss and every
    gradient equal those of the step loop, which runs when the skip is turned off."""
    from latentvl.model import pass1

    model, processor = fresh_tiny
    set_latent_fields(model.config, latent_feedback=False, latent_align_weight=0.0, latent_mode_stage="A")
    model.train()
    batch = _batch(model, processor)

    def run():
        model.zero_grad()
        out = model.latent_loss(batch)
        out.loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return out, grads

    fast, fast_grads = run()
    assert fast.latent.num_model_calls == 0
    monkeypatch.setattr(pass1, "reads_hidden_states", lambda settings, stage_c: True)
    loop, loop_grads = run()
    assert loop.latent.num_model_calls > 0
    assert torch.equal(fast.latent.ce_patch_pos, loop.latent.ce_patch_pos)
    assert torch.equal(fast.latent.ce_patch_vec, loop.latent.ce_patch_vec)
    assert torch.equal(fast.latent.latent_kv_mask, loop.latent.latent_kv_mask)
    assert fast.latent.latent_used_lens == loop.latent.latent_used_lens
    assert torch.allclose(fast.loss, loop.loss, rtol=1e-6, atol=1e-7)
    assert fast_grads.keys() == loop_grads.keys() and "latent_pause_embedding.weight" in fast_grads
    for name, g in fast_grads.items():
        assert torch.allclose(g, loop_grads[name], rtol=1e-5, atol=1e-7), name


def test_pause_pass_applies_the_step_override_without_model_calls(fresh_tiny):
    """Interventions (``latent_step_override``) still replace the slot inputs when pass 1 makes no call."""
    model, processor = fresh_tiny
    set_latent_fields(model.config, latent_feedback=False)
    batch = _batch(model, processor)
    model.latent_step_override = lambda x, rows, cols: torch.full_like(x, 0.5)
    try:
        with torch.no_grad():
            out = _pass1(model, batch)
    finally:
        model.latent_step_override = None
    assert out.num_model_calls == 0 and torch.equal(out.ce_patch_vec, torch.full_like(out.ce_patch_vec, 0.5))
