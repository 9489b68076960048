"""A stage-C model at learned halting and at full budget, against difficulty.

Latents used per ``difficulty``, Spearman(used, difficulty) and accuracy; with ``--out``, ``halting.json``,
``halting.md`` and ``used_by_difficulty.png``.
"""

from __future__ import annotations

import argparse
import sys

from ..evaluation.halting import evaluate_halting, read_difficulties
from ..reports.halting import halting_markdown, write_halting_report

__all__ = ["add_arguments", "run"]

def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``latentvl halting``."""
    parser.add_argument("--model", required=True, help="a stage-C model directory (e.g. a checkpoint's model/)")
    parser.add_argument("--data", required=True, help="records JSONL whose lines carry a numeric 'difficulty'")
    parser.add_argument("--out", default=None, help="folder for halting.json, halting.md, used_by_difficulty.png")
    parser.add_argument("--threshold", type=float, default=None, help="stop threshold (default: the model's)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-samples", type=int, default=None)


def run(args: argparse.Namespace) -> int:
    """Run ``latentvl halting``: the model at learned halting and at full budget, against difficulty."""
    from ..data.collator import LatentCollator
    from ..data.records import load_records
    from ..model.loading import load_latent_model

    try:
        records, _ = load_records(args.data)
        difficulty = read_difficulties(args.data)
    except (OSError, ValueError) as err:  # RecordError is a ValueError
        print(f"halting: error: {err}", file=sys.stderr)
        return 2
    if args.max_samples is not None:
        records = records[: args.max_samples]
    if not difficulty:
        print(f"halting: error: no record of {args.data} carries a numeric 'difficulty'", file=sys.stderr)
        return 2
    model, processor = load_latent_model(args.model)
    if model.config.latent_mode_stage != "C":
        print(f"halting: error: {args.model} is a stage-{model.config.latent_mode_stage} model; "
              "halting needs a stage-C model", file=sys.stderr)
        return 2
    result = evaluate_halting(model, LatentCollator(processor, model.config), records, difficulty,
                              threshold=args.threshold, batch_size=args.batch_size)
    title = f"{args.model} on {args.data}"
    print(halting_markdown(title, result))
    if args.out:
        write_halting_report(result, title, args.out)
    return 0
