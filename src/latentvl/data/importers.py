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
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import DatasetImportError, ImageReadError
from ..images import decoded_format
from .import_formats import READERS
from .import_rows import ImportSkip, MalformedRow, SourceImage, SourceRow

__all__ = ["FORMATS", "ImportReport", "import_dataset"]

FORMATS = tuple(READERS)  # ("zebra-cot", "mirage", "monet")
IMAGES_DIRNAME = "images"


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


def _check_image(img: SourceImage) -> str:
    """Decode the image fully; return its PIL format name. Raises MalformedRow with the reason."""
    if img.path is not None:
        if not img.path.exists():
            if img.tried:
                where = " or ".join(str(p) for p in img.tried)
                raise MalformedRow(f"{img.label}: file not found (looked for {where}; --image-root DIR sets "
                                "the directory relative paths start from)")
            raise MalformedRow(f"{img.label}: file not found ({img.path})")
        if not img.path.is_file():
            raise MalformedRow(f"{img.label}: not a file ({img.path})")
    try:
        return decoded_format(img.path if img.data is None else img.data)
    except ImageReadError as err:
        what = "file" if img.data is None else "inline bytes"
        raise MalformedRow(f"{img.label}: cannot decode the image {what} ({err})") from err


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


def _materialize(row: SourceRow, out_dir: Path, link: bool) -> dict:
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
    if fmt not in READERS:
        raise ValueError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", split_name or ""):
        raise ValueError(f"split name must be a plain file name (letters, digits, . _ -), got {split_name!r}")
    if not Path(src).exists():
        raise FileNotFoundError(f"input not found: {src}")
    if image_root is not None and not Path(image_root).is_dir():
        raise FileNotFoundError(f"image root is not a directory: {image_root}")


def _convert_rows(rows: Iterable[SourceRow | ImportSkip], report: ImportReport, out: _AtomicLines, out_dir: Path,
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
                raise MalformedRow("empty question")
            if not item.answer:
                raise MalformedRow("empty answer")
            if item.id in first_seen:
                raise MalformedRow(f"duplicate id {item.id!r} (first used at {first_seen[item.id]})")
            record = _materialize(item, out_dir, link)
        except MalformedRow as err:
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

    rows = READERS[fmt](src, outputs, Path(image_root) if image_root is not None else None)
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
