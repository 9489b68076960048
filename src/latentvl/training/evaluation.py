"""Moved: :mod:`latentvl.evaluation.teacher_forced` (this path re-exports it)."""

from ..evaluation.teacher_forced import batch_correct, evaluate_records

__all__ = ["batch_correct", "evaluate_records"]
