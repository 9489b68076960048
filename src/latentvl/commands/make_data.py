"""Generate a synthetic visual chain-of-thought data set.

PNG images, train/val/test JSONL and ``meta.json`` (with chance accuracy) from
:func:`latentvl.data.tasks.writer.make_dataset`; the same seed gives the same bytes.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..data.tasks.registry import DEFAULT_KNOBS, TASKS
from ..data.tasks.writer import make_dataset

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``latentvl make-data``."""
    d = DEFAULT_KNOBS
    parser.add_argument("--task", choices=sorted(TASKS), default="maze", help="which task (default: maze)")
    parser.add_argument("--n", type=int, default=1000, help="number of records in all splits (default: 1000)")
    parser.add_argument("--seed", type=int, default=0, help="random seed; same seed, same bytes (default: 0)")
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument("--val-fraction", type=float, default=d["val_fraction"], help="default: %(default)s")
    parser.add_argument("--test-fraction", type=float, default=d["test_fraction"], help="default: %(default)s")
    parser.add_argument(
        "--min-cot", type=int, default=d["min_cot"], help="fewest CoT images per record (default: %(default)s)"
    )
    parser.add_argument(
        "--max-cot", type=int, default=d["max_cot"], help="most CoT images per record (default: %(default)s)"
    )
    parser.add_argument(
        "--min-size", "--size-min", dest="min_size", type=int, default=d["min_size"],
        help="smallest image side in px (--size-min: the former name) (default: %(default)s)",
    )
    parser.add_argument(
        "--max-size", "--size-max", dest="max_size", type=int, default=d["max_size"],
        help="largest image side in px (--size-max: the former name) (default: %(default)s)",
    )
    parser.add_argument(
        "--min-grid", "--grid-min", dest="min_grid", type=int, default=d["min_grid"],
        help="maze: smallest grid (cells/side) (--grid-min: the former name) (default: %(default)s)",
    )
    parser.add_argument(
        "--max-grid", "--grid-max", dest="max_grid", type=int, default=d["max_grid"],
        help="maze: largest grid (cells/side) (--grid-max: the former name) (default: %(default)s)",
    )
    parser.add_argument(
        "--min-moves", type=int, default=d["min_moves"], help="maze: shortest start-goal path (default: %(default)s)"
    )
    parser.add_argument(
        "--max-shapes", type=int, default=d["max_shapes"], help="shapes: most shapes (2..4) (default: %(default)s)"
    )
    parser.add_argument(
        "--colours", type=int, default=d["colours"], help="relay: number of colours (3..8) (default: %(default)s)"
    )
    parser.add_argument(
        "--min-hops", "--hops-min", dest="min_hops", type=int, default=d["min_hops"],
        help="relay, a5: fewest hops k (--hops-min: the former name) (default: %(default)s)",
    )
    parser.add_argument(
        "--max-hops", "--hops-max", dest="max_hops", type=int, default=d["max_hops"],
        help="relay (< colours), a5: most hops k (--hops-max: the former name) (default: %(default)s)",
    )
    parser.add_argument(
        "--token-px", dest="token_px", type=int, default=d["token_px"],
        help="a5: side in px of one merged visual token (28: Qwen2.5-VL, 32: Qwen3-VL) (default: %(default)s)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace a dataset already in --out")


def run(args: argparse.Namespace) -> int:
    """Run ``latentvl make-data``: generate, then say where it wrote and show one record."""
    knobs = {key: getattr(args, key) for key in DEFAULT_KNOBS}
    knobs = {
        key: v for key, v in knobs.items() if key in ("val_fraction", "test_fraction") or key in TASKS[args.task].knobs
    }
    try:
        meta = make_dataset(args.task, args.n, args.seed, args.out, overwrite=args.overwrite, **knobs)
    except (ValueError, FileExistsError) as err:
        print(f"make-data: error: {err}", file=sys.stderr)
        return 2
    sizes = ", ".join(f"{s} {v['size']}" for s, v in meta["splits"].items())
    print(f"wrote {meta['n']} {meta['task']} records to {args.out} ({sizes}); images in {args.out / 'images'}")
    chance = meta["chance_accuracy"]
    print(f"answers {meta['answer_counts']}, chance accuracy {chance:.3f}; metadata in {args.out / 'meta.json'}")
    with open(args.out / "train.jsonl", encoding="utf-8") as f:
        print("sample record:", f.readline().strip())
    return 0
