"""The demo over several seeds: one demo per seed in its own folder, then the seeds report.

``latentvl demo --seeds 0-4 --jobs 2`` runs :func:`latentvl.recipes.demo.recipe.run_demo` once per seed in
``<out>/seed_<n>/`` (``jobs`` processes at a time, each with ``train.num_threads // jobs`` threads, at least
one), then writes ``seeds.md`` and ``seeds.json`` in ``<out>``: one row per seed, and per arm and per bar
figure the mean, the standard deviation and the worst seed. A seed whose ``report.json`` is complete and of
the same settings is not run again, so a killed run, started again with the same arguments, finishes only
what is missing.
"""

from __future__ import annotations

import copy
import json
import math
import shutil
import traceback
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from ...fileio import write_atomic
from .bars import BARS
from .report import ARM_LABELS, ARMS

__all__ = [
    "aggregate",
    "completed_report",
    "parse_seeds",
    "run_seeds",
    "seed_dir",
    "seeds_markdown",
    "spread",
    "write_seeds_report",
]


def parse_seeds(text: str) -> list[int]:
    """Seeds from ``"0-4"`` (a range, both ends included), ``"0,3,7"`` or a mix (``"0-2,9"``), in the order
    given, each once. Raises ValueError on anything else (empty parts, a falling range, a negative seed)."""
    seeds: list[int] = []
    for part in text.split(","):
        part = part.strip()
        lo, sep, hi = part.partition("-")
        try:
            first, last = (int(lo), int(hi)) if sep else (int(part), int(part))
        except ValueError:
            raise ValueError(f"--seeds {text!r}: {part!r} is neither a seed nor a range like 0-4") from None
        if first < 0 or last < first:
            raise ValueError(f"--seeds {text!r}: {part!r} must be a seed >= 0 or a rising range like 0-4")
        seeds += [s for s in range(first, last + 1) if s not in seeds]
    return seeds


def seed_dir(out: str | Path, seed: int) -> Path:
    """The folder of one seed's demo inside the seeds run's folder ``out``."""
    return Path(out) / f"seed_{seed}"


# Settings that change how fast a demo runs, not what it measures: a report is reused across them.
_PACE = (("train", "num_threads"), ("train", "progress_bar"), ("demo", "arm_workers"))


def _recipe(settings: Mapping[str, Any]) -> Any:
    """``settings`` as JSON would give them back, less the keys of ``_PACE``."""
    plain = json.loads(json.dumps(settings))
    for section, key in _PACE:
        (plain.get(section) or {}).pop(key, None)
    return plain


def completed_report(path: str | Path, settings: Mapping[str, Any]) -> dict[str, Any] | None:
    """The demo report at ``path`` (a ``report.json``) if it is complete and was made with ``settings`` (its
    seed included; the threads, progress bars and arm workers aside), else None."""
    try:
        report = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    complete = isinstance(report, dict) and {"checks", "all_bars_met", "bar_metrics", "results"} <= set(report)
    if not complete or _recipe(report.get("settings") or {}) != _recipe(settings):
        return None
    return report


def _seed_settings(settings: Mapping[str, Any], seed: int) -> dict[str, Any]:
    out = copy.deepcopy(dict(settings))
    out["demo"]["seed"] = seed
    return out


def _run_one(out: str, settings: dict[str, Any], seed: int) -> None:
    """One seed's demo in ``seed_dir(out, seed)`` (a new, empty folder), its log lines prefixed by the seed."""
    from .recipe import run_demo

    def log(*parts: Any) -> None:
        print(f"[seed {seed}]", *parts, flush=True)

    run_demo(seed_dir(out, seed), settings, log=log)


def run_seeds(out: str | Path, settings: dict[str, Any], seeds: Sequence[int], jobs: int = 1,
              log: Callable[..., None] = print) -> dict[str, Any]:
    """The demo of ``settings`` once per seed (``demo.seed`` replaced), ``jobs`` at a time, then the seeds
    report in ``out``. Seeds with a complete ``report.json`` of the same settings are read, not run; the
    folder of any other seed is cleared and the seed run from the start. ``jobs == 1`` runs in this process;
    more, in fresh processes with ``train.num_threads // jobs`` threads each (at least 1) and no progress
    bars. A seed that fails is logged and counts as missing every bar. Returns the seeds report
    (``seeds.json``'s content)."""
    if jobs < 1:
        raise ValueError(f"--jobs must be >= 1, got {jobs}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    base = copy.deepcopy(settings)
    if jobs > 1:
        total = int(base["train"].get("num_threads") or 1)
        base["train"]["num_threads"] = max(1, total // jobs)
        base["train"]["progress_bar"] = False
    per_seed = {s: _seed_settings(base, s) for s in seeds}
    pending = [s for s in seeds if completed_report(seed_dir(out, s) / "report.json", per_seed[s]) is None]
    done = [s for s in seeds if s not in pending]
    if done:
        log(f"seeds {', '.join(map(str, done))}: complete report.json found, not run again")
    for s in pending:
        shutil.rmtree(seed_dir(out, s), ignore_errors=True)
    errors: dict[int, str] = {}
    if jobs == 1 or len(pending) <= 1:
        for s in pending:
            try:
                _run_one(str(out), per_seed[s], s)
            except Exception as err:  # noqa: BLE001 - one seed's failure is reported, the others still run
                errors[s] = f"{type(err).__name__}: {err}"
                log(f"[seed {s}] failed:\n{traceback.format_exc()}")
    else:
        with ProcessPoolExecutor(max_workers=jobs, mp_context=get_context("spawn")) as pool:
            futures = {pool.submit(_run_one, str(out), per_seed[s], s): s for s in pending}
            for fut in as_completed(futures):
                s = futures[fut]
                try:
                    fut.result()
                except Exception as err:  # noqa: BLE001 - as above
                    errors[s] = f"{type(err).__name__}: {err}"
                    log(f"[seed {s}] failed: {errors[s]}")
    reports = {s: completed_report(seed_dir(out, s) / "report.json", per_seed[s]) for s in seeds}
    seeds_report = aggregate(reports, errors)
    seeds_report["out"] = str(out)
    write_seeds_report(out, seeds_report)
    return seeds_report


def spread(values: Mapping[int, float | None], higher_is_better: bool = True) -> dict[str, Any]:
    """Mean, standard deviation (sample, n - 1; None under two values) and the worst seed of ``values``
    (seed -> figure). A seed whose figure is None (not measured) is the worst; otherwise the lowest figure
    when higher is better, else the highest (the first such seed in order on ties)."""
    known = {s: v for s, v in values.items() if v is not None}
    n = len(known)
    mean = sum(known.values()) / n if n else None
    std = math.sqrt(sum((v - mean) ** 2 for v in known.values()) / (n - 1)) if n > 1 and mean is not None else None
    unmeasured = [s for s, v in values.items() if v is None]
    if unmeasured:
        worst_seed: int | None = unmeasured[0]
    elif known:
        pick = min if higher_is_better else max
        worst_seed = pick(known, key=lambda s: known[s])
    else:
        worst_seed = None
    return {"n": n, "mean": mean, "std": std, "worst_seed": worst_seed,
            "worst": None if worst_seed is None else values[worst_seed]}


def _accuracy_at_hardest(report: Mapping[str, Any], arm: str) -> float:
    res, hard = report["results"][arm], report.get("hardest_difficulty")
    by = res["accuracy_by_difficulty"]
    return by[hard]["accuracy"] if hard is not None and hard in by else res["accuracy"]


def aggregate(reports: Mapping[int, Mapping[str, Any] | None],
              errors: Mapping[int, str] | None = None) -> dict[str, Any]:
    """The seeds report from each seed's demo report (None: the seed has no complete report).

    ``rows``: per seed, its bars met, each check, each bar figure and each arm's accuracy (overall and at
    the hardest difficulty). ``arms.<arm>.accuracy`` / ``accuracy_at_hardest`` and ``bars.<metric>``: their
    :func:`spread` over the seeds that have a report, ``bars`` with each bar's value, direction and the seeds
    that miss it. ``all_seeds_met``: every seed has a report and meets every bar."""
    errors = dict(errors or {})
    done = {s: r for s, r in reports.items() if r is not None}
    rows = []
    for s, r in reports.items():
        if r is None:
            rows.append({"seed": s, "complete": False, "all_bars_met": False, "error": errors.get(s)})
            continue
        rows.append({
            "seed": s, "complete": True, "all_bars_met": bool(r["all_bars_met"]), "checks": dict(r["checks"]),
            "bar_metrics": dict(r["bar_metrics"]),
            "accuracy": {arm: r["results"][arm]["accuracy"] for arm in ARMS},
            "accuracy_at_hardest": {arm: _accuracy_at_hardest(r, arm) for arm in ARMS},
            "total_s": (r.get("timings_s") or {}).get("total"),
        })
    arms = {arm: {"accuracy": spread({s: r["results"][arm]["accuracy"] for s, r in done.items()}),
                  "accuracy_at_hardest": spread({s: _accuracy_at_hardest(r, arm) for s, r in done.items()})}
            for arm in ARMS}
    bar_values = next(iter(done.values()))["bars"] if done else {}
    bars = {}
    for bar in BARS:
        figures = {s: r["bar_metrics"].get(bar.metric) for s, r in done.items()}
        bars[bar.metric] = {
            **spread(figures, bar.higher_is_better), "check": bar.check, "bar": bar_values.get(bar.key),
            "higher_is_better": bar.higher_is_better, "strict": bar.strict,
            "seeds_missing": [s for s, r in done.items() if not r["checks"].get(bar.check, False)],
        }
    return {
        "seeds": list(reports), "rows": rows, "arms": arms, "bars": bars,
        "seeds_incomplete": [s for s, r in reports.items() if r is None],
        "all_seeds_met": bool(reports) and len(done) == len(reports) and all(r["all_bars_met"] for r in done.values()),
    }


def _f(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def seeds_markdown(report: Mapping[str, Any]) -> str:
    """``seeds.md`` of a seeds report (:func:`aggregate`)."""
    seeds = report["seeds"]
    met = sum(1 for r in report["rows"] if r["all_bars_met"])
    lines = [
        "# latentvl demo over seeds", "",
        f"Seeds {', '.join(map(str, seeds))}: {met} of {len(seeds)} meet every bar"
        + (f"; no complete report for seed(s) {', '.join(map(str, report['seeds_incomplete']))}"
           if report["seeds_incomplete"] else "") + ". Each seed's report: `seed_<n>/report.md`.", "",
        "## Per seed", "",
        "| seed | all bars | " + " | ".join(b.check for b in BARS) + " | minutes |",
        "|" + "---|" * (len(BARS) + 3),
    ]
    for row in report["rows"]:
        if not row["complete"]:
            lines.append(f"| {row['seed']} | no report ({row.get('error') or 'not finished'}) |"
                         + " - |" * (len(BARS) + 1))
            continue
        cells = [f"{_f(row['bar_metrics'].get(b.metric))} {'ok' if row['checks'].get(b.check) else 'MISS'}"
                 for b in BARS]
        minutes = "-" if row.get("total_s") is None else f"{row['total_s'] / 60:.1f}"
        lines.append(f"| {row['seed']} | {'met' if row['all_bars_met'] else 'NOT met'} | " + " | ".join(cells)
                     + f" | {minutes} |")
    lines += ["", "## Arms: test accuracy over seeds", "",
              "| arm | mean | std | worst (seed) | at the hardest difficulty: mean | std | worst (seed) |",
              "|---|---|---|---|---|---|---|"]
    for arm, x in report["arms"].items():
        a, h = x["accuracy"], x["accuracy_at_hardest"]
        lines.append(f"| {ARM_LABELS[arm].split(' (')[0]} | {_f(a['mean'])} | {_f(a['std'])} | {_f(a['worst'])} "
                     f"({a['worst_seed']}) | {_f(h['mean'])} | {_f(h['std'])} | {_f(h['worst'])} ({h['worst_seed']}) |")
    lines += ["", "## Bars over seeds", "",
              "The figure each bar compares, over the seeds; worst: the seed furthest on the wrong side.", "",
              "| figure | bar | mean | std | worst (seed) | seeds missing it |", "|---|---|---|---|---|---|"]
    for metric, b in report["bars"].items():
        side = (">" if b["higher_is_better"] else "<") + ("" if b["strict"] else "=")
        missing = ", ".join(map(str, b["seeds_missing"])) or "none"
        lines.append(f"| {metric} | {side} {b['bar']} | {_f(b['mean'])} | {_f(b['std'])} | {_f(b['worst'])} "
                     f"({b['worst_seed']}) | {missing} |")
    return "\n".join(lines) + "\n"


def write_seeds_report(out: str | Path, report: Mapping[str, Any]) -> None:
    """``seeds.md`` and ``seeds.json`` in ``out``, each written atomically."""
    out = Path(out)
    write_atomic(out / "seeds.md", seeds_markdown(report))
    write_atomic(out / "seeds.json", json.dumps(report, indent=2) + "\n")
