"""Time a stage-A training step with and without ``vision_cache_mb`` (a frozen tower's features kept per image).

The demo's a5 records (question swatch and CoT strip) on the demo's tiny model (hidden 128, 2 language
layers), its vision tower frozen as the demo freezes it. Both variants run ``model.latent_loss(batch)``
forward and backward on the same collated batches, in interleaved rounds in this process (a noisy machine
hurts both alike); the cache is filled on a first pass over the batches, so the rows compare a warm cache
(every epoch after the first) with the tower run on every call. Printed: the median step of each and the
ratio, and the cache's hits, misses and bytes.

Usage::

    python benchmarks/vision_cache.py                 # 8 batches of 16, 5 rounds
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
from pathlib import Path

import torch

from latentvl import build_tiny_model, set_latent_fields
from latentvl.data.collator import LatentCollator
from latentvl.data.records import RecordDataset, load_records
from latentvl.data.tasks.writer import make_dataset
from latentvl.model.vision_cache import VisionFeatureCache


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        n = args.batches * args.batch_size
        make_dataset("a5", int(n / 0.8) + 10, 0, Path(tmp), min_hops=1, max_hops=4, token_px=28)
        records, _ = load_records(Path(tmp) / "train.jsonl")
        model, processor = build_tiny_model(seed=0, hidden_size=128, num_layers=2)
        set_latent_fields(model.config, latent_budget_alpha=1.0, latent_budget_gamma=1.0, latent_budget_max=8,
                          latent_mode_stage="A", latent_stop_loss_weight=0.0, latent_cost_weight=0.0)
        model.model.visual.requires_grad_(False)
        model.train()
        collator = LatentCollator(processor, model.config)
        items = RecordDataset(records[:n])
        batches = [collator([items[i] for i in range(b * args.batch_size, (b + 1) * args.batch_size)])
                   for b in range(args.batches)]
        cached = copy.deepcopy(model)
        cache = VisionFeatureCache(cached.model.visual, 64 * 2**20)
        cached.vision_cache = cache

        def step(m, batch) -> float:
            t0 = time.perf_counter()
            m.latent_loss(batch).loss.backward()
            m.zero_grad(set_to_none=True)
            return time.perf_counter() - t0

        for batch in batches:  # warm-up, and the cache filled
            step(model, batch)
            step(cached, batch)
        times: dict[str, list[float]] = {"tower every step": [], "vision cache (warm)": []}
        for _ in range(args.rounds):
            for batch in batches:
                torch.manual_seed(0)
                times["tower every step"].append(step(model, batch))
                torch.manual_seed(0)
                times["vision cache (warm)"].append(step(cached, batch))
        med = {k: statistics.median(v) for k, v in times.items()}
        print(f"a5 records, batch {args.batch_size}, {args.batches} batches x {args.rounds} rounds, "
              f"torch threads {torch.get_num_threads()}")
        for k, v in med.items():
            print(f"{k:<22} stage-A step {v * 1e3:8.1f} ms")
        print(f"cache: {len(cache)} images, {cache.hits} hits, {cache.misses} misses, {cache.bytes / 2**20:.2f} MiB")
        ratio = med["tower every step"] / med["vision cache (warm)"]
        print(f"stage-A step, tower every step / vision cache: {ratio:.2f}x")


if __name__ == "__main__":
    main()
