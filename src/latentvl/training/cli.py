"""Train a latent model (SPEC §7): stage A warm-up, stage C dynamic halting, or both in one run.

Examples::

    latentvl train --config configs/train_tiny.yaml
    latentvl train --config configs/train_tiny.yaml --stage AC --switch-step 200 lr=5e-4 latent_budget_max=6
    latentvl train --config configs/train_tiny.yaml --stage C --init-from runs/a/checkpoints/step-00000200
    latentvl train --config configs/train_tiny.yaml --resume            # continue from the latest checkpoint
    torchrun --nproc_per_node 2 -m latentvl.cli train --config ...       # DDP (gloo on CPU, nccl on GPU)
"""

from __future__ import annotations

import argparse
import sys

from .checkpoint import CheckpointError
from .checks import PreflightError
from .config import TrainConfigError, load_config

# flag -> config key; each flag is a shortcut for "key=value"
_FLAGS = {
    "--stage": ("stage", str, "A (warm-up), C (dynamic halting) or AC (A, then C from --switch-step)"),
    "--switch-step": ("switch_step", int, "stage AC: the first step of stage C"),
    "--init-from": ("init_from", str, "start from these weights (a checkpoint or model directory)"),
    "--model": ("model", str, "'tiny' or a model directory"),
    "--train-data": ("train_data", str, "training records (JSONL)"),
    "--eval-data": ("eval_data", str, "held-out records (JSONL)"),
    "--output-dir": ("output_dir", str, "where checkpoints, logs and the final model go"),
    "--max-steps": ("max_steps", int, "optimiser steps"),
    "--batch-size": ("batch_size", int, "micro-batch size per process"),
    "--grad-accum": ("grad_accum", int, "micro-batches per optimiser step"),
    "--lr": ("lr", float, "peak learning rate"),
    "--seed": ("seed", int, "seed for the model init, the data order and the RNGs"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.description = __doc__
    parser.add_argument("--config", "-c", help="YAML file of options (see docs/training.md)")
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="option overrides, value in YAML syntax (e.g. lr=1e-3 latent.latent_budget_max=8)",
    )
    parser.add_argument(
        "--set",
        dest="set_overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an override (repeatable); same as a positional KEY=VALUE",
    )
    for flag, (key, typ, text) in _FLAGS.items():
        parser.add_argument(
            flag, dest=f"flag_{key}", type=typ, default=None, metavar=key.upper(), help=f"{text} (sets {key})"
        )
    parser.add_argument(
        "--resume",
        nargs="?",
        const="latest",
        default=None,
        metavar="CHECKPOINT",
        help="continue exactly from a checkpoint (default: the latest in output_dir)",
    )
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")


def config_from_args(args: argparse.Namespace):
    """The config: YAML file, then KEY=VALUE overrides, then the flags (flags win)."""
    overrides = list(args.set_overrides) + list(args.overrides)
    updates = {}
    for _flag, (key, _typ, _text) in _FLAGS.items():
        value = getattr(args, f"flag_{key}", None)
        if value is not None:
            updates[key] = value
    if args.resume is not None:
        updates["resume"] = args.resume
    return load_config(args.config, overrides, updates)


def run(args: argparse.Namespace) -> int:
    try:
        cfg = config_from_args(args)
    except TrainConfigError as err:
        print(f"train: config error: {err}", file=sys.stderr)
        return 2
    if args.print_config:
        print(cfg.to_yaml(), end="")
        return 0
    from .trainer import NonFiniteLossError, train

    try:
        result = train(cfg)
    except PreflightError as err:
        print(f"train: stopped before the first step:\n{err}", file=sys.stderr)
        return 3
    except NonFiniteLossError as err:
        print(f"train: stopped: {err}", file=sys.stderr)
        return 4
    except CheckpointError as err:
        print(f"train: checkpoint error: {err}", file=sys.stderr)
        return 5
    if result.final_model is not None:
        print(f"final model: {result.final_model}")
    return 0
