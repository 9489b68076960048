"""Moved: :mod:`latentvl.evaluation.causal` (this path re-exports it)."""

from ..evaluation import causal as _moved
from ..evaluation.causal import *  # noqa: F403

__all__ = _moved.__all__
