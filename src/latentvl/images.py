"""Reading an image, once for every reader (records, the collator, inference, the importers).

An image is a ``PIL.Image`` or a path. :func:`read_image` returns it as RGB (transparent areas
composited onto white), or only its ``(width, height)`` from the file header; :func:`image_file_problem`
says why a file is not a usable image without decoding its pixels. Failures are
:class:`~latentvl.errors.ImageReadError` with a ``kind`` and a reason that names the file; the caller
adds whose image it is (sample id, field).
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

from PIL import Image

from .errors import ImageReadError

__all__ = ["decoded_format", "image_file_problem", "image_label", "open_rgb", "read_image", "to_rgb"]


def to_rgb(im: Image.Image) -> Image.Image:
    """``im`` as RGB; transparent areas are composited onto white."""
    has_alpha = im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info)
    if has_alpha:
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return im if im.mode == "RGB" else im.convert("RGB")


def open_rgb(path: str | os.PathLike[str]) -> Image.Image:
    """Open an image fully into memory as RGB; transparent areas are composited onto white."""
    with Image.open(path) as im:
        im.load()
        return to_rgb(im) if im.mode != "RGB" else im.copy()


def image_label(value: Any) -> str:
    """How an error names an image: its path, or its type."""
    return repr(os.fspath(value)) if isinstance(value, (str, os.PathLike)) else type(value).__name__


def image_file_problem(path: str | os.PathLike[str]) -> str | None:
    """None if ``path`` is a file PIL can identify and verify (header and structure, no pixels decoded),
    else the reason it is not: ``does not exist``, ``is not a file``, ``cannot be opened as an image (...)``."""
    path = Path(path)
    if not path.exists():
        return "does not exist"
    if not path.is_file():
        return "is not a file"
    try:
        with Image.open(path) as im:
            im.verify()
    except Exception as err:  # PIL raises many types for broken files
        return f"cannot be opened as an image ({type(err).__name__}: {err})"
    return None


def decoded_format(source: str | os.PathLike[str] | bytes) -> str:
    """Decode an image file or its bytes fully; return PIL's format name (``""`` when unknown).

    Raises :class:`ImageReadError` (``unreadable_image``) with the decoder's reason.
    """
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as im:
            im.load()
            return im.format or ""
    except Exception as err:  # PIL raises many types for broken data
        raise ImageReadError("unreadable_image", f"{type(err).__name__}: {err}") from err


def read_image(value: Any, header_only: bool = False) -> Any:
    """An RGB ``PIL.Image`` from a PIL image or a path or, with ``header_only``, its ``(width, height)``
    (for a file only the header is read).

    Raises :class:`ImageReadError`: ``invalid_input`` (neither an image nor a path), ``missing_image``
    (no such file), ``unreadable_image`` (the file does not decode).
    """
    if isinstance(value, Image.Image):
        return value.size if header_only else to_rgb(value)
    if not isinstance(value, (str, os.PathLike)):
        raise ImageReadError("invalid_input", f"expected a PIL image or a path, got {type(value).__name__}")
    path = Path(value)
    if not path.is_file():
        raise ImageReadError("missing_image", f"image file '{path}' does not exist")
    try:
        if header_only:
            with Image.open(path) as im:
                return im.size
        return open_rgb(path)
    except Exception as err:  # PIL raises many types for broken files
        raise ImageReadError("unreadable_image",
                             f"cannot read image '{path}' ({type(err).__name__}: {err})") from err
