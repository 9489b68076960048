"""The figures every evaluation reports, each defined once with its report key and its label.

Two figures relate latents used to budgets, and they differ whenever budgets differ:

- ``used_ratio`` (label "used/budget, all latents"): the latents used over the budget, both summed over
  every CoT segment: a ratio of totals, so a segment with a large budget weighs more. The training log,
  teacher-forced evaluation, ``latentvl halting`` and the demo report it.
- ``mean_used_over_budget`` (label "mean used/budget per image"): the mean over CoT segments of each
  segment's used/budget: every image weighs the same. ``latentvl eval`` reports it beside ``used_ratio``.
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = ["LABELS", "MEAN_USED_OVER_BUDGET", "USED_RATIO", "accuracy", "mean_used_over_budget", "used_ratio"]

USED_RATIO = "used_ratio"
MEAN_USED_OVER_BUDGET = "mean_used_over_budget"
LABELS = {
    USED_RATIO: "used/budget, all latents",
    MEAN_USED_OVER_BUDGET: "mean used/budget per image",
}


def used_ratio(used: Iterable[float], budgets: Iterable[float]) -> float | None:
    """Sum of ``used`` over sum of ``budgets`` (None when the budgets sum to 0: no latents)."""
    total_budget = sum(budgets)
    return sum(used) / total_budget if total_budget else None


def mean_used_over_budget(used: Iterable[float], budgets: Iterable[float]) -> float | None:
    """Mean over segments of used/budget (``used`` and ``budgets`` per segment; None without segments)."""
    ratios = [u / b for u, b in zip(used, budgets, strict=True)]
    return sum(ratios) / len(ratios) if ratios else None


def accuracy(n_correct: float, n: float) -> float | None:
    """``n_correct / n``, None without samples."""
    return n_correct / n if n else None
