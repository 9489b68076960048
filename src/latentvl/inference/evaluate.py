"""Moved: :mod:`latentvl.evaluation.generated` (measurement) and :mod:`latentvl.reports.evaluation`
(the report files); this path re-exports ``evaluate`` (measure, then write the files) and the rest."""

from ..evaluation.generated import chance_from_metadata, evaluate_generated
from ..reports.evaluation import REPORT_FILES, evaluate, render_markdown, write_report

__all__ = ["REPORT_FILES", "chance_from_metadata", "evaluate", "evaluate_generated", "render_markdown", "write_report"]
