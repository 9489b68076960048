"""Choosing a stage-C model's stop threshold on held-out data.

The stop head's probabilities are trained towards 0/1 labels, but where a probability crosses from "go on" to
"stop" is not calibrated: the same head may halt too early at 0.7 and never at 0.8, and which one depends on
the run. So, as early-exit models do, latentvl picks the threshold on a validation split rather than by hand:

1. the stage-C model is evaluated (greedy exact match by teacher forcing, halting as in inference) at every
   threshold of a grid, and once at full budget;
2. ``best`` is the highest accuracy among them;
3. among the thresholds within ``tolerance`` of ``best``, those whose used/budget is within ``used_slack`` of
   the lowest count as tied, and the chosen one is the most accurate of them, then the highest: savings
   smaller than ``used_slack`` are not worth a threshold at the edge where held-out accuracy starts to
   fall, because new questions sit on either side of that edge (docs/training.md).

If no threshold comes within ``tolerance`` (full budget alone is that good), the threshold with the highest
accuracy is returned with ``within_tolerance: False``: the stop head costs accuracy at every threshold.
The test split is never touched. Cost: one teacher-forced evaluation per grid point (both passes, no
backward), plus one at full budget.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..config import check_threshold
from ..errors import LatentConfigError
from ..fileio import write_atomic
from .halting import full_budget
from .teacher_forced import evaluate_records

__all__ = [
    "DEFAULT_GRID",
    "DEFAULT_TOLERANCE",
    "DEFAULT_USED_SLACK",
    "TOLERANCE_SLACK",
    "calibrate_threshold",
    "calibration_markdown",
    "choose_threshold",
    "write_model_threshold",
]

DEFAULT_GRID: tuple[float, ...] = tuple(round(0.3 + 0.05 * i, 2) for i in range(14))  # 0.3, 0.35, ..., 0.95
DEFAULT_TOLERANCE = 0.01
DEFAULT_USED_SLACK = 0.05  # used/budget within this of the lowest counts as a tie (0: the lowest alone)
TOLERANCE_SLACK = 1e-9  # accuracies and used/budget are fractions: comparisons ignore float rounding below this


def choose_threshold(rows: Sequence[Mapping[str, Any]], tolerance: float = DEFAULT_TOLERANCE,
                     reference: float | None = None, used_slack: float = DEFAULT_USED_SLACK) -> dict[str, Any]:
    """Pick a row of ``rows`` (each ``{"threshold", "accuracy", "used_ratio"}``) by the rule of this module.

    ``reference``: an accuracy that also sets ``best`` but cannot be chosen (full budget). Returns
    ``{"threshold", "accuracy", "used_ratio", "best_accuracy", "within_tolerance"}``.
    """
    if not rows:
        raise ValueError("choose_threshold: no thresholds to choose from")
    if not tolerance >= 0:
        raise ValueError(f"choose_threshold: tolerance must be >= 0, got {tolerance}")
    if not used_slack >= 0:
        raise ValueError(f"choose_threshold: used_slack must be >= 0, got {used_slack}")
    best = max([float(r["accuracy"]) for r in rows] + ([float(reference)] if reference is not None else []))
    eligible = [r for r in rows if float(r["accuracy"]) >= best - tolerance - TOLERANCE_SLACK]
    if eligible:
        lowest = min(_used(r) for r in eligible)
        tied = [r for r in eligible if _used(r) <= lowest + used_slack + TOLERANCE_SLACK]
        pick = max(tied, key=lambda r: (float(r["accuracy"]), float(r["threshold"])))
    else:
        pick = max(rows, key=lambda r: (float(r["accuracy"]), -_used(r), float(r["threshold"])))
    return {"threshold": float(pick["threshold"]), "accuracy": float(pick["accuracy"]),
            "used_ratio": pick["used_ratio"], "best_accuracy": best, "within_tolerance": bool(eligible)}


def _used(row: Mapping[str, Any]) -> float:
    return float(row["used_ratio"]) if row["used_ratio"] is not None else 0.0


def calibrate_threshold(
    model: Any, collator: Any, records: Sequence[Any], *, grid: Sequence[float] = DEFAULT_GRID,
    tolerance: float = DEFAULT_TOLERANCE, used_slack: float = DEFAULT_USED_SLACK, batch_size: int = 16,
    max_samples: int | None = None, rank: int = 0, world_size: int = 1,
) -> dict[str, Any]:
    """Evaluate a stage-C ``model`` on ``records`` at every threshold of ``grid`` and at full budget, and
    choose a threshold (:func:`choose_threshold`). In a distributed run every process must call it with the
    same grid (the calls are the same whatever the samples).

    Returns ``{"n", "grid", "tolerance", "used_slack", "rows": [{"threshold", "accuracy", "used_ratio"}],
    "full_budget": {"accuracy", "used_ratio"}, **choice}``. The model's config is left as it was.
    """
    if getattr(model.config, "latent_mode_stage", None) != "C":
        raise LatentConfigError(
            f"latent_mode_stage={getattr(model.config, 'latent_mode_stage', None)!r}: calibrating a stop "
            "threshold needs a stage-C model")
    grid = sorted({check_threshold(t, "threshold grid value") for t in grid})
    if not grid:
        raise LatentConfigError("threshold grid []: needs at least one value, each in [0, 1]")
    common = {"batch_size": batch_size, "max_samples": max_samples, "rank": rank, "world_size": world_size}
    rows = []
    for thr in grid:
        res = evaluate_records(model, collator, list(records), threshold=thr, **common)
        rows.append({"threshold": thr, "accuracy": res["accuracy"], "used_ratio": res["used_ratio"]})
    with full_budget(model):
        full = evaluate_records(model, collator, list(records), **common)
    choice = choose_threshold(rows, tolerance, reference=full["accuracy"], used_slack=used_slack)
    return {"n": full["n"], "grid": grid, "tolerance": tolerance, "used_slack": used_slack, "rows": rows,
            "full_budget": {"accuracy": full["accuracy"], "used_ratio": full["used_ratio"]}, **choice}


def write_model_threshold(model_dir: str | Path, threshold: float) -> None:
    """Set ``latent_stop_threshold`` in ``model_dir/config.json`` (atomically; every other key kept)."""
    path = Path(model_dir) / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise LatentConfigError(f"{path}: cannot read the model config ({err})") from err
    config["latent_stop_threshold"] = float(threshold)
    write_atomic(path, json.dumps(config, indent=2, sort_keys=True) + "\n")


def calibration_markdown(result: Mapping[str, Any]) -> str:
    """A table of the grid, the full-budget row and the choice."""
    lines = [
        f"Stop threshold chosen on {result['n']} held-out records: within {result['tolerance']:.3f} of the best "
        f"accuracy ({result['best_accuracy']:.3f}), the lowest used/budget, a used/budget within "
        f"{result.get('used_slack', 0.0):.3f} of it counting as a tie (then the more accurate, then the higher "
        "threshold).",
        "",
        "| threshold | accuracy | used/budget |",
        "|---|---|---|",
    ]
    for r in result["rows"]:
        mark = " **chosen**" if r["threshold"] == result["threshold"] else ""
        used = "-" if r["used_ratio"] is None else f"{r['used_ratio']:.3f}"
        lines.append(f"| {r['threshold']:.2f}{mark} | {r['accuracy']:.3f} | {used} |")
    fb = result["full_budget"]
    fb_used = "-" if fb["used_ratio"] is None else f"{fb['used_ratio']:.3f}"
    lines.append(f"| full budget | {fb['accuracy']:.3f} | {fb_used} |")
    if not result["within_tolerance"]:
        lines += ["", "No threshold comes within the tolerance of full budget: the stop head costs accuracy "
                      "at every threshold; the most accurate one is chosen."]
    return "\n".join(lines) + "\n"
