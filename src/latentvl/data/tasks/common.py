"""What the synthetic tasks share: the generated :class:`Sample`, common colours, image sides and bytes."""

from __future__ import annotations

import io
import json
import random
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

__all__ = ["BLACK", "GREY", "SIDE_STEP", "WHITE", "Sample", "jsonl_bytes", "pick_side", "png_bytes"]

WHITE = (255, 255, 255)
BLACK = (0, 0, 0)
GREY = (200, 200, 200)

SIDE_STEP = 28  # image sides are multiples of this (the vision patch grid is 28 px per merged token)


@dataclass
class Sample:
    """One generated sample before it is written: images in memory plus the ground truth."""

    question: str
    answer: str
    images: list[Image.Image]
    cot_images: list[Image.Image]
    annotation: dict[str, Any] = field(default_factory=dict)
    record_fields: dict[str, Any] = field(default_factory=dict)  # extra keys of the JSONL record


def pick_side(rng: random.Random, min_size: int, max_size: int, min_side: int) -> int:
    """A random image side: a multiple of :data:`SIDE_STEP` in ``[max(min_size, min_side), max_size]``."""
    sides = [s for s in range(SIDE_STEP, max_size + 1, SIDE_STEP) if s >= max(min_size, min_side)]
    if not sides:
        raise ValueError(f"no image side that is a multiple of {SIDE_STEP} in [{max(min_size, min_side)}, {max_size}]")
    return rng.choice(sides)


def png_bytes(img: Image.Image) -> bytes:
    """``img`` encoded as PNG (deterministic for the same pixels)."""
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def jsonl_bytes(rows: list[dict[str, Any]]) -> bytes:
    """``rows`` as UTF-8 JSON lines."""
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8")
