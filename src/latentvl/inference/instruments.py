"""Moved: :mod:`latentvl.evaluation.instruments` (this path re-exports it)."""

from ..evaluation.instruments import (
    InstrumentRunner,
    accuracy_by_difficulty,
    collect_segment_latents,
    fit_linear_probe,
    read_record_fields,
    record_fields,
    task_of_data,
)

__all__ = [
    "InstrumentRunner",
    "accuracy_by_difficulty",
    "collect_segment_latents",
    "fit_linear_probe",
    "read_record_fields",
    "record_fields",
    "task_of_data",
]
