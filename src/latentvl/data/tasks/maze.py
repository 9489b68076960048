"""``maze``: the first move of the unique path through a perfect maze.

A perfect maze (exactly one path between any two cells) on a g x g grid, a green start disc and a red goal
square. The CoT images draw the solution path in blue, the i-th of M showing the first i/M of it. Question
``"First move from start?"``; answer ``U``/``D``/``L``/``R``, the first step of the path.
"""

from __future__ import annotations

import math
import random
from collections import deque
from typing import Any

from PIL import Image, ImageDraw

from .common import BLACK, WHITE, Sample, pick_side

__all__ = [
    "KNOBS",
    "MAZE_ANSWERS",
    "MAZE_QUESTION",
    "MOVES",
    "RULE",
    "baselines",
    "carve_maze",
    "check_knobs",
    "maze_neighbours",
    "sample",
    "solve_maze",
]

Cell = tuple[int, int]
Edge = frozenset  # frozenset of two adjacent cells: an open passage

START_GREEN = (0, 170, 0)
GOAL_RED = (220, 0, 0)
PATH_BLUE = (0, 0, 255)

MAZE_QUESTION = "First move from start?"
MAZE_ANSWERS = ("U", "D", "L", "R")
RULE = "first move (U/D/L/R) of the unique path from the green start to the red goal"
MOVES: dict[str, Cell] = {"U": (-1, 0), "D": (1, 0), "L": (0, -1), "R": (0, 1)}
KNOBS = ("min_cot", "max_cot", "min_size", "max_size", "min_grid", "max_grid", "min_moves")  # meta.json order

MAZE_MIN_CELL = 12  # px; smaller cells are hard to see
MAZE_MARGIN = 4  # px around the maze


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


def sample(rng: random.Random, target: str, knobs: dict[str, Any]) -> Sample:
    g = rng.randint(knobs["min_grid"], knobs["max_grid"])
    side = pick_side(rng, knobs["min_size"], knobs["max_size"], _maze_min_side(g))
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


def baselines(annotations: list[dict[str, Any]]) -> dict[str, float]:
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




def check_knobs(k: dict[str, Any]) -> None:
    """Raise ValueError when the maze knobs of ``k`` (all knobs, defaults filled in) cannot be met."""
    if not 2 <= k["min_grid"] <= k["max_grid"]:
        raise ValueError(f"need 2 <= min_grid <= max_grid, got {k['min_grid']}, {k['max_grid']}")
    if _maze_min_side(k["max_grid"]) > k["max_size"]:
        raise ValueError(
            f"a {k['max_grid']}x{k['max_grid']} maze needs images of at least "
            f"{_maze_min_side(k['max_grid'])} px; raise max_size or lower max_grid"
        )
    pick_side(random.Random(0), k["min_size"], k["max_size"], _maze_min_side(k["max_grid"]))
    # any spanning tree joins opposite corners by >= 2(g-1) moves, so such a start-goal pair exists
    longest = 2 * (k["min_grid"] - 1)
    if max(k["min_moves"], k["min_cot"]) > longest:
        raise ValueError(f"min_moves/min_cot {max(k['min_moves'], k['min_cot'])} impossible on a small grid")
