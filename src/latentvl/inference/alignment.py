"""Moved: :mod:`latentvl.evaluation.alignment` (this path re-exports it)."""

from ..evaluation.alignment import AlignmentProbe

__all__ = ["AlignmentProbe"]
