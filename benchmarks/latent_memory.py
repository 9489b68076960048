"""Training memory of pass 1: latentvl's K/V store against a KV cache that grows by concatenation.

For each (prompt length, latent steps) it runs pass 1 with autograd and prints:

- the bytes autograd keeps for backward (distinct storages seen by a saved-tensor hook, the weights
  left out, plus the store's K/V buffers: exact and the same on every device), for ``model.latent_pass`` and for the
  same batched stage-A pass written over transformers' ``DynamicCache``, whose every step saves the
  whole K/V it attended to;
- the time of forward + backward of both, and on a GPU the peak memory of both
  (``torch.cuda.max_memory_allocated``), as ratios measured in this process.

Usage::

    python benchmarks/latent_memory.py                # tiny model on CPU
    python benchmarks/latent_memory.py --model 3b     # Qwen2.5-VL-3B architecture, random bf16 weights (GPU)
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from architectures import build, describe
from latent_pass import sync, synthetic_batch
from transformers.cache_utils import DynamicCache

from latentvl import set_latent_fields
from latentvl.model.compat import CACHE_KWARG


def growing_cache_pass(model, input_ids, embeds, position_ids, segments) -> torch.Tensor:
    """Stage-A pass 1 over ``DynamicCache`` (every row has the same layout: no shifting needed)."""
    lm = model.model.language_model
    first, end = segments[0][0][0], segments[0][-1][1]
    cache = DynamicCache(config=model.config.text_config)
    h = lm(inputs_embeds=embeds[:, :first], position_ids=position_ids[..., :first], **{CACHE_KWARG: cache},
           use_cache=True).last_hidden_state[:, -1:]
    vecs = []
    for col in range(first, end):
        is_latent = any(s <= col < e for s, e, _ in segments[0])
        x = h if is_latent else embeds[:, col : col + 1]
        h = lm(inputs_embeds=x, position_ids=position_ids[..., col : col + 1], **{CACHE_KWARG: cache},
               use_cache=True).last_hidden_state
        if is_latent:
            vecs.append(x)
    return torch.cat(vecs, dim=1)


def store_pass(model, input_ids, embeds, position_ids, segments) -> torch.Tensor:
    budgets = [[e - s for s, e, _ in row] for row in segments]
    mask = torch.ones_like(input_ids)
    return model.latent_pass(input_ids, mask, embeds, position_ids, segments, budgets).ce_patch_vec


def store_pass_no_prefix_grad(model, input_ids, embeds, position_ids, segments) -> torch.Tensor:
    """The store with ``latent_prefix_grad=False``: the prefix runs without autograd."""
    set_latent_fields(model.config, latent_prefix_grad=False)
    try:
        return store_pass(model, input_ids, embeds, position_ids, segments)
    finally:
        set_latent_fields(model.config, latent_prefix_grad=True)


def saved_bytes(model, fn) -> int:
    """Bytes of the distinct storages autograd saves while ``fn`` runs, the model's weights left out."""
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in weights:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def store_buffer_bytes(model, rows: int, width: int, itemsize: int) -> int:
    """The store's K/V buffers: held by the autograd graph as context, not as saved tensors."""
    text = model.config.text_config
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    return 2 * text.num_hidden_layers * rows * text.num_key_value_heads * width * head_dim * itemsize


def measure(model, device: str, batch: int, prompt: int, steps: int, repeats: int) -> dict:
    """Bytes kept for backward, peak memory (GPU) and the fwd+bwd time ratio of both passes."""
    input_ids, _, segments, _ = synthetic_batch(model, batch, prompt, 1, steps, device)
    with torch.no_grad():
        base = model.get_input_embeddings()(input_ids)
        position_ids = model.compute_position_ids(input_ids, torch.ones_like(input_ids), None, None)
    passes = {"store": store_pass, "cache": growing_cache_pass, "no prefix grad": store_pass_no_prefix_grad}

    def run(name: str, backward: bool) -> None:
        embeds = base.detach().requires_grad_()
        vec = passes[name](model, input_ids, embeds, position_ids, segments)
        if backward:
            vec.float().square().mean().backward()
        model.zero_grad(set_to_none=True)

    row = {}
    for name in passes:
        row[name, "saved"] = saved_bytes(model, lambda name=name: run(name, backward=False))
        if device == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            run(name, backward=True)
            row[name, "peak"] = torch.cuda.max_memory_allocated() / 2**30
    for name in ("store", "no prefix grad"):
        row[name, "saved"] += store_buffer_bytes(model, batch, prompt + 1 + steps, base.element_size())
    times = {name: [] for name in ("store", "cache")}
    for _ in range(repeats):  # interleaved: noise hits both alike
        for name in times:
            sync(device)
            start = time.perf_counter()
            run(name, backward=True)
            sync(device)
            times[name].append(time.perf_counter() - start)
    row["time ratio"] = statistics.median(times["store"]) / statistics.median(times["cache"])
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=["tiny", "3b", "8b"], default="tiny",
                    help="tiny, Qwen2.5-VL-3B or Qwen3-VL-8B architecture (benchmarks/architectures.py)")
    ap.add_argument("--backbone", choices=["qwen2_5_vl", "qwen3_vl"], default="qwen2_5_vl",
                    help="the tiny model's family")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--prompts", type=int, nargs="+", default=None, help="default 128 512 (tiny), 512 2048 (3b)")
    ap.add_argument("--steps", type=int, nargs="+", default=[16, 64], help="latents (one segment)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--layers", type=int, default=None, help="3b/8b only: fewer text layers (a quick check)")
    args = ap.parse_args()

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float32 if args.model == "tiny" else torch.bfloat16
    prompts = args.prompts or ([128, 512] if args.model == "tiny" else [512, 2048])
    torch.manual_seed(0)
    model = build(args.model, device, dtype, args.layers, args.backbone).train()
    model.requires_grad_(True)
    dev = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    print(f"device: {dev}; "
          f"model: {describe(args.model, args.backbone)} ({dtype}); batch {args.batch}; stage A; one segment; "
          f"fwd+bwd median of {args.repeats}")
    head = (f"{'prompt':>7}{'steps':>7}{'saved MiB store':>17}{'saved MiB cache':>17}{'ratio':>8}"
            f"{'time ratio':>12}{'no prefix grad':>16}")
    print(head + (f"{'peak GiB store':>16}{'peak GiB cache':>16}{'no prefix grad':>16}" if device == "cuda" else ""))
    for prompt in prompts:
        for steps in args.steps:
            row = measure(model, device, args.batch, prompt, steps, args.repeats)
            s_store, s_cache = row["store", "saved"] / 2**20, row["cache", "saved"] / 2**20
            line = (f"{prompt:>7}{steps:>7}{s_store:>17.1f}{s_cache:>17.1f}{s_cache / s_store:>7.1f}x"
                    f"{row['time ratio']:>11.2f}x{row['no prefix grad', 'saved'] / 2**20:>16.1f}")
            if device == "cuda":
                line += "".join(f"{row[k, 'peak']:>16.2f}" for k in ("store", "cache", "no prefix grad"))
            print(line, flush=True)
    print("ratio: cache / store bytes kept for backward; time ratio: store / cache (below 1 = store faster); "
          "no prefix grad: the store with latent_prefix_grad=False")


if __name__ == "__main__":
    main()
