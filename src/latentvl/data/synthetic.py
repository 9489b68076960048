"""Generate a synthetic visual chain-of-thought dataset (a5, relay, maze or shapes) as JSONL records.

``latentvl make-data --task relay --n 1000 --seed 0 --out data/maze`` writes ``images/*.png``,
``train.jsonl``, ``val.jsonl``, ``test.jsonl`` (the format of :mod:`latentvl.data.records`, paths relative
to the output directory), ``annotations.jsonl`` (the generator's ground-truth structure per record) and
``meta.json`` (task, sizes, answer set, chance accuracy, knobs). The output is byte-identical for the same
task, n, seed and knobs. Every file is written to a temporary name first and moved into place, so a
killed run never leaves a half-written file behind; ``meta.json`` is written last (and removed first when
overwriting), so a folder without it holds an incomplete dataset.

Tasks (answers are balanced within each split, so chance is known exactly):

``relay``
    A serial lookup task. The question image is a grid of 28 px tiles (each tile is exactly one merged
    visual token): for each of C colours a one rule tile whose left half is ``a`` and right half
    ``f(a)``, with ``f`` a random single C-cycle, and one start tile (left half grey, right half the
    start colour ``c0``); positions are shuffled. The question gives the number of hops k; the answer
    is the letter of ``f^k(c0)``.
    The CoT images are plain swatches of ``c0, f(c0), ..., f^k(c0)`` (k + 1 images, one per state), so
    each latent segment can carry one colour and each step does one lookup. There is no shortcut:
    every colour is once a source and once a target, positions are random and the ``f^j(c0)`` are
    distinct, so a model that resolves fewer than k hops is near chance. Records carry ``difficulty``
    (k), ``cot_states`` (the colour letter of each CoT image) and ``rule`` (``{a: f(a)}``), which the
    implant instrument of ``latentvl eval`` uses (:func:`implied_answer`).

``a5``
    A word problem over the alternating group A5, which is not solvable, so no constant-depth circuit
    (and no fixed number of transformer layers) computes it for every length: a model has to carry a
    state step by step. Five state colours ``R G B Y C``; three ops, each a fixed permutation of the
    states: ``a`` the 5-cycle (R G B Y C), ``b`` the 3-cycle (R G B), ``c`` the double transposition
    (R G)(B Y). The question image is a swatch of the start colour ``s0``; the question text lists the k
    ops padded with ``-`` (the identity) to ``hops_max``, one character each: ``"Ops: acb-"``. The one CoT
    image is a strip of ``hops_max + 1`` cells of one merged token each, ``s0, s1, ..., sk`` (``s_j`` the
    state after j ops) and then ``sk`` held to the end, so with a budget of one latent per cell (alpha 1,
    gamma 1) latent j aligns to state j and reads op j at a constant distance in the sequence. The answer
    is the letter of ``sk``. Records carry ``difficulty`` (k), ``ops`` and ``latent_states``, one list per
    CoT image with one state per cell (``[[s0, ..., sk, ..., sk]]``), so the instruments of ``latentvl
    eval`` work per latent (:func:`implied_answer`).

``maze``
    A perfect maze (exactly one path between any two cells) on a g x g grid, a green start disc and a red
    goal square. The CoT images draw the solution path in blue, the i-th of M showing the first i/M of
    it. Question ``"First move from start?"``; answer ``U``/``D``/``L``/``R``, the first step of the path.
``shapes``
    2 to 4 shapes of distinct colours. The CoT images grey out the smaller shapes one by one, then frame
    the largest. Question ``"Colour of largest shape?"``; answer ``R``/``G``/``B``/``Y``.
"""

from __future__ import annotations

import io
import json
import math
import os
import random
import re
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

from ..fileio import write_atomic
from .palettes import RELAY_COLOURS

__all__ = [
    "DEFAULT_KNOBS",
    "IMPLIED_ANSWERS",
    "MAZE_ANSWERS",
    "SHAPES_ANSWERS",
    "TASKS",
    "Sample",
    "a5_implied_answer",
    "carve_maze",
    "generate_sample",
    "implied_answer",
    "make_dataset",
    "maze_neighbours",
    "relay_implied_answer",
    "solve_maze",
]

Cell = tuple[int, int]
Edge = frozenset  # frozenset of two adjacent cells: an open passage

WHITE = (255, 255, 255)
BLACK = (0, 0, 0)
START_GREEN = (0, 170, 0)
GOAL_RED = (220, 0, 0)
PATH_BLUE = (0, 0, 255)
GREY = (200, 200, 200)

MAZE_QUESTION = "First move from start?"
MAZE_ANSWERS = ("U", "D", "L", "R")
MOVES: dict[str, Cell] = {"U": (-1, 0), "D": (1, 0), "L": (0, -1), "R": (0, 1)}

SHAPES_QUESTION = "Colour of largest shape?"
SHAPES_ANSWERS = ("R", "G", "B", "Y")
SHAPE_COLOURS: dict[str, tuple[int, int, int]] = {
    "R": (220, 30, 30),
    "G": (0, 170, 0),
    "B": (30, 60, 230),
    "Y": (240, 200, 0),
}
SHAPE_KINDS = ("circle", "square", "triangle")

SIDE_STEP = 28  # image sides are multiples of this (the vision patch grid is 28 px per merged token)
MAZE_MIN_CELL = 12  # px; smaller cells are hard to see
MAZE_MARGIN = 4  # px around the maze
SHAPES_MIN_SIDE = 84
FRAME_PAD = 3  # px between a framed shape and its frame

DEFAULT_KNOBS: dict[str, Any] = {
    "val_fraction": 0.1,
    "test_fraction": 0.1,
    "min_cot": 1,
    "max_cot": 4,
    "size_min": 84,
    "size_max": 224,
    "grid_min": 3,
    "grid_max": 6,
    "min_moves": 2,
    "max_shapes": 4,
    "colours": 6,
    "hops_min": 1,
    "hops_max": 4,
}
_TASK_KNOBS = {
    "maze": ("min_cot", "max_cot", "size_min", "size_max", "grid_min", "grid_max", "min_moves"),
    "shapes": ("min_cot", "max_cot", "size_min", "size_max", "max_shapes"),
    "relay": ("colours", "hops_min", "hops_max"),
    "a5": ("hops_min", "hops_max"),
}
_IMAGE_NAME = re.compile(r"^[a-z]+-\d+-(q|cot)\d+\.png$")


@dataclass
class Sample:
    """One generated sample before it is written: images in memory plus the ground truth."""

    question: str
    answer: str
    images: list[Image.Image]
    cot_images: list[Image.Image]
    annotation: dict[str, Any] = field(default_factory=dict)
    record_fields: dict[str, Any] = field(default_factory=dict)  # extra keys of the JSONL record


# ----------------------------------------------------------------------------------------------- maze


def maze_neighbours(cell: Cell, g: int) -> list[Cell]:
    """The in-grid 4-neighbours of ``cell`` on a g x g grid, in U, D, L, R order."""
    r, c = cell
    out = []
    for dr, dc in MOVES.values():
        nr, nc = r + dr, c + dc
        if 0 <= nr < g and 0 <= nc < g:
            out.append((nr, nc))
    return out


def carve_maze(g: int, rng: random.Random) -> set[Edge]:
    """A perfect maze on a g x g grid by randomised depth-first search: the set of open passages.

    The passages form a spanning tree of the grid, so any two cells are joined by exactly one path.
    """
    start = (rng.randrange(g), rng.randrange(g))
    visited = {start}
    stack = [start]
    edges: set[Edge] = set()
    while stack:
        cell = stack[-1]
        options = [n for n in maze_neighbours(cell, g) if n not in visited]
        if not options:
            stack.pop()
            continue
        nxt = rng.choice(options)
        edges.add(frozenset((cell, nxt)))
        visited.add(nxt)
        stack.append(nxt)
    return edges


def _bfs(g: int, edges: set[Edge], source: Cell) -> tuple[dict[Cell, Cell | None], dict[Cell, int]]:
    """Breadth-first search from ``source``: parent and distance (in moves) of every reachable cell."""
    parent: dict[Cell, Cell | None] = {source: None}
    dist = {source: 0}
    queue = deque([source])
    while queue:
        cell = queue.popleft()
        for n in maze_neighbours(cell, g):
            if n not in parent and frozenset((cell, n)) in edges:
                parent[n] = cell
                dist[n] = dist[cell] + 1
                queue.append(n)
    return parent, dist


def solve_maze(g: int, edges: set[Edge], start: Cell, goal: Cell) -> list[Cell]:
    """The shortest path of cells from ``start`` to ``goal`` (both included); ValueError if none."""
    parent, _ = _bfs(g, edges, start)
    if goal not in parent:
        raise ValueError(f"goal {goal} is not reachable from start {start}")
    path = [goal]
    while path[-1] != start:
        path.append(parent[path[-1]])  # type: ignore[arg-type]
    return path[::-1]


def _move(a: Cell, b: Cell) -> str:
    delta = (b[0] - a[0], b[1] - a[1])
    for name, d in MOVES.items():
        if d == delta:
            return name
    raise ValueError(f"cells {a} and {b} are not adjacent")


def _rotate_cell(cell: Cell, g: int) -> Cell:
    """Rotate a cell 90 degrees clockwise on a g x g grid (U -> R -> D -> L -> U)."""
    r, c = cell
    return (c, g - 1 - r)


def _pick_side(rng: random.Random, size_min: int, size_max: int, min_side: int) -> int:
    sides = [s for s in range(SIDE_STEP, size_max + 1, SIDE_STEP) if s >= max(size_min, min_side)]
    if not sides:
        raise ValueError(f"no image side that is a multiple of {SIDE_STEP} in [{max(size_min, min_side)}, {size_max}]")
    return rng.choice(sides)


def _maze_min_side(g: int) -> int:
    return g * MAZE_MIN_CELL + 2 * MAZE_MARGIN


def _draw_maze(
    g: int, side: int, edges: set[Edge], start: Cell, goal: Cell, path: list[Cell]
) -> tuple[Image.Image, dict[str, int]]:
    cell = (side - 2 * MAZE_MARGIN) // g
    ox = oy = (side - g * cell) // 2
    wall = max(2, cell // 7)
    img = Image.new("RGB", (side, side), WHITE)
    draw = ImageDraw.Draw(img)

    def centre(rc: Cell) -> tuple[int, int]:
        return (ox + rc[1] * cell + cell // 2, oy + rc[0] * cell + cell // 2)

    half = max(3, cell // 4) // 2
    for j in range(1, len(path)):  # axis-aligned bars between consecutive cell centres
        (ax, ay), (bx, by) = centre(path[j - 1]), centre(path[j])
        draw.rectangle((min(ax, bx) - half, min(ay, by) - half, max(ax, bx) + half, max(ay, by) + half), PATH_BLUE)
    h0 = wall // 2

    def hwall(x: int, y: int) -> None:  # from grid corner (x, y) one cell to the right
        draw.rectangle((x - h0, y - h0, x + cell - h0 + wall - 1, y - h0 + wall - 1), BLACK)

    def vwall(x: int, y: int) -> None:  # from grid corner (x, y) one cell down
        draw.rectangle((x - h0, y - h0, x - h0 + wall - 1, y + cell - h0 + wall - 1), BLACK)

    for r in range(g):
        for c in range(g):
            x0, y0 = ox + c * cell, oy + r * cell
            # bottom and right walls of every cell; top and left only on the border
            if r == g - 1 or frozenset(((r, c), (r + 1, c))) not in edges:
                hwall(x0, y0 + cell)
            if c == g - 1 or frozenset(((r, c), (r, c + 1))) not in edges:
                vwall(x0 + cell, y0)
            if r == 0:
                hwall(x0, y0)
            if c == 0:
                vwall(x0, y0)
    rad = max(3, int(cell * 0.3))
    sx, sy = centre(start)
    draw.ellipse((sx - rad, sy - rad, sx + rad, sy + rad), fill=START_GREEN)
    gx, gy = centre(goal)
    draw.rectangle((gx - rad, gy - rad, gx + rad, gy + rad), fill=GOAL_RED)
    return img, {"cell": cell, "origin": ox, "wall": wall}


def _maze_sample(rng: random.Random, target: str, knobs: dict[str, Any]) -> Sample:
    g = rng.randint(knobs["grid_min"], knobs["grid_max"])
    side = _pick_side(rng, knobs["size_min"], knobs["size_max"], _maze_min_side(g))
    edges = carve_maze(g, rng)
    need = max(knobs["min_moves"], knobs["min_cot"], 1)
    cells = [(r, c) for r in range(g) for c in range(g)]
    while True:  # a start with some cell far enough away (every grid allowed by the knobs has one)
        start = rng.choice(cells)
        _, dist = _bfs(g, edges, start)
        far = [cl for cl in cells if dist[cl] >= need]
        if far:
            goal = rng.choice(far)
            break
    path = solve_maze(g, edges, start, goal)
    # rotate the whole maze until its first move is the target answer (balances the answers exactly)
    rotations = 0
    while _move(path[0], path[1]) != target:
        edges = {frozenset(_rotate_cell(x, g) for x in e) for e in edges}
        start, goal = _rotate_cell(start, g), _rotate_cell(goal, g)
        path = [_rotate_cell(x, g) for x in path]
        rotations += 1
        if rotations > 3:  # cannot happen: four rotations visit all four directions
            raise RuntimeError(f"no rotation makes the first move {target!r}")
    moves = len(path) - 1
    m = rng.randint(knobs["min_cot"], min(knobs["max_cot"], moves))
    shown = [math.ceil(i * moves / m) for i in range(1, m + 1)]
    question_img, geom = _draw_maze(g, side, edges, start, goal, [])
    cot = [_draw_maze(g, side, edges, start, goal, path[: k + 1])[0] for k in shown]
    annotation = {
        "grid": g,
        "side": side,
        **geom,
        "open": sorted([list(a) + list(b) for a, b in (sorted(e) for e in edges)]),
        "start": list(start),
        "goal": list(goal),
        "path": [list(p) for p in path],
        "cot_moves_shown": shown,
        "rotations": rotations,
    }
    return Sample(MAZE_QUESTION, _move(path[0], path[1]), [question_img], cot, annotation)


def _maze_baselines(annotations: list[dict[str, Any]]) -> dict[str, float]:
    """Accuracy of question-image-only heuristics that need no path tracing (for comparison)."""
    guess_open = toward = 0.0
    for a in annotations:
        start, goal = tuple(a["start"]), tuple(a["goal"])
        edges = {frozenset(((e[0], e[1]), (e[2], e[3]))) for e in a["open"]}
        exits = [n for n in maze_neighbours(start, a["grid"]) if frozenset((start, n)) in edges]
        answer_cell = (start[0] + MOVES[a["answer"]][0], start[1] + MOVES[a["answer"]][1])
        guess_open += 1.0 / len(exits)  # the answer is always one of the open exits
        best = min(exits, key=lambda n: (abs(n[0] - goal[0]) + abs(n[1] - goal[1]), exits.index(n)))
        toward += best == answer_cell
    n = max(1, len(annotations))
    return {
        "uniform_over_open_exits": round(guess_open / n, 4),
        "open_exit_nearest_to_goal": round(toward / n, 4),
    }


# --------------------------------------------------------------------------------------------- shapes


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


def _shapes_sample(rng: random.Random, target: str, knobs: dict[str, Any]) -> Sample:
    side = _pick_side(rng, knobs["size_min"], knobs["size_max"], SHAPES_MIN_SIDE)
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


# ---------------------------------------------------------------------------------------------- relay

RELAY_QUESTION = "Relay hops: {k}"
# The answer is the colour's letter (latentvl.data.palettes); ``colours`` takes the first C of them.
RELAY_START = (128, 128, 128)  # left half of the start tile
RELAY_TILE = SIDE_STEP  # one rule tile = one merged visual token (2x2 patches of 14 px)
RELAY_SWATCH = 2 * SIDE_STEP  # CoT swatch side: 4 visual tokens (the tiny processor's minimum)


def relay_answers(colours: int) -> tuple[str, ...]:
    """The answer letters of a relay task over ``colours`` colours."""
    return tuple(RELAY_COLOURS)[:colours]


def _relay_grid(colours: int) -> int:
    return math.ceil(math.sqrt(colours + 1))


def _relay_sample(rng: random.Random, target: str, knobs: dict[str, Any]) -> Sample:
    letters = list(relay_answers(knobs["colours"]))
    k = rng.randint(knobs["hops_min"], knobs["hops_max"])
    cycle = letters[:]
    rng.shuffle(cycle)  # f(cycle[i]) = cycle[i + 1]: one C-cycle
    rule = {cycle[i]: cycle[(i + 1) % len(cycle)] for i in range(len(cycle))}
    # start k steps before the target on the cycle, so that f^k(c0) = target
    c0 = cycle[(cycle.index(target) - k) % len(cycle)]
    chain = [c0]
    for _ in range(k):
        chain.append(rule[chain[-1]])
    g = _relay_grid(len(letters))
    side = g * RELAY_TILE
    cells = rng.sample(range(g * g), len(letters) + 1)
    img = Image.new("RGB", (side, side), WHITE)
    draw = ImageDraw.Draw(img)
    half = RELAY_TILE // 2
    tiles = []
    for cell, source in zip(cells, [*sorted(letters), None], strict=True):
        x0, y0 = (cell % g) * RELAY_TILE, (cell // g) * RELAY_TILE
        # The start tile reads like a rule "start -> c0": its left half is grey, a colour no rule uses, so
        # finding it is the same operation as every hop (match the left half, read the right half).
        left = RELAY_START if source is None else RELAY_COLOURS[source]
        right = RELAY_COLOURS[c0 if source is None else rule[source]]
        draw.rectangle((x0, y0, x0 + half - 1, y0 + RELAY_TILE - 1), left)
        draw.rectangle((x0 + half, y0, x0 + RELAY_TILE - 1, y0 + RELAY_TILE - 1), right)
        tiles.append({"cell": cell, "start": c0} if source is None else
                     {"cell": cell, "from": source, "to": rule[source]})
    cot = [Image.new("RGB", (RELAY_SWATCH, RELAY_SWATCH), RELAY_COLOURS[c]) for c in chain]
    annotation = {"side": side, "grid": g, "hops": k, "cycle": cycle, "chain": chain, "tiles": tiles}
    fields = {"difficulty": k, "cot_states": chain, "rule": rule}
    return Sample(RELAY_QUESTION.format(k=k), chain[-1], [img], cot, annotation, fields)


def relay_implied_answer(record: dict[str, Any], segment: int, state: Any) -> str | None:
    """The answer a relay record implies when its CoT state ``segment`` is ``state`` (a colour letter).

    ``f^(k - segment)(state)`` with ``f`` the record's ``rule`` and ``k = len(cot_states) - 1``; None
    when the record lacks the fields or ``state`` is not a colour of its rule.
    """
    rule, states = record.get("rule"), record.get("cot_states")
    if not isinstance(rule, dict) or not isinstance(states, list) or state not in rule:
        return None
    if not 0 <= segment < len(states):
        return None
    x = state
    for _ in range(len(states) - 1 - segment):
        x = rule[x]
    return x


# ------------------------------------------------------------------------------------------------- a5

A5_STATES = ("R", "G", "B", "Y", "C")  # RELAY_COLOURS' first five
# op -> the image of each state, by index into A5_STATES; a and b generate A5
A5_OPS: dict[str, tuple[int, ...]] = {
    "a": (1, 2, 3, 4, 0),  # the 5-cycle R -> G -> B -> Y -> C -> R
    "b": (1, 2, 0, 3, 4),  # the 3-cycle R -> G -> B -> R
    "c": (1, 0, 3, 2, 4),  # (R G)(B Y)
}
A5_SWATCH = 2 * SIDE_STEP  # question image: 4 visual tokens, the tiny processor's minimum
A5_CELL = SIDE_STEP  # one strip cell = one merged visual token
A5_IDENTITY = "-"


def a5_apply(ops: list[str] | str, state: str) -> str:
    """``state`` after the ``ops`` in order (letters of :data:`A5_OPS`; ``-`` is the identity)."""
    i = A5_STATES.index(state)
    for op in ops:
        if op != A5_IDENTITY:
            i = A5_OPS[op][i]
    return A5_STATES[i]


def _a5_sample(rng: random.Random, target: str, knobs: dict[str, Any]) -> Sample:
    k, cells = rng.randint(knobs["hops_min"], knobs["hops_max"]), knobs["hops_max"] + 1
    ops = [rng.choice(sorted(A5_OPS)) for _ in range(k)]
    s0 = next(s for s in A5_STATES if a5_apply(ops, s) == target)  # the ops are a permutation
    chain = [s0]
    for op in ops:
        chain.append(a5_apply(op, chain[-1]))
    held = chain + [chain[-1]] * (cells - len(chain))
    question = Image.new("RGB", (A5_SWATCH, A5_SWATCH), RELAY_COLOURS[s0])
    strip = Image.new("RGB", (A5_CELL * cells, A5_CELL), WHITE)
    draw = ImageDraw.Draw(strip)
    for j, state in enumerate(held):
        draw.rectangle((A5_CELL * j, 0, A5_CELL * (j + 1) - 1, A5_CELL - 1), RELAY_COLOURS[state])
    text = "Ops: " + "".join(ops) + A5_IDENTITY * (cells - 1 - k)
    annotation = {"side": A5_CELL * cells, "hops": k, "ops": ops, "chain": chain}
    fields = {"difficulty": k, "latent_states": [held], "ops": ops}
    return Sample(text, chain[-1], [question], [strip], annotation, fields)


def a5_implied_answer(record: dict[str, Any], segment: int, state: Any) -> str | None:
    """The answer an a5 record implies when the state at latent ``segment`` of its strip is ``state``:
    ``state`` after the record's ops ``segment + 1 .. k`` (none for the held cells after k); None when the
    record lacks ``ops``, ``segment`` is not a cell of its strip or ``state`` is not a state letter."""
    ops, states = record.get("ops"), record.get("latent_states")
    if not isinstance(ops, list) or state not in A5_STATES or any(op not in A5_OPS for op in ops):
        return None
    nested = isinstance(states, list) and len(states) == 1 and isinstance(states[0], list)
    if not 0 <= segment < (len(states[0]) if nested else len(ops) + 1):
        return None
    return a5_apply(ops[segment:], state)


# task name -> f(record, segment, state) -> the answer implied when CoT state `segment` is `state`
IMPLIED_ANSWERS: dict[str, Callable[[dict[str, Any], int, Any], str | None]] = {
    "relay": relay_implied_answer,
    "a5": a5_implied_answer,
}


def implied_answer(task: str | None, record: dict[str, Any], segment: int, state: Any) -> str | None:
    """The answer ``record`` implies if its CoT state ``segment`` were ``state``; None if unknown.

    ``task`` (a record's ``task`` field or its dataset's ``meta.json`` ``task``) selects the function in
    :data:`IMPLIED_ANSWERS`; a task without one gives None.
    """
    fn = IMPLIED_ANSWERS.get(task or "")
    return fn(record, segment, state) if fn is not None else None


# ---------------------------------------------------------------------------------------------- tasks


@dataclass(frozen=True)
class _Task:
    answers: tuple[str, ...]
    question: str
    rule: str
    make: Callable[[random.Random, str, dict[str, Any]], Sample]
    baselines: Callable[[list[dict[str, Any]]], dict[str, float]] | None = None


TASKS: dict[str, _Task] = {
    "a5": _Task(
        A5_STATES,
        "Ops: <k ops, then - up to hops_max>",
        "letter of the state after applying the listed ops (permutations of R G B Y C) in order to the "
        "colour of the question image",
        _a5_sample,
    ),
    "maze": _Task(
        MAZE_ANSWERS,
        MAZE_QUESTION,
        "first move (U/D/L/R) of the unique path from the green start to the red goal",
        _maze_sample,
        _maze_baselines,
    ),
    "shapes": _Task(
        SHAPES_ANSWERS,
        SHAPES_QUESTION,
        "colour (R/G/B/Y) of the largest shape; colours are distinct within an image",
        _shapes_sample,
    ),
    "relay": _Task(
        relay_answers(int(DEFAULT_KNOBS["colours"])),
        RELAY_QUESTION.format(k="k"),
        "letter of f^k(c0): follow the rule tiles (left half -> right half) k times from the start tile "
        "(grey -> c0)",
        _relay_sample,
    ),
}


def _answers(task: str, knobs: dict[str, Any]) -> tuple[str, ...]:
    if task == "relay":
        return relay_answers(int(knobs["colours"]))
    return TASKS[task].answers


def _check_knobs(task: str, knobs: dict[str, Any]) -> dict[str, Any]:
    unknown = set(knobs) - set(DEFAULT_KNOBS) - {"overwrite"}
    if unknown:
        raise ValueError(f"unknown knob(s) {sorted(unknown)}; known: {sorted(DEFAULT_KNOBS)}")
    k = {**DEFAULT_KNOBS, **{key: v for key, v in knobs.items() if key != "overwrite"}}
    for name in ("val_fraction", "test_fraction"):
        if not 0.0 <= float(k[name]) < 1.0:
            raise ValueError(f"{name}={k[name]} must be in [0, 1)")
    if k["val_fraction"] + k["test_fraction"] >= 1.0:
        raise ValueError("val_fraction + test_fraction must be < 1")
    if not 1 <= k["min_cot"] <= k["max_cot"]:
        raise ValueError(f"need 1 <= min_cot <= max_cot, got {k['min_cot']}, {k['max_cot']}")
    if not SIDE_STEP <= k["size_min"] <= k["size_max"]:
        raise ValueError(f"need {SIDE_STEP} <= size_min <= size_max, got {k['size_min']}, {k['size_max']}")
    if task == "maze":
        if not 2 <= k["grid_min"] <= k["grid_max"]:
            raise ValueError(f"need 2 <= grid_min <= grid_max, got {k['grid_min']}, {k['grid_max']}")
        if _maze_min_side(k["grid_max"]) > k["size_max"]:
            raise ValueError(
                f"a {k['grid_max']}x{k['grid_max']} maze needs images of at least "
                f"{_maze_min_side(k['grid_max'])} px; raise size_max or lower grid_max"
            )
        _pick_side(random.Random(0), k["size_min"], k["size_max"], _maze_min_side(k["grid_max"]))
        # any spanning tree joins opposite corners by >= 2(g-1) moves, so such a start-goal pair exists
        longest = 2 * (k["grid_min"] - 1)
        if max(k["min_moves"], k["min_cot"]) > longest:
            raise ValueError(f"min_moves/min_cot {max(k['min_moves'], k['min_cot'])} impossible on a small grid")
    if task == "relay":
        if not 3 <= k["colours"] <= len(RELAY_COLOURS):
            raise ValueError(f"colours={k['colours']} must be in [3, {len(RELAY_COLOURS)}]")
        if not 1 <= k["hops_min"] <= k["hops_max"] < k["colours"]:
            raise ValueError(
                f"need 1 <= hops_min <= hops_max < colours, got {k['hops_min']}, {k['hops_max']}, {k['colours']}"
            )
    if task == "a5" and not 1 <= k["hops_min"] <= k["hops_max"]:
        raise ValueError(f"need 1 <= hops_min <= hops_max, got {k['hops_min']}, {k['hops_max']}")
    if task == "shapes":
        if not 2 <= k["max_shapes"] <= len(SHAPE_COLOURS):
            raise ValueError(f"max_shapes={k['max_shapes']} must be in [2, {len(SHAPE_COLOURS)}]")
        if k["min_cot"] > 2:
            raise ValueError("shapes: min_cot must be <= 2 (an image may hold only 2 shapes)")
        _pick_side(random.Random(0), k["size_min"], k["size_max"], SHAPES_MIN_SIDE)
    return k


def generate_sample(task: str, rng: random.Random, target: str, knobs: dict[str, Any] | None = None) -> Sample:
    """One sample of ``task`` whose answer is ``target`` (one of the task's answers)."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose from {sorted(TASKS)}")
    checked = _check_knobs(task, knobs or {})
    if target not in _answers(task, checked):
        raise ValueError(f"target {target!r} is not an answer of task {task!r}")
    return TASKS[task].make(rng, target, checked)


# ---------------------------------------------------------------------------------------------- files


def _png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _jsonl(rows: list[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8")


def _split_sizes(n: int, val_fraction: float, test_fraction: float) -> dict[str, int]:
    n_val = int(round(n * val_fraction))
    n_test = int(round(n * test_fraction))
    n_train = n - n_val - n_test
    if n_train < 1:
        raise ValueError(f"n={n} leaves no training records with these val/test fractions")
    return {"train": n_train, "val": n_val, "test": n_test}


def _balanced_targets(answers: tuple[str, ...], size: int, rng: random.Random) -> list[str]:
    targets = [answers[i % len(answers)] for i in range(size)]
    rng.shuffle(targets)
    return targets


def _chance(counts: Counter, size: int) -> float | None:
    return max(counts.values()) / size if size else None


def _difficulty_counts(rows: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    values = Counter(r["difficulty"] for split_rows in rows.values() for r in split_rows if "difficulty" in r)
    return {"difficulty_counts": {str(v): values[v] for v in sorted(values)}} if values else {}


def make_dataset(task: str, n: int, seed: int, out: str | os.PathLike[str], **knobs: Any) -> dict[str, Any]:
    """Generate ``n`` records of ``task`` into ``out`` and return the metadata written to ``meta.json``.

    Knobs (defaults in :data:`DEFAULT_KNOBS`): ``val_fraction``, ``test_fraction``, ``min_cot``,
    ``max_cot`` (CoT images per record), ``size_min``/``size_max`` (image side range in px, sides are
    multiples of 28), maze: ``grid_min``/``grid_max``/``min_moves``, shapes: ``max_shapes``; and
    ``overwrite`` (default False: refuse to write into a directory that already holds a dataset).
    Deterministic: the same arguments give byte-identical files.
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose from {sorted(TASKS)}")
    if n < 1:
        raise ValueError(f"n={n} must be >= 1")
    overwrite = bool(knobs.get("overwrite", False))
    k = _check_knobs(task, knobs)
    out = Path(out)
    sizes = _split_sizes(n, k["val_fraction"], k["test_fraction"])
    image_dir = _prepare_output(out, sizes, overwrite)
    rows, annotations, written = _write_samples(task, seed, k, sizes, image_dir)
    for split, split_rows in rows.items():
        write_atomic(out / f"{split}.jsonl", _jsonl(split_rows))
    write_atomic(out / "annotations.jsonl", _jsonl(annotations))
    meta = _dataset_meta(task, n, seed, k, rows, annotations)
    write_atomic(out / "meta.json", (json.dumps(meta, indent=2) + "\n").encode("utf-8"))
    if overwrite:  # drop images of an earlier, larger run so the folder matches the records
        for old in image_dir.iterdir():
            if _IMAGE_NAME.match(old.name) and old.name not in written:
                old.unlink()
    return meta


def _prepare_output(out: Path, sizes: dict[str, int], overwrite: bool) -> Path:
    """Refuse a folder that holds a dataset unless ``overwrite``; create ``images/``; remove ``meta.json``
    (written last: while it is missing the folder is an incomplete dataset). Returns the image folder."""
    existing = [
        name for name in ("meta.json", "annotations.jsonl", *(f"{s}.jsonl" for s in sizes)) if (out / name).exists()
    ]
    if existing and not overwrite:
        raise FileExistsError(
            f"{out} already holds a dataset ({', '.join(existing)}); use --overwrite (overwrite=True) to replace it"
        )
    image_dir = out / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    (out / "meta.json").unlink(missing_ok=True)
    return image_dir


def _write_samples(task: str, seed: int, k: dict[str, Any], sizes: dict[str, int], image_dir: Path
                   ) -> tuple[dict[str, list[dict[str, Any]]], list[dict[str, Any]], set[str]]:
    """Draw every split's samples (answers balanced per split, one seeded generator per record), write their
    images, and return the records by split, the annotations and the image names written."""
    spec = TASKS[task]
    answers = _answers(task, k)
    written: set[str] = set()
    rows: dict[str, list[dict[str, Any]]] = {s: [] for s in sizes}
    annotations: list[dict[str, Any]] = []
    index = 0
    for split, size in sizes.items():
        targets = _balanced_targets(answers, size, random.Random(f"{task}:{seed}:targets:{split}"))
        for target in targets:
            rec_id = f"{task}-{index:05d}"
            sample = spec.make(random.Random(f"{task}:{seed}:sample:{index}"), target, k)
            names = [f"{rec_id}-q{j}.png" for j in range(len(sample.images))]
            cot_names = [f"{rec_id}-cot{j}.png" for j in range(len(sample.cot_images))]
            for name, img in zip(names + cot_names, sample.images + sample.cot_images, strict=True):
                write_atomic(image_dir / name, _png_bytes(img), sync=False)
                written.add(name)
            rows[split].append(
                {
                    "id": rec_id,
                    "question": sample.question,
                    "images": [f"images/{x}" for x in names],
                    "cot_images": [f"images/{x}" for x in cot_names],
                    "answer": sample.answer,
                    **sample.record_fields,
                }
            )
            annotations.append({"id": rec_id, "split": split, "answer": sample.answer, **sample.annotation})
            index += 1
    return rows, annotations, written


def _dataset_meta(task: str, n: int, seed: int, k: dict[str, Any], rows: dict[str, list[dict[str, Any]]],
                  annotations: list[dict[str, Any]]) -> dict[str, Any]:
    """``meta.json``: the task, answer set and counts, chance per split, CoT and difficulty counts, knobs."""
    spec = TASKS[task]
    answers = _answers(task, k)
    all_counts = Counter(r["answer"] for split_rows in rows.values() for r in split_rows)
    cot_counts = Counter(len(r["cot_images"]) for split_rows in rows.values() for r in split_rows)
    sides = [a["side"] for a in annotations]
    splits_meta = {}
    for split, split_rows in rows.items():
        counts = Counter(r["answer"] for r in split_rows)
        splits_meta[split] = {
            "file": f"{split}.jsonl",
            "size": len(split_rows),
            "answer_counts": {a: counts.get(a, 0) for a in answers},
            "chance_accuracy": _chance(counts, len(split_rows)),
        }
    meta = {
        "task": task,
        "n": n,
        "seed": seed,
        "question": spec.question,
        "answer_rule": spec.rule,
        "answer_set": list(answers),
        "answer_counts": {a: all_counts.get(a, 0) for a in answers},
        "chance_accuracy": _chance(all_counts, n),
        "chance_method": (
            "rate of the most frequent answer over all records (per split under 'splits'); answers are "
            "balanced within each split by construction, so this is 1/|answer_set| when the split size "
            "is a multiple of |answer_set|"
        ),
        "splits": splits_meta,
        "cot_images_per_record": {str(m): cot_counts[m] for m in sorted(cot_counts)},
        **_difficulty_counts(rows),
        "image_side_px": {"min": min(sides), "max": max(sides)},
        "knobs": {key: k[key] for key in ("val_fraction", "test_fraction", *_TASK_KNOBS[task])},
        "annotations": "annotations.jsonl",
    }
    if spec.baselines is not None:
        meta["heuristic_baselines"] = {
            "what": "accuracy over all records of rules that look only at the question image, without "
            "tracing the solution (a model above these uses more than local cues)",
            **spec.baselines(annotations),
        }
    return meta


# ------------------------------------------------------------------------------------------------ CLI
