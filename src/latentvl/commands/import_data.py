"""Convert a public visual-CoT data set to latentvl's JSONL records.

Formats and their fields: ``docs/data-formats.md`` and :mod:`latentvl.data.importers`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..data.importers import FORMATS, import_dataset
from ..errors import DatasetImportError

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``latentvl import``."""
    parser.add_argument("--format", required=True, choices=FORMATS, help="layout of the input")
    parser.add_argument(
        "input", type=Path, metavar="IN", help="input file, or a directory searched recursively"
    )
    parser.add_argument("out_dir", type=Path, metavar="OUT_DIR", help="output directory (created if needed)")
    parser.add_argument(
        "--link", action="store_true", help="hard-link (else symlink) image files instead of copying them"
    )
    parser.add_argument("--limit", type=int, default=None, metavar="N", help="stop after N converted records")
    parser.add_argument(
        "--split-name", default="data", metavar="NAME", help="writes OUT_DIR/NAME.jsonl (default: data)"
    )
    parser.add_argument(
        "--image-root",
        type=Path,
        default=None,
        metavar="DIR",
        help="resolve relative image paths against DIR (default: the input file's directory, then the "
        "working directory for a path that is not there)",
    )


def run(args: argparse.Namespace) -> int:
    """Run ``latentvl import``."""
    try:
        report = import_dataset(
            args.format,
            args.input,
            args.out_dir,
            link=args.link,
            limit=args.limit,
            split_name=args.split_name,
            image_root=args.image_root,
        )
    except (DatasetImportError, OSError, ValueError) as err:
        print(f"latentvl import: error: {err}", file=sys.stderr)
        return 2
    print(f"converted {report.converted} record(s) -> {report.output_path}")
    if report.image_roots:
        print(report.roots_summary())
    if report.skipped:
        print(f"skipped {len(report.skipped)} record(s) (also in {report.skipped_path}):")
        for skip in report.skipped:
            who = f" (id {skip.id!r})" if skip.id is not None else ""
            print(f"  {skip.location}{who}: {skip.reason}")
    else:
        print("skipped 0 records")
    if report.converted == 0 and report.skipped:
        print("latentvl import: error: no record could be converted", file=sys.stderr)
        return 1
    return 0
