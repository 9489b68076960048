"""Turn latentvl JSONL records into a local lmms-eval task: ``latentvl lmms-task``.

``latentvl lmms-task --data data/maze/test.jsonl --out tasks/maze`` writes ``tasks/maze/<task>.yaml``
and ``tasks/maze/<task>.jsonl`` (the records with absolute image paths). Then
``lmms-eval eval --model latentvl --model_args pretrained=DIR --tasks <task> --include_path tasks/maze``
evaluates a checkpoint on them offline, scored as ``latentvl eval`` scores (exact match after
:func:`~latentvl.inference.generate.normalize_answer`).

Each dataset row keeps the record's segment plan (design D9) so that the lmms-eval model plans the same
latent segments as ``latentvl eval``: ``latent_budgets`` when the record has them, else
``cot_image_sizes`` (the ``(width, height)`` of its CoT images, read from the file headers), else
neither (null), and the model's default applies.

The functions below are what the YAML names (``!function latentvl.integrations.lmms_task.<name>``);
importing this module never imports lmms-eval.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from PIL import Image

from ..fileio import write_atomic

__all__ = [

    "doc_to_target",
    "doc_to_text",
    "doc_to_visual",
    "process_results",
    "task_rows",
    "write_task",
]

_TASK_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")
_FN = "!function latentvl.integrations.lmms_task."


# ------------------------------------------------------------------------------ task functions
def _doc_field(doc: Mapping[str, Any], key: str) -> Any:
    if key not in doc:
        raise KeyError(f"document {doc.get('id', '?')!r}: field {key!r} is missing")
    return doc[key]


def doc_to_visual(doc: Mapping[str, Any]) -> list[Image.Image]:
    """The question images of a row, opened as RGB (as ``latentvl eval`` opens them)."""
    from ..images import open_rgb

    return [open_rgb(p) for p in (_doc_field(doc, "images") or [])]


def doc_to_text(doc: Mapping[str, Any], lmms_eval_specific_kwargs: Mapping[str, Any] | None = None) -> str:
    """The question, with the task's optional ``pre_prompt`` / ``post_prompt`` around it (default none)."""
    kw = lmms_eval_specific_kwargs or {}
    return f"{kw.get('pre_prompt', '')}{_doc_field(doc, 'question')}{kw.get('post_prompt', '')}"


def doc_to_target(doc: Mapping[str, Any]) -> str:
    """The gold answer."""
    return str(_doc_field(doc, "answer"))


def process_results(doc: Mapping[str, Any], results: list[str]) -> dict[str, float]:
    """``exact_match``: 1.0 when the normalised answer equals the normalised gold, else 0.0."""
    from ..inference.generate import normalize_answer

    answer = results[0] if results else ""
    return {"exact_match": float(normalize_answer(answer) == normalize_answer(doc_to_target(doc)))}


# ------------------------------------------------------------------------------ writing a task
def task_rows(records: list[Any]) -> list[dict[str, Any]]:
    """One JSON-ready row per :class:`~latentvl.data.records.Record` (absolute image paths, D9 plan)."""
    from ..data.collator import image_size

    rows = []
    for rec in records:
        sizes = [list(image_size(p, rec.id, f"cot_images[{i}]")) for i, p in enumerate(rec.cot_images)]
        rows.append({
            "id": rec.id,
            "question": rec.question,
            "images": [str(p) for p in rec.images],
            "answer": rec.answer,
            "latent_budgets": list(rec.latent_budgets) if rec.latent_budgets is not None else None,
            "cot_image_sizes": sizes if sizes and rec.latent_budgets is None else None,
        })
    return rows


def _task_yaml(task: str, data_file: str, max_new_tokens: int, choices: list[str] | None = None) -> str:
    head = [
        "# lmms-eval task over latentvl records (written by `latentvl lmms-task`)",
        f"task: {task}",
        "dataset_path: json",
        "dataset_kwargs:",
        "  data_files:",
        f"    test: {data_file}",
        "test_split: test",
        f"doc_to_visual: {_FN}doc_to_visual",
        f"doc_to_text: {_FN}doc_to_text",
        f"doc_to_target: {_FN}doc_to_target",
    ]
    if choices is not None:  # scored by loglikelihood: needs lmms-eval's --force_simple
        body = [
            "output_type: multiple_choice",
            f"doc_to_choice: {json.dumps(choices)}",
            'target_delimiter: ""',
            "metric_list:",
            "  - metric: acc",
            "    aggregation: mean",
            "    higher_is_better: true",
        ]
    else:
        body = [
            "output_type: generate_until",
            f"process_results: {_FN}process_results",
            "metric_list:",
            "  - metric: exact_match",
            "    aggregation: mean",
            "    higher_is_better: true",
            "generation_kwargs:",
            f"  max_new_tokens: {max_new_tokens}",
            "  do_sample: false",
            "  temperature: 0",
        ]
    return "\n".join([*head, *body, "metadata:", "  version: 1.0", ""])



def write_task(
    data: str | os.PathLike[str], out_dir: str | os.PathLike[str], task: str | None = None,
    max_new_tokens: int = 16, limit: int | None = None, overwrite: bool = False,
    choices: list[str] | None = None,
) -> Path:
    """Write ``<task>.yaml`` and ``<task>.jsonl`` for the records of ``data`` into ``out_dir``; return
    the YAML path. ``task`` defaults to ``latentvl_<data file stem>``. Every record is validated
    (:func:`~latentvl.data.records.load_records`); an invalid one raises ``RecordError`` naming it.

    Without ``choices`` the task generates answers (``generate_until``, exact match). With ``choices``
    it is a ``multiple_choice`` task: each choice is scored by loglikelihood as the whole answer
    (no delimiter) and ``acc`` counts the records whose answer scores best; every answer must be one
    of the choices.
    """
    from ..data.records import load_records

    data = Path(data)
    task = task if task is not None else f"latentvl_{data.stem}"
    if not _TASK_NAME.match(task):
        raise ValueError(f"task name {task!r} must be letters, digits, '_', '.' or '-' (not starting with "
                         "'.' or '-')")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1")
    records, _ = load_records(data)
    if limit is not None:
        records = records[:limit]
    if not records:
        raise ValueError(f"{data}: no records")
    if choices is not None:
        choices = [str(c) for c in choices]
        if len(choices) < 2 or len(set(choices)) != len(choices) or not all(choices):
            raise ValueError(f"choices {choices!r} must be at least two distinct non-empty strings")
        for rec in records:
            if rec.answer not in choices:
                raise ValueError(f"{rec.source} (id {rec.id!r}): answer {rec.answer!r} is not one of the choices "
                                 f"{choices}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    yaml_path, rows_path = out / f"{task}.yaml", out / f"{task}.jsonl"
    existing = [p.name for p in (yaml_path, rows_path) if p.exists()]
    if existing and not overwrite:
        raise FileExistsError(f"{out} already holds {', '.join(existing)}; pass overwrite=True (--overwrite)")
    rows = task_rows(records)
    write_atomic(rows_path, "".join(json.dumps(r) + "\n" for r in rows))
    write_atomic(yaml_path, _task_yaml(task, rows_path.name, max_new_tokens, choices))
    return yaml_path


# ------------------------------------------------------------------------------ command line
