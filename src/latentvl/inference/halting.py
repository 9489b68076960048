"""Moved: :mod:`latentvl.evaluation.halting` (measurement) and :mod:`latentvl.reports.halting`
(text and plot); this path re-exports both."""

from ..evaluation.halting import evaluate_halting, full_budget, halting_summary, read_difficulties, spearman
from ..reports.halting import halting_markdown, plot_used_by_difficulty

__all__ = [
    "evaluate_halting",
    "full_budget",
    "halting_markdown",
    "halting_summary",
    "plot_used_by_difficulty",
    "read_difficulties",
    "spearman",
]
