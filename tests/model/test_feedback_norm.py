"""``latent_feedback_norm``: the fed-back hidden state enters its slot at unit RMS times a learned gain."""

from __future__ import annotations

import pytest
import torch
from helpers import lora_trained_copies, rand_image, run_pass1, save_and_load

from latentvl import LatentCollator, LatentSettings, set_latent_fields
from latentvl.errors import LatentConfigError

TINY_LATENT = {"latent_budget_alpha": 1.0, "latent_budget_gamma": 0.5, "latent_budget_max": 3}  # `fresh_tiny`


def _batch(model, processor):
    samples = [
        {"id": f"s{i}", "question": f"Q{i}?", "images": [rand_image(56, 56, i)],
         "cot_images": [rand_image(56, 56, 100 + i + k) for k in range(1 + i)], "answer": "AB"[: 1 + i]}
        for i in range(2)
    ]
    return LatentCollator(processor, model.config)(samples)


def _rms(x: torch.Tensor) -> torch.Tensor:
    return x.float().pow(2).mean(-1).sqrt()


def test_field_defaults_off_and_must_be_bool():
    assert LatentSettings().latent_feedback_norm is False
    with pytest.raises(LatentConfigError, match="latent_feedback_norm"):
        LatentSettings(latent_feedback_norm=1).validate()


def test_gain_starts_at_the_embedding_init_scale(fresh_tiny):
    model, _ = fresh_tiny
    std = model.config.text_config.initializer_range
    assert torch.allclose(model.latent_feedback_gain.weight, torch.full_like(model.latent_feedback_gain.weight, std))


def test_slot_inputs_are_the_normalised_hidden_states(fresh_tiny):
    """Every active slot's input has RMS 1 over the gain; the first slot of each sample (fed from the same
    prefix either way) is exactly the gain applied to the raw hidden state of the default pass."""
    model, processor = fresh_tiny
    batch = _batch(model, processor)
    with torch.no_grad():
        model.latent_feedback_gain.weight.copy_(torch.linspace(0.01, 0.05, model.latent_feedback_gain.weight.numel()))
        raw = run_pass1(model, batch)
        set_latent_fields(model.config, latent_feedback_norm=True)
        normed = run_pass1(model, batch)
    gain = model.latent_feedback_gain.weight.detach()
    assert torch.allclose(_rms(normed.ce_patch_vec / gain), torch.ones(normed.ce_patch_vec.shape[0]), atol=1e-4)
    assert _rms(raw.ce_patch_vec).min() > 10 * _rms(normed.ce_patch_vec).max()  # the default feeds it raw
    first = [0, 2]  # rows of the first slot of sample 0 and sample 1 (budgets 2 and 2 + 2)
    assert raw.ce_patch_pos[first, 0].tolist() == [0, 1]
    expected = model.latent_feedback_gain(raw.ce_patch_vec[first])
    torch.testing.assert_close(normed.ce_patch_vec[first], expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("stage", ["A", "C"])
def test_training_reaches_the_gain(fresh_tiny, stage):
    model, processor = fresh_tiny
    weights = {"latent_stop_loss_weight": 1.0, "latent_cost_weight": 1e-3} if stage == "C" else {}
    set_latent_fields(model.config, latent_feedback_norm=True, latent_mode_stage=stage, **weights)
    model.train()
    model.latent_loss(_batch(model, processor)).loss.backward()
    grad = model.latent_feedback_gain.weight.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().max() > 0


def test_pause_tokens_ignore_the_gain(fresh_tiny):
    model, processor = fresh_tiny
    set_latent_fields(model.config, latent_feedback=False, latent_feedback_norm=True)
    with torch.no_grad():
        vec = run_pass1(model, _batch(model, processor)).ce_patch_vec
    pause = model.latent_pause_embedding.weight[0].detach()
    assert torch.equal(vec, pause.expand_as(vec))


def test_gain_survives_save_and_load_and_trains_under_lora(fresh_tiny, tmp_path):
    model, processor = fresh_tiny
    set_latent_fields(model.config, latent_feedback_norm=True)
    with torch.no_grad():
        model.latent_feedback_gain.weight.fill_(0.125)
    loaded = save_and_load(model, processor, tmp_path / "m")
    assert loaded.config.latent_feedback_norm is True
    assert torch.equal(loaded.latent_feedback_gain.weight, model.latent_feedback_gain.weight)
    trained = lora_trained_copies(model, _batch(model, processor), "latent_feedback_gain")
    assert trained, "the feedback gain has no trainable copy under LoRA"
    assert all(p.grad is not None and p.grad.abs().max() > 0 for p in trained)
