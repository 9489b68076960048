"""``latent_compile``: pass 1's static-shape step under ``torch.compile`` equals the eager pass.

Graph capture is checked with dynamo alone (backend "eager") and, in training, through AOTAutograd
(backend "aot_eager", forward and backward graphs); one test runs inductor. Compile times stay small:
the tiny model, three rows, a few steps.
"""

from __future__ import annotations

import types

import pytest
import torch
from helpers import talking_tiny_model
from torch._dynamo.utils import counters

from latentvl import LatentSettings, build_tiny_model, set_latent_fields
from latentvl.errors import LatentConfigError

pytestmark = pytest.mark.slow


def _rms_norm_in_input_dtype(self, x):
    return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))


def _model(dtype: torch.dtype, backbone: str):
    model, _ = build_tiny_model(seed=3, backbone=backbone)
    with torch.no_grad():  # a stop head that fires at some slots and not at others
        model.latent_stop_head.weight.normal_(0, 0.5, generator=torch.Generator().manual_seed(0))
        model.latent_stop_head.bias.zero_()
    if dtype == torch.float64:  # the stock RMSNorm computes in float32 whatever its input
        for m in model.modules():
            if type(m).__name__.endswith("RMSNorm"):
                m.forward = types.MethodType(_rms_norm_in_input_dtype, m)
    return model.to(dtype)


@pytest.fixture(scope="module")
def tiny32(backbone):
    return _model(torch.float32, backbone)


@pytest.fixture(scope="module")
def tiny64(backbone):
    return _model(torch.float64, backbone)


def _batch(model):
    """Three rows, right-padded: different prompt lengths, two segments of different budgets, text between."""
    cfg = model.config
    rows, segs, budgets = [], [], []
    for r, (prompt, b1, b2) in enumerate([(5, 3, 2), (7, 2, 3), (4, 3, 3)]):
        ids = [10 + (3 * i + r) % 60 for i in range(prompt)]
        spans = []
        for k, b in enumerate((b1, b2)):
            ids.append(cfg.latent_start_token_id)
            spans.append((len(ids), len(ids) + b, k))
            ids += [cfg.latent_token_id] * b + [cfg.latent_end_token_id] + [20 + r]
        rows.append(ids)
        segs.append(spans)
        budgets.append([b1, b2])
    width = max(map(len, rows))
    mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in rows])
    ids = torch.tensor([x + [0] * (width - len(x)) for x in rows])
    return ids, mask, segs, budgets


def _pass1(model, batch, compile_option, weights=None):
    """Pass 1 with ``latent_compile=compile_option``; with ``weights`` also the gradient of every parameter
    of a fixed linear function of the latents and stop logits."""
    ids, mask, segs, budgets = batch
    set_latent_fields(model.config, latent_compile=compile_option)
    try:
        with torch.set_grad_enabled(weights is not None):
            embeds = model.get_input_embeddings()(ids)
            pos = model.compute_position_ids(ids, mask, None, None)
            p1 = model.latent_pass(ids, mask, embeds, pos, segs, budgets)
            grads = None
            if weights is not None:
                w, u = weights
                loss = (p1.ce_patch_vec * w[p1.ce_patch_pos[:, 0], p1.ce_patch_pos[:, 1]]).sum()
                if p1.stop_logits is not None:
                    loss = loss + (p1.stop_logits * u).sum()
                params = [p for p in model.parameters() if p.requires_grad]
                grads = torch.autograd.grad(loss, params, allow_unused=True)
    finally:
        set_latent_fields(model.config, latent_compile=False)
    return p1, grads


def _stage(model, stage: str, **extra) -> None:
    set_latent_fields(model.config, latent_mode_stage=stage, latent_stop_loss_weight=1.0, **extra)


def _assert_same_pass(a, b, rtol: float, atol: float) -> None:
    assert torch.equal(a.ce_patch_pos, b.ce_patch_pos)
    assert torch.equal(a.latent_kv_mask, b.latent_kv_mask)
    assert torch.equal(a.used_lens, b.used_lens)
    torch.testing.assert_close(a.ce_patch_vec, b.ce_patch_vec, rtol=rtol, atol=atol)
    assert (a.stop_logits is None) == (b.stop_logits is None)
    if a.stop_logits is not None:
        torch.testing.assert_close(a.stop_logits, b.stop_logits, rtol=rtol, atol=atol)
        assert torch.equal(a.stop_step_active, b.stop_step_active)


def test_latent_compile_setting_is_validated():
    assert LatentSettings().latent_compile is False
    for ok in (False, True, "inductor", "aot_eager", "eager"):
        LatentSettings(latent_compile=ok).validate()
    for bad in ("fast", 1, None):
        with pytest.raises(LatentConfigError, match="latent_compile"):
            LatentSettings(latent_compile=bad).validate()


@pytest.mark.parametrize("stage", ["A", "C"])
def test_compiled_inference_is_one_graph_and_equals_eager(tiny32, stage, one_thread):
    """No gradient: every step of every pass of one shape replays a single captured graph (no graph
    break, no recompilation), and latents, stop logits, halting and the kv mask equal the eager pass."""
    model = tiny32
    _stage(model, stage)
    batch = _batch(model)
    want, _ = _pass1(model, batch, False)
    if stage == "C":  # the batch exercises halting: some segment stops before its budget
        assert any(u < b for used, bud in zip(want.latent_used_lens, batch[3]) for u, b in zip(used, bud))
    torch._dynamo.reset()
    counters.clear()
    got, _ = _pass1(model, batch, "eager")
    again, _ = _pass1(model, batch, "eager")
    assert counters["stats"]["unique_graphs"] == 1
    assert not counters["graph_break"]
    assert counters["stats"]["calls_captured"] > 0
    _assert_same_pass(got, want, rtol=1e-5, atol=1e-6)
    _assert_same_pass(again, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("stage, extra", [
    ("A", {}), ("C", {}), ("C", {"latent_null_scale": 0.3}), ("C", {"latent_detach_step_inputs": True}),
    ("C", {"latent_detach_step_inputs": True, "latent_prefix_grad": False}),
])
def test_compiled_training_pass_gives_the_eager_values_and_gradients(tiny64, stage, extra, one_thread):
    """Under autograd the compiled step is one graph too (AOTAutograd's forward and backward graphs with
    the K/V store's step operator inside; no graph break, no recompilation) and gives the eager pass's
    latents, stop logits and the gradient of every parameter (float64, to 1e-9). With
    ``latent_detach_step_inputs`` only the order tokens sequence the steps' backwards."""
    model = tiny64
    _stage(model, stage, **{"latent_null_scale": 0.0, "latent_detach_step_inputs": False,
                            "latent_prefix_grad": True, **extra})
    batch = _batch(model)
    g = torch.Generator().manual_seed(1)
    shape = batch[0].shape
    w = torch.randn(*shape, model.config.text_config.hidden_size, generator=g, dtype=torch.float64)
    u = torch.randn(*shape, generator=g, dtype=torch.float64)
    want, grads_want = _pass1(model, batch, False, (w, u))
    torch._dynamo.reset()
    counters.clear()
    got, grads_got = _pass1(model, batch, "aot_eager", (w, u))
    assert counters["stats"]["unique_graphs"] == 1
    assert not counters["graph_break"]
    _assert_same_pass(got, want, rtol=1e-9, atol=1e-12)
    assert sum(x is not None for x in grads_want) > 10
    for a, b in zip(grads_got, grads_want):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_inductor_compiled_inference_equals_eager(tiny32, one_thread):
    """The default backend (``latent_compile=True``: inductor, generated C++ on CPU) to float32 precision."""
    model = tiny32
    _stage(model, "C")
    batch = _batch(model)
    want, _ = _pass1(model, batch, False)
    got, _ = _pass1(model, batch, True)
    _assert_same_pass(got, want, rtol=1e-5, atol=1e-5)


def test_compiled_steps_take_the_cpp_wrapper_only_without_gradient(tiny32, monkeypatch, one_thread):
    """On a CPU the no-grad step is compiled with inductor's C++ wrapper, the step under autograd without."""
    from latentvl.model import pass1

    asked, compiled = [], pass1.compiled_latent_step

    def recording(backend="inductor", cpp_wrapper=False):
        asked.append((backend, cpp_wrapper))
        return compiled(backend, cpp_wrapper)

    monkeypatch.setattr(pass1, "compiled_latent_step", recording)
    model = tiny32
    _stage(model, "A")
    batch = _batch(model)
    w = torch.randn(*batch[0].shape, model.config.text_config.hidden_size)
    _pass1(model, batch, "eager")
    _pass1(model, batch, "eager", (w, torch.zeros(batch[0].shape)))
    assert asked == [("eager", True), ("eager", False)]


# ------------------------------------------------------------------------------------ training step
def _loss_batch(model, extra_pad: int = 0, rows: int = 3) -> dict:
    """:func:`_batch` as a collated training batch (labels on the text after the segments), right-padded
    by ``extra_pad`` more columns and cut to ``rows`` rows: other shapes of the same samples."""
    ids, mask, segs, budgets = _batch(model)
    ids = torch.nn.functional.pad(ids, (0, extra_pad))[:rows]
    mask = torch.nn.functional.pad(mask, (0, extra_pad))[:rows]
    labels = torch.where(mask.bool(), ids, -100)
    labels[:, :8] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "latent_segments": segs[:rows],
            "latent_budgets": budgets[:rows]}


def _loss_and_grads(model, batch: dict, compile_option):
    set_latent_fields(model.config, latent_compile=compile_option)
    try:
        out = model.latent_loss(batch)
        params = [p for p in model.parameters() if p.requires_grad]
        return out, torch.autograd.grad(out.loss, params, allow_unused=True)
    finally:
        set_latent_fields(model.config, latent_compile=False)


def _pass2_graphs() -> int:
    from latentvl.model.objective import _pass2_forward

    return len(torch._dynamo.eval_frame._debug_get_cache_entry_list(_pass2_forward.__code__))


@pytest.mark.parametrize("stage", ["A", "C"])
def test_compiled_training_step_gives_the_eager_loss_and_gradients(tiny64, stage, one_thread):
    """``latent_loss`` under ``latent_compile`` (pass 1's steps and pass 2's forward compiled; stage C's
    ``latent_kv_mask`` in pass 2) gives the eager loss, logits and the gradient of every parameter
    (float64, to 1e-9), without a graph break. Pass 2's recompiles are bounded: a static graph first, then
    one more each time a size (length, then rows) first changes; a later shape compiles nothing."""
    model = tiny64
    _stage(model, stage, latent_null_scale=0.0, latent_detach_step_inputs=False, latent_prefix_grad=True,
           latent_align_weight=0.0)
    torch._dynamo.reset()
    counters.clear()
    graphs = []
    for extra_pad, rows in ((0, 3), (2, 3), (5, 2), (1, 3), (3, 2)):
        batch = _loss_batch(model, extra_pad, rows)
        want, grads_want = _loss_and_grads(model, batch, False)
        got, grads_got = _loss_and_grads(model, batch, "aot_eager")
        torch.testing.assert_close(got.loss, want.loss, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(got.logits, want.logits, rtol=1e-9, atol=1e-12)
        if stage == "C":
            torch.testing.assert_close(got.stop, want.stop, rtol=1e-9, atol=1e-12)
        assert sum(x is not None for x in grads_want) > 10
        for a, b in zip(grads_got, grads_want):
            assert (a is None) == (b is None)
            if a is not None:
                torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
        graphs.append(_pass2_graphs())
    assert not counters["graph_break"]
    assert graphs[:3] == [1, 2, 3] and graphs[3:] == [3, 3]


# ---------------------------------------------------------------------------------------- generation
@pytest.fixture(scope="module")
def talker(backbone):
    """A stage-C tiny model whose greedy answers depend on the input (text weights scaled up) and whose
    stop head halts some segments early; with its processor."""
    model, processor = talking_tiny_model(backbone=backbone)
    set_latent_fields(model.config, latent_mode_stage="C", latent_stop_loss_weight=1.0)
    return model.eval(), processor


def _generation_inputs(model):
    """Left-padded prompts of different lengths, two latent segments each; pass 1's patches and mask."""
    cfg = model.config
    rows, segs, budgets = [], [], []
    for r, (prompt, b1, b2) in enumerate([(6, 4, 3), (9, 3, 4), (4, 4, 4)]):
        ids = [10 + (5 * i + 3 * r) % 70 for i in range(prompt)]
        spans = []
        for k, b in enumerate((b1, b2)):
            ids.append(cfg.latent_start_token_id)
            spans.append((len(ids), len(ids) + b, k))
            ids += [cfg.latent_token_id] * b + [cfg.latent_end_token_id]
        rows.append(ids)
        segs.append(spans)
        budgets.append([b1, b2])
    width = max(map(len, rows))
    pads = [width - len(x) for x in rows]
    ids = torch.tensor([[0] * p + x for p, x in zip(pads, rows)])
    mask = torch.tensor([[0] * p + [1] * len(x) for p, x in zip(pads, rows)])
    segs = [[(s + p, e + p, i) for s, e, i in spans] for p, spans in zip(pads, segs)]
    with torch.no_grad():
        embeds = model.get_input_embeddings()(ids)
        p1 = model.latent_pass(ids, mask, embeds, model.compute_position_ids(ids, mask, None, None), segs, budgets)
    assert not bool(p1.latent_kv_mask.all())  # some slots are gated out
    return {"input_ids": ids, "attention_mask": mask, "ce_patch_pos": p1.ce_patch_pos,
            "ce_patch_vec": p1.ce_patch_vec, "latent_kv_mask": p1.latent_kv_mask}


def _generate(model, inputs, compile_option, static=None, steps=8):
    from latentvl.inference.generate import GenerationSettings

    config = GenerationSettings(max_new_tokens=steps, compile=compile_option).generation_config(0, [])
    if static:  # a static cache, eager
        config.cache_implementation = "static"
    with torch.no_grad():
        return model.generate(**inputs, generation_config=config)[:, inputs["input_ids"].shape[1]:]


@pytest.mark.parametrize("null_scale", [0.0, 0.3])
def test_static_cache_generation_gives_the_dynamic_cache_tokens(talker, null_scale, one_thread):
    """Pass 2 on transformers' static cache, eager and compiled (dynamo, one graph for every decoding step,
    no graph break), gives the tokens of the default dynamic-cache decoding, with slots gated out (removed,
    or softly scaled). The static prefill has more keys than queries under a skipped causal mask: the gated
    attention aligns it as sdpa's is_causal does."""
    model, _ = talker
    set_latent_fields(model.config, latent_null_scale=null_scale)
    try:
        inputs = _generation_inputs(model)
        want = _generate(model, inputs, False)
        assert len(set(want.flatten().tolist())) > 3  # the answers are not one repeated token
        assert torch.equal(_generate(model, inputs, False, static=True), want)
        torch._dynamo.reset()
        counters.clear()
        got = _generate(model, inputs, "eager")
        again = _generate(model, inputs, "eager")
        assert counters["stats"]["unique_graphs"] == 1
        assert not counters["graph_break"]
        assert torch.equal(got, want) and torch.equal(again, want)
    finally:
        set_latent_fields(model.config, latent_null_scale=0.0)


def test_inductor_compiled_generation_gives_the_eager_tokens(talker, one_thread):
    model, _ = talker
    inputs = _generation_inputs(model)
    assert torch.equal(_generate(model, inputs, True), _generate(model, inputs, False))


def test_compiled_generation_settings_are_checked(talker, monkeypatch):
    from latentvl.inference.generate import GenerationSettings, LatentInference

    for bad in ("fast", 1, None):
        with pytest.raises(ValueError, match="compile"):
            GenerationSettings(compile=bad)
    config = GenerationSettings(compile="aot_eager").generation_config(0, [1])
    assert config.cache_implementation == "static" and config.compile_config.backend == "aot_eager"
    assert GenerationSettings().generation_config(0, [1]).cache_implementation is None
    model, processor = talker
    engine = LatentInference(model, processor)
    monkeypatch.setattr(type(model), "text_attention", property(lambda self: "latent_flash_attention_2"))
    with pytest.raises(ValueError, match="latent_sdpa or latent_eager"):
        engine.generate({}, None, None, GenerationSettings(compile=True))
