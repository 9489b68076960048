"""The ``latentvl`` command: one subcommand per job, each in its module of :mod:`latentvl.commands`."""

from __future__ import annotations

import argparse
import importlib
import sys

# subcommand name -> module that defines ``add_arguments(parser)`` and ``run(args) -> int``
SUBCOMMANDS = {
    "make-data": "latentvl.commands.make_data",
    "make-relay-bands": "latentvl.commands.make_relay_bands",
    "import": "latentvl.commands.import_data",
    "train": "latentvl.commands.train",
    "demo": "latentvl.commands.demo",
    "infer": "latentvl.commands.infer",
    "eval": "latentvl.commands.eval",
    "lmms-task": "latentvl.commands.lmms_task",
    "halting": "latentvl.commands.halting",
    "calibrate": "latentvl.commands.calibrate",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="latentvl", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, module_name in SUBCOMMANDS.items():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            if err.name != module_name:
                raise
            continue  # subcommand not available in this build
        p = sub.add_parser(name, help=(module.__doc__ or "").strip().splitlines()[0])
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args._run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
