"""Time a training batch's data with and without ``image_cache_mb`` (decoded and processed images kept).

The demo's a5 records (question swatch and CoT strip, words of up to five ops) through the demo's collator:
each batch is read from disk and collated, as the trainer's data loader does. With ``image_cache_mb`` the
dataset keeps each file's decoded pixels and the collator each image's patch rows (and, always, each text's
token ids). Both variants run on the same batches in interleaved rounds in this process (a noisy machine hurts
both alike); the caches are filled on a first pass over the batches, so the rows compare warm caches (every
epoch after the first) with decoding and processing on every call. Printed: the median batch of each, the
ratio, and the caches' hits, misses and bytes.

Usage::

    python benchmarks/image_cache.py                 # 60 batches of 16, 3 rounds, 1 thread
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from latentvl import build_tiny_model, set_latent_fields
from latentvl.data.collator import LatentCollator
from latentvl.data.image_cache import DecodedImageCache, ProcessedImageCache
from latentvl.data.records import RecordDataset, load_records
from latentvl.data.tasks.writer import make_dataset


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", type=int, default=60)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        n = args.batches * args.batch_size
        make_dataset("a5", int(n / 0.8) + 10, 0, Path(tmp), min_hops=1, max_hops=5, token_px=28)
        records, _ = load_records(Path(tmp) / "train.jsonl")
        model, processor = build_tiny_model(seed=0, hidden_size=128, num_layers=2)
        set_latent_fields(model.config, latent_budget_alpha=1.0, latent_budget_gamma=1.0, latent_budget_max=8)
        cache, decoded = ProcessedImageCache(64 * 2**20), DecodedImageCache(64 * 2**20)
        variants = {
            "decoded and processed": (RecordDataset(records[:n]), LatentCollator(processor, model.config)),
            "image_cache_mb: 64": (RecordDataset(records[:n], decoded),
                                   LatentCollator(processor, model.config, image_cache=cache)),
        }
        spans = [range(b * args.batch_size, (b + 1) * args.batch_size) for b in range(args.batches)]

        def one(variant, span) -> float:
            items, collator = variant
            t0 = time.perf_counter()
            collator([items[i] for i in span])
            return time.perf_counter() - t0

        for span in spans:  # fill the caches: the first epoch
            for variant in variants.values():
                one(variant, span)
        times: dict[str, list[float]] = {name: [] for name in variants}
        for _ in range(args.rounds):
            for span in spans:
                for name, variant in variants.items():
                    times[name].append(one(variant, span))
    base, new = (statistics.median(t) for t in times.values())
    for name, t in times.items():
        print(f"{name:24s} median {statistics.median(t) * 1000:7.2f} ms per batch of {args.batch_size}")
    print(f"ratio (uncached / cached): {base / new:.2f}x; processed: {len(cache)} images, {cache.hits} hits, "
          f"{cache.misses} misses, {cache.bytes / 2**20:.1f} MiB; decoded: {len(decoded)} files, {decoded.hits} hits, "
          f"{decoded.misses} misses, {decoded.bytes / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
