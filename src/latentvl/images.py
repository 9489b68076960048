"""Reading an image, once for every reader (records, the collator, inference, the importers).

An image is a ``PIL.Image`` or a path. :func:`read_image` returns it as RGB (transparent areas
composited onto white, 16-bit and 32-bit grayscale scaled to 8 bits, see :func:`to_rgb`), or only its
``(width, height)`` from the file header; :func:`image_file_problem` says why a file is not a usable
image without decoding its pixels. Failures are :class:`~latentvl.errors.ImageReadError` with a
``kind`` and a reason that names the file; the caller adds whose image it is (sample id, field).

Two size checks run on the header, before any pixel is decoded (:func:`size_problem`):

- the aspect ratio must be at most :data:`MAX_ASPECT_RATIO` (200), the limit of the Qwen2-VL image
  processor, which raises a bare ``ValueError`` beyond it;
- ``width * height`` must be at most the pixel limit: the ``max_pixels`` argument, else the
  environment variable ``LATENTVL_MAX_IMAGE_PIXELS`` (read at each call; ``0`` turns the check off),
  else :data:`DEFAULT_MAX_IMAGE_PIXELS` (40 megapixels). The Qwen processors resize every image to
  at most ~12.8 megapixels anyway; a larger file only costs memory and time to decode (a 12000x12000
  PNG can be 445 KB on disk and 3 GB in memory). PIL's own ``DecompressionBombError`` (at about 179
  megapixels) still applies above that.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

from PIL import Image

from .errors import ImageReadError, InputError

__all__ = [
    "DEFAULT_MAX_IMAGE_PIXELS",
    "MAX_ASPECT_RATIO",
    "MAX_PIXELS_ENV",
    "decoded_format",
    "image_file_problem",
    "image_label",
    "max_image_pixels",
    "open_rgb",
    "read_image",
    "size_problem",
    "to_rgb",
]

MAX_ASPECT_RATIO = 200
"""The Qwen2-VL image processor (``smart_resize``) refuses an image whose long side is over 200 times its
short side."""
DEFAULT_MAX_IMAGE_PIXELS = 40_000_000
"""The default pixel limit (``width * height``) of an image file: 40 megapixels (8K video, 7680x4320, is
33 megapixels)."""
MAX_PIXELS_ENV = "LATENTVL_MAX_IMAGE_PIXELS"
"""The environment variable that sets the pixel limit (a non-negative integer; 0: no limit)."""


def max_image_pixels(max_pixels: int | None = None) -> int | None:
    """The pixel limit in force: ``max_pixels`` if given, else ``$LATENTVL_MAX_IMAGE_PIXELS``, else
    :data:`DEFAULT_MAX_IMAGE_PIXELS`; ``None`` when the limit is off (0). A bad value is an
    :class:`~latentvl.errors.InputError` naming where it came from."""
    source = "max_pixels"
    value: object = max_pixels
    if value is None:
        raw = os.environ.get(MAX_PIXELS_ENV)
        if raw is None or not raw.strip():
            return DEFAULT_MAX_IMAGE_PIXELS
        source = MAX_PIXELS_ENV
        try:
            value = int(raw.strip().replace("_", ""))
        except ValueError:
            raise InputError(f"{MAX_PIXELS_ENV}={raw!r}: must be a non-negative integer (0: no limit)") from None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InputError(f"{source}={value!r}: must be a non-negative integer (0: no limit)")
    return value or None


def size_problem(width: int, height: int, max_pixels: int | None = None) -> str | None:
    """None if an image of ``width x height`` can be used, else why not (no pixels needed): an empty
    image, an aspect ratio over :data:`MAX_ASPECT_RATIO`, or more pixels than the limit
    (:func:`max_image_pixels`; ``max_pixels=0``: no pixel limit)."""
    if width < 1 or height < 1:
        return f"is empty ({width}x{height})"
    ratio = max(width, height) / min(width, height)
    if ratio > MAX_ASPECT_RATIO:
        return (f"is {width}x{height}: aspect ratio {ratio:.0f} is over {MAX_ASPECT_RATIO}, which the Qwen2-VL "
                "image processor refuses")
    limit = max_image_pixels(max_pixels)
    if limit is not None and width * height > limit:
        return (f"is {width}x{height} = {width * height} pixels, over the limit of {limit} "
                f"(set {MAX_PIXELS_ENV} to change it, 0 for none)")
    return None


def _to_8bit_gray(im: Image.Image) -> Image.Image:
    """A 16-bit or 32-bit grayscale image (``I;16*``, ``I``, ``F``) as 8-bit ``L``.

    PIL's own conversion clips every value above 255 to white. Here ``I;16`` (any byte order) keeps its
    top 8 bits (``value >> 8``, the full 16-bit range onto 0..255); so does ``I`` when all its values lie
    in 0..65535 (how PIL opens a 16-bit PNG in some versions). Other ``I`` and ``F`` images are scaled
    linearly from their own minimum..maximum onto 0..255 (a constant image becomes black).
    """
    import numpy as np

    if im.mode.startswith("I;16"):
        a = np.asarray(im).astype(np.uint32)
        return Image.fromarray((a >> 8).astype(np.uint8))
    a = np.asarray(im)
    lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
    if im.mode == "I" and lo >= 0 and hi <= 65535:
        return Image.fromarray((a.astype(np.int64) >> 8).astype(np.uint8))
    a = a.astype(np.float64)
    scaled = (a - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(a)
    return Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8))


def to_rgb(im: Image.Image) -> Image.Image:
    """``im`` as RGB; transparent areas are composited onto white; 16-bit and 32-bit grayscale
    (``I;16``, ``I;16B``, ``I``, ``F``, ...) are scaled to 8 bits first (:func:`_to_8bit_gray`)."""
    if im.mode.startswith("I") or im.mode == "F":
        return _to_8bit_gray(im).convert("RGB")
    has_alpha = im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info)
    if has_alpha:
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return im if im.mode == "RGB" else im.convert("RGB")


def open_rgb(path: str | os.PathLike[str], max_pixels: int | None = None) -> Image.Image:
    """Open an image fully into memory as RGB (:func:`to_rgb`).

    The size is checked from the header before decoding (:func:`size_problem`; ``max_pixels``: the
    pixel limit, default :func:`max_image_pixels`): an image too large or too elongated raises
    :class:`ImageReadError` (``invalid_input``) naming the file, its pixels never decoded.
    """
    with Image.open(path) as im:
        problem = size_problem(*im.size, max_pixels=max_pixels)
        if problem is not None:
            raise ImageReadError("invalid_input", f"image '{os.fspath(path)}' {problem}")
        im.load()
        return to_rgb(im) if im.mode != "RGB" else im.copy()


def image_label(value: Any) -> str:
    """How an error names an image: its path, or its type."""
    return repr(os.fspath(value)) if isinstance(value, (str, os.PathLike)) else type(value).__name__


def image_file_problem(path: str | os.PathLike[str], max_pixels: int | None = None) -> str | None:
    """None if ``path`` is a file PIL can identify and verify (header and structure, no pixels decoded)
    and whose size is usable (:func:`size_problem`), else the reason it is not: ``does not exist``,
    ``is not a file``, ``cannot be opened as an image (...)``, ``is WxH: ...``."""
    path = Path(path)
    if not path.exists():
        return "does not exist"
    if not path.is_file():
        return "is not a file"
    try:
        with Image.open(path) as im:
            size = im.size
            im.verify()
    except Exception as err:  # PIL raises many types for broken files
        return f"cannot be opened as an image ({type(err).__name__}: {err})"
    return size_problem(*size, max_pixels=max_pixels)


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


def read_image(value: Any, header_only: bool = False, max_pixels: int | None = None) -> Any:
    """An RGB ``PIL.Image`` from a PIL image or a path or, with ``header_only``, its ``(width, height)``
    (for a file only the header is read).

    Raises :class:`ImageReadError`: ``invalid_input`` (neither an image nor a path, or its size is not
    usable, :func:`size_problem`: checked from the header before decoding; for an image already in memory
    only the aspect ratio is checked), ``missing_image`` (no such file), ``unreadable_image`` (the file
    does not decode).
    """
    if isinstance(value, Image.Image):
        problem = size_problem(*value.size, max_pixels=0)
        if problem is not None:
            raise ImageReadError("invalid_input", f"image {problem}")
        return value.size if header_only else to_rgb(value)
    if not isinstance(value, (str, os.PathLike)):
        raise ImageReadError("invalid_input", f"expected a PIL image or a path, got {type(value).__name__}")
    path = Path(value)
    if not path.is_file():
        raise ImageReadError("missing_image", f"image file '{path}' does not exist")
    try:
        if header_only:
            with Image.open(path) as im:
                size = im.size
        else:
            return open_rgb(path, max_pixels=max_pixels)
    except ImageReadError:
        raise
    except Exception as err:  # PIL raises many types for broken files
        raise ImageReadError("unreadable_image",
                             f"cannot read image '{path}' ({type(err).__name__}: {err})") from err
    problem = size_problem(*size, max_pixels=max_pixels)
    if problem is not None:
        raise ImageReadError("invalid_input", f"image '{path}' {problem}")
    return size
