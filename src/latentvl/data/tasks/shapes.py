"""``shapes``: the colour of the largest of 2 to 4 shapes.

2 to 4 shapes of distinct colours. The CoT images grey out the smaller shapes one by one, then frame the
largest. Question ``"Colour of largest shape?"``; answer ``R``/``G``/``B``/``Y``.
"""

from __future__ import annotations

import math
import random
from typing import Any

from PIL import Image, ImageDraw

from .common import BLACK, GREY, WHITE, Sample, pick_side

__all__ = ["KNOBS", "RULE", "SHAPE_COLOURS", "SHAPES_ANSWERS", "SHAPES_QUESTION", "check_knobs", "sample"]

SHAPES_QUESTION = "Colour of largest shape?"
SHAPES_ANSWERS = ("R", "G", "B", "Y")
RULE = "colour (R/G/B/Y) of the largest shape; colours are distinct within an image"
KNOBS = ("min_cot", "max_cot", "min_size", "max_size", "max_shapes")  # meta.json order
SHAPE_COLOURS: dict[str, tuple[int, int, int]] = {
    "R": (220, 30, 30),
    "G": (0, 170, 0),
    "B": (30, 60, 230),
    "Y": (240, 200, 0),
}
SHAPE_KINDS = ("circle", "square", "triangle")
SHAPES_MIN_SIDE = 84
FRAME_PAD = 3  # px between a framed shape and its frame


def _draw_shape(draw: ImageDraw.ImageDraw, kind: str, box: list[int], fill, outline=None) -> None:
    x0, y0, x1, y1 = box
    if kind == "circle":
        draw.ellipse(box, fill=fill, outline=outline)
    elif kind == "square":
        draw.rectangle(box, fill=fill, outline=outline)
    else:
        draw.polygon([((x0 + x1) // 2, y0), (x1, y1), (x0, y1)], fill=fill, outline=outline)


def _frame_width(side: int) -> int:
    return max(2, side // 56)


def _draw_shapes(side: int, shapes: list[dict[str, Any]], greyed: set[int], framed: int | None) -> Image.Image:
    img = Image.new("RGB", (side, side), WHITE)
    draw = ImageDraw.Draw(img)
    for i, s in enumerate(shapes):
        fill = GREY if i in greyed else SHAPE_COLOURS[s["colour"]]
        _draw_shape(draw, s["kind"], s["box"], fill)
    if framed is not None:
        x0, y0, x1, y1 = shapes[framed]["box"]
        pad, width = FRAME_PAD, _frame_width(side)
        draw.rectangle((x0 - pad, y0 - pad, x1 + pad, y1 + pad), outline=BLACK, width=width)
    return img


def sample(rng: random.Random, target: str, knobs: dict[str, Any]) -> Sample:
    side = pick_side(rng, knobs["min_size"], knobs["max_size"], SHAPES_MIN_SIDE)
    k = rng.randint(2, knobs["max_shapes"])
    others = [c for c in SHAPE_COLOURS if c != target]
    rng.shuffle(others)
    colours = [target] + others[: k - 1]
    quadrants = rng.sample(range(4), k)
    q = side // 2
    margin = FRAME_PAD + _frame_width(side) + 1  # room for the frame inside the quadrant
    big = min(rng.randint(int(0.72 * q), int(0.9 * q)), q - 2 * margin)
    shapes = []
    for i, (colour, quad) in enumerate(zip(colours, quadrants, strict=True)):
        size = big if i == 0 else rng.randint(int(0.3 * q), max(int(0.3 * q), int(big / 1.5)))
        qx, qy = (quad % 2) * q, (quad // 2) * q
        slack = q - size - 2 * margin
        x0 = qx + margin + rng.randint(0, slack)
        y0 = qy + margin + rng.randint(0, slack)
        kind = rng.choice(SHAPE_KINDS)
        shapes.append({"colour": colour, "kind": kind, "size": size, "box": [x0, y0, x0 + size - 1, y0 + size - 1]})
    order = rng.sample(range(k), k)  # shuffle drawing/storage order so the largest is not always first
    shapes = [shapes[j] for j in order]
    largest = order.index(0)
    smaller = sorted((i for i in range(k) if i != largest), key=lambda i: (shapes[i]["size"], i))
    # stage j (1..k-1): the j smallest are greyed out; stage k: all others greyed and the largest framed
    m = rng.randint(knobs["min_cot"], min(knobs["max_cot"], k))
    stages = [math.ceil(i * k / m) for i in range(1, m + 1)]
    cot = []
    for stage in stages:
        greyed = set(smaller[: min(stage, k - 1)])
        cot.append(_draw_shapes(side, shapes, greyed, largest if stage == k else None))
    annotation = {"side": side, "shapes": shapes, "largest": largest, "stages": stages}
    return Sample(
        SHAPES_QUESTION, shapes[largest]["colour"], [_draw_shapes(side, shapes, set(), None)], cot, annotation
    )



def check_knobs(k: dict[str, Any]) -> None:
    """Raise ValueError when the shapes knobs of ``k`` (all knobs, defaults filled in) cannot be met."""
    if not 2 <= k["max_shapes"] <= len(SHAPE_COLOURS):
        raise ValueError(f"max_shapes={k['max_shapes']} must be in [2, {len(SHAPE_COLOURS)}]")
    if k["min_cot"] > 2:
        raise ValueError("shapes: min_cot must be <= 2 (an image may hold only 2 shapes)")
    pick_side(random.Random(0), k["min_size"], k["max_size"], SHAPES_MIN_SIDE)
