"""Model core (design §4–§6, D2–D8): the two passes, K/V gating, losses through the model, call counts."""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch
from helpers import fire_at
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from latentvl import (
    LatentCollator,
    LatentInputError,
    LatentSettings,
    build_tiny_model,
    compute_latent_budget,
    set_latent_fields,
)


@pytest.fixture(scope="module")
def tiny():
    model, processor = build_tiny_model(seed=0)
    set_latent_fields(model.config, latent_budget_alpha=0.5, latent_budget_gamma=0.5, latent_budget_max=6)
    return model, processor


def _image(w: int, h: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((h, w, 3)) * 255).astype("uint8"))


def _sample(i: int, m: int, size=(84, 56), cot_sizes=None) -> dict:
    cot_sizes = cot_sizes or [(56 + 28 * ((i + k) % 4), 56 + 28 * (k % 3)) for k in range(m)]
    return {
        "id": f"s{i}",
        "question": f"Q{i}?" + "x" * (i % 3),
        "images": [_image(*size, seed=100 + i)],
        "cot_images": [_image(w, h, seed=200 + 10 * i + k) for k, (w, h) in enumerate(cot_sizes)],
        "answer": "ABCD"[: 1 + i % 4],
    }


def _collate(model, processor, samples, side="right"):
    return LatentCollator(processor, model.config, padding_side=side)(samples)


def _stage(model, stage: str, **extra):
    if stage == "A":
        set_latent_fields(model.config, latent_mode_stage="A", latent_stop_loss_weight=0.0, latent_cost_weight=0.0,
                          **extra)
    else:
        set_latent_fields(model.config, latent_mode_stage="C", latent_stop_loss_weight=1.0, latent_cost_weight=1e-3,
                          **extra)


def _pass1(model, batch, threshold=None):
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                 pixel_values=batch["pixel_values"], image_grid_thw=batch["image_grid_thw"],
                 mm_token_type_ids=batch["mm_token_type_ids"], latent_mode=True,
                 latent_segments=batch["latent_segments"], latent_budgets=batch["latent_budgets"],
                 latent_threshold=threshold)


MIXED = [(0, 1), (1, 3), (2, 0), (3, 3), (4, 1)]  # (index, M)


@pytest.mark.parametrize("side", ["right", "left"])
@torch.no_grad()
def test_pass_consistency_stage_a(tiny, side):
    """Pass 2's hidden state before each slot equals the vector pass 1 placed in the slot."""
    model, processor = tiny
    _stage(model, "A")
    batch = _collate(model, processor, [_sample(i, m) for i, m in MIXED], side)
    p1 = _pass1(model, batch)
    assert p1.ce_patch_pos.shape[0] == sum(batch["latent_budget_total"])
    embeds = model.embed_inputs(batch["input_ids"], batch["pixel_values"], batch["image_grid_thw"])
    embeds = embeds.index_put((p1.ce_patch_pos[:, 0], p1.ce_patch_pos[:, 1]), p1.ce_patch_vec)
    hidden = model.model.language_model(inputs_embeds=embeds, attention_mask=batch["attention_mask"],
                                        position_ids=p1.position_ids).last_hidden_state
    before = hidden[p1.ce_patch_pos[:, 0], p1.ce_patch_pos[:, 1] - 1]
    assert (before - p1.ce_patch_vec).abs().max().item() <= 1e-5


@pytest.mark.parametrize("stage", ["A", "C"])
@pytest.mark.parametrize("side", ["right", "left"])
@torch.no_grad()
def test_batched_equals_alone(tiny, side, stage):
    model, processor = tiny
    _stage(model, stage)
    torch.manual_seed(0)
    model.latent_stop_head.weight.normal_(0, 0.5)
    model.latent_stop_head.bias.fill_(0.0)
    try:
        samples = [_sample(i, m) for i, m in MIXED]
        batch = _collate(model, processor, samples, side)
        # a threshold in the middle of the probabilities this head gives, so some segments halt early
        threshold = None
        if stage == "C":
            every = _pass1(model, batch, threshold=1.0).latent_stop_probs
            threshold = float(np.median([p for seg in sum(every, []) for p in seg]))
        p1 = _pass1(model, batch, threshold)
        for b, sample in enumerate(samples):
            alone = _pass1(model, _collate(model, processor, [sample], side), threshold)
            rows = p1.ce_patch_pos[:, 0] == b
            assert p1.latent_used_lens[b] == alone.latent_used_lens[0]
            assert torch.allclose(p1.ce_patch_vec[rows], alone.ce_patch_vec, atol=1e-5, rtol=0)
            for got, ref in zip(p1.latent_stop_probs[b], alone.latent_stop_probs[0]):
                assert np.allclose(got, ref, atol=1e-5)
        if stage == "C":  # the random head really halted some segments early
            assert any(u < bud for us, bs in zip(p1.latent_used_lens, batch["latent_budgets"])
                       for u, bud in zip(us, bs))
    finally:
        model.latent_stop_head.reset_parameters()
        model._init_weights(model.latent_stop_head)
        _stage(model, "A")




@torch.no_grad()
def test_stage_c_halts_exactly_and_masks_the_tail(tiny):
    model, processor = tiny
    _stage(model, "C")
    same = [(224, 224), (280, 224)]  # identical layouts: the same step index is the same slot in every row
    samples = [dict(_sample(0, 2, cot_sizes=same), id=f"r{r}", answer="AB") for r in range(3)]
    batch = _collate(model, processor, samples)
    budgets = batch["latent_budgets"][0]
    assert budgets[0] >= 4 and all(b == budgets for b in batch["latent_budgets"])
    seg1_first = budgets[0] + 2  # slots of segment 0, then <|latent_end|><|latent_start|>
    # row 0 stops after slot 2 of segment 0 and slot 0 of segment 1; row 1 never; row 2 at slot 0
    handle = fire_at(model, {2: [0], seg1_first: [0], 0: [2], seg1_first + 1: [2]})
    try:
        p1 = _pass1(model, batch)
    finally:
        handle.remove()
    assert p1.latent_used_lens == [[3, 1], budgets, [1, 2]]
    for b, segs in enumerate(batch["latent_segments"]):
        for (start, end, img), used in zip(segs, p1.latent_used_lens[b]):
            row = p1.latent_kv_mask[b, start:end].tolist()
            assert row == [True] * used + [False] * (end - start - used)  # design §8 check 3
            assert used <= batch["latent_budgets"][b][img]
    # only active slots are patched
    patched = set(map(tuple, p1.ce_patch_pos.tolist()))
    inactive = set(map(tuple, (~p1.latent_kv_mask).nonzero().tolist()))
    assert patched and not patched & inactive
    assert len(patched) == sum(map(sum, p1.latent_used_lens))
    assert [len(p) for p in p1.latent_stop_probs[0]] == [3, 1]


@torch.no_grad()
def test_threshold_argument_overrides_config(tiny):
    model, processor = tiny
    _stage(model, "C")
    batch = _collate(model, processor, [_sample(1, 3)])
    model.latent_stop_head.weight.zero_()
    model.latent_stop_head.bias.fill_(0.0)  # p = 0.5 at every step
    try:
        assert _pass1(model, batch, threshold=0.4).latent_used_lens == [[1, 1, 1]]
        assert _pass1(model, batch, threshold=0.6).latent_used_lens == batch["latent_budgets"]
    finally:
        model._init_weights(model.latent_stop_head)
        _stage(model, "A")


@torch.no_grad()
def test_call_count_depends_on_layout_only(tiny):
    model, processor = tiny
    _stage(model, "C")
    same = [(224, 224), (280, 224)]  # budgets 4 and 5
    batch = _collate(model, processor, [dict(_sample(0, 2, cot_sizes=same), id=f"r{r}") for r in range(2)])
    counts, used = [], []
    for schedule in ({}, {0: [0, 1]}, {1: [1], 6: [0]}):
        handle = fire_at(model, schedule)
        try:
            p1 = _pass1(model, batch)
        finally:
            handle.remove()
        counts.append(p1.num_model_calls)
        used.append(p1.latent_used_lens)
    _stage(model, "A")
    assert len({str(u) for u in used}) == 3  # three different halting patterns
    assert len(set(counts)) == 1
    steps = batch["latent_segments"][0][-1][1] - batch["latent_segments"][0][0][0]
    assert counts[0] == 1 + steps  # one prefix call, then one call per column


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
        batch = _collate(model, processor, [_sample(i, m) for i, m in MIXED[:4]], side)
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
        batch = _collate(model, processor, [_sample(1, 3)])
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
    _stage(model, "C")
    batch = _collate(model, processor, [_sample(i, m) for i, m in [(1, 3), (2, 0), (3, 1)]], "left")
    handle = fire_at(model, {0: [0], 1: [1]})  # rows are the samples with latents
    try:
        p1 = _pass1(model, batch)
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
    _stage(model, "A")
    model.set_latent_attention("latent_sdpa")


@torch.no_grad()
def test_all_latents_masked_is_independent_of_content_and_close_to_no_think(tiny):
    """design §8 check 4: masking every latent removes their influence; report agreement with no-think."""
    model, processor = tiny
    samples = [_sample(i, m) for i, m in [(1, 3), (3, 1), (4, 2)]]
    batch = _collate(model, processor, samples)
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


def test_losses_and_gradients(tiny):
    model, processor = tiny
    batch = _collate(model, processor, [_sample(i, m) for i, m in MIXED])
    _stage(model, "A")
    model.zero_grad()
    out = model.latent_loss(batch)
    out.latent.ce_patch_vec.retain_grad()
    out.loss.backward()
    assert out.ce > 0 and out.align > 0 and out.stop == 0 and out.cost == 0
    assert out.latent.ce_patch_vec.grad.abs().sum() > 0  # CE/align reach the latent vectors
    assert model.latent_stop_head.weight.grad is None  # no stop-head gradient in stage A

    _stage(model, "C")
    out = model.latent_loss(batch)
    head_grad = torch.autograd.grad(out.loss, model.latent_stop_head.weight)[0]
    assert head_grad.abs().sum() > 0  # the stop head trains in stage C
    assert out.stop > 0
    assert out.cost.item() == pytest.approx(np.mean([sum(u) for u in out.latent.latent_used_lens]))
    _stage(model, "A")


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
    _stage(model, stage)
    set_latent_fields(model.config, latent_align_weight=0.7)
    if stage == "C":
        set_latent_fields(model.config, latent_stop_loss_weight=1.3, latent_cost_weight=0.01)
    samples = [_sample(i, m) for i, m in [(1, 3), (2, 0), (3, 2)]]
    batch = _collate(model, processor, samples)
    handle = fire_at(model, {0: [0], 2: [1]}) if stage == "C" else None
    try:
        with torch.no_grad():
            out = model.latent_loss(batch)
    finally:
        if handle is not None:
            handle.remove()
        _stage(model, "A")
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
    out = model.latent_loss(_collate(model, processor, [_sample(1, 3)]))
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
    batch = collator([_sample(i, m) for i, m in [(1, 2), (3, 1)]])
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
    _stage(model, "A")
    set_latent_fields(model.config, latent_align_weight=0.0)
    try:
        batch = _collate(model, processor, [_sample(1, 3)])
        out = model.latent_loss(batch)
        vec_grad = torch.autograd.grad(out.loss, out.latent.ce_patch_vec)[0]
        assert vec_grad.abs().sum() > 0
    finally:
        set_latent_fields(model.config, latent_align_weight=1.0)


def test_expected_cost_is_differentiable(tiny):
    model, processor = tiny
    _stage(model, "C", latent_cost_mode="expected")
    set_latent_fields(model.config, latent_stop_loss_weight=0.0)
    try:
        batch = _collate(model, processor, [_sample(1, 3)])
        out = model.latent_loss(batch)
        g = torch.autograd.grad(out.loss, model.latent_stop_head.bias)[0]
        assert g.item() < 0  # raising the stop bias lowers the expected length
    finally:
        _stage(model, "A", latent_cost_mode="count")


def test_overfit_four_samples():
    model, processor = build_tiny_model(seed=1)
    set_latent_fields(model.config, latent_budget_alpha=0.5, latent_budget_gamma=0.5, latent_budget_max=4)
    model.train()
    batch = _collate(model, processor, [_sample(i, m) for i, m in [(0, 1), (1, 2), (2, 0), (3, 1)]])
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(40):
        out = model.latent_loss(batch)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())
    assert losses[-1] < 0.3 * losses[0]


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda b: b["latent_segments"][1].__setitem__(0, (b["latent_segments"][1][0][0] - 1,
                                                           b["latent_segments"][1][0][1] - 1, 0)),
         r"sample 1 \(id 's1'\), segment 0 .*not latent_token_id"),
        (lambda b: b["latent_segments"][1].__setitem__(0, (*b["latent_segments"][1][0][:2], 7)),
         r"sample 1 .*segment 0.*img_idx 7 out of range"),
        (lambda b: b["latent_budgets"][0].__setitem__(0, b["latent_budgets"][0][0] + 1),
         r"sample 0 .*segment 0.*length .* != budget"),
        (lambda b: b["latent_segments"][3].pop(), r"sample 3 .*2 latent segments for 3 CoT images"),
        (lambda b: b.__setitem__("latent_segments", None), "needs latent_segments"),
    ],
)
def test_entry_checks_name_sample_segment_reason(tiny, mutate, message):
    model, processor = tiny
    batch = _collate(model, processor, [_sample(i, m) for i, m in MIXED])
    mutate(batch)
    from latentvl.model.layout import check_latent_inputs

    with pytest.raises(LatentInputError, match=message):
        check_latent_inputs(batch["input_ids"], batch["latent_segments"], batch["latent_budgets"],
                            model.config.latent_token_id, "A", sample_ids=batch["ids"])
    with pytest.raises(LatentInputError):
        _pass1(model, batch)


def test_settings_roundtrip_from_model(tiny):
    model, _ = tiny
    s = LatentSettings.from_config(model.config)
    assert s.latent_budget_alpha == 0.5 and s.latent_token_id == model.config.latent_token_id


# ---------------------------------------------------------------- pass 1 against its definition
def _reference_pass1(model, embeds, pos, segments, threshold, stage_c, detach, null_scale=0.0):
    """Pass 1 by its definition, for one unpadded sample: every latent re-runs the language model over
    all the columns used so far (no cache, causal attention). Inactive slots are left out of the
    sequence altogether, or with ``null_scale > 0`` kept with their own embedding (<|latent_pad|>, as
    pass 2 sees them) and their K/V scaled by the pass-2 gating (``latent_kv_mask``). Returns
    {column: latent vector} and {column: stop logit}."""
    lm = model.model.language_model
    seg_of = {c: s for s, e, _ in segments for c in range(s, e)}
    first, end = min(seg_of), max(seg_of) + 1
    cols, rows, keep = list(range(first)), list(embeds[:first]), [True] * first
    vecs, logits, halted = {}, {}, set()

    def last_hidden():
        gating = {} if all(keep) else {"latent_kv_mask": torch.tensor([keep]), "latent_null_scale": null_scale}
        return lm(inputs_embeds=torch.stack(rows)[None], position_ids=pos[:, None, cols],
                  **gating).last_hidden_state[0, -1]

    for c in range(first, end):
        if c not in seg_of:
            cols.append(c)
            rows.append(embeds[c])
            keep.append(True)
            continue
        if seg_of[c] in halted:
            if null_scale > 0:
                cols.append(c)
                rows.append(embeds[c])
                keep.append(False)
            continue
        h = last_hidden()
        x = h.detach() if detach else h
        cols.append(c)
        rows.append(x)
        keep.append(True)
        vecs[c] = x
        if stage_c:
            logits[c] = model.latent_stop_head(last_hidden())[0]
            if torch.sigmoid(logits[c]) >= threshold:
                halted.add(seg_of[c])
    return vecs, logits


def _rms_norm_in_input_dtype(self, x):
    return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))


@pytest.fixture(scope="module")
def tiny64():
    """The tiny model in float64 throughout (the stock RMSNorm computes in float32 whatever its input)."""
    model, processor = build_tiny_model(seed=3)
    set_latent_fields(model.config, latent_budget_alpha=1.0, latent_budget_gamma=0.5, latent_budget_max=6)
    with torch.no_grad():
        model.latent_stop_head.weight.normal_(0, 0.5)
        model.latent_stop_head.bias.zero_()
    for m in model.modules():
        if type(m).__name__.endswith("RMSNorm"):
            m.forward = types.MethodType(_rms_norm_in_input_dtype, m)
    return model.double(), processor


@pytest.mark.parametrize("stage, detach, side, null_scale, attn", [
    ("A", False, "left", 0.0, "latent_sdpa"), ("A", False, "right", 0.0, "latent_sdpa"),
    ("C", False, "right", 0.0, "latent_sdpa"), ("C", True, "left", 0.0, "latent_sdpa"),
    ("C", False, "left", 0.3, "latent_sdpa"), ("C", False, "left", 0.0, "latent_eager"),
])
def test_pass1_values_and_gradients_equal_the_definition(tiny64, stage, detach, side, null_scale, attn, one_thread):
    """Latents, stop logits and the gradient of every parameter equal a cache-free reference that
    recomputes the whole sequence at every step (float64): the K/V store, its hand-written backward
    and its ordering are exact, with and without ``latent_detach_step_inputs``, with the eager
    attention as with sdpa, and soft gating in pass 1 means what ``latent_kv_mask`` means in pass 2."""
    model, processor = tiny64
    model.set_latent_attention(attn)
    _stage(model, stage, latent_detach_step_inputs=detach, latent_null_scale=null_scale)
    batch = _collate(model, processor, [_sample(i, m) for i, m in MIXED], side)
    pixels = batch["pixel_values"].double()
    params = [p for p in model.parameters() if p.requires_grad]
    g = torch.Generator().manual_seed(1)
    w = torch.randn(*batch["input_ids"].shape, model.config.text_config.hidden_size, generator=g, dtype=torch.float64)
    u = torch.randn(*batch["input_ids"].shape, generator=g, dtype=torch.float64)

    def embeds_and_positions():
        e = model.embed_inputs(batch["input_ids"], pixels, batch["image_grid_thw"])
        pos = model.compute_position_ids(batch["input_ids"], batch["attention_mask"], batch["mm_token_type_ids"],
                                         batch["image_grid_thw"])
        return e, pos

    threshold = None
    if stage == "C":  # halfway between two of the head's probabilities: many segments halt early, none on a tie
        e, pos = embeds_and_positions()
        with torch.no_grad():
            every = model.latent_pass(batch["input_ids"], batch["attention_mask"], e, pos,
                                      batch["latent_segments"], batch["latent_budgets"], threshold=1.0)
        probs = sorted({p for seg in sum(every.latent_stop_probs, []) for p in seg})
        k = len(probs) // 4
        threshold = (probs[k] + probs[k + 1]) / 2

    e, pos = embeds_and_positions()
    p1 = model.latent_pass(batch["input_ids"], batch["attention_mask"], e, pos, batch["latent_segments"],
                           batch["latent_budgets"], threshold=threshold)
    r, c = p1.ce_patch_pos[:, 0], p1.ce_patch_pos[:, 1]
    loss = (w[r, c] * p1.ce_patch_vec).sum()
    if stage == "C":
        loss = loss + (u * p1.stop_logits)[p1.stop_step_active].sum()
    got = torch.autograd.grad(loss, params, allow_unused=True)

    e, pos = embeds_and_positions()
    ref_loss, gated_before_active = e.new_zeros(()), 0
    for b in range(len(batch["ids"])):
        idx = batch["attention_mask"][b].nonzero()[:, 0]
        off = int(idx[0])
        segs = [(s - off, t - off, i) for s, t, i in batch["latent_segments"][b]]
        if not segs:
            continue
        vecs, logits = _reference_pass1(model, e[b, idx], pos[:, b, idx], segs, threshold, stage == "C", detach,
                                        null_scale)
        mine = {int(col): v for row, col, v in zip(r, c, p1.ce_patch_vec) if row == b}
        assert sorted(mine) == sorted(k + off for k in vecs)  # the same active slots
        for k, v in vecs.items():
            assert torch.allclose(mine[k + off], v, rtol=0, atol=1e-10)
            ref_loss = ref_loss + (w[b, k + off] * v).sum()
        for k, lg in logits.items():
            assert torch.allclose(p1.stop_logits[b, k + off], lg, rtol=0, atol=1e-10)
            ref_loss = ref_loss + u[b, k + off] * lg
        slots = [k for s_, t, _ in segs for k in range(s_, t)]
        gated = [k for k in slots if k not in vecs]
        gated_before_active += sum(any(g < k for g in gated) for k in vecs)
    # in stage C some inactive slot lies before an active one, so the gating is exercised
    assert (gated_before_active > 0) == (stage == "C")
    # pass 2 (as in latent_loss and the prefill of generate()): the active latents patched in, the rest
    # of the sequence as it is, latent_kv_mask applied; its hidden state before every active slot is the
    # latent pass 1 placed there
    with torch.no_grad():
        e2 = e.index_put((r, c), p1.ce_patch_vec.detach())
        hidden = model.model.language_model(inputs_embeds=e2, attention_mask=batch["attention_mask"], position_ids=pos,
                                            **model._gating_kwargs(p1.latent_kv_mask)).last_hidden_state
        assert (hidden[r, c - 1] - p1.ce_patch_vec).abs().max().item() <= 1e-10
    want = torch.autograd.grad(ref_loss, params, allow_unused=True)
    checked = 0
    for p, a, ref in zip(params, got, want):
        if ref is None:
            assert a is None or a.abs().max() == 0
            continue
        assert a is not None, f"no gradient for a parameter of shape {tuple(p.shape)}"
        assert torch.allclose(a, ref, rtol=1e-9, atol=1e-12 * ref.abs().max().item()), (a - ref).abs().max()
        checked += int(ref.abs().max() > 0)
    assert checked > len(params) // 2
    _stage(model, "A", latent_detach_step_inputs=False, latent_null_scale=0.0)
    model.set_latent_attention("latent_sdpa")


def _saved_bytes(model, batch_of) -> int:
    """Bytes of the distinct storages autograd keeps for backward during pass 1."""
    ids, mask, segs, budgets = batch_of
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        e = model.get_input_embeddings()(ids)
        model.latent_pass(ids, mask, e, model.compute_position_ids(ids, mask, None, None), segs, budgets)
    return sum(seen.values())


def _text_batch(model, prompt: int, budget: int, rows: int = 2):
    cfg = model.config
    ids = [[10 + (i * 7 + r) % 50 for i in range(prompt)] + [cfg.latent_start_token_id]
           + [cfg.latent_token_id] * budget + [cfg.latent_end_token_id] for r in range(rows)]
    ids = torch.tensor(ids)
    segs = [[(prompt + 1, prompt + 1 + budget, 0)] for _ in range(rows)]
    return ids, torch.ones_like(ids), segs, [[budget] for _ in range(rows)]


def test_pass1_memory_per_step_does_not_grow_with_the_sequence(tiny, one_thread):
    """What pass 1 keeps for backward per latent step is independent of the prompt length (a growing
    KV cache would keep the whole K/V of every step: steps x sequence)."""
    model, _ = tiny
    _stage(model, "A")
    s = {(p, k): _saved_bytes(model, _text_batch(model, p, k)) for p in (32, 320) for k in (8, 24)}
    per_step_short = (s[32, 24] - s[32, 8]) / 16
    per_step_long = (s[320, 24] - s[320, 8]) / 16
    assert per_step_short > 0
    assert abs(per_step_long - per_step_short) <= 0.02 * per_step_short, (per_step_short, per_step_long)


# ---------------------------------------------------------------- flash-attention 2 dispatch
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
    batch = _collate(model, processor, [_sample(i, m) for i, m in [(1, 3), (2, 0), (3, 1)]], "left")
    results = {}
    try:
        for attn in ("latent_sdpa", "latent_flash_attention_2"):
            model.set_latent_attention(attn)
            calls.clear()
            _stage(model, "C")
            handle = fire_at(model, {0: [0], 1: [1]})
            try:
                p1 = _pass1(model, batch)
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
            _stage(model, "A")
            calls.clear()
            loss_a = model.latent_loss(batch).loss
            results[attn] = (p1, loss_c, scores, seq, loss_a, pass1_calls, gated_calls, list(calls))
    finally:
        _stage(model, "A")
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


def test_pass1_backward_twice_on_a_retained_graph(tiny, one_thread):
    """The store's gradient accumulators start from zero on every backward of the same graph."""
    model, _ = tiny
    _stage(model, "A")
    ids, mask, segs, budgets = _text_batch(model, 20, 6)
    e = model.get_input_embeddings()(ids)
    out = model.latent_pass(ids, mask, e, model.compute_position_ids(ids, mask, None, None), segs, budgets)
    loss = out.ce_patch_vec.square().sum()
    params = [p for p in model.model.language_model.parameters()]
    first = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    second = torch.autograd.grad(loss, params, allow_unused=True)
    assert sum(int(a is not None and a.abs().max() > 0) for a in first) > len(params) // 2
    for a, b in zip(first, second):
        assert (a is None and b is None) or torch.equal(a, b)


@pytest.mark.parametrize("stage", ["A", "C"])
def test_latent_loss_under_bf16_autocast(tiny, stage, one_thread):
    """The trainer's default on a GPU (bf16 autocast over float32 weights), here on the CPU: both passes
    and the K/V store's backward run, with finite gradients, and the loss stays near the float32 one."""
    model, processor = tiny
    _stage(model, stage)
    batch = _collate(model, processor, [_sample(i, m) for i, m in MIXED])
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
        _stage(model, "A")


def test_bf16_weights_give_the_float32_gradients_to_bf16_precision(one_thread):
    """A model held in bf16 (as FSDP's bf16 policy or a bf16 checkpoint runs it): the K/V store keeps bf16
    keys and values, accumulates their gradients in float32, and the gradient matches float32's."""
    grads = {}
    for dtype in (torch.float32, torch.bfloat16):
        model, processor = build_tiny_model(seed=0)
        model = model.to(dtype)
        batch = _collate(model, processor, [_sample(i, m) for i, m in MIXED])
        batch = {k: v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v for k, v in batch.items()}
        model.latent_loss(batch).loss.backward()
        grads[dtype] = torch.cat([p.grad.float().flatten() for p in model.model.language_model.parameters()])
    a, b = grads[torch.float32], grads[torch.bfloat16]
    assert torch.isfinite(b).all()
    assert torch.nn.functional.cosine_similarity(a, b, dim=0) > 0.99
    assert (a - b).norm() / a.norm() < 0.05


def test_prefix_grad_off_keeps_the_values_and_drops_the_prefix_memory_and_gradient(tiny, one_thread):
    """``latent_prefix_grad=False``: the same latents, the prefix keeps nothing for backward and gets
    no gradient from pass 1, and the steps still train."""
    model, _ = tiny
    _stage(model, "A")
    ids, mask, segs, budgets = _text_batch(model, 200, 8)
    pos = model.compute_position_ids(ids, mask, None, None)

    def run():
        embeds = model.get_input_embeddings()(ids).detach().requires_grad_()
        out = model.latent_pass(ids, mask, embeds, pos, segs, budgets)
        k_proj = model.model.language_model.layers[0].self_attn.k_proj.weight
        g_embeds, g_k = torch.autograd.grad(out.ce_patch_vec.square().sum(), (embeds, k_proj))
        return out.ce_patch_vec.detach(), g_embeds, g_k, _saved_bytes(model, (ids, mask, segs, budgets))

    vec_on, g_on, k_on, saved_on = run()
    set_latent_fields(model.config, latent_prefix_grad=False)
    try:
        vec_off, g_off, k_off, saved_off = run()
    finally:
        set_latent_fields(model.config, latent_prefix_grad=True)
    assert torch.equal(vec_on, vec_off)
    first = segs[0][0][0]
    assert g_on[:, :first].abs().max() > 0 and g_off[:, :first].abs().max() == 0
    assert k_off.abs().max() > 0 and not torch.allclose(k_on, k_off)
    assert saved_off < 0.25 * saved_on, (saved_off, saved_on)
