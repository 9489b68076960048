"""Generate ``relay_bands`` records (hops vary, the CoT strip and its budget do not)."""

from __future__ import annotations

import argparse

from ..data.tasks.relay_bands import RELAY_BANDS_DEFAULTS, RULES
from ..data.tasks.writer import make_relay_bands

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``latentvl make-relay-bands``."""
    parser.add_argument("--n", type=int, default=1000, help="number of records (default 1000)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--colours", type=int, default=RELAY_BANDS_DEFAULTS["colours"])
    parser.add_argument("--min-hops", type=int, default=RELAY_BANDS_DEFAULTS["min_hops"])
    parser.add_argument("--max-hops", type=int, default=RELAY_BANDS_DEFAULTS["max_hops"])
    parser.add_argument("--rule", choices=RULES, default=RELAY_BANDS_DEFAULTS["rule"])
    parser.add_argument("--overwrite", action="store_true")


def run(args: argparse.Namespace) -> int:
    """Run ``latentvl make-relay-bands``."""
    meta = make_relay_bands(args.n, args.seed, args.out, overwrite=args.overwrite, colours=args.colours,
                            min_hops=args.min_hops, max_hops=args.max_hops, rule=args.rule)
    print(f"wrote {meta['n']} relay_bands records to {args.out} (chance {meta['chance_accuracy']:.3f})")
    return 0
