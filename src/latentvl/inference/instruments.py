"""Moved: :mod:`latentvl.evaluation.instruments` (this path re-exports it)."""

from ..evaluation import instruments as _moved
from ..evaluation.instruments import *  # noqa: F403

__all__ = _moved.__all__
