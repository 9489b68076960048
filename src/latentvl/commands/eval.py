"""Evaluate a latent model on a JSONL test set.

``latentvl eval --model DIR --data test.jsonl --out DIR`` answers every record with the two inference
steps (design §9), measures accuracy (also by difficulty), latents used, speed, the causal checks and
the instruments, and writes ``report.md``, ``report.json``, ``predictions.jsonl`` and the plots
(:mod:`latentvl.reports.evaluation`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..evaluation.causal import CHECKS
from ..evaluation.generated import chance_from_metadata
from ..evaluation.instruments import read_record_fields, task_of_data
from ..evaluation.metrics import LABELS, MEAN_USED_OVER_BUDGET
from ..reports.evaluation import REPORT_FILES, evaluate
from ..reports.format import fmt as _fmt
from .infer import add_model_arguments, load_for_inference, make_engine

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``latentvl eval``."""
    add_model_arguments(parser)
    parser.add_argument("--data", type=Path, required=True, help="JSONL records to evaluate, e.g. test.jsonl")
    parser.add_argument("--out", type=Path, default=None,
                        help="report directory (default: eval-<data file stem> in the current directory)")
    parser.add_argument("--batch-size", type=int, default=8, help="samples per batch (default: 8)")
    parser.add_argument("--max-new-tokens", type=int, default=16, help="answer length limit (default: 16)")
    parser.add_argument("--limit", type=int, default=None, help="evaluate only the first N records")
    parser.add_argument("--no-causal", action="store_true",
                        help="skip the causal checks (mask, swap, noise) and the alignment check")
    parser.add_argument("--chance", type=float, default=None,
                        help="chance accuracy (default: from meta.json beside the data, when present)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the noise check and the implant draws "
                        "(default: 0)")
    parser.add_argument("--probe-data", type=Path, default=None,
                        help="JSONL records (with cot_states) to fit the linear probe on, e.g. train.jsonl")
    parser.add_argument("--probe-limit", type=int, default=512,
                        help="records of --probe-data used (default: 512)")
    parser.add_argument("--task", default=None,
                        help="task name for implied answers (default: meta.json beside the data)")


def run(args: argparse.Namespace) -> int:
    """Run ``latentvl eval``."""
    from ..data.records import load_records
    from ..errors import RecordError

    for flag, value in (("--batch-size", args.batch_size), ("--max-new-tokens", args.max_new_tokens),
                        ("--limit", args.limit), ("--probe-limit", args.probe_limit)):
        if value is not None and value < 1:
            print(f"eval: error: {flag} {value}: must be >= 1", file=sys.stderr)
            return 2
    try:
        records, skipped = load_records(args.data, skip_invalid=True, check_images=False)
        chance = args.chance if args.chance is not None else chance_from_metadata(args.data)
    except RecordError as err:
        print(f"eval: error: {err}", file=sys.stderr)
        return 2
    if args.limit is not None:
        records = records[: args.limit]
    if not records:
        print(f"eval: error: {args.data}: no valid records"
              + (f" ({len(skipped)} skipped)" if skipped else ""), file=sys.stderr)
        return 2
    extra = [{"id": s.id, "kind": "invalid_record", "error": f"{s.source}: {s.reason}"} for s in skipped]
    try:
        model, processor = load_for_inference(args)
        engine = make_engine(args, model, processor, threshold=args.threshold, use_latents=not args.no_latents,
                             default_num_segments=args.num_segments)
    except (OSError, ValueError, ImportError) as err:
        print(f"eval: error: {err}", file=sys.stderr)
        return 2
    out = args.out if args.out is not None else Path(f"eval-{args.data.stem}")
    probe_records = probe_fields = None
    try:
        fields = read_record_fields(args.data)
        if args.probe_data is not None:
            probe_records, _ = load_records(args.probe_data, skip_invalid=True, check_images=False)
            probe_records = probe_records[: args.probe_limit]
            probe_fields = read_record_fields(args.probe_data)
    except (OSError, RecordError) as err:
        print(f"eval: error: {err}", file=sys.stderr)
        return 2
    task = args.task if args.task is not None else task_of_data(args.data)
    report = evaluate(
        model, processor, records, out_dir=out, batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens, threshold=args.threshold, causal_checks=not args.no_causal,
        use_latents=not args.no_latents, chance_accuracy=chance, default_num_segments=args.num_segments,
        seed=args.seed, extra_errors=extra, fields=fields, task=task, probe_records=probe_records,
        probe_fields=probe_fields, engine=engine,
    )
    lat = report["latents"]
    print(f"accuracy {_fmt(report['accuracy'], pct=True)} on {report['n_evaluated']} samples "
          f"({report['n_errors']} errors; chance {_fmt(report['chance_accuracy'], pct=True)}); "
          f"{LABELS[MEAN_USED_OVER_BUDGET]} {_fmt(lat[MEAN_USED_OVER_BUDGET])}; "
          f"{_fmt(report['timing']['throughput_samples_per_s'])} samples/s")
    if report["causal"]:
        parts = [f"{k}: acc {_fmt(report['causal'][k]['accuracy'], pct=True)}, changed "
                 f"{_fmt(report['causal'][k]['answer_change_rate'], pct=True)}" for k in CHECKS]
        print("causal checks -- " + "; ".join(parts))
    if report.get("implant") and report["implant"]["n"]:
        imp = report["implant"]
        print(f"implant -- follow {_fmt(imp['follow_rate'], pct=True)}, unchanged "
              f"{_fmt(imp['unchanged_rate'], pct=True)} ({imp['n']} samples)")
    print(f"report: {out / REPORT_FILES['markdown']}")
    return 0 if report["n_evaluated"] else 1
