"""The source layouts ``latentvl import`` reads: Zebra-CoT (parquet), Mirage-style JSONL, Monet-style
JSON. Each reader yields :class:`~latentvl.data.import_rows.SourceRow` objects, or an
:class:`~latentvl.data.import_rows.ImportSkip` for a row it cannot convert; ``READERS`` maps a format to its reader.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from ..errors import DatasetImportError
from .import_rows import (
    INSTALL_HINT,
    ImageRoots,
    ImportSkip,
    MalformedRow,
    SourceImage,
    SourceRow,
    as_id,
    as_text,
    clean_text,
    extract_answer,
    first_id,
    generated_id,
    input_files,
    marked_answer,
    path_image,
    path_list,
    tidy,
)

# --------------------------------------------------------------------------------------------------
# Zebra-CoT (parquet, inline images)

_ZEBRA_PLACEHOLDER = re.compile(
    r"(?:<image_start>\s*)?\[(problem|reasoning)_image_(\d+)\](?:\s*<image_end>)?"
)
_ZEBRA_IMAGE_COLUMN = re.compile(r"(problem|reasoning)_image_(\d+)")
_ZEBRA_QUESTION = "Question"
_ZEBRA_TRACE = "Text Reasoning Trace"
_ZEBRA_ANSWER = "Final Answer"

__all__ = ["READERS"]


def _zebra_cell_image(label: str, cell: Any, base: ImageRoots) -> SourceImage | None:
    """An image cell as HF datasets store it (struct with bytes/path), raw bytes, a path, or null."""
    if cell is None:
        return None
    if isinstance(cell, dict):
        data, path = cell.get("bytes"), cell.get("path")
        if data:
            return SourceImage(label=label, data=bytes(data))
        if isinstance(path, str) and path:
            return path_image(label, path, base)
        return None
    if isinstance(cell, (bytes, bytearray, memoryview)):
        return SourceImage(label=label, data=bytes(cell)) if len(cell) else None
    if isinstance(cell, str):
        return path_image(label, cell, base) if cell else None
    raise MalformedRow(f"{label}: unsupported image cell of type {type(cell).__name__}")


def _zebra_row(row: dict, location: str, row_id: str, base: ImageRoots, image_cols: dict) -> SourceRow:
    out = SourceRow(location=location, id=as_id(row.get("id")) or row_id)
    question = as_text(row.get(_ZEBRA_QUESTION))
    if question is None:
        raise MalformedRow(f"{_ZEBRA_QUESTION!r} is missing or not text")
    answer = as_text(row.get(_ZEBRA_ANSWER))
    if answer is None:
        raise MalformedRow(f"{_ZEBRA_ANSWER!r} is missing or not text")
    out.question = tidy(_ZEBRA_PLACEHOLDER.sub(" ", question))
    out.answer = answer.strip()

    present: dict[tuple[str, int], SourceImage] = {}
    for key, col in image_cols.items():
        img = _zebra_cell_image(col, row.get(col), base)
        if img is not None:
            present[key] = img
    referenced = [(kind, int(n)) for kind, n in _ZEBRA_PLACEHOLDER.findall(question)]
    trace = as_text(row.get(_ZEBRA_TRACE)) or ""
    trace_refs = [(kind, int(n)) for kind, n in _ZEBRA_PLACEHOLDER.findall(trace)]
    for where, refs in (("question", referenced), ("reasoning trace", trace_refs)):
        for key in refs:
            if key not in present:
                raise MalformedRow(
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


def _read_zebra(src: Path, exclude: frozenset[Path], image_root: Path | None) -> Iterator[SourceRow | ImportSkip]:
    try:
        import pyarrow.parquet as pq
    except ImportError as err:
        raise DatasetImportError(
            f"reading Zebra-CoT parquet files needs pyarrow, which is not installed: {INSTALL_HINT}"
        ) from err
    for file in input_files(src, (".parquet",), exclude):
        base = ImageRoots.for_file(file, image_root)
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
                row_id = generated_id("zebra-cot", src, file, index)
                try:
                    yield _zebra_row(row, location, row_id, base, image_cols)
                except MalformedRow as err:
                    yield ImportSkip(location, as_id(row.get("id")) or row_id, str(err))
                index += 1


# --------------------------------------------------------------------------------------------------
# Mirage-style JSONL

_ID_KEYS = ("id", "qid", "sample_id", "uid", "question_id")


def _mirage_row(obj: Any, location: str, row_id: str, base: ImageRoots) -> SourceRow:
    if not isinstance(obj, dict):
        raise MalformedRow(f"expected a JSON object, got {type(obj).__name__}")
    out = SourceRow(location=location, id=first_id(obj, _ID_KEYS) or row_id)
    question = as_text(obj.get("text_input"))
    if question is None:
        raise MalformedRow("'text_input' is missing or not text")
    output = as_text(obj.get("text_output"))
    if output is None:
        raise MalformedRow("'text_output' is missing or not text")
    out.question = question.strip()
    out.answer = extract_answer(output)
    out.images = path_list("image_input", obj.get("image_input"), base)
    out.cot_images = path_list("image_output", obj.get("image_output"), base)
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


def _read_mirage(src: Path, exclude: frozenset[Path], image_root: Path | None) -> Iterator[SourceRow | ImportSkip]:
    for file in input_files(src, (".jsonl",), exclude):
        base = ImageRoots.for_file(file, image_root)
        try:
            for number, obj, problem in _read_jsonl_objects(file):
                location = f"{file}:{number}"
                row_id = generated_id("mirage", src, file, number)
                if problem is not None:
                    yield ImportSkip(location, None, problem)
                    continue
                try:
                    yield _mirage_row(obj, location, row_id, base)
                except MalformedRow as err:
                    yield ImportSkip(location, first_id(obj, _ID_KEYS) or row_id, str(err))
        except OSError as err:
            yield ImportSkip(str(file), None, f"cannot read file ({err})")


# --------------------------------------------------------------------------------------------------
# Monet-style JSON (chat messages)

_MONET_IMAGE_KEYS = ("image", "image_file_name", "image_path", "path")


def _monet_parts(message: Any, where: str) -> tuple[str, list[dict]]:
    if not isinstance(message, dict):
        raise MalformedRow(f"{where}: a message must be an object, got {type(message).__name__}")
    role = message.get("role")
    if role not in ("system", "user", "assistant"):
        raise MalformedRow(f"{where}: unknown role {role!r}")
    content = message.get("content")
    if content is None:
        return role, []
    if isinstance(content, str):
        return role, [{"type": "text", "text": content}]
    if not isinstance(content, list):
        raise MalformedRow(f"{where}: 'content' must be a list or a string, got {type(content).__name__}")
    for j, part in enumerate(content):
        if not isinstance(part, dict):
            raise MalformedRow(f"{where}: content[{j}] must be an object, got {type(part).__name__}")
    return role, content


def _monet_row(item: Any, location: str, row_id: str, base: ImageRoots) -> SourceRow:
    if isinstance(item, list):  # a bare message list, without metadata
        messages, metadata = item, None
    elif isinstance(item, dict):
        messages, metadata = item.get("data"), item.get("metadata")
    else:
        raise MalformedRow(f"expected an object with 'data' and 'metadata', got {type(item).__name__}")
    out = SourceRow(location=location, id=first_id(metadata, _ID_KEYS) or row_id)
    if not isinstance(messages, list) or not messages:
        raise MalformedRow("'data' must be a non-empty list of chat messages")

    question_texts: list[str] = []
    # assistant content in order: ("text", str) or ("image", SourceImage)
    assistant: list[tuple[str, Any]] = []
    seen_assistant = False
    for i, message in enumerate(messages):
        where = f"data[{i}]"
        role, parts = _monet_parts(message, where)
        if role == "system":
            continue
        if role == "user" and seen_assistant:
            raise MalformedRow(
                f"{where}: a user turn after the assistant's answer (multi-turn) is not supported"
            )
        seen_assistant = seen_assistant or role == "assistant"
        for j, part in enumerate(parts):
            kind = part.get("type")
            label = f"{where}.content[{j}]"
            if kind == "text":
                text = as_text(part.get("text"))
                if text is None:
                    raise MalformedRow(f"{label}: text part without a 'text' string")
                if role == "user":
                    question_texts.append(text)
                else:
                    assistant.append(("text", text))
            elif kind == "image":
                raw = next((part[k] for k in _MONET_IMAGE_KEYS if part.get(k) is not None), None)
                img = path_image(f"{role} image ({label})", raw, base)
                if role == "user":
                    out.images.append(img)
                else:
                    out.cot_images.append(img)
                    assistant.append(("image", img))
            else:
                raise MalformedRow(f"{label}: unsupported content type {kind!r}")
    if not seen_assistant:
        raise MalformedRow("no assistant message")
    out.question = tidy("\n".join(t.strip() for t in question_texts if t.strip()))

    last_image = max((k for k, (kind, _) in enumerate(assistant) if kind == "image"), default=-1)
    tail = "\n".join(v for kind, v in assistant[last_image + 1 :] if kind == "text")
    every = "\n".join(v for kind, v in assistant if kind == "text")
    answer = marked_answer(tail)
    if answer is None:
        answer = marked_answer(every)
    if answer is None:
        answer = clean_text(tail)
        if not answer:
            raise MalformedRow("no answer: the assistant has no text after its last image and no answer marker")
    out.answer = answer
    return out


def _read_monet(src: Path, exclude: frozenset[Path], image_root: Path | None) -> Iterator[SourceRow | ImportSkip]:
    for file in input_files(src, (".json", ".jsonl"), exclude):
        base = ImageRoots.for_file(file, image_root)
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
            row_id = generated_id("monet", src, file, number)
            if problem is not None:
                yield ImportSkip(location, None, problem)
                continue
            try:
                yield _monet_row(obj, location, row_id, base)
            except MalformedRow as err:
                meta = obj.get("metadata") if isinstance(obj, dict) else None
                yield ImportSkip(location, first_id(meta, _ID_KEYS) or row_id, str(err))


READERS = {"zebra-cot": _read_zebra, "mirage": _read_mirage, "monet": _read_monet}


