"""Time a training step (forward + backward) of stage A and stage C against a plain CE step, eager and
with ``latent_compile``; and pass 1 alone, with and without gradient.

Everything is measured in this process, in interleaved rounds (a noisy machine hurts every variant alike),
and printed as times and ratios:

- plain CE step: one forward + backward of the same batch as ordinary text (latent slots as tokens);
- stage A / stage C step: ``model.latent_loss(batch).loss.backward()`` (pass 1, pass 2, losses);
- pass 1 alone: ``latent_pass`` forward + backward of a fixed linear function of the latents, i.e. the
  part of the step that pass 1 costs (its share of the step is printed);
- inference: ``latent_pass`` without gradient, per latent step (the marginal cost between two budgets).

Each variant runs eager and compiled (``latent_compile``, inductor); the first compiled call of each
shape, which builds the graphs, is timed apart ("compile") and left out of the medians.

Usage::

    python benchmarks/train_step.py                  # tiny model on CPU, batch 8
    python benchmarks/train_step.py --model 3b       # Qwen2.5-VL-3B architecture, random bf16 weights (GPU)
"""

from __future__ import annotations

import argparse
import statistics

import torch
from architectures import build, describe
from latent_pass import synthetic_batch, timed
from torch._dynamo.utils import counters

from latentvl import set_latent_fields


def training_batch(model, batch: int, prompt: int, segments: int, budget: int, answer: int, device: str) -> dict:
    """A collated batch: prompt, ``segments`` latent segments of ``budget``, ``answer`` labelled tokens."""
    input_ids, _, segs, budgets = synthetic_batch(model, batch, prompt, segments, budget, device)
    g = torch.Generator().manual_seed(1)
    tail = torch.randint(10, 90, (batch, answer), generator=g).to(device)
    input_ids = torch.cat([input_ids, tail], dim=1)
    labels = torch.full_like(input_ids, -100)
    labels[:, -answer:] = tail
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels,
            "latent_segments": segs, "latent_budgets": budgets}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=["tiny", "3b", "8b"], default="tiny",
                    help="tiny, Qwen2.5-VL-3B or Qwen3-VL-8B architecture (benchmarks/architectures.py)")
    ap.add_argument("--backbone", choices=["qwen2_5_vl", "qwen3_vl"], default="qwen2_5_vl",
                    help="the tiny model's family")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompt", type=int, default=None, help="prompt tokens (default 64 tiny, 512 3b)")
    ap.add_argument("--segments", type=int, default=2)
    ap.add_argument("--budget", type=int, default=8)
    ap.add_argument("--answer", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--layers", type=int, default=None,
                    help="text layers (tiny: 4, the demo's model 2; 3b/8b: fewer is a quick check)")
    ap.add_argument("--backend", default="inductor", help="torch.compile backend for the compiled variants")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's own)")
    ap.add_argument("--no-inference", action="store_true", help="skip the inference rows (two more compiles)")
    ap.add_argument("--no-training", action="store_true", help="only the inference rows")
    args = ap.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float32 if args.model == "tiny" else torch.bfloat16
    prompt = args.prompt or (64 if args.model == "tiny" else 512)
    torch.manual_seed(0)
    model = build(args.model, device, dtype, args.layers, args.backbone).train()
    # alignment needs CoT images; it is one vision call without gradient and a cosine loss, left out here
    set_latent_fields(model.config, latent_align_weight=0.0)
    batch = training_batch(model, args.batch, prompt, args.segments, args.budget, args.answer, device)
    steps = batch["latent_segments"][0][-1][1] - batch["latent_segments"][0][0][0]

    def configure(stage: str, compiled: bool) -> None:
        changes = {"latent_mode_stage": stage, "latent_compile": args.backend if compiled else False}
        if stage == "C":
            changes["latent_stop_loss_weight"] = 1.0
        set_latent_fields(model.config, **changes)

    def plain_ce():
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
        out.loss.backward()

    def latent_step():
        model.latent_loss(batch).loss.backward()

    probe = torch.randn(model.config.text_config.hidden_size, generator=torch.Generator().manual_seed(2))
    probe = probe.to(device, dtype)

    def pass1():
        ids, mask = batch["input_ids"], batch["attention_mask"]
        embeds = model.embed_inputs(ids, None, None)
        pos = model.compute_position_ids(ids, mask, None, None)
        p1 = model.latent_pass(ids, mask, embeds, pos, batch["latent_segments"], batch["latent_budgets"])
        (p1.ce_patch_vec @ probe).sum().backward()

    def inference(budget: int):
        ids, mask, segs, budgets = synthetic_batch(model, args.batch, prompt, args.segments, budget, device)

        def run():
            with torch.no_grad():
                embeds = model.get_input_embeddings()(ids)
                pos = model.compute_position_ids(ids, mask, None, None)
                model.latent_pass(ids, mask, embeds, pos, segs, budgets)
        return run

    def variant(fn, stage: str, compiled: bool):
        def run():
            configure(stage, compiled)
            model.zero_grad(set_to_none=True)
            fn()
        return run

    runs = {}
    if not args.no_training:
        runs["plain CE step"] = variant(plain_ce, "A", False)
        for stage in ("A", "C"):
            for compiled in (False, True):
                tag = "compiled" if compiled else "eager"
                runs[f"stage {stage} step, {tag}"] = variant(latent_step, stage, compiled)
                runs[f"stage {stage} pass 1 fwd+bwd, {tag}"] = variant(pass1, stage, compiled)
    if not args.no_inference:
        for stage in ("A", "C"):
            for compiled in (False, True):
                tag = f"stage {stage}, {'compiled' if compiled else 'eager'}"
                for budget in (args.budget, 2 * args.budget):
                    runs[f"inference pass 1, budget {budget}, {tag}"] = variant(inference(budget), stage, compiled)

    counters.clear()
    first = {name: timed(fn, device) for name, fn in runs.items()}  # warm-up; builds the compiled graphs
    graphs, breaks = counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())
    times: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(args.repeats):
        for name, fn in runs.items():
            times[name].append(timed(fn, device))
    med = {k: statistics.median(v) for k, v in times.items()}

    dev = torch.cuda.get_device_name() if device == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"device: {dev}; "
          f"model: {describe(args.model, args.backbone)} ({dtype}); batch {args.batch}; prompt {prompt}; "
          f"{args.segments} segments x {args.budget} latents ({steps} steps); answer {args.answer}; "
          f"backend {args.backend}; median of {args.repeats}")
    print(f"compiled: {graphs} graphs captured (pass 1: one per pass shape and grad mode; pass 2: one per "
          f"stage), {breaks} graph breaks")
    if args.no_training:
        print_inference(args, med, first)
        return
    ce = med["plain CE step"]
    print(f"{'what':<44}{'ms':>10}{'/ CE step':>11}{'compile s':>11}")
    for name in runs:
        if name.startswith("inference"):
            continue
        compile_s = f"{first[name] - med[name]:.1f}" if name.endswith("compiled") else ""
        print(f"{name:<44}{med[name] * 1e3:>10.1f}{med[name] / ce:>10.2f}x{compile_s:>11}")
    for stage in ("A", "C"):
        for tag in ("eager", "compiled"):
            share = med[f"stage {stage} pass 1 fwd+bwd, {tag}"] / med[f"stage {stage} step, {tag}"]
            print(f"stage {stage}, {tag}: pass 1 is {share:.0%} of the step")
        speed = med[f"stage {stage} step, eager"] / med[f"stage {stage} step, compiled"]
        speed1 = med[f"stage {stage} pass 1 fwd+bwd, eager"] / med[f"stage {stage} pass 1 fwd+bwd, compiled"]
        print(f"stage {stage}: compiled over eager: step {speed:.2f}x, pass 1 fwd+bwd {speed1:.2f}x")
    if not args.no_inference:
        print_inference(args, med, first)


def print_inference(args, med: dict[str, float], first: dict[str, float]) -> None:
    """The inference rows: per latent step (the marginal cost between two budgets) and whole pass."""
    ds = args.segments * args.budget
    for stage in ("A", "C"):
        per_step = {}
        for how in ("eager", "compiled"):
            tag = f"stage {stage}, {how}"
            a = med[f"inference pass 1, budget {args.budget}, {tag}"]
            b = med[f"inference pass 1, budget {2 * args.budget}, {tag}"]
            per_step[how] = (b - a) / ds
            compile_s = ""
            if how == "compiled":
                compile_s = (f"; compile {first[f'inference pass 1, budget {args.budget}, {tag}'] - a:.1f} s + "
                             f"{first[f'inference pass 1, budget {2 * args.budget}, {tag}'] - b:.1f} s")
            print(f"inference (no grad), {tag}: whole pass {b * 1e3:.1f} ms, per latent step "
                  f"{per_step[how] * 1e3:.2f} ms{compile_s}")
        whole = {how: med[f"inference pass 1, budget {2 * args.budget}, stage {stage}, {how}"]
                 for how in ("eager", "compiled")}
        print(f"inference, stage {stage}: compiled over eager per latent step "
              f"{per_step['eager'] / per_step['compiled']:.2f}x, whole pass "
              f"{whole['eager'] / whole['compiled']:.2f}x")


if __name__ == "__main__":
    main()
