"""Pass 1 (design §4, §5, D6-D8): batched against alone, halting, call counts, the definition it
implements, memory, input checks."""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch
from helpers import MIXED, collate_samples, fire_at, hidden_before_slots, make_sample, run_pass1, set_stage
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from latentvl import (
    LatentInputError,
    LatentSettings,
    build_tiny_model,
    set_latent_fields,
)
from latentvl.errors import LatentConfigError

TINY_LATENT = {"latent_budget_alpha": 0.5, "latent_budget_gamma": 0.5, "latent_budget_max": 6}  # the `tiny` fixture


@pytest.mark.parametrize("side", ["right", "left"])
@torch.no_grad()
def test_pass_consistency_stage_a(tiny, side):
    """Pass 2's hidden state before each slot equals the vector pass 1 placed in the slot."""
    model, processor = tiny
    set_stage(model, "A")
    batch = collate_samples(model, processor, [make_sample(i, m) for i, m in MIXED], side)
    p1 = run_pass1(model, batch)
    assert p1.ce_patch_pos.shape[0] == sum(batch["latent_budget_total"])
    before = hidden_before_slots(model, batch, p1)
    assert (before - p1.ce_patch_vec).abs().max().item() <= 1e-5


@pytest.mark.parametrize("stage", ["A", "C"])
@pytest.mark.parametrize("side", ["right", "left"])
@torch.no_grad()
def test_batched_equals_alone(tiny, side, stage):
    model, processor = tiny
    set_stage(model, stage)
    torch.manual_seed(0)
    model.latent_stop_head.weight.normal_(0, 0.5)
    model.latent_stop_head.bias.fill_(0.0)
    try:
        samples = [make_sample(i, m) for i, m in MIXED]
        batch = collate_samples(model, processor, samples, side)
        # a threshold in the middle of the probabilities this head gives, so some segments halt early
        threshold = None
        if stage == "C":
            every = run_pass1(model, batch, threshold=1.0).latent_stop_probs
            threshold = float(np.median([p for seg in sum(every, []) for p in seg]))
        p1 = run_pass1(model, batch, threshold)
        for b, sample in enumerate(samples):
            alone = run_pass1(model, collate_samples(model, processor, [sample], side), threshold)
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
        set_stage(model, "A")


@torch.no_grad()
def test_stage_c_halts_exactly_and_masks_the_tail(tiny):
    model, processor = tiny
    set_stage(model, "C")
    same = [(224, 224), (280, 224)]  # identical layouts: the same step index is the same slot in every row
    samples = [dict(make_sample(0, 2, cot_sizes=same), id=f"r{r}", answer="AB") for r in range(3)]
    batch = collate_samples(model, processor, samples)
    budgets = batch["latent_budgets"][0]
    assert budgets[0] >= 4 and all(b == budgets for b in batch["latent_budgets"])
    seg1_first = budgets[0] + 2  # slots of segment 0, then <|latent_end|><|latent_start|>
    # row 0 stops after slot 2 of segment 0 and slot 0 of segment 1; row 1 never; row 2 at slot 0
    handle = fire_at(model, {2: [0], seg1_first: [0], 0: [2], seg1_first + 1: [2]})
    try:
        p1 = run_pass1(model, batch)
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


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(min_used=st.integers(1, 7), fires=st.lists(st.integers(0, 5), min_size=3, max_size=3))
@torch.no_grad()
def test_min_used_delays_every_stop_to_its_slot(tiny, min_used, fires):
    """With ``latent_min_used = m``, a head that fires from slot ``f`` of segment 0 on stops it after
    ``min(B0, max(f + 1, m))`` latents; one firing from segment 1's first slot stops it after ``min(B1, m)``;
    the K/V mask and the stop probabilities follow the used lengths."""
    model, processor = tiny
    set_stage(model, "C", latent_min_used=min_used)
    same = [(224, 224), (280, 224)]
    samples = [dict(make_sample(0, 2, cot_sizes=same), id=f"r{r}", answer="AB") for r in range(3)]
    batch = collate_samples(model, processor, samples)
    b0, b1 = batch["latent_budgets"][0]
    seg1_first = b0 + 2  # slots of segment 0, then <|latent_end|><|latent_start|>
    schedule: dict[int, list[int]] = {}
    for row, f in enumerate(fires):
        for step in range(min(f, b0 - 1), b0):
            schedule.setdefault(step, []).append(row)
    for step in range(seg1_first, seg1_first + b1):
        schedule.setdefault(step, []).extend(range(3))
    handle = fire_at(model, schedule)
    try:
        p1 = run_pass1(model, batch)
    finally:
        handle.remove()
        set_stage(model, "A", latent_min_used=1)
    want = [[min(b0, max(min(f, b0 - 1) + 1, min_used)), min(b1, min_used)] for f in fires]
    assert p1.latent_used_lens == want
    for b, segs in enumerate(batch["latent_segments"]):
        assert [len(q) for q in p1.latent_stop_probs[b]] == want[b]
        for (start, end, _img), used in zip(segs, want[b]):
            assert p1.latent_kv_mask[b, start:end].tolist() == [True] * used + [False] * (end - start - used)


@pytest.mark.parametrize("value", [0, -1, True, 1.5, "2", None])
def test_min_used_is_an_integer_at_least_one(value):
    assert LatentSettings().latent_min_used == 1
    with pytest.raises(LatentConfigError, match="latent_min_used"):
        LatentSettings(latent_min_used=value).validate()


@torch.no_grad()
def test_threshold_argument_overrides_config(tiny):
    model, processor = tiny
    set_stage(model, "C")
    batch = collate_samples(model, processor, [make_sample(1, 3)])
    model.latent_stop_head.weight.zero_()
    model.latent_stop_head.bias.fill_(0.0)  # p = 0.5 at every step
    try:
        assert run_pass1(model, batch, threshold=0.4).latent_used_lens == [[1, 1, 1]]
        assert run_pass1(model, batch, threshold=0.6).latent_used_lens == batch["latent_budgets"]
    finally:
        model._init_weights(model.latent_stop_head)
        set_stage(model, "A")


@torch.no_grad()
def test_call_count_depends_on_layout_only(tiny):
    model, processor = tiny
    set_stage(model, "C")
    same = [(224, 224), (280, 224)]  # budgets 4 and 5
    batch = collate_samples(model, processor, [dict(make_sample(0, 2, cot_sizes=same), id=f"r{r}") for r in range(2)])
    counts, used = [], []
    for schedule in ({}, {0: [0, 1]}, {1: [1], 6: [0]}):
        handle = fire_at(model, schedule)
        try:
            p1 = run_pass1(model, batch)
        finally:
            handle.remove()
        counts.append(p1.num_model_calls)
        used.append(p1.latent_used_lens)
    set_stage(model, "A")
    assert len({str(u) for u in used}) == 3  # three different halting patterns
    assert len(set(counts)) == 1
    steps = batch["latent_segments"][0][-1][1] - batch["latent_segments"][0][0][0]
    assert counts[0] == 1 + steps  # one prefix call, then one call per column


def _reference_pass1(model, embeds, pos, segments, threshold, stage_c, detach, null_scale=0.0, visual=None):
    """Pass 1 by its definition, for one unpadded sample: every latent re-runs the language model over
    all the columns used so far (no cache, causal attention). Inactive slots are left out of the
    sequence altogether, or with ``null_scale > 0`` kept with their own embedding (<|latent_pad|>, as
    pass 2 sees them) and their K/V scaled by the pass-2 gating (``latent_kv_mask``). Returns
    {column: latent vector} and {column: stop logit}. ``visual``: the sample's DeepStack extras over its
    unpadded columns ``[1, S_b]`` (a family with DeepStack)."""
    lm = model.model.language_model
    seg_of = {c: s for s, e, _ in segments for c in range(s, e)}
    first, end = min(seg_of), max(seg_of) + 1
    cols, rows, keep = list(range(first)), list(embeds[:first]), [True] * first
    vecs, logits, halted = {}, {}, set()

    def last_hidden():
        gating = {} if all(keep) else {"latent_kv_mask": torch.tensor([keep]), "latent_null_scale": null_scale}
        extras = {} if visual is None else model.text_visual_kwargs(visual.take(torch.tensor([0]),
                                                                                torch.tensor([cols])))
        return lm(inputs_embeds=torch.stack(rows)[None], position_ids=pos[:, None, cols],
                  **gating, **extras).last_hidden_state[0, -1]

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
def tiny64(backbone):
    """The tiny model in float64 throughout (the stock RMSNorm computes in float32 whatever its input)."""
    model, processor = build_tiny_model(seed=3, backbone=backbone)
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
    set_stage(model, stage, latent_detach_step_inputs=detach, latent_null_scale=null_scale)
    batch = collate_samples(model, processor, [make_sample(i, m) for i, m in MIXED], side)
    pixels = batch["pixel_values"].double()
    params = [p for p in model.parameters() if p.requires_grad]
    g = torch.Generator().manual_seed(1)
    w = torch.randn(*batch["input_ids"].shape, model.config.text_config.hidden_size, generator=g, dtype=torch.float64)
    u = torch.randn(*batch["input_ids"].shape, generator=g, dtype=torch.float64)

    def embeds_and_positions():
        e, visual = model.embed_inputs(batch["input_ids"], pixels, batch["image_grid_thw"], return_visual=True)
        pos = model.compute_position_ids(batch["input_ids"], batch["attention_mask"], batch["mm_token_type_ids"],
                                         batch["image_grid_thw"])
        return e, pos, visual

    threshold = None
    if stage == "C":  # halfway between two of the head's probabilities: many segments halt early, none on a tie
        e, pos, visual = embeds_and_positions()
        with torch.no_grad():
            every = model.latent_pass(batch["input_ids"], batch["attention_mask"], e, pos,
                                      batch["latent_segments"], batch["latent_budgets"], threshold=1.0,
                                      visual=visual)
        probs = sorted({p for seg in sum(every.latent_stop_probs, []) for p in seg})
        k = len(probs) // 4
        threshold = (probs[k] + probs[k + 1]) / 2

    e, pos, visual = embeds_and_positions()
    p1 = model.latent_pass(batch["input_ids"], batch["attention_mask"], e, pos, batch["latent_segments"],
                           batch["latent_budgets"], threshold=threshold, visual=visual)
    r, c = p1.ce_patch_pos[:, 0], p1.ce_patch_pos[:, 1]
    loss = (w[r, c] * p1.ce_patch_vec).sum()
    if stage == "C":
        loss = loss + (u * p1.stop_logits)[p1.stop_step_active].sum()
    got = torch.autograd.grad(loss, params, allow_unused=True)

    e, pos, visual = embeds_and_positions()
    ref_loss, gated_before_active = e.new_zeros(()), 0
    for b in range(len(batch["ids"])):
        idx = batch["attention_mask"][b].nonzero()[:, 0]
        off = int(idx[0])
        segs = [(s - off, t - off, i) for s, t, i in batch["latent_segments"][b]]
        if not segs:
            continue
        vis = None if visual is None else visual.take(torch.tensor([b]), idx[None])
        vecs, logits = _reference_pass1(model, e[b, idx], pos[:, b, idx], segs, threshold, stage == "C", detach,
                                        null_scale, vis)
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
                                            **model._gating_kwargs(p1.latent_kv_mask),
                                            **model.text_visual_kwargs(visual)).last_hidden_state
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
    set_stage(model, "A", latent_detach_step_inputs=False, latent_null_scale=0.0)
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
    set_stage(model, "A")
    s = {(p, k): _saved_bytes(model, _text_batch(model, p, k)) for p in (32, 320) for k in (8, 24)}
    per_step_short = (s[32, 24] - s[32, 8]) / 16
    per_step_long = (s[320, 24] - s[320, 8]) / 16
    assert per_step_short > 0
    assert abs(per_step_long - per_step_short) <= 0.02 * per_step_short, (per_step_short, per_step_long)


def test_pass1_backward_twice_on_a_retained_graph(tiny, one_thread):
    """The store's gradient accumulators start from zero on every backward of the same graph."""
    model, _ = tiny
    set_stage(model, "A")
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


def test_prefix_grad_off_keeps_the_values_and_drops_the_prefix_memory_and_gradient(tiny, one_thread):
    """``latent_prefix_grad=False``: the same latents, the prefix keeps nothing for backward and gets
    no gradient from pass 1, and the steps still train."""
    model, _ = tiny
    set_stage(model, "A")
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
    batch = collate_samples(model, processor, [make_sample(i, m) for i, m in MIXED])
    mutate(batch)
    from latentvl.segments import check_latent_inputs

    with pytest.raises(LatentInputError, match=message):
        check_latent_inputs(batch["input_ids"], batch["latent_segments"], batch["latent_budgets"],
                            model.config.latent_token_id, "A", sample_ids=batch["ids"])
    with pytest.raises(LatentInputError):
        run_pass1(model, batch)


def test_settings_roundtrip_from_model(tiny):
    model, _ = tiny
    s = LatentSettings.from_config(model.config)
    assert s.latent_budget_alpha == 0.5 and s.latent_token_id == model.config.latent_token_id

