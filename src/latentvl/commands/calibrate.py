"""Choose a stage-C model's stop threshold on held-out records: the lowest used/budget near the best accuracy.

Evaluates the model at every threshold of a grid and at full budget (greedy exact match, halting as in
inference) and prints the table; ``--write`` stores the chosen threshold as the model's
``latent_stop_threshold`` (what ``latentvl infer`` and ``latentvl eval`` use by default), ``--out`` writes the
result as JSON. Use a validation split, never the test split. See :mod:`latentvl.evaluation.calibration`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..config import check_threshold
from ..errors import LatentConfigError
from ..evaluation.calibration import DEFAULT_GRID, DEFAULT_TOLERANCE, DEFAULT_USED_SLACK

__all__ = ["add_arguments", "run"]


def _grid(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"--grid {text!r}: comma-separated numbers expected") from err
    try:
        if not values:
            raise LatentConfigError("no value")
        return [check_threshold(v, "threshold") for v in values]
    except LatentConfigError as err:
        raise argparse.ArgumentTypeError(f"--grid {text!r}: at least one threshold, each in [0, 1] ({err})") from err


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``latentvl calibrate``."""
    parser.add_argument("--model", required=True, help="a stage-C model directory (e.g. a run's final/)")
    parser.add_argument("--data", required=True, help="held-out records JSONL (a validation split)")
    parser.add_argument("--grid", type=_grid, default=list(DEFAULT_GRID),
                        help="comma-separated thresholds to try (default 0.3,0.35,...,0.95)")
    parser.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE,
                        help="accuracy a threshold may lose against the best one (default %(default)s)")
    parser.add_argument("--used-slack", type=float, default=DEFAULT_USED_SLACK,
                        help="used/budget within this of the lowest counts as a tie, settled by accuracy and "
                             "then the higher threshold (default %(default)s)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-samples", type=int, default=None)
    parser.add_argument("--out", default=None, help="write the result here as JSON")
    parser.add_argument("--write", action="store_true",
                        help="store the chosen threshold in MODEL/config.json (latent_stop_threshold)")


def run(args: argparse.Namespace) -> int:
    """Run ``latentvl calibrate``."""
    from ..data.collator import LatentCollator
    from ..data.records import load_records
    from ..errors import InputError, LatentConfigError
    from ..evaluation.calibration import calibrate_threshold, calibration_markdown, write_model_threshold
    from ..fileio import write_atomic
    from ..model.loading import load_latent_model

    for flag, value in (("--tolerance", args.tolerance), ("--used-slack", args.used_slack)):
        if not value >= 0:
            print(f"calibrate: error: {flag} {value}: must be >= 0", file=sys.stderr)
            return 2
    try:
        records, _ = load_records(args.data)
    except (OSError, ValueError) as err:  # RecordError is a ValueError
        print(f"calibrate: error: {err}", file=sys.stderr)
        return 2
    if not records:
        print(f"calibrate: error: {args.data} holds no records", file=sys.stderr)
        return 2
    if args.batch_size < 1 or (args.max_samples is not None and args.max_samples < 1):
        print("calibrate: error: --batch-size and --max-samples must be >= 1", file=sys.stderr)
        return 2
    try:
        model, processor = load_latent_model(args.model)
    except (OSError, ValueError) as err:
        print(f"calibrate: error: {err}", file=sys.stderr)
        return 2
    try:
        result = calibrate_threshold(model, LatentCollator(processor, model.config), records, grid=args.grid,
                                     tolerance=args.tolerance, used_slack=args.used_slack,
                                     batch_size=args.batch_size,
                                     max_samples=args.max_samples)
    except LatentConfigError as err:
        print(f"calibrate: error: {args.model}: {err}", file=sys.stderr)
        return 2
    except InputError as err:  # a record the collator rejects, an image that cannot be read
        print(f"calibrate: error: {args.data}: {err}", file=sys.stderr)
        return 2
    print(f"# {args.model} on {args.data}\n")
    print(calibration_markdown(result))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        write_atomic(args.out, json.dumps(result, indent=2) + "\n")
    if args.write:
        write_model_threshold(args.model, result["threshold"])
        print(f"latent_stop_threshold = {result['threshold']:g} written to {args.model}/config.json")
    return 0
