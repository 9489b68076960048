"""Convert public visual chain-of-thought datasets (Zebra-CoT, Mirage-style, Monet-style) to latentvl JSONL.

``latentvl import --format FORMAT IN OUT_DIR`` reads one of the supported layouts and writes
``OUT_DIR/NAME.jsonl`` (one latentvl record per line, see ``docs/data-formats.md``), the images under
``OUT_DIR/images/`` and ``OUT_DIR/NAME.skipped.jsonl`` (one ``{"location", "id", "reason"}`` object per
row that could not be converted). Malformed rows are skipped and reported, never fatal; a missing input,
an unknown format or a missing optional dependency is an error.

Text reasoning between chain-of-thought images is dropped: latentvl thinks in latents only, so a
record keeps the question, the question images, the chain-of-thought images (in reasoning order) and
the final answer.

Python API: :func:`import_dataset` returns an :class:`ImportReport`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import shutil
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from ..errors import DatasetImportError, ImageReadError
from ..images import decoded_format

__all__ = [
    "FORMATS",
    "DatasetImportError",
    "ImportReport",
    "ImportSkip",
    "extract_answer",
    "import_dataset",

]

FORMATS = ("zebra-cot", "mirage", "monet")
IMAGES_DIRNAME = "images"
_INSTALL_HINT = "pip install 'latentvl[import]'"


class ImportSkip(NamedTuple):
    """One source row that was not converted: where it is, its id when known, and why."""

    location: str
    id: str | None
    reason: str


@dataclass
class ImportReport:
    """What :func:`import_dataset` did."""

    format: str
    source: Path
    output_path: Path
    skipped_path: Path
    converted: int = 0
    skipped: list[ImportSkip] = field(default_factory=list)
    #: directory -> number of image files of converted records whose relative path was resolved against it
    image_roots: dict[Path, int] = field(default_factory=dict)

    def roots_summary(self) -> str:
        """Which directories relative image paths were resolved against (empty if none were relative)."""
        if not self.image_roots:
            return ""
        cwd = Path.cwd().resolve()
        parts = []
        for root, n in sorted(self.image_roots.items(), key=lambda kv: -kv[1]):
            what = " (the working directory)" if root.resolve() == cwd else ""
            parts.append(f"{root.resolve()}{what}: {n} image(s)")
        return "relative image paths resolved against " + "; ".join(parts)

    def summary(self) -> str:
        roots = self.roots_summary()
        return (
            f"converted {self.converted} record(s) from {self.format} {self.source} -> {self.output_path}; "
            f"skipped {len(self.skipped)}" + (f"; {roots}" if roots else "")
        )


# --------------------------------------------------------------------------------------------------
# intermediate representation shared by the readers


@dataclass
class _Image:
    """One image of a source row: inline bytes or a file, with a label for error messages."""

    label: str
    data: bytes | None = None
    path: Path | None = None
    root: Path | None = None  # the directory a relative path was resolved against
    tried: tuple[Path, ...] = ()  # every location looked at for a relative path that exists nowhere


@dataclass
class _Row:
    location: str
    id: str
    question: str | None = None
    answer: str | None = None
    images: list[_Image] = field(default_factory=list)
    cot_images: list[_Image] = field(default_factory=list)


class _RowError(Exception):
    """A reader found a row malformed; the message is the skip reason."""


# --------------------------------------------------------------------------------------------------
# text helpers

_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.S | re.I)
_THINK_BLOCK = re.compile(r"<think>.*?</think>", re.S | re.I)
_LATENT_BLOCK = re.compile(r"<abs_vis_token>.*?</abs_vis_token>", re.S)
_STRAY_TAGS = re.compile(r"</?(?:abs_vis_token|observation|think|answer)>", re.I)
_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")


def _last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (nested braces allowed), or None if there is none."""
    for match in reversed(list(_BOXED.finditer(text))):
        depth, start = 1, match.end()
        for i in range(start, len(text)):
            ch = text[i]
            if ch == "{":
                depth += 1
            elif ch == "}":
                depth -= 1
                if depth == 0:
                    return text[start:i].strip()
    return None


def _marked_answer(text: str) -> str | None:
    """The answer inside the last ``<answer>...</answer>`` or ``\\boxed{...}`` of ``text``, if any."""
    tags = _ANSWER_TAG.findall(text)
    if tags:
        inner = tags[-1]
        boxed = _last_boxed(inner)
        return (boxed if boxed is not None else inner).strip()
    return _last_boxed(text)


def _clean_text(text: str) -> str:
    """Drop think blocks and reasoning markup, keep the rest."""
    text = _THINK_BLOCK.sub(" ", text)
    text = _LATENT_BLOCK.sub(" ", text)
    text = _STRAY_TAGS.sub(" ", text)
    return _tidy(text)


def extract_answer(text: str) -> str:
    """The final answer of a model response.

    Order: the inside of the last ``<answer>...</answer>`` (itself reduced to its ``\\boxed{}`` if it has
    one); else the inside of the last ``\\boxed{...}``; else the whole text without ``<think>`` blocks
    and reasoning tags. The result is stripped; it may be empty.
    """
    marked = _marked_answer(text)
    return marked if marked is not None else _clean_text(text)


def _tidy(text: str) -> str:
    """Collapse the gaps that removed placeholders leave, keep paragraph breaks."""
    text = re.sub(r"[ \t]{2,}", " ", text)
    text = re.sub(r"[ \t]+\n", "\n", text)
    text = re.sub(r"\n[ \t]+", "\n", text)
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip()


def _as_text(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    return None


def _as_id(value: Any) -> str | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str) and value.strip():
        return value.strip()
    return None


def _first_id(mapping: Any, keys: Iterable[str]) -> str | None:
    if not isinstance(mapping, dict):
        return None
    for key in keys:
        found = _as_id(mapping.get(key))
        if found is not None:
            return found
    return None


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "x"


# --------------------------------------------------------------------------------------------------
# input discovery


def _input_files(src: Path, suffixes: tuple[str, ...], exclude: frozenset[Path]) -> list[Path]:
    """``src`` itself, or every file under the directory ``src`` with one of ``suffixes`` (sorted).

    ``exclude`` holds resolved paths (our own outputs) that are left out, with everything under them.
    """
    if src.is_file():
        return [src]
    found = []
    for path in sorted(src.rglob("*")):
        if not path.is_file() or path.suffix.lower() not in suffixes:
            continue
        resolved = path.resolve()
        if resolved in exclude or any(parent in exclude for parent in resolved.parents):
            continue
        found.append(path)
    if not found:
        raise DatasetImportError(f"{src}: no {' or '.join(suffixes)} files found in this directory")
    return found


def _generated_id(prefix: str, src: Path, file: Path, number: int) -> str:
    """``prefix-000017`` for a single input file, ``prefix-<file slug>-000017`` for a directory."""
    if src.is_file():
        return f"{prefix}-{number:06d}"
    rel = file.relative_to(src).with_suffix("")
    return f"{prefix}-{_slug(rel.as_posix())}-{number:06d}"


@dataclass(frozen=True)
class _Roots:
    """Where relative image paths are looked up: ``primary`` (``--image-root``, else the folder of the
    file that names them), then, only without ``--image-root``, ``fallback`` (the working directory):
    public datasets write paths relative to the directory their own scripts run from."""

    primary: Path
    fallback: Path | None = None

    @classmethod
    def for_file(cls, file: Path, image_root: Path | None) -> _Roots:
        if image_root is not None:
            return cls(Path(image_root))
        cwd = Path.cwd()
        folder = file.parent
        same = folder.resolve() == cwd.resolve()
        return cls(folder, None if same else cwd)

    def locate(self, rel: Path) -> tuple[Path, Path, tuple[Path, ...]]:
        """(path, the root it lies under, locations tried when it exists under none)."""
        first = self.primary / rel
        if self.fallback is None or first.exists():
            return first, self.primary, ()
        second = self.fallback / rel
        if second.exists():
            return second, self.fallback, ()
        return first, self.primary, (first.absolute(), second.absolute())


def _path_image(label: str, raw: Any, base: _Roots) -> _Image:
    if not isinstance(raw, str) or not raw.strip():
        raise _RowError(f"{label}: expected a path string, got {raw!r}")
    p = Path(raw.strip())
    label = f"{label} {raw.strip()!r}"
    if p.is_absolute():
        return _Image(label=label, path=p)
    path, root, tried = base.locate(p)
    return _Image(label=label, path=path, root=root, tried=tried)


def _path_list(label: str, value: Any, base: _Roots) -> list[_Image]:
    """A path, a list of paths, or nothing (None / missing / empty list)."""
    if value is None:
        return []
    if isinstance(value, str):
        return [_path_image(label, value, base)]
    if isinstance(value, list):
        return [_path_image(f"{label}[{i}]", item, base) for i, item in enumerate(value)]
    raise _RowError(f"{label}: expected a path or a list of paths, got {type(value).__name__}")


# --------------------------------------------------------------------------------------------------
# Zebra-CoT (parquet, inline images)

_ZEBRA_PLACEHOLDER = re.compile(
    r"(?:<image_start>\s*)?\[(problem|reasoning)_image_(\d+)\](?:\s*<image_end>)?"
)
_ZEBRA_IMAGE_COLUMN = re.compile(r"(problem|reasoning)_image_(\d+)")
_ZEBRA_QUESTION = "Question"
_ZEBRA_TRACE = "Text Reasoning Trace"
_ZEBRA_ANSWER = "Final Answer"


def _zebra_cell_image(label: str, cell: Any, base: _Roots) -> _Image | None:
    """An image cell as HF datasets store it (struct with bytes/path), raw bytes, a path, or null."""
    if cell is None:
        return None
    if isinstance(cell, dict):
        data, path = cell.get("bytes"), cell.get("path")
        if data:
            return _Image(label=label, data=bytes(data))
        if isinstance(path, str) and path:
            return _path_image(label, path, base)
        return None
    if isinstance(cell, (bytes, bytearray, memoryview)):
        return _Image(label=label, data=bytes(cell)) if len(cell) else None
    if isinstance(cell, str):
        return _path_image(label, cell, base) if cell else None
    raise _RowError(f"{label}: unsupported image cell of type {type(cell).__name__}")


def _zebra_row(row: dict, location: str, row_id: str, base: _Roots, image_cols: dict) -> _Row:
    out = _Row(location=location, id=_as_id(row.get("id")) or row_id)
    question = _as_text(row.get(_ZEBRA_QUESTION))
    if question is None:
        raise _RowError(f"{_ZEBRA_QUESTION!r} is missing or not text")
    answer = _as_text(row.get(_ZEBRA_ANSWER))
    if answer is None:
        raise _RowError(f"{_ZEBRA_ANSWER!r} is missing or not text")
    out.question = _tidy(_ZEBRA_PLACEHOLDER.sub(" ", question))
    out.answer = answer.strip()

    present: dict[tuple[str, int], _Image] = {}
    for key, col in image_cols.items():
        img = _zebra_cell_image(col, row.get(col), base)
        if img is not None:
            present[key] = img
    referenced = [(kind, int(n)) for kind, n in _ZEBRA_PLACEHOLDER.findall(question)]
    trace = _as_text(row.get(_ZEBRA_TRACE)) or ""
    trace_refs = [(kind, int(n)) for kind, n in _ZEBRA_PLACEHOLDER.findall(trace)]
    for where, refs in (("question", referenced), ("reasoning trace", trace_refs)):
        for key in refs:
            if key not in present:
                raise _RowError(
                    f"the {where} refers to [{key[0]}_image_{key[1]}] but the row has no such image"
                )

    out.images = [present[k] for k in sorted(present) if k[0] == "problem"]
    order: list[tuple[str, int]] = []
    for key in trace_refs:
        if key[0] == "reasoning" and key not in order:
            order.append(key)
    order += [k for k in sorted(present) if k[0] == "reasoning" and k not in order]
    out.cot_images = [present[k] for k in order]
    return out


def _read_zebra(src: Path, exclude: frozenset[Path], image_root: Path | None) -> Iterator[_Row | ImportSkip]:
    try:
        import pyarrow.parquet as pq
    except ImportError as err:
        raise DatasetImportError(
            f"reading Zebra-CoT parquet files needs pyarrow, which is not installed: {_INSTALL_HINT}"
        ) from err
    for file in _input_files(src, (".parquet",), exclude):
        base = _Roots.for_file(file, image_root)
        try:
            pf = pq.ParquetFile(file)
            names = pf.schema_arrow.names
        except Exception as err:  # pyarrow raises several types for damaged files
            yield ImportSkip(str(file), None, f"cannot read parquet file ({type(err).__name__}: {err})")
            continue
        image_cols = {}
        for name in names:
            m = _ZEBRA_IMAGE_COLUMN.fullmatch(name)
            if m:
                image_cols[(m.group(1), int(m.group(2)))] = name
        missing = [c for c in (_ZEBRA_QUESTION, _ZEBRA_ANSWER) if c not in names]
        if missing:
            reason = f"missing column(s) {', '.join(repr(c) for c in missing)} in {file.name}"
            for i in range(pf.metadata.num_rows):
                yield ImportSkip(f"{file}:row {i}", None, reason)
            continue
        wanted = [c for c in names if c in (_ZEBRA_QUESTION, _ZEBRA_TRACE, _ZEBRA_ANSWER, "id")]
        wanted += list(image_cols.values())
        batches = pf.iter_batches(batch_size=16, columns=wanted)
        index = 0
        while True:
            try:
                rows = next(batches).to_pylist()
            except StopIteration:
                break
            except Exception as err:  # a damaged row group: report it, go on with the next file
                reason = f"cannot read the rest of the file ({type(err).__name__}: {err})"
                yield ImportSkip(f"{file}:row {index}", None, reason)
                break
            for row in rows:
                location = f"{file}:row {index}"
                row_id = _generated_id("zebra-cot", src, file, index)
                try:
                    yield _zebra_row(row, location, row_id, base, image_cols)
                except _RowError as err:
                    yield ImportSkip(location, _as_id(row.get("id")) or row_id, str(err))
                index += 1


# --------------------------------------------------------------------------------------------------
# Mirage-style JSONL

_ID_KEYS = ("id", "qid", "sample_id", "uid", "question_id")


def _mirage_row(obj: Any, location: str, row_id: str, base: _Roots) -> _Row:
    if not isinstance(obj, dict):
        raise _RowError(f"expected a JSON object, got {type(obj).__name__}")
    out = _Row(location=location, id=_first_id(obj, _ID_KEYS) or row_id)
    question = _as_text(obj.get("text_input"))
    if question is None:
        raise _RowError("'text_input' is missing or not text")
    output = _as_text(obj.get("text_output"))
    if output is None:
        raise _RowError("'text_output' is missing or not text")
    out.question = question.strip()
    out.answer = extract_answer(output)
    out.images = _path_list("image_input", obj.get("image_input"), base)
    out.cot_images = _path_list("image_output", obj.get("image_output"), base)
    return out


def _read_jsonl_objects(file: Path) -> Iterator[tuple[int, Any, str | None]]:
    """(line number, decoded object or None, error) for every non-blank line."""
    with open(file, encoding="utf-8", errors="replace") as fh:
        for number, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                yield number, json.loads(line), None
            except json.JSONDecodeError as err:
                yield number, None, f"invalid JSON ({err})"


def _read_mirage(src: Path, exclude: frozenset[Path], image_root: Path | None) -> Iterator[_Row | ImportSkip]:
    for file in _input_files(src, (".jsonl",), exclude):
        base = _Roots.for_file(file, image_root)
        try:
            for number, obj, problem in _read_jsonl_objects(file):
                location = f"{file}:{number}"
                row_id = _generated_id("mirage", src, file, number)
                if problem is not None:
                    yield ImportSkip(location, None, problem)
                    continue
                try:
                    yield _mirage_row(obj, location, row_id, base)
                except _RowError as err:
                    yield ImportSkip(location, _first_id(obj, _ID_KEYS) or row_id, str(err))
        except OSError as err:
            yield ImportSkip(str(file), None, f"cannot read file ({err})")


# --------------------------------------------------------------------------------------------------
# Monet-style JSON (chat messages)

_MONET_IMAGE_KEYS = ("image", "image_file_name", "image_path", "path")


def _monet_parts(message: Any, where: str) -> tuple[str, list[dict]]:
    if not isinstance(message, dict):
        raise _RowError(f"{where}: a message must be an object, got {type(message).__name__}")
    role = message.get("role")
    if role not in ("system", "user", "assistant"):
        raise _RowError(f"{where}: unknown role {role!r}")
    content = message.get("content")
    if content is None:
        return role, []
    if isinstance(content, str):
        return role, [{"type": "text", "text": content}]
    if not isinstance(content, list):
        raise _RowError(f"{where}: 'content' must be a list or a string, got {type(content).__name__}")
    for j, part in enumerate(content):
        if not isinstance(part, dict):
            raise _RowError(f"{where}: content[{j}] must be an object, got {type(part).__name__}")
    return role, content


def _monet_row(item: Any, location: str, row_id: str, base: _Roots) -> _Row:
    if isinstance(item, list):  # a bare message list, without metadata
        messages, metadata = item, None
    elif isinstance(item, dict):
        messages, metadata = item.get("data"), item.get("metadata")
    else:
        raise _RowError(f"expected an object with 'data' and 'metadata', got {type(item).__name__}")
    out = _Row(location=location, id=_first_id(metadata, _ID_KEYS) or row_id)
    if not isinstance(messages, list) or not messages:
        raise _RowError("'data' must be a non-empty list of chat messages")

    question_texts: list[str] = []
    # assistant content in order: ("text", str) or ("image", _Image)
    assistant: list[tuple[str, Any]] = []
    seen_assistant = False
    for i, message in enumerate(messages):
        where = f"data[{i}]"
        role, parts = _monet_parts(message, where)
        if role == "system":
            continue
        if role == "user" and seen_assistant:
            raise _RowError(
                f"{where}: a user turn after the assistant's answer (multi-turn) is not supported"
            )
        seen_assistant = seen_assistant or role == "assistant"
        for j, part in enumerate(parts):
            kind = part.get("type")
            label = f"{where}.content[{j}]"
            if kind == "text":
                text = _as_text(part.get("text"))
                if text is None:
                    raise _RowError(f"{label}: text part without a 'text' string")
                if role == "user":
                    question_texts.append(text)
                else:
                    assistant.append(("text", text))
            elif kind == "image":
                raw = next((part[k] for k in _MONET_IMAGE_KEYS if part.get(k) is not None), None)
                img = _path_image(f"{role} image ({label})", raw, base)
                if role == "user":
                    out.images.append(img)
                else:
                    out.cot_images.append(img)
                    assistant.append(("image", img))
            else:
                raise _RowError(f"{label}: unsupported content type {kind!r}")
    if not seen_assistant:
        raise _RowError("no assistant message")
    out.question = _tidy("\n".join(t.strip() for t in question_texts if t.strip()))

    last_image = max((k for k, (kind, _) in enumerate(assistant) if kind == "image"), default=-1)
    tail = "\n".join(v for kind, v in assistant[last_image + 1 :] if kind == "text")
    every = "\n".join(v for kind, v in assistant if kind == "text")
    answer = _marked_answer(tail)
    if answer is None:
        answer = _marked_answer(every)
    if answer is None:
        answer = _clean_text(tail)
        if not answer:
            raise _RowError("no answer: the assistant has no text after its last image and no answer marker")
    out.answer = answer
    return out


def _read_monet(src: Path, exclude: frozenset[Path], image_root: Path | None) -> Iterator[_Row | ImportSkip]:
    for file in _input_files(src, (".json", ".jsonl"), exclude):
        base = _Roots.for_file(file, image_root)
        if file.suffix.lower() == ".jsonl":
            entries: Iterable[tuple[str, int, Any, str | None]] = (
                (f"{file}:{n}", n, obj, problem) for n, obj, problem in _read_jsonl_objects(file)
            )
        else:
            try:
                with open(file, encoding="utf-8") as fh:
                    data = json.load(fh)
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
                yield ImportSkip(str(file), None, f"cannot read JSON file ({err})")
                continue
            if not isinstance(data, list):
                yield ImportSkip(
                    str(file), None, f"expected a JSON list of samples, got {type(data).__name__}"
                )
                continue
            entries = ((f"{file}:item {i}", i, obj, None) for i, obj in enumerate(data))
        for location, number, obj, problem in entries:
            row_id = _generated_id("monet", src, file, number)
            if problem is not None:
                yield ImportSkip(location, None, problem)
                continue
            try:
                yield _monet_row(obj, location, row_id, base)
            except _RowError as err:
                meta = obj.get("metadata") if isinstance(obj, dict) else None
                yield ImportSkip(location, _first_id(meta, _ID_KEYS) or row_id, str(err))


_READERS = {"zebra-cot": _read_zebra, "mirage": _read_mirage, "monet": _read_monet}


# --------------------------------------------------------------------------------------------------
# writing


def _image_dirname(rec_id: str) -> str:
    safe = re.sub(r"[^A-Za-z0-9_-]+", "_", rec_id)[:80]
    if safe != rec_id:
        safe = f"{safe}-{hashlib.sha1(rec_id.encode('utf-8')).hexdigest()[:10]}"
    return safe


def _extension(fmt: str | None, fallback_path: Path | None) -> str:
    if fallback_path is not None and re.fullmatch(r"\.[A-Za-z0-9]{1,5}", fallback_path.suffix):
        return fallback_path.suffix.lower()
    if fmt == "JPEG":
        return ".jpg"
    return f".{fmt.lower()}" if fmt else ".img"


def _check_image(img: _Image) -> str:
    """Decode the image fully; return its PIL format name. Raises _RowError with the reason."""
    if img.path is not None:
        if not img.path.exists():
            if img.tried:
                where = " or ".join(str(p) for p in img.tried)
                raise _RowError(f"{img.label}: file not found (looked for {where}; --image-root DIR sets "
                                "the directory relative paths start from)")
            raise _RowError(f"{img.label}: file not found ({img.path})")
        if not img.path.is_file():
            raise _RowError(f"{img.label}: not a file ({img.path})")
    try:
        return decoded_format(img.path if img.data is None else img.data)
    except ImageReadError as err:
        what = "file" if img.data is None else "inline bytes"
        raise _RowError(f"{img.label}: cannot decode the image {what} ({err})") from err


def _place_file(src: Path, dest: Path, link: bool) -> None:
    tmp = dest.with_name(f".{dest.name}.tmp")
    tmp.unlink(missing_ok=True)
    if link:
        for make in (os.link, lambda a, b: os.symlink(Path(a).resolve(), b)):
            try:
                make(src, tmp)
            except OSError:
                tmp.unlink(missing_ok=True)
                continue
            os.replace(tmp, dest)
            return
    shutil.copyfile(src, tmp)
    os.replace(tmp, dest)


def _write_bytes(data: bytes, dest: Path) -> None:
    tmp = dest.with_name(f".{dest.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, dest)


def _materialize(row: _Row, out_dir: Path, link: bool) -> dict:
    """Check every image, then copy / link / write them under ``out_dir/images/<id>/``."""
    checked = [
        (prefix, n, img, _check_image(img))
        for prefix, imgs in (("question", row.images), ("cot", row.cot_images))
        for n, img in enumerate(imgs, start=1)
    ]
    rel_dir = Path(IMAGES_DIRNAME) / _image_dirname(row.id)
    (out_dir / rel_dir).mkdir(parents=True, exist_ok=True)
    paths: dict[str, list[str]] = {"question": [], "cot": []}
    for prefix, n, img, fmt in checked:
        rel = rel_dir / f"{prefix}-{n}{_extension(fmt, img.path)}"
        if img.data is not None:
            _write_bytes(img.data, out_dir / rel)
        else:
            _place_file(img.path, out_dir / rel, link)
        paths[prefix].append(rel.as_posix())
    return {
        "id": row.id,
        "question": row.question,
        "images": paths["question"],
        "cot_images": paths["cot"],
        "answer": row.answer,
    }


class _AtomicLines:
    """Write lines to a temporary file in the target's directory; ``commit`` renames it into place."""

    def __init__(self, target: Path):
        self.target = target
        # open(..., "x") rather than mkstemp: the file gets the usual umask permissions, not 0600
        self.tmp = target.with_name(f".{target.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
        self.fh = open(self.tmp, "x", encoding="utf-8")

    def write(self, obj: dict) -> None:
        self.fh.write(json.dumps(obj, ensure_ascii=False) + "\n")

    def commit(self) -> None:
        self.fh.flush()
        os.fsync(self.fh.fileno())
        self.fh.close()
        os.replace(self.tmp, self.target)

    def discard(self) -> None:
        if not self.fh.closed:
            self.fh.close()
        self.tmp.unlink(missing_ok=True)


def _check_import_arguments(fmt: str, src: Path, limit: int | None, split_name: str,
                            image_root: Path | None) -> None:
    """``ValueError`` for an unknown format or a bad limit or split name, ``FileNotFoundError`` for a
    missing input or image root."""
    if fmt not in _READERS:
        raise ValueError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", split_name or ""):
        raise ValueError(f"split name must be a plain file name (letters, digits, . _ -), got {split_name!r}")
    if not Path(src).exists():
        raise FileNotFoundError(f"input not found: {src}")
    if image_root is not None and not Path(image_root).is_dir():
        raise FileNotFoundError(f"image root is not a directory: {image_root}")


def _convert_rows(rows: Iterable[_Row | ImportSkip], report: ImportReport, out: _AtomicLines, out_dir: Path,
                  link: bool, limit: int | None) -> None:
    """Check and write each row (its images placed under ``out_dir``); a row that fails is a skip, and
    a repeated id is refused. Stops after ``limit`` converted records."""
    first_seen: dict[str, str] = {}
    for item in rows:
        if isinstance(item, ImportSkip):
            report.skipped.append(item)
            continue
        try:
            if not item.question:
                raise _RowError("empty question")
            if not item.answer:
                raise _RowError("empty answer")
            if item.id in first_seen:
                raise _RowError(f"duplicate id {item.id!r} (first used at {first_seen[item.id]})")
            record = _materialize(item, out_dir, link)
        except _RowError as err:
            report.skipped.append(ImportSkip(item.location, item.id, str(err)))
            continue
        first_seen[item.id] = item.location
        for img in (*item.images, *item.cot_images):
            if img.root is not None:
                report.image_roots[img.root] = report.image_roots.get(img.root, 0) + 1
        out.write(record)
        report.converted += 1
        if limit is not None and report.converted >= limit:
            break


def import_dataset(
    fmt: str,
    src: Path,
    out_dir: Path,
    link: bool = False,
    limit: int | None = None,
    split_name: str = "data",
    image_root: Path | None = None,
) -> ImportReport:
    """Convert the dataset at ``src`` (a file, or a directory searched recursively) to latentvl JSONL.

    Writes ``out_dir/<split_name>.jsonl`` and ``out_dir/<split_name>.skipped.jsonl`` atomically, images
    under ``out_dir/images/``. ``link`` hard-links (else symlinks, else copies) image files instead of
    copying them; inline images are always written. ``limit`` stops after that many converted records.
    ``image_root`` overrides the directory that relative image paths are resolved against. Without it a
    relative path is looked up under the directory of the file that names it, and, when it is not there,
    under the working directory (Mirage's JSONL names images relative to the directory its scripts run
    from); ``ImportReport.image_roots`` counts the images resolved against each.

    Raises ``ValueError`` for an unknown format or bad arguments, ``FileNotFoundError`` for a missing
    input and :class:`DatasetImportError` when the input cannot be imported at all.
    """
    _check_import_arguments(fmt, src, limit, split_name, image_root)
    src, out_dir = Path(src), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    report = ImportReport(
        format=fmt,
        source=src,
        output_path=out_dir / f"{split_name}.jsonl",
        skipped_path=out_dir / f"{split_name}.skipped.jsonl",
    )
    outputs = frozenset(
        {report.output_path.resolve(), report.skipped_path.resolve(), (out_dir / IMAGES_DIRNAME).resolve()}
    )
    if src.is_file() and src.resolve() in outputs:
        raise DatasetImportError(
            f"the output would overwrite the input {src}; choose another OUT_DIR or split name"
        )

    rows = _READERS[fmt](src, outputs, Path(image_root) if image_root is not None else None)
    out = _AtomicLines(report.output_path)
    try:
        _convert_rows(rows if limit != 0 else (), report, out, out_dir, link, limit)
        skipped = _AtomicLines(report.skipped_path)
        try:
            for skip in report.skipped:
                skipped.write(skip._asdict())
        except BaseException:
            skipped.discard()
            raise
        out.commit()
        skipped.commit()
    except BaseException:
        out.discard()
        raise
    return report


# --------------------------------------------------------------------------------------------------
# command line
