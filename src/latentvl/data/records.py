"""The JSONL sample format: loading, validation and a torch Dataset over it.

One sample per line, a JSON object::

    {"id": str, "question": str, "images": [path, ...], "cot_images": [path, ...], "answer": str}

``images`` are the question images and ``cot_images`` the chain-of-thought images; either list may be
empty. Relative paths are resolved against the directory of the JSONL file; absolute paths are used as
they are. One optional field is understood: ``latent_budgets`` (a list of positive ints, explicit
per-CoT-image budgets used at inference; when ``cot_images`` is non-empty it must have the same length).
Other keys are ignored. Blank lines are ignored.

Every error names the file, the line and, when it can be read, the id, e.g.
``data/train.jsonl:17 (id 'maze-00016'): cot_images[1] 'img/x.png' does not exist``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image
from torch.utils.data import Dataset

from ..errors import RecordError
from ..images import image_file_problem, open_rgb
from .image_cache import DecodedImageCache

__all__ = [
    "META_FILENAME",
    "Record",
    "RecordDataset",
    "SkippedRecord",
    "load_metadata",
    "load_records",
]

META_FILENAME = "meta.json"
_REQUIRED_FIELDS = ("id", "question", "images", "cot_images", "answer")


@dataclass
class Record:
    """One validated sample. Image paths are absolute; ``source`` is ``"file.jsonl:LINE"``."""

    id: str
    question: str
    images: list[Path]
    cot_images: list[Path]
    answer: str
    source: str
    latent_budgets: list[int] | None = None


@dataclass
class SkippedRecord:
    """A record that ``load_records(..., skip_invalid=True)`` left out, and why."""

    source: str
    id: str | None
    reason: str


def _where(source: str, rec_id: str | None) -> str:
    return f"{source} (id {rec_id!r})" if rec_id is not None else source


def _resolve(base: Path, raw: str) -> Path:
    p = Path(raw)
    return Path(os.path.normpath(p if p.is_absolute() else base / p))


def _parse_record(
    obj: Any, source: str, base: Path, check_images: bool
) -> tuple[Record | None, str | None, str | None]:
    """Validate one decoded line. Returns ``(record, id, None)`` or ``(None, id_or_None, reason)``."""
    if not isinstance(obj, dict):
        return None, None, f"a record must be a JSON object, got {type(obj).__name__}"
    raw_id = obj.get("id")
    rec_id = raw_id if isinstance(raw_id, str) and raw_id.strip() else None
    missing = [k for k in _REQUIRED_FIELDS if k not in obj]
    if missing:
        return None, rec_id, f"missing field(s) {', '.join(missing)}"
    if not isinstance(raw_id, str):
        return None, None, f"'id' must be a string, got {type(raw_id).__name__}"
    if rec_id is None:
        return None, None, "'id' is empty"
    for key in ("question", "answer"):
        value = obj[key]
        if not isinstance(value, str):
            return None, rec_id, f"{key!r} must be a string, got {type(value).__name__}"
        if not value.strip():
            return None, rec_id, f"{key!r} is empty"
    paths: dict[str, list[Path]] = {}
    for key in ("images", "cot_images"):
        value = obj[key]
        if not isinstance(value, list):
            return None, rec_id, f"{key!r} must be a list of paths, got {type(value).__name__}"
        resolved = []
        for i, item in enumerate(value):
            if not isinstance(item, str) or not item:
                return None, rec_id, f"{key}[{i}] must be a non-empty path string, got {item!r}"
            p = _resolve(base, item)
            if check_images:
                problem = image_file_problem(p)
                if problem is not None:
                    return None, rec_id, f"{key}[{i}] {item!r} {problem}"
            resolved.append(p)
        paths[key] = resolved
    budgets = obj.get("latent_budgets")
    if budgets is not None:
        if not isinstance(budgets, list) or not all(
            isinstance(b, int) and not isinstance(b, bool) and b >= 1 for b in budgets
        ):
            return None, rec_id, f"'latent_budgets' must be a list of ints >= 1, got {budgets!r}"
        n_cot = len(paths["cot_images"])
        if n_cot and len(budgets) != n_cot:
            return (
                None,
                rec_id,
                f"'latent_budgets' has {len(budgets)} entries but there are {n_cot} cot_images",
            )
    record = Record(
        id=raw_id,
        question=obj["question"],
        images=paths["images"],
        cot_images=paths["cot_images"],
        answer=obj["answer"],
        source=source,
        latent_budgets=list(budgets) if budgets is not None else None,
    )
    return record, rec_id, None


def load_records(
    path: str | os.PathLike[str], skip_invalid: bool = False, check_images: bool = True
) -> tuple[list[Record], list[SkippedRecord]]:
    """Load and validate every record of a JSONL file.

    Checks: valid JSON object per line, required fields with the right types, non-empty id (unique in
    the file), non-empty question and answer, ``latent_budgets`` when present, and (if ``check_images``)
    that every image path exists and PIL can open and verify it.

    Without ``skip_invalid`` the first invalid record raises :class:`RecordError`. With it, invalid
    records are returned in the second list (source, id, reason) and the valid ones still load; the
    caller is expected to report them. A file that cannot be read at all always raises.
    """
    path = Path(path)
    name = str(path)
    try:
        raw_lines = path.read_bytes().splitlines()
    except OSError as err:
        raise RecordError(f"{name}: cannot read record file ({err})") from err
    base = path.parent
    records: list[Record] = []
    skipped: list[SkippedRecord] = []
    first_line_of: dict[str, int] = {}
    for lineno, raw in enumerate(raw_lines, start=1):
        if not raw.strip():
            continue
        source = f"{name}:{lineno}"
        rec_id: str | None = None
        reason: str | None
        record: Record | None = None
        try:
            obj = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as err:
            reason = f"not UTF-8 ({err})"
        except json.JSONDecodeError as err:
            reason = f"invalid JSON ({err.msg} at column {err.colno})"
        else:
            record, rec_id, reason = _parse_record(obj, source, base, check_images)
            if record is not None and record.id in first_line_of:
                reason = f"duplicate id, first seen at {name}:{first_line_of[record.id]}"
                record = None
        if record is None:
            reason = reason or "invalid record"
            if not skip_invalid:
                raise RecordError(f"{_where(source, rec_id)}: {reason}")
            skipped.append(SkippedRecord(source=source, id=rec_id, reason=reason))
            continue
        first_line_of[record.id] = lineno
        records.append(record)
    return records, skipped


def load_metadata(jsonl_path: str | os.PathLike[str]) -> dict | None:
    """The ``meta.json`` object beside a JSONL file (task name, chance accuracy, ...), or None if absent.

    Raises :class:`RecordError` if the file exists but is not a JSON object.
    """
    meta_path = Path(jsonl_path).parent / META_FILENAME
    if not meta_path.is_file():
        return None
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise RecordError(f"{meta_path}: cannot read metadata ({err})") from err
    if not isinstance(meta, dict):
        raise RecordError(f"{meta_path}: metadata must be a JSON object, got {type(meta).__name__}")
    return meta


class RecordDataset(Dataset):
    """A map-style dataset over validated records.

    ``dataset[i]`` is ``{"id", "question", "images", "cot_images", "answer"}`` with the images as RGB
    ``PIL.Image`` objects (plus ``"latent_budgets"`` when the record has it). An image that cannot be
    read raises :class:`RecordError` naming the record source, id and file. ``decoded_cache``: a
    :class:`~latentvl.data.image_cache.DecodedImageCache` that decodes each file once.
    """

    def __init__(self, records: list[Record], decoded_cache: DecodedImageCache | None = None):
        self.records = list(records)
        self.decoded_cache = decoded_cache

    def __len__(self) -> int:
        return len(self.records)

    def _open(self, record: Record, key: str, index: int, path: Path) -> Image.Image:
        try:
            return open_rgb(path) if self.decoded_cache is None else self.decoded_cache.open(path, open_rgb)
        except Exception as err:
            raise RecordError(
                f"{_where(record.source, record.id)}: {key}[{index}] '{path}' cannot be read "
                f"({type(err).__name__}: {err})"
            ) from err

    def __getitem__(self, index: int) -> dict[str, Any]:
        record = self.records[index]
        item: dict[str, Any] = {
            "id": record.id,
            "question": record.question,
            "images": [self._open(record, "images", i, p) for i, p in enumerate(record.images)],
            "cot_images": [self._open(record, "cot_images", i, p) for i, p in enumerate(record.cot_images)],
            "answer": record.answer,
        }
        if record.latent_budgets is not None:
            item["latent_budgets"] = list(record.latent_budgets)
        return item
