"""Throughput of step 2 (generation) with ``--engine hf`` against ``--engine vllm`` on the same records.

The tiny model (its text weights scaled so that answers depend on the input, a stage-C stop head that halts
some segments) is saved as a checkpoint; both engines answer the same records greedily (the same tokens:
vLLM's answers equal latentvl's ``generate()``) at batch 1, 8 and 64. Step 1 (the latent pass) runs in
latentvl for both. Reported per batch size: generated tokens per second of step 2 (``generation_s``) and of
the whole two-step run (wall time).

Two answer lengths: ``fixed`` (every answer exactly ``--max-new-tokens`` tokens, the end of turn held back
with ``min_new_tokens``: how serving throughput is usually measured, and the headline ratio) and
``natural`` (answers end at their end of turn, as ``latentvl eval`` decodes).

Usage (in the environment with the vllm extra, e.g. /work/venv-vllm)::

    python benchmarks/serving.py                      # 64 records, 32 new tokens, batch 1, 8, 64
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from latentvl import build_tiny_model, set_latent_fields
from latentvl.inference.generate import LatentInference
from latentvl.model.loading import load_latent_model, save_latent_checkpoint

IDLE_S = 2.0


def stage_c_checkpoint(path: Path) -> Path:
    model, processor = build_tiny_model(seed=5)
    set_latent_fields(model.config, latent_budget_alpha=0.8, latent_mode_stage="C", latent_stop_loss_weight=1.0,
                      latent_cost_weight=1e-3)
    with torch.no_grad():
        for name, w in model.model.language_model.named_parameters():
            if w.dim() == 2 and "embed" not in name:
                w.mul_(5.0)
        head = model.latent_stop_head
        head.weight.copy_(torch.randn(head.weight.shape, generator=torch.Generator().manual_seed(0)) * 0.3)
        head.bias.zero_()
    save_latent_checkpoint(copy.deepcopy(model), processor, path)
    return path


def records(n: int, folder: Path) -> list[dict]:
    rs = np.random.RandomState(0)
    sizes = [(84, 84), (112, 56), (140, 112), (56, 140), (98, 98), (126, 70)]
    out = []
    for i in range(n):
        w, h = sizes[i % len(sizes)]
        p = folder / f"img{i}.png"
        Image.fromarray(rs.randint(0, 255, (h, w, 3), dtype=np.uint8)).save(p)
        out.append({"id": f"r{i}", "question": f"Question {i}: which way?", "images": [p],
                    "cot_image_sizes": [sizes[(i + k + 1) % len(sizes)] for k in range(1 + i % 3)]})
    return out


def measure(engine: LatentInference, recs: list[dict], batch: int, max_new: int, fixed: bool) -> dict:
    # vLLM's worker process busy-waits for 1 s after its last step; start each measurement after it has gone
    # idle, so that neither engine shares the CPU with the other's spinning
    time.sleep(IDLE_S)
    t0 = time.perf_counter()
    results = engine.run(recs, batch_size=batch, max_new_tokens=max_new, min_new_tokens=max_new if fixed else 0)
    wall = time.perf_counter() - t0
    assert all(r.ok for r in results), [r.error for r in results if not r.ok]
    tokens = sum(len(r.token_ids) + int(r.finished) for r in results)
    gen_s = sum(r.timings["generation_s"] for r in results if r.index % batch == 0)
    return {"tokens": tokens, "gen_tok_s": tokens / gen_s, "wall_tok_s": tokens / wall,
            "answers": [r.token_ids for r in results]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--records", type=int, default=64)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--batches", default="1,8,64")
    ap.add_argument("--only", choices=("hf", "vllm"), default=None,
                    help="time one engine alone (no vLLM engine process beside an hf run)")
    ap.add_argument("--lengths", default="fixed,natural",
                    help="answer lengths to measure: fixed (exactly --max-new-tokens), natural (to the end of turn)")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        ckpt = stage_c_checkpoint(tmp / "ckpt")
        recs = records(args.records, tmp)
        model, processor = load_latent_model(ckpt)
        model.eval()
        engines = {}
        if args.only != "vllm":
            engines["hf"] = LatentInference(model, processor)
        if args.only != "hf":
            from latentvl.inference.vllm_engine import VLLMInference

            engines["vllm"] = VLLMInference(model, processor, ckpt, max_model_len=1024)
        for engine in engines.values():  # warm-up
            engine.run(recs[:2], batch_size=2, max_new_tokens=2)
        print(f"{args.records} records, {args.max_new_tokens} new tokens at most, greedy, "
              f"torch threads {torch.get_num_threads()}")
        headline = {}
        for length in args.lengths.split(","):
            fixed = length == "fixed"
            print(f"\n{length} answer lengths")
            print(f"{'batch':>5} {'engine':>6} {'tokens':>7} {'step-2 tok/s':>13} {'end-to-end tok/s':>17}")
            last = {}
            for batch in (int(b) for b in args.batches.split(",")):
                row = {name: measure(engine, recs, batch, args.max_new_tokens, fixed)
                       for name, engine in engines.items()}
                for name, m in row.items():
                    print(f"{batch:>5} {name:>6} {m['tokens']:>7} {m['gen_tok_s']:>13.1f} {m['wall_tok_s']:>17.1f}")
                if len(row) < 2:
                    continue
                same = row["hf"]["answers"] == row["vllm"]["answers"]
                print(f"      same answers: {same}; step-2 tokens/s vllm/hf: "
                      f"{row['vllm']['gen_tok_s'] / row['hf']['gen_tok_s']:.2f}x")
                last = row
            if len(last) == 2:
                headline[length] = last
        for length, last in headline.items():
            print(f"{'tokens/s vllm/hf' if length == 'fixed' else 'natural lengths: tokens/s vllm/hf'}: "
                  f"{last['vllm']['gen_tok_s'] / last['hf']['gen_tok_s']:.2f}x "
                  f"(end to end {last['vllm']['wall_tok_s'] / last['hf']['wall_tok_s']:.2f}x)")


if __name__ == "__main__":
    main()
