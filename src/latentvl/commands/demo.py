"""Run the whole method end to end on the tiny model and a synthetic task, with its controls.

What it trains and measures: :mod:`latentvl.recipes.demo.recipe`; its settings: ``latentvl/recipes/demo/demo.yaml``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import yaml

from ..model.backbone import BACKBONES
from ..recipes.demo import recipe
from ..recipes.demo.recipe import default_settings, demo_tasks, load_demo_settings, run_demo
from ..recipes.demo.report import difficulty_table, results_table
from ..recipes.demo.seeds import parse_seeds, run_seeds

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = recipe.__doc__
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument(
        "--out", type=Path, default=Path("runs/demo"), help="output folder (default: runs/demo)"
    )
    parser.add_argument(
        "--config",
        type=Path,
        default=None,
        help="YAML with any of the 'demo', 'quick', 'full' and 'train' sections, merged over the shipped "
        "latentvl/recipes/demo/demo.yaml",
    )
    parser.add_argument(
        "--quick", action="store_true", help="a few steps on a few records (pipeline smoke test)"
    )
    parser.add_argument("--full", action="store_true", help="the longer schedule of the 'full' section")
    parser.add_argument("--task", default=None, choices=demo_tasks(),
                        help=f"synthetic task (default: {default_settings()['demo']['task']})")
    parser.add_argument("--steps-a", type=int, default=None, help="stage-A steps")
    parser.add_argument("--steps-c", type=int, default=None, help="stage-C steps")
    parser.add_argument("--n", type=int, default=None, help="records to generate")
    parser.add_argument("--seed", type=int, default=None, help="seed for data, model and order")
    parser.add_argument("--backbone", default=None, choices=sorted(BACKBONES),
                        help="the tiny model's family (default: qwen2_5_vl)")
    parser.add_argument(
        "--seeds", default=None,
        help="run the demo once per seed, e.g. 0-4 or 0,3,7, each in <out>/seed_<n>/, then write seeds.md and "
        "seeds.json (per arm and per bar: mean, std, worst seed); seeds with a complete report.json are not rerun",
    )
    parser.add_argument("--jobs", type=int, default=1,
                        help="with --seeds: demos run at once, each with train.num_threads // jobs threads")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    try:
        settings = load_demo_settings(args.config, quick=args.quick, full=args.full, task=args.task,
                                      backbone=args.backbone)
        seeds = None if args.seeds is None else parse_seeds(args.seeds)
        if seeds is not None and args.seed is not None:
            raise ValueError("--seed and --seeds exclude each other")
        if args.jobs < 1 or (args.jobs > 1 and seeds is None):
            raise ValueError("--jobs takes a number >= 1, and more than 1 only with --seeds")
    except (OSError, ValueError, yaml.YAMLError) as err:
        print(f"demo: error: {err}", file=sys.stderr)
        return 2
    for key in ("steps_a", "steps_c", "n", "seed"):
        value = getattr(args, key)
        if value is not None:
            settings["demo"][key] = value
    if args.no_progress:
        settings["train"]["progress_bar"] = False
    t0 = time.perf_counter()
    if seeds is not None:
        return _run_seeds(args, settings, seeds, t0)
    report = run_demo(args.out, settings)
    print()
    print(difficulty_table(report), end="")
    print()
    print(results_table(report), end="")
    for name, ok in report["checks"].items():
        print(f"  {'ok  ' if ok else 'MISS'} {name}")
    minutes = (time.perf_counter() - t0) / 60
    print(
        f"\nreport: {Path(args.out) / 'report.md'} (also report.json, accuracy_vs_difficulty.png, "
        "loss_curves.png, latents.png); "
        f"{minutes:.1f} min"
    )
    return exit_status(report["all_bars_met"], args.quick)


def exit_status(all_met: bool, quick: bool) -> int:
    """The demo's exit status: 0 when every bar is met (of every seed), or under ``--quick`` (a pipeline
    check, not a result); else 1."""
    return 0 if all_met or quick else 1


def _run_seeds(args: argparse.Namespace, settings: dict, seeds: list[int], t0: float) -> int:
    report = run_seeds(args.out, settings, seeds, jobs=args.jobs)
    print()
    for row in report["rows"]:
        missed = [name for name, ok in (row.get("checks") or {}).items() if not ok]
        state = "ok  " if row["all_bars_met"] else "MISS"
        detail = ("no complete report" if not row["complete"] else
                  "every bar met" if not missed else "missed: " + ", ".join(missed))
        print(f"  {state} seed {row['seed']}: {detail}")
    minutes = (time.perf_counter() - t0) / 60
    print(f"\nseeds report: {Path(args.out) / 'seeds.md'} (also seeds.json; each seed in seed_<n>/); "
          f"{minutes:.1f} min")
    return exit_status(report["all_seeds_met"], args.quick)
