"""Write records as a local lmms-eval task (docs/lmms-eval.md)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..errors import RecordError
from ..integrations.lmms_task import write_task

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``latentvl lmms-task``."""
    parser.add_argument("--data", type=Path, required=True, help="JSONL records, e.g. data/maze/test.jsonl")
    parser.add_argument("--out", type=Path, required=True, help="directory for the task (use as --include_path)")
    parser.add_argument("--task", default=None, help="task name (default: latentvl_<data file stem>)")
    parser.add_argument("--max-new-tokens", type=int, default=16, help="answer length limit (default: 16)")
    parser.add_argument("--limit", type=int, default=None, help="only the first N records")
    parser.add_argument("--overwrite", action="store_true", help="replace a task of the same name")
    parser.add_argument("--choices", default=None,
                        help="comma-separated answers, e.g. U,D,L,R: a multiple_choice task scored by "
                             "loglikelihood (run lmms-eval with --force_simple)")


def run(args: argparse.Namespace) -> int:
    """Run ``latentvl lmms-task``."""
    try:
        choices = args.choices.split(",") if args.choices is not None else None
        path = write_task(args.data, args.out, args.task, args.max_new_tokens, args.limit, args.overwrite, choices)
    except (RecordError, OSError, ValueError) as err:
        print(f"lmms-task: error: {err}", file=sys.stderr)
        return 2
    task = path.stem
    simple = " --force_simple" if args.choices is not None else ""
    print(f"wrote {path} and {path.with_suffix('.jsonl')}\n"
          f"run: lmms-eval eval --model latentvl{simple} --model_args pretrained=CHECKPOINT --tasks {task} "
          f"--include_path {path.parent}")
    return 0
