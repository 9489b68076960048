"""What the dataset importers read a source into: rows of question, answer and images, the skips, and
the helpers every format shares (answers out of reasoning text, ids, input files, image paths).

The formats themselves: :mod:`latentvl.data.import_formats`; the writer: :mod:`latentvl.data.importers`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from ..errors import DatasetImportError

__all__ = ["INSTALL_HINT", "ImageRoots", "ImportSkip", "MalformedRow", "SourceImage", "SourceRow", "extract_answer"]

INSTALL_HINT = "pip install 'latentvl[import]'"


class ImportSkip(NamedTuple):
    """One source row that was not converted: where it is, its id when known, and why."""

    location: str
    id: str | None
    reason: str



# --------------------------------------------------------------------------------------------------
# intermediate representation shared by the readers


@dataclass
class SourceImage:
    """One image of a source row: inline bytes or a file, with a label for error messages."""

    label: str
    data: bytes | None = None
    path: Path | None = None
    root: Path | None = None  # the directory a relative path was resolved against
    tried: tuple[Path, ...] = ()  # every location looked at for a relative path that exists nowhere


@dataclass
class SourceRow:
    location: str
    id: str
    question: str | None = None
    answer: str | None = None
    images: list[SourceImage] = field(default_factory=list)
    cot_images: list[SourceImage] = field(default_factory=list)


class MalformedRow(Exception):
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


def marked_answer(text: str) -> str | None:
    """The answer inside the last ``<answer>...</answer>`` or ``\\boxed{...}`` of ``text``, if any."""
    tags = _ANSWER_TAG.findall(text)
    if tags:
        inner = tags[-1]
        boxed = _last_boxed(inner)
        return (boxed if boxed is not None else inner).strip()
    return _last_boxed(text)


def clean_text(text: str) -> str:
    """Drop think blocks and reasoning markup, keep the rest."""
    text = _THINK_BLOCK.sub(" ", text)
    text = _LATENT_BLOCK.sub(" ", text)
    text = _STRAY_TAGS.sub(" ", text)
    return tidy(text)


def extract_answer(text: str) -> str:
    """The final answer of a model response.

    Order: the inside of the last ``<answer>...</answer>`` (itself reduced to its ``\\boxed{}`` if it has
    one); else the inside of the last ``\\boxed{...}``; else the whole text without ``<think>`` blocks
    and reasoning tags. The result is stripped; it may be empty.
    """
    marked = marked_answer(text)
    return marked if marked is not None else clean_text(text)


def tidy(text: str) -> str:
    """Collapse the gaps that removed placeholders leave, keep paragraph breaks."""
    text = re.sub(r"[ \t]{2,}", " ", text)
    text = re.sub(r"[ \t]+\n", "\n", text)
    text = re.sub(r"\n[ \t]+", "\n", text)
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip()


def as_text(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    return None


def as_id(value: Any) -> str | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str) and value.strip():
        return value.strip()
    return None


def first_id(mapping: Any, keys: Iterable[str]) -> str | None:
    if not isinstance(mapping, dict):
        return None
    for key in keys:
        found = as_id(mapping.get(key))
        if found is not None:
            return found
    return None


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "x"


# --------------------------------------------------------------------------------------------------
# input discovery


def input_files(src: Path, suffixes: tuple[str, ...], exclude: frozenset[Path]) -> list[Path]:
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


def generated_id(prefix: str, src: Path, file: Path, number: int) -> str:
    """``prefix-000017`` for a single input file, ``prefix-<file slug>-000017`` for a directory."""
    if src.is_file():
        return f"{prefix}-{number:06d}"
    rel = file.relative_to(src).with_suffix("")
    return f"{prefix}-{slug(rel.as_posix())}-{number:06d}"


@dataclass(frozen=True)
class ImageRoots:
    """Where relative image paths are looked up: ``primary`` (``--image-root``, else the folder of the
    file that names them), then, only without ``--image-root``, ``fallback`` (the working directory):
    public datasets write paths relative to the directory their own scripts run from."""

    primary: Path
    fallback: Path | None = None

    @classmethod
    def for_file(cls, file: Path, image_root: Path | None) -> ImageRoots:
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


def path_image(label: str, raw: Any, base: ImageRoots) -> SourceImage:
    if not isinstance(raw, str) or not raw.strip():
        raise MalformedRow(f"{label}: expected a path string, got {raw!r}")
    p = Path(raw.strip())
    label = f"{label} {raw.strip()!r}"
    if p.is_absolute():
        return SourceImage(label=label, path=p)
    path, root, tried = base.locate(p)
    return SourceImage(label=label, path=path, root=root, tried=tried)


def path_list(label: str, value: Any, base: ImageRoots) -> list[SourceImage]:
    """A path, a list of paths, or nothing (None / missing / empty list)."""
    if value is None:
        return []
    if isinstance(value, str):
        return [path_image(label, value, base)]
    if isinstance(value, list):
        return [path_image(f"{label}[{i}]", item, base) for i, item in enumerate(value)]
    raise MalformedRow(f"{label}: expected a path or a list of paths, got {type(value).__name__}")


