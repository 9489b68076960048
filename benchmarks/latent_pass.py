"""Time the batched latent pass against a per-sample loop and against ``generate()``.

Prints one table with per-step times and their ratios, all measured in this process:

- batched: ``model.latent_pass`` (all samples advance together, one model call per column);
- per-sample loop: each sample alone, one call per latent with a ``.item()`` host read of the stop
  probability per step (how the original design note sketches it);
- ``generate()``: per generated token, same batch and prompt (the floor a latent step can hope for).

Beside the times it counts the aten operators each method dispatches per step (views left out): on a
GPU, where a step of a small batch is bound by kernel launches, that count predicts the time, and it is
the same on every machine.

Usage::

    python benchmarks/latent_pass.py                 # tiny Qwen2.5-VL on CPU
    python benchmarks/latent_pass.py --backbone qwen3_vl   # tiny Qwen3-VL on CPU
    python benchmarks/latent_pass.py --model 3b      # Qwen2.5-VL-3B architecture, random bf16 weights (GPU)
    python benchmarks/latent_pass.py --model 8b      # Qwen3-VL-8B architecture, random bf16 weights (GPU)
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from architectures import build, describe
from torch.utils._python_dispatch import TorchDispatchMode
from transformers.cache_utils import DynamicCache

from latentvl import set_latent_fields
from latentvl.model.compat import CACHE_KWARG


def synthetic_batch(model, batch: int, prompt: int, segments: int, budget: int, device: str):
    """Text-only prompts of ``prompt`` tokens followed by ``segments`` latent segments of ``budget``."""
    cfg = model.config
    g = torch.Generator().manual_seed(0)
    rows, segs = [], []
    for _ in range(batch):
        ids = torch.randint(10, 90, (prompt,), generator=g).tolist()
        spans = []
        for i in range(segments):
            ids.append(cfg.latent_start_token_id)
            spans.append((len(ids), len(ids) + budget, i))
            ids += [cfg.latent_token_id] * budget + [cfg.latent_end_token_id]
        rows.append(ids)
        segs.append(spans)
    input_ids = torch.tensor(rows, device=device)
    return input_ids, torch.ones_like(input_ids), segs, [[budget] * segments for _ in range(batch)]


class _OpCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += not getattr(func, "is_view", False)
        return func(*args, **(kwargs or {}))


def count_ops(fn) -> int:
    """aten operators ``fn`` dispatches, views left out: a device-independent measure of launch overhead."""
    with _OpCounter() as counter:
        fn()
    return counter.count


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: str) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


@torch.no_grad()
def per_sample_loop(model, input_ids, segments, threshold: float) -> None:
    """One sample at a time, one call per slot, a host read of the stop probability at every step."""
    lm = model.model.language_model
    for b in range(input_ids.shape[0]):
        ids = input_ids[b : b + 1]
        embeds = model.get_input_embeddings()(ids)
        first = segments[b][0][0]
        cache = DynamicCache(config=model.config.text_config)
        pos = torch.arange(ids.shape[1], device=ids.device).view(1, 1, -1).expand(3, 1, -1)
        h = lm(inputs_embeds=embeds[:, :first], position_ids=pos[..., :first], **{CACHE_KWARG: cache},
               use_cache=True).last_hidden_state[:, -1:]
        for col in range(first, segments[b][-1][1]):
            is_latent = any(s <= col < e for s, e, _ in segments[b])
            x = h if is_latent else embeds[:, col : col + 1]
            h = lm(inputs_embeds=x, position_ids=pos[..., col : col + 1], **{CACHE_KWARG: cache},
                   use_cache=True).last_hidden_state
            if is_latent and torch.sigmoid(model.latent_stop_head(h)).item() >= threshold:
                pass  # the loop style reads the decision on the host every step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=["tiny", "3b", "8b"], default="tiny",
                    help="tiny, Qwen2.5-VL-3B or Qwen3-VL-8B architecture (benchmarks/architectures.py)")
    ap.add_argument("--backbone", choices=["qwen2_5_vl", "qwen3_vl"], default="qwen2_5_vl",
                    help="the tiny model's family")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompt", type=int, default=None, help="prompt tokens (default 128 tiny, 512 3b)")
    ap.add_argument("--segments", type=int, default=4)
    ap.add_argument("--budget", type=int, default=8)
    ap.add_argument("--stage", choices=["A", "C"], default="C")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--layers", type=int, default=None,
                    help="text layers (tiny: 4, the demo's model 2; 3b/8b: fewer is a quick check)")
    args = ap.parse_args()

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float32 if args.model == "tiny" else torch.bfloat16
    prompt = args.prompt or (128 if args.model == "tiny" else 512)
    torch.manual_seed(0)
    model = build(args.model, device, dtype, args.layers, args.backbone)
    if args.stage == "C":
        set_latent_fields(model.config, latent_mode_stage="C", latent_stop_loss_weight=1.0, latent_cost_weight=1e-3)
        with torch.no_grad():
            model.latent_stop_head.bias.fill_(-20.0)  # never halts: every run walks every slot
    # Two batches that differ only in the latent budget: the difference of their times over the
    # difference of their step counts is the marginal cost of one latent step (prefix excluded).
    short = synthetic_batch(model, args.batch, prompt, args.segments, args.budget, device)
    long = synthetic_batch(model, args.batch, prompt, args.segments, 2 * args.budget, device)

    def steps_of(batch) -> int:
        segs = batch[2][0]
        return segs[-1][1] - segs[0][0]

    def batched(batch):
        input_ids, mask, segs, budgets = batch

        def run():
            with torch.no_grad():
                embeds = model.get_input_embeddings()(input_ids)
                pos = model.compute_position_ids(input_ids, mask, None, None)
                model.latent_pass(input_ids, mask, embeds, pos, segs, budgets)
        return run

    def loop(batch, rows: int | None = None):
        return lambda: per_sample_loop(model, batch[0][:rows], batch[2][:rows], 0.5)

    def generate(n):
        input_ids, mask = short[0], short[1]

        def run():
            with torch.no_grad():
                model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                               do_sample=False, pad_token_id=0)
        return run

    ds = steps_of(long) - steps_of(short)
    runs = {"batched": (batched(short), batched(long)), "loop": (loop(short), loop(long)),
            "generate": (generate(1), generate(1 + ds))}
    for pair in runs.values():  # warm-up
        for fn in pair:
            fn()
    times: dict[str, list[list[float]]] = {k: [[], []] for k in runs}
    for _ in range(args.repeats):  # interleaved rounds: a noisy machine hurts every method alike
        for name, pair in runs.items():
            for i, fn in enumerate(pair):
                times[name][i].append(timed(fn, device))
    med = {k: [statistics.median(v[0]), statistics.median(v[1])] for k, v in times.items()}
    per_step = {k: (v[1] - v[0]) / ds for k, v in med.items()}
    # The synthetic rows share one layout, so the loop's count is one sample's times the batch size.
    counted = {**runs, "loop": (loop(short, rows=1), loop(long, rows=1))}
    scale = {"loop": args.batch}
    ops = {k: scale.get(k, 1) * (count_ops(pair[1]) - count_ops(pair[0])) / ds for k, pair in counted.items()}

    dev = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    print(f"device: {dev}; "
          f"model: {describe(args.model, args.backbone)} ({dtype}); batch {args.batch}; prompt {prompt}; "
          f"{args.segments} segments x {2 * args.budget} latents ({steps_of(long)} steps); stage {args.stage}; "
          f"median of {args.repeats}")
    print(f"{'what':<46}{'whole pass ms':>14}{'per step ms':>13}{'ops per step':>14}")
    rows = [("batched latent pass", "batched"), ("per-sample loop, .item() per step", "loop"),
            ("generate(), per token (same batch, prompt)", "generate")]
    for label, k in rows:
        whole = f"{med[k][1] * 1e3:.1f}" if k != "generate" else ""
        print(f"{label:<46}{whole:>14}{per_step[k] * 1e3:>13.2f}{ops[k]:>14.0f}")
    print(f"speed-up of batched over per-sample loop: whole pass {med['loop'][1] / med['batched'][1]:.1f}x, "
          f"per latent step {per_step['loop'] / per_step['batched']:.1f}x")
    print(f"batched latent step / generate() token: {per_step['batched'] / per_step['generate']:.2f}x "
          f"(ops: {ops['batched'] / ops['generate']:.2f}x)")
    print("ops per step: aten operators dispatched, views left out (about one kernel launch each on a GPU)")


if __name__ == "__main__":
    main()
