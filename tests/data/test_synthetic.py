"""Tests for the synthetic a5, relay, maze and shapes tasks and the ``make-data`` command."""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import random
from collections import Counter, deque
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from latentvl import fileio
from latentvl.commands import make_data
from latentvl.data.palettes import RELAY_COLOURS
from latentvl.data.records import RecordDataset, load_metadata, load_records
from latentvl.data.tasks import a5, common, maze, relay, writer
from latentvl.data.tasks.maze import MAZE_ANSWERS, PATH_BLUE
from latentvl.data.tasks.registry import TASKS, check_knobs, generate_sample, implied_answer
from latentvl.data.tasks.shapes import SHAPE_COLOURS, SHAPES_ANSWERS
from latentvl.data.tasks.writer import make_dataset

STEP = {"U": (-1, 0), "D": (1, 0), "L": (0, -1), "R": (0, 1)}
SPLITS = ("train", "val", "test")


def _hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _rows(root: Path, name: str) -> list[dict]:
    return [json.loads(line) for line in (root / name).read_text(encoding="utf-8").splitlines()]


def _all_records(root: Path) -> list[dict]:
    return [r for split in SPLITS for r in _rows(root, f"{split}.jsonl")]


def _annotations(root: Path) -> dict[str, dict]:
    return {a["id"]: a for a in _rows(root, "annotations.jsonl")}


@pytest.fixture(scope="module")
def maze_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("maze")
    make_dataset("maze", 120, 7, out)
    return out


@pytest.fixture(scope="module")
def shapes_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shapes")
    make_dataset("shapes", 62, 3, out, val_fraction=0.2, test_fraction=0.0)  # 62: not a multiple of 4
    return out


# ----------------------------------------------------------------------------- files and metadata


@pytest.mark.parametrize("task", ["maze", "shapes", "relay"])
def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path: Path, task: str) -> None:
    make_dataset(task, 24, 11, tmp_path / "a")
    make_dataset(task, 24, 11, tmp_path / "b")
    make_dataset(task, 24, 12, tmp_path / "c")
    a, b, c = (_hashes(tmp_path / x) for x in "abc")
    assert a == b
    assert len(a) == sum(len(r["images"]) + len(r["cot_images"]) for r in _all_records(tmp_path / "a")) + 5
    assert {k for k in a if not k.endswith(".png")} == {k for k in c if not k.endswith(".png")}
    assert a["train.jsonl"] != c["train.jsonl"]
    question_images = [k for k in a if k.endswith("-q0.png")]
    assert len(question_images) == 24
    assert sum(a[k] != c[k] for k in question_images) > 20


@pytest.mark.parametrize("fixture", ["maze_dir", "shapes_dir"])
def test_records_load_and_meta_matches_the_files(request, fixture: str) -> None:
    root: Path = request.getfixturevalue(fixture)
    meta = load_metadata(root / "train.jsonl")
    assert meta is not None
    records = []
    for split in SPLITS:
        recs, skipped = load_records(root / f"{split}.jsonl")  # also verifies every PNG opens
        assert skipped == []
        assert len(recs) == meta["splits"][split]["size"]
        records += recs
    assert len(records) == meta["n"]
    assert len({r.id for r in records}) == meta["n"]
    assert not list(root.rglob("*.tmp")) and not list(root.rglob(".*"))
    # chance accuracy is the rate of the most frequent answer, overall and per split
    counts = Counter(r.answer for r in records)
    assert set(counts) <= set(meta["answer_set"])
    assert meta["answer_counts"] == {a: counts.get(a, 0) for a in meta["answer_set"]}
    assert meta["chance_accuracy"] == pytest.approx(max(counts.values()) / len(records))
    for split in SPLITS:
        split_counts = Counter(r["answer"] for r in _rows(root, f"{split}.jsonl"))
        size = sum(split_counts.values())
        if size == 0:
            assert meta["splits"][split]["chance_accuracy"] is None
            continue
        assert meta["splits"][split]["chance_accuracy"] == pytest.approx(max(split_counts.values()) / size)
        # balanced by construction: every answer within one of every other
        full = [split_counts.get(a, 0) for a in meta["answer_set"]]
        assert max(full) - min(full) <= 1
    assert meta["chance_accuracy"] == pytest.approx(1 / len(meta["answer_set"]), abs=0.02)
    if meta["n"] % len(meta["answer_set"]):
        assert meta["chance_accuracy"] > 1 / len(meta["answer_set"])
    assert Counter(len(r.cot_images) for r in records) == Counter(
        {int(m): c for m, c in meta["cot_images_per_record"].items()}
    )


def test_maze_heuristic_baselines_in_meta(maze_dir: Path) -> None:
    meta = load_metadata(maze_dir / "meta.json")
    expected = 0.0
    for a in _annotations(maze_dir).values():
        start = tuple(a["start"])
        exits = [e for e in a["open"] if tuple(e[:2]) == start or tuple(e[2:]) == start]
        expected += 1 / len(exits)
    base = meta["heuristic_baselines"]
    assert base["uniform_over_open_exits"] == pytest.approx(expected / meta["n"], abs=1e-4)
    assert 0.25 < base["uniform_over_open_exits"] < base["open_exit_nearest_to_goal"] < 1.0


@pytest.mark.parametrize("fixture", ["maze_dir", "shapes_dir"])
def test_cot_count_and_image_sizes_vary(request, fixture: str) -> None:
    root: Path = request.getfixturevalue(fixture)
    records = [r for split in SPLITS for r in load_records(root / f"{split}.jsonl")[0]]
    ms = Counter(len(r.cot_images) for r in records)
    assert set(ms) == {1, 2, 3, 4}
    assert all(len(r.images) == 1 for r in records)
    sides = set()
    for r in records:
        sizes = {Image.open(p).size for p in r.images + r.cot_images}
        assert len(sizes) == 1, f"{r.id}: question and CoT images differ in size"
        (w, h) = sizes.pop()
        assert w == h and w % 28 == 0 and 84 <= w <= 224
        sides.add(w)
    assert len(sides) >= 4


def test_dataset_items_are_rgb(maze_dir: Path) -> None:
    records, _ = load_records(maze_dir / "val.jsonl")
    item = RecordDataset(records)[0]
    assert item["id"] == records[0].id and item["answer"] in MAZE_ANSWERS
    assert all(im.mode == "RGB" for im in item["images"] + item["cot_images"])


# ------------------------------------------------------------------------------------------- maze


def _solve(g: int, open_edges: set, start: tuple, goal: tuple) -> list[tuple]:
    """Independent BFS that also checks the solution is unique (the passages form a tree)."""
    assert len(open_edges) == g * g - 1, "a perfect maze has cells - 1 passages"
    prev = {start: None}
    queue = deque([start])
    while queue:
        r, c = queue.popleft()
        for dr, dc in STEP.values():
            n = (r + dr, c + dc)
            if frozenset(((r, c), n)) in open_edges and n not in prev:
                prev[n] = (r, c)
                queue.append(n)
    assert len(prev) == g * g, "every cell is reachable (so, with cells - 1 passages, paths are unique)"
    path = [goal]
    while path[-1] != start:
        path.append(prev[path[-1]])
    return path[::-1]


def _centre(a: dict, cell: tuple) -> tuple[int, int]:
    return (
        a["origin"] + cell[1] * a["cell"] + a["cell"] // 2,
        a["origin"] + cell[0] * a["cell"] + a["cell"] // 2,
    )


def _mid(a: dict, p: tuple, q: tuple) -> tuple[int, int]:
    (x0, y0), (x1, y1) = _centre(a, p), _centre(a, q)
    return ((x0 + x1) // 2, (y0 + y1) // 2)


def _check_maze(a: dict, answer: str) -> None:
    g = a["grid"]
    edges = {frozenset(((e[0], e[1]), (e[2], e[3]))) for e in a["open"]}
    for e in edges:
        (r0, c0), (r1, c1) = sorted(e)
        assert abs(r0 - r1) + abs(c0 - c1) == 1 and all(0 <= v < g for v in (r0, c0, r1, c1))
    start, goal = tuple(a["start"]), tuple(a["goal"])
    path = _solve(g, edges, start, goal)
    assert [list(p) for p in path] == a["path"]
    dr, dc = path[1][0] - path[0][0], path[1][1] - path[0][1]
    assert STEP[answer] == (dr, dc), f"answer {answer} but the path starts with {(dr, dc)}"
    moves = len(path) - 1
    shown = a["cot_moves_shown"]
    m = len(shown)
    assert 1 <= m <= 4 and m <= moves
    assert shown == [math.ceil(i * moves / m) for i in range(1, m + 1)]


def test_maze_answers_are_the_first_move_of_the_unique_path(maze_dir: Path) -> None:
    ann = _annotations(maze_dir)
    records = _all_records(maze_dir)
    assert set(ann) == {r["id"] for r in records}
    for r in records:
        a = ann[r["id"]]
        assert r["answer"] == a["answer"]
        assert len(r["cot_images"]) == len(a["cot_moves_shown"])
        assert r["question"] == "First move from start?"
        _check_maze(a, r["answer"])
        assert len(a["path"]) - 1 >= 2  # min_moves default


def test_maze_pictures_show_markers_and_the_path_so_far(maze_dir: Path) -> None:
    ann = _annotations(maze_dir)
    for r in _all_records(maze_dir)[:40]:
        a = ann[r["id"]]
        path = [tuple(p) for p in a["path"]]
        q = Image.open(maze_dir / r["images"][0]).convert("RGB")
        assert q.getpixel(_centre(a, path[0])) == maze.START_GREEN
        assert q.getpixel(_centre(a, path[-1])) == maze.GOAL_RED
        assert all(q.getpixel(_mid(a, path[k], path[k + 1])) == (255, 255, 255) for k in range(len(path) - 1))
        assert PATH_BLUE not in {c for _, c in q.getcolors(1 << 16)}
        for cot_path, shown in zip(r["cot_images"], a["cot_moves_shown"], strict=True):
            im = Image.open(maze_dir / cot_path).convert("RGB")
            drawn = [im.getpixel(_mid(a, path[k], path[k + 1])) == PATH_BLUE for k in range(len(path) - 1)]
            assert drawn == [k < shown for k in range(len(path) - 1)], r["id"]
        # the wall pixels: an open passage has no wall on it, a closed one does
        g, cell, o = a["grid"], a["cell"], a["origin"]
        edges = {tuple(e) for e in a["open"]}
        for row in range(g):
            for col in range(g - 1):
                x, y = o + (col + 1) * cell, o + row * cell + cell // 2  # on the grid line
                wall = q.getpixel((x, y)) == (0, 0, 0)
                assert wall == ((row, col, row, col + 1) not in edges), (r["id"], row, col)


@settings(max_examples=30, deadline=None)
@given(
    seed=st.integers(0, 2**32),
    g=st.integers(2, 8),
    target=st.sampled_from(MAZE_ANSWERS),
    max_cot=st.integers(1, 4),
)
def test_maze_generator_property(seed: int, g: int, target: str, max_cot: int) -> None:
    knobs = {"min_grid": g, "max_grid": g, "max_cot": max_cot, "max_size": 224}
    sample = generate_sample("maze", random.Random(seed), target, knobs)
    assert sample.answer == target
    assert 1 <= len(sample.cot_images) <= max_cot
    assert sample.annotation["grid"] == g
    _check_maze(sample.annotation, target)


# ----------------------------------------------------------------------------------------- shapes


def test_shapes_answer_is_the_colour_of_the_largest_shape(shapes_dir: Path) -> None:
    ann = _annotations(shapes_dir)
    for r in _all_records(shapes_dir):
        a = ann[r["id"]]
        shapes = a["shapes"]
        assert 2 <= len(shapes) <= 4 and len({s["colour"] for s in shapes}) == len(shapes)
        sizes = sorted(s["size"] for s in shapes)
        assert sizes[-1] >= 1.45 * sizes[-2], "the largest shape must be clearly the largest"
        biggest = max(shapes, key=lambda s: s["size"])
        assert r["answer"] == biggest["colour"] and r["answer"] in SHAPES_ANSWERS
        side = a["side"]
        for s in shapes:
            x0, y0, x1, y1 = s["box"]
            assert 0 <= x0 < x1 < side and 0 <= y0 < y1 < side
        q = Image.open(shapes_dir / r["images"][0]).convert("RGB")
        last = Image.open(shapes_dir / r["cot_images"][-1]).convert("RGB")
        for s in shapes:
            x0, y0, x1, y1 = s["box"]
            centre = ((x0 + x1) // 2, (y0 + y1) // 2)
            assert q.getpixel(centre) == SHAPE_COLOURS[s["colour"]]
            expected = SHAPE_COLOURS[s["colour"]] if s is biggest else common.GREY
            assert last.getpixel(centre) == expected
        # the frame: black pixels around the largest shape only in the last CoT image
        assert (0, 0, 0) in {c for _, c in last.getcolors(1 << 16)}
        assert (0, 0, 0) not in {c for _, c in q.getcolors(1 << 16)}


# -------------------------------------------------------------------------------- knobs and the CLI


def _args(**kw) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    make_data.add_arguments(parser)
    argv = []
    for key, value in kw.items():
        flag = "--" + key.replace("_", "-")
        argv += [flag] if value is True else [flag, str(value)]
    return parser.parse_args(argv)


def test_cli_writes_says_where_and_prints_a_record(tmp_path: Path, capsys) -> None:
    out = tmp_path / "d"
    assert make_data.run(_args(task="shapes", n=10, seed=1, out=out)) == 0
    printed = capsys.readouterr().out
    assert str(out) in printed
    sample_line = next(line for line in printed.splitlines() if line.startswith("sample record: "))
    assert json.loads(sample_line.removeprefix("sample record: ")) == _rows(out, "train.jsonl")[0]
    assert load_metadata(out / "train.jsonl")["task"] == "shapes"


def test_cli_refuses_to_overwrite_without_flag_and_cleans_stale_images(tmp_path: Path, capsys) -> None:
    out = tmp_path / "d"
    assert make_data.run(_args(task="maze", n=20, seed=1, out=out)) == 0
    before = _hashes(out)
    assert make_data.run(_args(task="maze", n=8, seed=1, out=out)) == 2
    assert "already holds a dataset" in capsys.readouterr().err
    assert _hashes(out) == before
    assert make_data.run(_args(task="maze", n=8, seed=1, out=out, overwrite=True)) == 0
    referenced = {p for r in _all_records(out) for p in r["images"] + r["cot_images"]}
    on_disk = {f"images/{p.name}" for p in (out / "images").iterdir()}
    assert on_disk == referenced and len(_all_records(out)) == 8


def test_cli_knobs_reach_the_generator(tmp_path: Path) -> None:
    out = tmp_path / "d"
    args = _args(task="maze", n=30, seed=2, out=out, min_grid=4, max_grid=4, max_cot=2, min_size=112, max_size=140)
    assert make_data.run(args) == 0
    meta = load_metadata(out / "meta.json")
    assert meta["knobs"]["max_grid"] == 4 and meta["knobs"]["max_cot"] == 2
    assert "max_shapes" not in meta["knobs"]
    assert set(meta["cot_images_per_record"]) <= {"1", "2"}
    assert 112 <= meta["image_side_px"]["min"] <= meta["image_side_px"]["max"] <= 140
    assert {a["grid"] for a in _rows(out, "annotations.jsonl")} == {4}


@pytest.mark.parametrize(
    ("task", "knobs", "message"),
    [
        ("maze", {"colour": 1}, "unknown knob"),
        ("maze", {"max_grid": 20}, "needs images of at least"),
        ("maze", {"min_grid": 5, "max_grid": 4}, "min_grid <= max_grid"),
        ("maze", {"min_cot": 3, "max_cot": 2}, "min_cot <= max_cot"),
        ("maze", {"val_fraction": 0.6, "test_fraction": 0.5}, "must be < 1"),
        ("maze", {"min_size": 100, "max_size": 110}, "no image side"),
        ("shapes", {"max_shapes": 5}, "max_shapes"),
        ("nope", {}, "unknown task"),
    ],
)
def test_bad_knobs_are_rejected(tmp_path: Path, task: str, knobs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make_dataset(task, 10, 0, tmp_path / "d", **knobs)
    assert not (tmp_path / "d" / "meta.json").exists()


def test_interrupted_run_leaves_no_partial_files(tmp_path: Path, monkeypatch) -> None:
    out = tmp_path / "d"
    make_dataset("shapes", 12, 0, out)
    before = {name: (out / name).read_bytes() for name in ("train.jsonl", "val.jsonl", "meta.json")}
    real = writer.write_atomic
    calls = []

    def dying_write(path: Path, data: bytes, sync: bool = True) -> None:
        calls.append(path.name)
        if path.name == "val.jsonl":
            raise KeyboardInterrupt  # killed while writing the JSONL files
        real(path, data, sync=sync)

    monkeypatch.setattr(writer, "write_atomic", dying_write)
    with pytest.raises(KeyboardInterrupt):
        make_dataset("shapes", 12, 5, out, overwrite=True)
    monkeypatch.undo()
    assert "train.jsonl" in calls
    # every file is either the old one or the new one, complete; meta.json (written last) is gone, which
    # marks the folder as incomplete; nothing temporary is left
    assert (out / "val.jsonl").read_bytes() == before["val.jsonl"]
    assert not (out / "meta.json").exists()
    assert (out / "train.jsonl").read_bytes() != before["train.jsonl"]
    assert all(json.loads(line) for line in (out / "train.jsonl").read_text().splitlines())
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]


def test_atomic_write_cleans_up_on_failure(tmp_path: Path, monkeypatch) -> None:
    target = tmp_path / "f.jsonl"
    target.write_bytes(b"old\n")

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(fileio.os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        fileio.write_atomic(target, b"new\n")
    monkeypatch.undo()
    assert target.read_bytes() == b"old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["f.jsonl"]


# ------------------------------------------------------------------------------------------- relay


@pytest.fixture(scope="module")
def relay_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("relay")
    make_dataset("relay", 60, 5, out, colours=6, min_hops=1, max_hops=4)
    return out


def test_relay_records_follow_the_rule_k_times(relay_dir: Path) -> None:
    annotations = _annotations(relay_dir)
    records = _all_records(relay_dir)
    assert Counter(r["answer"] for r in records) == {c: 10 for c in "RGBYCM"}
    assert {r["difficulty"] for r in records} == {1, 2, 3, 4}
    for r in records:
        rule, states, k = r["rule"], r["cot_states"], r["difficulty"]
        # f is one cycle through all six colours (no shorter cycle, no fixed point)
        x, seen = "R", []
        for _ in range(6):
            seen.append(x)
            x = rule[x]
        assert x == "R" and sorted(seen) == sorted("RGBYCM")
        assert len(states) == k + 1 == len(r["cot_images"]) and r["question"] == f"Relay hops: {k}"
        assert all(rule[a] == b for a, b in zip(states, states[1:]))
        assert states[-1] == r["answer"] and len(set(states)) == k + 1
        assert annotations[r["id"]]["chain"] == states
    meta = load_metadata(relay_dir / "train.jsonl")
    assert meta["answer_set"] == list("RGBYCM") and meta["chance_accuracy"] == pytest.approx(1 / 6)
    assert sum(meta["difficulty_counts"].values()) == 60


def test_relay_pictures_show_whole_token_rule_tiles_and_swatches(relay_dir: Path) -> None:
    colours = RELAY_COLOURS
    for r in _all_records(relay_dir)[:12]:
        a = _annotations(relay_dir)[r["id"]]
        q = Image.open(relay_dir / r["images"][0]).convert("RGB")
        assert q.size == (84, 84)  # 3 x 3 tiles of 28 px: one merged visual token each
        for tile in a["tiles"]:
            x0, y0 = (tile["cell"] % 3) * 28, (tile["cell"] // 3) * 28
            left = {q.getpixel((x0 + dx, y0 + dy)) for dx in range(14) for dy in range(28)}
            right = {q.getpixel((x0 + 14 + dx, y0 + dy)) for dx in range(14) for dy in range(28)}
            if "start" in tile:
                assert left == {relay.RELAY_START} and right == {colours[tile["start"]]}
                assert tile["start"] == r["cot_states"][0]
            else:
                assert left == {colours[tile["from"]]} and right == {colours[tile["to"]]}
                assert r["rule"][tile["from"]] == tile["to"]
        for path, state in zip(r["cot_images"], r["cot_states"]):
            swatch = Image.open(relay_dir / path).convert("RGB")
            assert swatch.size == (56, 56) and {c for _, c in swatch.getcolors()} == {colours[state]}


@settings(max_examples=40)
@given(st.integers(0, 59), st.integers(0, 4), st.sampled_from(list("RGBYCM")))
def test_relay_implied_answer_follows_the_remaining_hops(relay_dir: Path, index: int, j: int, state: str) -> None:
    r = _all_records(relay_dir)[index]
    k = r["difficulty"]
    if j > k:
        assert implied_answer("relay", r, j, state) is None
        return
    implied = implied_answer("relay", r, j, state)
    assert implied_answer("relay", r, j, r["cot_states"][j]) == r["answer"]
    assert (implied == r["answer"]) == (state == r["cot_states"][j])  # f^(k-j) is a bijection
    assert implied_answer("maze", r, j, state) is None
    assert implied_answer("relay", {"question": "?"}, j, state) is None


@pytest.mark.parametrize(
    "knobs, message",
    [({"colours": 2}, "colours"), ({"colours": 9}, "colours"), ({"max_hops": 6}, "max_hops < colours"),
     ({"min_hops": 0}, "min_hops")],
)
def test_relay_knobs_are_checked(tmp_path: Path, knobs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make_dataset("relay", 12, 0, tmp_path / "d", **knobs)


def test_relay_cli_flags(tmp_path: Path) -> None:
    out = tmp_path / "d"
    assert make_data.run(_args(task="relay", n=12, seed=1, out=out, colours=4, min_hops=2, max_hops=3)) == 0
    records = _all_records(out)
    assert {r["answer"] for r in records} == set("RGBY") and {r["difficulty"] for r in records} <= {2, 3}


# ---------------------------------------------------------------------------------------------------- a5


@pytest.fixture(scope="module")
def a5_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("a5")
    make_dataset("a5", 50, 3, out, min_hops=1, max_hops=5)
    return out


def _permutation(op: str) -> dict[str, str]:
    return {s: a5.A5_STATES[a5.A5_OPS[op][i]] for i, s in enumerate(a5.A5_STATES)}


def test_a5_ops_generate_a_non_solvable_group() -> None:
    """a and b generate all 60 even permutations (A5); every op is even."""
    def parity(p: tuple[int, ...]) -> int:
        return sum(p[i] > p[j] for i in range(5) for j in range(i + 1, 5)) % 2

    assert all(parity(p) == 0 for p in a5.A5_OPS.values())
    group, frontier = {tuple(range(5))}, [tuple(range(5))]
    while frontier:
        g = frontier.pop()
        for op in ("a", "b"):
            h = tuple(a5.A5_OPS[op][g[i]] for i in range(5))
            if h not in group:
                group.add(h)
                frontier.append(h)
    assert len(group) == 60


def test_a5_records_apply_their_ops_in_order(a5_dir: Path) -> None:
    records = _all_records(a5_dir)
    assert Counter(r["answer"] for r in records) == {c: 10 for c in "RGBYC"}
    colours = RELAY_COLOURS
    for r in records:
        ops, (states,), k = r["ops"], r["latent_states"], r["difficulty"]
        assert len(ops) == k and 1 <= k <= 5 and len(states) == 6 and len(r["cot_images"]) == 1
        assert all(_permutation(op)[a] == b for op, a, b in zip(ops, states, states[1:]))
        assert set(states[k:]) == {r["answer"]}  # the last state, held to the end of the strip
        assert r["question"] == "Ops: " + "".join(ops) + "-" * (5 - k)
        q = Image.open(a5_dir / r["images"][0]).convert("RGB")
        assert q.size == (56, 56) and {c for _, c in q.getcolors()} == {colours[states[0]]}
        strip = Image.open(a5_dir / r["cot_images"][0]).convert("RGB")
        assert strip.size == (6 * 28, 28)  # one merged visual token per cell
        for j, state in enumerate(states):
            cell = {strip.getpixel((28 * j + dx, dy)) for dx in range(28) for dy in range(28)}
            assert cell == {colours[state]}
    assert load_metadata(a5_dir / "train.jsonl")["chance_accuracy"] == pytest.approx(0.2)


@settings(max_examples=40)
@given(st.integers(0, 49), st.integers(0, 6), st.sampled_from(list("RGBYC")))
def test_a5_implied_answer_applies_the_remaining_ops(a5_dir: Path, index: int, j: int, state: str) -> None:
    r = _all_records(a5_dir)[index]
    if j > 5:  # past the strip's six cells
        assert implied_answer("a5", r, j, state) is None
        return
    implied = implied_answer("a5", r, j, state)
    assert implied_answer("a5", r, j, r["latent_states"][0][j]) == r["answer"]
    assert (implied == r["answer"]) == (state == r["latent_states"][0][j])  # the remaining ops are a bijection
    x = state
    for op in r["ops"][j:]:
        x = _permutation(op)[x]
    assert implied == x
    assert implied_answer("a5", r, j, "M") is None
    assert implied_answer("a5", {"question": "?"}, j, state) is None


@pytest.mark.parametrize("knobs", [{"min_hops": 0}, {"min_hops": 3, "max_hops": 2}])
def test_a5_knobs_are_checked(tmp_path: Path, knobs: dict) -> None:
    with pytest.raises(ValueError, match="min_hops"):
        make_dataset("a5", 10, 0, tmp_path / "d", **knobs)


def test_a5_cli_flags(tmp_path: Path) -> None:
    out = tmp_path / "d"
    # the former flag names --hops-min/--hops-max still work
    assert make_data.run(_args(task="a5", n=10, seed=1, out=out, hops_min=3, hops_max=4)) == 0
    records = _all_records(out)
    assert {r["difficulty"] for r in records} == {3, 4} and all(len(r["question"]) == len("Ops: abcd") for r in records)


def _a5_questions(root: Path, split: str) -> set[tuple[str, str]]:
    return {(r["question"], r["latent_states"][0][0]) for r in _rows(root, f"{split}.jsonl")}


@settings(max_examples=8, deadline=None)
@given(st.integers(0, 10_000), st.integers(3, 7))
def test_a5_splits_share_no_question(tmp_path_factory, seed: int, max_hops: int) -> None:
    """A question (ops and start colour) is in one split only, whatever the seed; sizes and answers stay balanced."""
    out = tmp_path_factory.mktemp("a5split")
    meta = make_dataset("a5", 300, seed, out, min_hops=1, max_hops=max_hops)
    questions = {s: _a5_questions(out, s) for s in SPLITS}
    assert not questions["train"] & questions["val"]
    assert not questions["train"] & questions["test"]
    assert not questions["val"] & questions["test"]
    for split, size in (("train", 240), ("val", 30), ("test", 30)):
        rows = _rows(out, f"{split}.jsonl")
        assert len(rows) == size and Counter(r["answer"] for r in rows) == {c: size // 5 for c in "RGBYC"}
        assert sum(meta["splits"][split]["difficulty_counts"].values()) == size
    assert meta["split_rule"].startswith("each question is owned by one split")


def test_a5_one_op_keeps_two_questions_per_answer_for_training() -> None:
    """One op gives 15 questions, 3 per answer: the train split owns two of each answer's three, and the third
    goes to val or to test in turns, none shared."""
    knobs = check_knobs("a5", {"min_hops": 1, "max_hops": 1})
    owners = writer._question_owners("a5", 0, knobs, {"train": 80, "val": 10, "test": 10})
    owned = {s: Counter(a5.a5_apply(key[len("Ops: ")], key[-1]) for key, o in owners.items() if o == s)
             for s in SPLITS}
    assert len(owners) == 15 and owned["train"] == {c: 2 for c in "RGBYC"}
    assert owned["val"] + owned["test"] == {c: 1 for c in "RGBYC"}
    assert {sum(owned["val"].values()), sum(owned["test"].values())} == {2, 3}


def test_split_too_few_questions_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A held-out split that owns no question with some answer at all (one op: val and test share each
    answer's third question) is an error naming the split, the answer and the knobs; so it is without strata,
    where the hash alone shares the questions out."""
    with pytest.raises(ValueError, match=r"a5: no (val|test) question with answer '[RGBYC]'.*max_hops=1"):
        make_dataset("a5", 100, 0, tmp_path / "d", min_hops=1, max_hops=1)
    monkeypatch.setitem(TASKS, "a5", dataclasses.replace(TASKS["a5"], question_strata=None))
    with pytest.raises(ValueError, match=r"a5: no (val|test) question with answer '[RGBYC]'.*max_hops=1"):
        make_dataset("a5", 100, 0, tmp_path / "e", min_hops=1, max_hops=1)


@settings(max_examples=300, deadline=None)
@given(st.integers(1, 3000), st.lists(st.integers(0, 2000), min_size=1, max_size=4), st.integers(0, 50))
def test_shares_cut_questions_in_the_splits_shares(m: int, sizes_list: list[int], turn: int) -> None:
    """Every question goes to one split; a split without records gets none; the largest keeps at least half
    (or its own share, when that is less); a split with records goes without only where the largest could
    give no more, and then the turn moves on; each is within one of its exact share when every share is at
    least one."""
    sizes = {f"s{i}": size for i, size in enumerate(sizes_list)}
    if not sum(sizes.values()):
        return
    shares, next_turn = writer._shares(m, sizes, turn)
    live = sorted((s for s in sizes if sizes[s]), key=lambda s: -sizes[s])
    exact = {s: m * sizes[s] / sum(sizes.values()) for s in live}
    half = -(-m // 2)
    assert set(shares) == set(sizes) and sum(shares.values()) == m
    assert all(shares[s] == 0 for s in sizes if not sizes[s])
    assert shares[live[0]] >= min(half, max(1, int(exact[live[0]])))
    assert next_turn in (turn, turn + 1)
    if any(shares[s] == 0 for s in live):
        assert shares[live[0]] <= half and next_turn == turn + 1
    if all(e >= 1 for e in exact.values()):
        assert all(abs(shares[s] - exact[s]) < 1 for s in live)


def test_shares_of_small_strata_take_turns() -> None:
    """Three questions and splits of 80/10/10: train keeps two and the third goes to val and test in turns."""
    sizes, turn, got = {"train": 1920, "val": 240, "test": 240}, 0, []
    for _ in range(4):
        shares, turn = writer._shares(3, sizes, turn)
        assert shares["train"] == 2
        got.append("val" if shares["val"] else "test")
    assert got in (["test", "val", "test", "val"], ["val", "test", "val", "test"])
    assert writer._shares(9, sizes)[0] == {"train": 7, "val": 1, "test": 1}
    assert writer._shares(27, sizes)[0] == {"train": 21, "val": 3, "test": 3}


def test_a5_question_strata_list_every_question_a_sample_can_ask() -> None:
    """Each (k, answer) lists its 3^k questions, once each, in the form of question_key; longer words (3^k over
    STRATIFIED_QUESTIONS) are left to the hash."""
    knobs = check_knobs("a5", {"min_hops": 2, "max_hops": 7})
    strata = a5.question_strata(knobs)
    assert set(strata) == {(k, c) for k in range(2, 7) for c in "RGBYC"}
    assert all(len(keys) == 3**k == len(set(keys)) for (k, _), keys in strata.items())
    rng = random.Random(0)
    for _ in range(200):
        sample = a5.sample(rng, rng.choice("RGBYC"), knobs)
        k = sample.record_fields["difficulty"]
        if k <= 6:
            assert a5.question_key(sample) in strata[(k, sample.answer)]


def test_tasks_without_a_question_key_draw_once_per_record(tmp_path: Path) -> None:
    """relay has no question_key: each record is the first draw of its own generator, splits drawn apart."""
    out = tmp_path / "relay"
    meta = make_dataset("relay", 30, 4, out)
    knobs = check_knobs("relay", {})
    for r in _all_records(out):
        index = int(r["id"].split("-")[1])
        first = TASKS["relay"].make(random.Random(f"relay:4:sample:{index}"), r["answer"], knobs)
        assert first.question == r["question"]
    assert meta["split_rule"] == "records drawn independently for each split"


@pytest.mark.parametrize("seed", [55, 56, 66, 71])
def test_a5_held_out_splits_carry_every_k_and_answer(tmp_path: Path, seed: int) -> None:
    """A held-out split owns its share of the questions of each k and answer (one of nine at k = 2, three of
    27 at k = 3), and at k = 1 val and test take turns over the answers' third questions, so its records keep
    about the generator's even share per k from k = 2 and every answer at every k from k = 2 (seed 55 once drew
    88 of 240 at k = 1; seeds 56 and 66 once had no k = 1 record in a held-out split)."""
    meta = make_dataset("a5", 2400, seed, tmp_path / "d", min_hops=1, max_hops=5)
    short: Counter = Counter()
    for split in ("val", "test"):
        counts = meta["splits"][split]["difficulty_counts"]
        assert set(counts) == {"1", "2", "3", "4", "5"} and counts["1"] >= 8, (split, counts)
        assert all(0.7 * 48 <= counts[k] <= 1.5 * 48 for k in "2345"), (split, counts)  # even: 48
        cells = Counter((r["difficulty"], r["answer"]) for r in _rows(tmp_path / "d", f"{split}.jsonl"))
        assert {cell for cell in cells if cell[0] >= 2} == {(k, c) for k in range(2, 6) for c in "RGBYC"}, split
        short.update(c for k, c in cells if k == 1)
    assert set(short) == set("RGBYC")  # between them, val and test hold every answer at k = 1
