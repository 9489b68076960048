"""The KV cache reaches the model under the installed transformers' keyword and under the other one."""

from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import DynamicCache, Qwen2_5_VLForConditionalGeneration

from latentvl import LatentCollator
from latentvl.model.compat import CACHE_KWARG, enable_activation_checkpointing, output_cache, resolve_cache

TINY_LATENT = {"latent_budget_alpha": 0.5, "latent_budget_gamma": 0.5, "latent_budget_max": 4}  # the `tiny` fixture


def _batch(model, processor):
    rng = np.random.default_rng(0)

    def image(w, h):
        return Image.fromarray((rng.random((h, w, 3)) * 255).astype("uint8"))

    samples = [
        {"id": "a", "question": "Q1?", "images": [image(84, 56)], "cot_images": [image(56, 56), image(84, 56)],
         "answer": "AB"},
        {"id": "b", "question": "Q2?xx", "images": [image(56, 84)], "cot_images": [image(84, 84)], "answer": "C"},
    ]
    return LatentCollator(processor, model.config, padding_side="left")(samples)


def test_cache_keyword_is_the_installed_forward_keyword():
    params = inspect.signature(Qwen2_5_VLForConditionalGeneration.forward).parameters
    assert CACHE_KWARG in params and CACHE_KWARG in {"cache", "past_key_values"}


def test_resolve_cache_takes_either_name_and_rejects_both():
    c = DynamicCache()
    assert resolve_cache(c, None) is c and resolve_cache(None, c) is c and resolve_cache(None, None) is None
    with pytest.raises(TypeError, match="not both"):
        resolve_cache(c, DynamicCache())


@pytest.mark.parametrize("keyword", ["cache", "past_key_values"])
@torch.no_grad()
def test_cached_step_with_patches_and_gating_equals_the_full_forward(tiny, keyword):
    """Prefill (patches placed, some latent slots gated out), then one cached step with the cache given
    as ``keyword``: the step's logits equal the full forward's at that position, and the output hands
    the grown cache back."""
    model, processor = tiny
    model.set_latent_attention("latent_sdpa")
    batch = _batch(model, processor)
    ids, att = batch["input_ids"], batch["attention_mask"]
    latent = ids == model.config.latent_token_id
    g = torch.Generator().manual_seed(0)
    drop = latent & (torch.rand(ids.shape, generator=g) < 0.5)
    assert drop.any() and (latent & ~drop).any()
    kv_mask = ~drop
    pos = latent.nonzero()
    vec = torch.randn(pos.shape[0], model.config.text_config.hidden_size, generator=g)
    common = {"pixel_values": batch["pixel_values"], "image_grid_thw": batch["image_grid_thw"],
              "ce_patch_pos": pos, "ce_patch_vec": vec}
    full = model(input_ids=ids, attention_mask=att, mm_token_type_ids=batch["mm_token_type_ids"],
                 latent_kv_mask=kv_mask, **common).logits
    positions = model.compute_position_ids(ids, att, batch["mm_token_type_ids"], batch["image_grid_thw"])

    prefill = model(input_ids=ids[:, :-1], attention_mask=att[:, :-1],
                    mm_token_type_ids=batch["mm_token_type_ids"][:, :-1], latent_kv_mask=kv_mask[:, :-1],
                    use_cache=True, **common)
    cache = output_cache(prefill)
    assert cache is not None and cache.get_seq_length() == ids.shape[1] - 1
    real = att[:, :-1].bool()  # padding positions attend to nothing real: their logits mean nothing
    assert (prefill.logits - full[:, :-1])[real].abs().max().item() <= 1e-5
    step = model(input_ids=ids[:, -1:], attention_mask=att, position_ids=positions[..., -1:],
                 latent_kv_mask=kv_mask, use_cache=True, ce_patch_pos=pos, ce_patch_vec=vec, **{keyword: cache})
    assert torch.allclose(step.logits[:, -1], full[:, -1], atol=1e-5, rtol=0)
    assert output_cache(step).get_seq_length() == ids.shape[1]


def test_activation_checkpointing_without_deprecation_warning(fresh_tiny):
    """Checkpointing goes on through the installed version's name (5.24 deprecates the old one)."""
    import warnings

    model, _ = fresh_tiny
    layers = model.model.language_model.layers
    assert not any(getattr(m, "gradient_checkpointing", False) for m in layers)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        enable_activation_checkpointing(model)
    assert all(m.gradient_checkpointing for m in layers)
