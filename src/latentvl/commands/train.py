"""Train a latent model (design §7): stage A warm-up, stage C dynamic halting, or both in one run.

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
from pathlib import Path

from ..errors import CollatorInputError, RecordError, TrainConfigError, TrainDataError
from ..training.checkpoint import CheckpointError
from ..training.checks import PreflightError
from ..training.config import load_config
from ..training.resume import RunLockedError

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
    resume = args.resume
    if resume is not None and "=" in resume and not Path(resume).exists():
        # "--resume lr=1e-3": argparse gave the override to --resume; it is an override, resume the latest
        overrides.append(resume)
        resume = "latest"
    updates = {}
    for _flag, (key, _typ, _text) in _FLAGS.items():
        value = getattr(args, f"flag_{key}", None)
        if value is not None:
            updates[key] = value
    if resume is not None:
        updates["resume"] = resume
    return load_config(args.config, overrides, updates)


# exit statuses (docs/training.md): 0 done; 2 the run could not start (config, data, output folder,
# a refused resume change) or stopped on bad data; 3 a design §8 check failed; 4 non-finite loss;
# 5 a checkpoint could not be written or read; 6 a collective timed out or lost a process
EXIT_BAD_INPUT, EXIT_PREFLIGHT, EXIT_NON_FINITE, EXIT_CHECKPOINT, EXIT_TIMEOUT = 2, 3, 4, 5, 6


def _fail(text: str, status: int) -> int:
    print(f"latentvl train: {text}", file=sys.stderr)
    return status


def run(args: argparse.Namespace) -> int:
    try:
        cfg = config_from_args(args)
    except TrainConfigError as err:
        return _fail(f"config error: {err}", EXIT_BAD_INPUT)
    if args.print_config:
        print(cfg.to_yaml(), end="")
        return 0
    from ..training.distributed import CollectiveError  # accelerate: on first use
    from ..training.trainer import NonFiniteLossError, train

    try:
        result = train(cfg)
    except TrainConfigError as err:
        return _fail(f"config error: {err}", EXIT_BAD_INPUT)
    except RunLockedError as err:
        return _fail(f"output folder in use: {err}", EXIT_BAD_INPUT)
    except (RecordError, TrainDataError, CollatorInputError) as err:
        return _fail(f"data error: {err}", EXIT_BAD_INPUT)
    except PreflightError as err:
        return _fail(f"stopped before the first step:\n{err}", EXIT_PREFLIGHT)
    except NonFiniteLossError as err:
        return _fail(f"stopped: {err}", EXIT_NON_FINITE)
    except CheckpointError as err:
        return _fail(f"checkpoint error: {err}", EXIT_CHECKPOINT)
    except CollectiveError as err:
        return _fail(f"stopped: {err}", EXIT_TIMEOUT)
    if result.final_model is not None:
        print(f"final model: {result.final_model}")
    return 0
