"""Pass 1's K/V store on its own: outputs and gradients equal plain attention over concatenated K/V."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from latentvl.model.kv_store import LatentKVStore


def _reference(q_steps, k_all, v_all, biases, scaling):
    """Plain autograd: step j attends over the first P + j + 1 keys with its additive mask."""
    outs = []
    for j, q in enumerate(q_steps):
        n = k_all.shape[2] - len(q_steps) + j + 1
        k, v = k_all[:, :, :n], v_all[:, :, :n]
        groups = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
        w = torch.softmax((q @ k.transpose(-1, -2)) * scaling + biases[j], dim=-1)
        outs.append(w @ v)
    return torch.cat(outs, dim=2)


@settings(max_examples=25, deadline=None)
@given(
    rows=st.integers(1, 3), kv_heads=st.sampled_from([1, 2]), groups=st.sampled_from([1, 2, 4]),
    dim=st.sampled_from([4, 8]), prefix=st.integers(1, 5), steps=st.integers(1, 6), soft=st.booleans(),
    seed=st.integers(0, 10_000), static=st.booleans(),
)
def test_store_matches_plain_attention_values_and_gradients(rows, kv_heads, groups, dim, prefix, steps, soft, seed,
                                                            static):
    """Both step forms: ``attend_step`` (mask over the columns so far) and ``attend_step_at`` (static
    shapes: column as a tensor, mask over the full width, -inf after the column)."""
    g = torch.Generator().manual_seed(seed)
    heads, width, scaling = kv_heads * groups, prefix + steps, dim ** -0.5

    def rand(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64, requires_grad=True)

    k_pre, v_pre = rand(rows, kv_heads, prefix, dim), rand(rows, kv_heads, prefix, dim)
    k_new = [rand(rows, kv_heads, 1, dim) for _ in range(steps)]
    v_new = [rand(rows, kv_heads, 1, dim) for _ in range(steps)]
    q_steps = [rand(rows, heads, 1, dim) for _ in range(steps)]
    # random key masks that keep column 0, and (soft gating) a per-row scale for each step's key
    keep = torch.rand(rows, width, generator=g) > 0.3
    keep[:, 0] = True
    bias_full = torch.zeros(rows, width, dtype=torch.float64).masked_fill(~keep, float("-inf"))
    biases = [bias_full[:, None, None, : prefix + j + 1].contiguous() for j in range(steps)]
    step_scales = [torch.where(torch.rand(rows, generator=g) > 0.5, 1.0, 0.25) for _ in range(steps)] if soft \
        else None

    store = LatentKVStore(rows, width, num_layers=1)
    kp, vp = store.write_prefix(0, k_pre, v_pre)
    assert torch.equal(kp, k_pre) and torch.equal(vp, v_pre)
    got = []
    for j in range(steps):
        store.write_scale = step_scales[j] if soft else None
        if static:
            col = prefix + j
            full = bias_full.clone()
            full[:, col + 1 :] = float("-inf")
            got.append(store.attend_step_at(0, q_steps[j], k_new[j], v_new[j], full[:, None, None, :],
                                            torch.tensor([col]), scaling))
        else:
            got.append(store.attend_step(0, q_steps[j], k_new[j], v_new[j], biases[j], scaling))
    store.close()
    got = torch.cat(got, dim=2) + 0 * (kp.sum() + vp.sum())  # the prefix output joins the graph

    k_all = torch.cat([k_pre, *k_new], dim=2)
    v_all = torch.cat([v_pre, *v_new], dim=2)
    if soft:  # per row: 1 for the prefix, then each step's factor
        scales = torch.cat([torch.ones(rows, prefix, dtype=torch.float64),
                            torch.stack(step_scales, dim=1).double()], dim=1)[:, None, :, None]
        k_all, v_all = k_all * scales, v_all * scales
    want = _reference(q_steps, k_all, v_all, biases, scaling)
    assert torch.allclose(got, want, atol=1e-12, rtol=0)

    upstream = torch.randn(want.shape, generator=g, dtype=torch.float64)
    inputs = [k_pre, v_pre, *k_new, *v_new, *q_steps]
    grads_got = torch.autograd.grad(got, inputs, upstream)
    grads_want = torch.autograd.grad(want, inputs, upstream)
    for a, b in zip(grads_got, grads_want):
        assert torch.allclose(a, b, atol=1e-10, rtol=0), (a - b).abs().max()


def test_store_refuses_a_mask_that_does_not_cover_the_written_columns():
    store = LatentKVStore(rows=1, width=4, num_layers=1)
    k = torch.zeros(1, 1, 2, 4)
    store.write_prefix(0, k, k)
    step = torch.zeros(1, 1, 1, 4)
    with pytest.raises(RuntimeError, match="column 2 of 4 with a mask over 2 keys"):
        store.attend_step(0, step, step, step, torch.zeros(1, 1, 1, 2), 0.5)
    with pytest.raises(RuntimeError, match="prefix must be the first call"):
        store.write_prefix(0, k, k)


def test_a_training_pass_frees_its_store_without_the_cycle_collector(monkeypatch):
    """Nothing of a pass outlives its backward: no reference cycle holds the store and its graph."""
    import gc
    import weakref

    from latentvl import build_tiny_model
    from latentvl.model import kv_store

    model, _ = build_tiny_model(seed=0)
    cfg = model.config
    ids = torch.tensor([[11, 12, 13, cfg.latent_start_token_id] + [cfg.latent_token_id] * 4
                        + [cfg.latent_end_token_id]] * 2)
    mask = torch.ones_like(ids)
    made = []
    init = kv_store.LatentKVStore.__init__

    def tracking_init(self, *args, **kwargs):
        init(self, *args, **kwargs)
        made.append(weakref.ref(self))

    monkeypatch.setattr(kv_store.LatentKVStore, "__init__", tracking_init)
    gc.disable()
    try:
        for _ in range(2):
            embeds = model.get_input_embeddings()(ids)
            out = model.latent_pass(ids, mask, embeds, model.compute_position_ids(ids, mask, None, None),
                                    [[(4, 8, 0)]] * 2, [[4]] * 2)
            out.ce_patch_vec.square().sum().backward()
            del out, embeds
        assert len(made) == 2 and all(ref() is None for ref in made)
    finally:
        gc.enable()
