"""K/V gating (design §5, D2): latent_kv_mask through the full forward, generate() with a cache,
soft gating, and the flash-attention 2 dispatch."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import MIXED, collate_samples, fire_at, make_sample, run_pass1, set_stage
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from latentvl import (
    LatentCollator,
    set_latent_fields,
)

TINY_LATENT = {"latent_budget_alpha": 0.5, "latent_budget_gamma": 0.5, "latent_budget_max": 6}  # the `tiny` fixture


def _masked_logits(model, batch, kv_mask, noise):
    embeds = model.embed_inputs(batch["input_ids"], batch["pixel_values"], batch["image_grid_thw"])
    embeds = torch.where((~kv_mask)[..., None], embeds + noise, embeds)
    return model(input_ids=batch["input_ids"], inputs_embeds=embeds, attention_mask=batch["attention_mask"],
                 mm_token_type_ids=batch["mm_token_type_ids"], image_grid_thw=batch["image_grid_thw"],
                 latent_kv_mask=kv_mask).logits


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 10_000), attn=st.sampled_from(["latent_sdpa", "latent_eager"]),
       side=st.sampled_from(["right", "left"]))
@torch.no_grad()
def test_gating_property_full_forward(tiny, seed, attn, side):
    """Changing the embeddings at inactive slots changes no logit at any other position."""
    model, processor = tiny
    model.set_latent_attention(attn)
    try:
        batch = collate_samples(model, processor, [make_sample(i, m) for i, m in MIXED[:4]], side)
        g = torch.Generator().manual_seed(seed)
        latent = batch["input_ids"] == model.config.latent_token_id
        kv_mask = ~(latent & (torch.rand(latent.shape, generator=g) < 0.5))
        noise = torch.randn(1, 1, model.config.text_config.hidden_size, generator=g) * 3
        a = _masked_logits(model, batch, kv_mask, 0.0)
        b = _masked_logits(model, batch, kv_mask, noise)
        keep = kv_mask & batch["attention_mask"].bool()
        assert (a - b)[keep].abs().max().item() <= 1e-6
        if (~kv_mask).any():
            assert (a - b)[~kv_mask].abs().max().item() > 1e-4  # the noise did reach the masked slots
    finally:
        model.set_latent_attention("latent_sdpa")


@pytest.mark.parametrize("attn", ["latent_sdpa", "latent_eager"])
@torch.no_grad()
def test_null_scale_above_zero_only_suppresses(tiny, attn):
    model, processor = tiny
    model.set_latent_attention(attn)
    set_latent_fields(model.config, latent_null_scale=0.3)
    try:
        batch = collate_samples(model, processor, [make_sample(1, 3)])
        latent = batch["input_ids"] == model.config.latent_token_id
        kv_mask = ~latent
        noise = torch.ones(1, 1, model.config.text_config.hidden_size) * 3
        diff = _masked_logits(model, batch, kv_mask, 0.0) - _masked_logits(model, batch, kv_mask, noise)
        assert diff[kv_mask].abs().max().item() > 1e-5
    finally:
        set_latent_fields(model.config, latent_null_scale=0.0)
        model.set_latent_attention("latent_sdpa")


def _gen_scores(model, batch, p1, ce_patch_vec, n=4):
    out = model.generate(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], pixel_values=batch["pixel_values"],
        image_grid_thw=batch["image_grid_thw"], mm_token_type_ids=batch["mm_token_type_ids"],
        ce_patch_pos=p1.ce_patch_pos, ce_patch_vec=ce_patch_vec, latent_kv_mask=p1.latent_kv_mask,
        max_new_tokens=n, min_new_tokens=n, do_sample=False, output_scores=True, return_dict_in_generate=True,
        pad_token_id=0,
    )
    return torch.stack(out.scores, 1), out.sequences


@pytest.mark.parametrize("attn", ["latent_sdpa", "latent_eager"])
@torch.no_grad()
def test_gating_through_generate_with_cache(tiny, attn):
    """Inactive slots hold vectors that never matter, in the prefill and in every cached step."""
    model, processor = tiny
    model.set_latent_attention(attn)
    set_stage(model, "C")
    batch = collate_samples(model, processor, [make_sample(i, m) for i, m in [(1, 3), (2, 0), (3, 1)]], "left")
    handle = fire_at(model, {0: [0], 1: [1]})  # rows are the samples with latents
    try:
        p1 = run_pass1(model, batch)
    finally:
        handle.remove()
    assert (~p1.latent_kv_mask).any()
    ref_scores, ref_seq = _gen_scores(model, batch, p1, p1.ce_patch_vec)
    # put noise into the inactive slots through the patches: pass 2 patches every slot this time
    inactive = (~p1.latent_kv_mask).nonzero()
    pos = torch.cat([p1.ce_patch_pos, inactive])
    vec = torch.cat([p1.ce_patch_vec, torch.randn(inactive.shape[0], p1.ce_patch_vec.shape[1]) * 5])

    class P:
        pass

    noisy = P()
    noisy.ce_patch_pos, noisy.latent_kv_mask = pos, p1.latent_kv_mask
    scores, seq = _gen_scores(model, batch, noisy, vec)
    finite = torch.isfinite(ref_scores)  # generate() sets some scores to -inf (e.g. min_new_tokens)
    assert torch.equal(seq, ref_seq) and torch.equal(finite, torch.isfinite(scores))
    assert (scores - ref_scores)[finite].abs().max().item() <= 1e-5
    # and the latents themselves do matter
    scores2, _ = _gen_scores(model, batch, p1, p1.ce_patch_vec * -3)
    assert (scores2 - ref_scores)[finite].abs().max().item() > 1e-4
    set_stage(model, "A")
    model.set_latent_attention("latent_sdpa")


@torch.no_grad()
def test_all_latents_masked_is_independent_of_content_and_close_to_no_think(tiny):
    """design §8 check 4: masking every latent removes their influence; report agreement with no-think."""
    model, processor = tiny
    samples = [make_sample(i, m) for i, m in [(1, 3), (3, 1), (4, 2)]]
    batch = collate_samples(model, processor, samples)
    latent = batch["input_ids"] == model.config.latent_token_id
    a = _masked_logits(model, batch, ~latent, 0.0)
    b = _masked_logits(model, batch, ~latent, torch.randn(1, 1, model.config.text_config.hidden_size))
    answer = batch["labels"] != -100
    assert (a - b)[answer].abs().max().item() <= 1e-6
    plain = LatentCollator(processor, model.config, use_latents=False)(samples)
    ref = model(**{k: plain[k] for k in ("input_ids", "attention_mask", "pixel_values", "image_grid_thw",
                                         "mm_token_type_ids")}).logits
    ref_answer = plain["labels"] != -100
    # shift by one: logits at t predict t+1
    pa = torch.log_softmax(a[:, :-1][answer[:, 1:]], -1)
    pr = torch.log_softmax(ref[:, :-1][ref_answer[:, 1:]], -1)
    assert pa.shape == pr.shape
    top1 = (pa.argmax(-1) == pr.argmax(-1)).float().mean().item()
    kl = torch.nn.functional.kl_div(pa, pr, log_target=True, reduction="batchmean").item()
    print(f"all-masked vs no-think: top-1 agreement {top1:.3f}, KL {kl:.4f}")
    # the masked sequence still carries <|latent_start|>/<|latent_end|> and shifted positions, so the
    # two differ; they must stay close on a random model
    assert np.isfinite(kl) and kl >= 0 and top1 >= 0.5


def _stand_in_flash(calls: list):
    """A flash-attention stand-in with flash's contract: a [B, kv] padding mask or None, causal,
    bottom-right aligned. Records the query length of every call that reaches it."""

    def forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
        calls.append(query.shape[-2])
        q_len, kv_len = query.shape[-2], key.shape[-2]
        keep = torch.arange(kv_len)[None, :] <= torch.arange(kv_len - q_len, kv_len)[:, None]
        keep = keep[None, None].expand(query.shape[0], 1, q_len, kv_len)
        if attention_mask is not None:
            keep = keep & attention_mask[:, None, None, :kv_len].bool()
        keep = keep | ~keep.any(-1, keepdim=True)  # flash leaves padding queries out; here they see all
        groups = query.shape[1] // key.shape[1]
        out = torch.nn.functional.scaled_dot_product_attention(
            query, key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1), attn_mask=keep,
            scale=scaling)
        return out.transpose(1, 2).contiguous(), None

    return forward


@torch.no_grad()
def test_flash_attention_2_dispatch_matches_sdpa(tiny, monkeypatch):
    """``latent_flash_attention_2`` (with a stand-in kernel: flash_attn needs a GPU) gives sdpa's
    results in pass 1, in pass 2 and through ``generate()``; ungated calls reach the flash kernel,
    gated ones and pass 1's steps do not."""
    import transformers.integrations.flash_attention as fa
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

    from latentvl.model.attention import latent_flash_attention_2

    calls: list[int] = []
    monkeypatch.setattr(fa, "flash_attention_forward", _stand_in_flash(calls))
    AttentionInterface.register("latent_flash_attention_2", latent_flash_attention_2)
    AttentionMaskInterface.register("latent_flash_attention_2", flash_attention_mask)
    model, processor = tiny
    batch = collate_samples(model, processor, [make_sample(i, m) for i, m in [(1, 3), (2, 0), (3, 1)]], "left")
    results = {}
    try:
        for attn in ("latent_sdpa", "latent_flash_attention_2"):
            model.set_latent_attention(attn)
            calls.clear()
            set_stage(model, "C")
            handle = fire_at(model, {0: [0], 1: [1]})
            try:
                p1 = run_pass1(model, batch)
            finally:
                handle.remove()
            pass1_calls = list(calls)
            handle = fire_at(model, {0: [0], 1: [1]})  # the same halting inside latent_loss
            try:
                out = model.latent_loss(batch)
            finally:
                handle.remove()
            assert torch.equal(out.latent.latent_kv_mask, p1.latent_kv_mask)
            loss_c = out.loss
            gated_calls = len(calls) - len(pass1_calls)
            scores, seq = _gen_scores(model, batch, p1, p1.ce_patch_vec)
            set_stage(model, "A")
            calls.clear()
            loss_a = model.latent_loss(batch).loss
            results[attn] = (p1, loss_c, scores, seq, loss_a, pass1_calls, gated_calls, list(calls))
    finally:
        set_stage(model, "A")
        model.set_latent_attention("latent_sdpa")
    ref, got = results["latent_sdpa"], results["latent_flash_attention_2"]
    assert (~got[0].latent_kv_mask).any()  # stage C really gated some slots
    assert torch.equal(got[0].ce_patch_pos, ref[0].ce_patch_pos)
    assert torch.allclose(got[0].ce_patch_vec, ref[0].ce_patch_vec, atol=1e-5, rtol=0)
    assert torch.allclose(got[1], ref[1], atol=2e-6, rtol=0) and torch.allclose(got[4], ref[4], atol=2e-6, rtol=0)
    assert torch.equal(got[3], ref[3])
    finite = torch.isfinite(ref[2])
    assert (got[2] - ref[2])[finite].abs().max().item() <= 1e-4
    n_layers = model.config.text_config.num_hidden_layers
    assert got[5] == [got[5][0]] * n_layers and got[5][0] > 1  # pass 1: only the prefix reaches flash
    assert got[6] == n_layers  # latent_loss in stage C: its pass 1's prefix; pass 2 gates keys, never flash
    assert len(got[7]) >= n_layers  # stage A's pass 2 gates nothing: flash

