"""Atomic file writes: the one way latentvl writes a file that must never be seen half-written."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path


def write_atomic(path: str | Path, data: str | bytes, *, sync: bool = True) -> None:
    """Write ``data`` (text as UTF-8, or bytes) to a temporary file beside ``path``, then move it into place.

    A reader sees the old file or the new one, never a part. ``sync=True`` flushes the data to disk before
    the move (a crash right after leaves the new content); ``sync=False`` skips the fsync for bulk files
    that can be regenerated (synthetic images). On any error the temporary file is removed.
    """
    path = Path(path)
    payload = data.encode("utf-8") if isinstance(data, str) else data
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
            if sync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def replace_dir_with_copy(src: Path, dst: Path) -> None:
    """Copy ``src`` to ``dst`` atomically (copy beside it, then swap)."""

    tmp = dst.with_name(f".tmp-{dst.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp)
    old = dst.with_name(f".old-{dst.name}")
    if dst.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(dst, old)
    os.replace(tmp, dst)
    shutil.rmtree(old, ignore_errors=True)
