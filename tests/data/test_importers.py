"""`latentvl import`: Zebra-CoT parquet, Mirage-style JSONL and Monet-style JSON to latentvl JSONL."""

from __future__ import annotations

import io
import json
import os
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from latentvl.data.import_rows import ImportSkip, extract_answer
from latentvl.data.importers import import_dataset
from latentvl.errors import DatasetImportError

COLORS = {
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "white": (255, 255, 255),
    "black": (0, 0, 0),
    "gray": (128, 128, 128),
    "yellow": (255, 255, 0),
}


def png_bytes(color: str, size=(6, 4)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, COLORS[color]).save(buf, format="PNG")
    return buf.getvalue()


def save_png(path: Path, color: str, size=(6, 4)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, COLORS[color]).save(path)
    return path


def pixel(path: Path) -> tuple:
    with Image.open(path) as im:
        return im.convert("RGB").getpixel((0, 0))


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def check_contract(jsonl: Path) -> list[dict]:
    """The latentvl record contract: unique non-empty ids, non-empty texts, readable images."""
    records = read_jsonl(jsonl)
    ids = [r["id"] for r in records]
    assert all(isinstance(i, str) and i for i in ids)
    assert len(ids) == len(set(ids))
    for r in records:
        assert set(r) == {"id", "question", "images", "cot_images", "answer"}
        assert r["question"].strip() and r["answer"].strip()
        for rel in r["images"] + r["cot_images"]:
            assert not Path(rel).is_absolute()
            with Image.open(jsonl.parent / rel) as im:
                im.load()
    return records


def by_location(skipped) -> dict[str, ImportSkip]:
    return {s.location: s for s in skipped}


# ---------------------------------------------------------------------------------------------- Zebra


def _image_struct(color_or_bytes):
    if color_or_bytes is None:
        return None
    data = color_or_bytes if isinstance(color_or_bytes, bytes) else png_bytes(color_or_bytes)
    return {"bytes": data, "path": "img.png"}


@pytest.fixture()
def zebra_dir(tmp_path) -> Path:
    root = tmp_path / "zebra"
    (root / "maze").mkdir(parents=True)
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    rows = [
        # 0: good; the trace uses reasoning image 2 before 1
        dict(
            q="Find the exit.\n<image_start>[problem_image_1]<image_end> and <image_start>[problem_image_2]"
            "<image_end>  Which door?",
            t="THOUGHT 0: look <image_start>[reasoning_image_2]<image_end> then "
            "<image_start>[reasoning_image_1]<image_end> done",
            a=" B ",
            p=["red", "green"],
            r=["blue", "white"],
        ),
        # 1: a reasoning image that cannot be decoded
        dict(q="Q1", t="[reasoning_image_1]", a="A", p=["red", None], r=[b"not an image", None]),
        # 2: empty final answer
        dict(q="Q2", t="", a="   ", p=[None, None], r=["blue", None]),
        # 3: null question
        dict(q=None, t="", a="C", p=[None, None], r=[None, None]),
        # 4: the trace refers to an image the row does not have
        dict(
            q="Q4", t="<image_start>[reasoning_image_2]<image_end>", a="D", p=[None, None], r=["gray", None]
        ),
        # 5: good, no question image, trace with no placeholders -> numeric order
        dict(q="Q5 plain", t="no pictures named", a="E", p=[None, None], r=["yellow", "black"]),
    ]
    table = pa.table(
        {
            "Question": pa.array([r["q"] for r in rows], pa.string()),
            "Text Reasoning Trace": pa.array([r["t"] for r in rows], pa.string()),
            "Final Answer": pa.array([r["a"] for r in rows], pa.string()),
            "problem_image_1": pa.array([_image_struct(r["p"][0]) for r in rows], image_type),
            "problem_image_2": pa.array([_image_struct(r["p"][1]) for r in rows], image_type),
            "reasoning_image_1": pa.array([_image_struct(r["r"][0]) for r in rows], image_type),
            "reasoning_image_2": pa.array([_image_struct(r["r"][1]) for r in rows], image_type),
        }
    )
    pq.write_table(table, root / "maze" / "a.parquet")
    # raw binary image columns, no trace column -> numeric order
    pq.write_table(
        pa.table(
            {
                "Question": ["Raw <image_start>[problem_image_1]<image_end>"],
                "Final Answer": ["F"],
                "problem_image_1": pa.array([png_bytes("green")], pa.binary()),
                "reasoning_image_1": pa.array([png_bytes("red")], pa.binary()),
                "reasoning_image_10": pa.array([png_bytes("black")], pa.binary()),
                "reasoning_image_2": pa.array([png_bytes("blue")], pa.binary()),
            }
        ),
        root / "b.parquet",
    )
    # a file without the answer column: every row is skipped
    pq.write_table(pa.table({"Question": ["x", "y"]}), root / "c.parquet")
    (root / "d.parquet").write_bytes(b"PAR1 but not really")
    (root / "notes.txt").write_text("not a parquet file")
    return root


def test_zebra_cot_directory(zebra_dir, tmp_path):
    out = tmp_path / "out"
    report = import_dataset("zebra-cot", zebra_dir, out, split_name="train")
    assert report.converted == 3
    assert report.output_path == out / "train.jsonl"
    records = {r["id"]: r for r in check_contract(out / "train.jsonl")}
    assert set(records) == {
        "zebra-cot-maze-a-000000",
        "zebra-cot-maze-a-000005",
        "zebra-cot-b-000000",
    }

    first = records["zebra-cot-maze-a-000000"]
    assert first["question"] == "Find the exit.\nand Which door?"
    assert first["answer"] == "B"
    assert [pixel(out / p) for p in first["images"]] == [COLORS["red"], COLORS["green"]]
    assert [pixel(out / p) for p in first["cot_images"]] == [COLORS["white"], COLORS["blue"]]
    assert all(p.startswith("images/") and p.endswith(".png") for p in first["images"] + first["cot_images"])

    fifth = records["zebra-cot-maze-a-000005"]
    assert fifth["images"] == []
    assert [pixel(out / p) for p in fifth["cot_images"]] == [COLORS["yellow"], COLORS["black"]]

    raw = records["zebra-cot-b-000000"]
    assert raw["question"] == "Raw"
    assert [pixel(out / p) for p in raw["images"]] == [COLORS["green"]]
    assert [pixel(out / p) for p in raw["cot_images"]] == [COLORS["red"], COLORS["blue"], COLORS["black"]]

    a, c = zebra_dir / "maze" / "a.parquet", zebra_dir / "c.parquet"
    skips = by_location(report.skipped)
    d = zebra_dir / "d.parquet"
    assert set(skips) == {f"{a}:row {i}" for i in (1, 2, 3, 4)} | {f"{c}:row 0", f"{c}:row 1", str(d)}
    assert "cannot read parquet file" in skips[str(d)].reason
    assert "reasoning_image_1" in skips[f"{a}:row 1"].reason
    assert "cannot decode" in skips[f"{a}:row 1"].reason
    assert skips[f"{a}:row 1"].id == "zebra-cot-maze-a-000001"
    assert skips[f"{a}:row 2"].reason == "empty answer"
    assert "'Question'" in skips[f"{a}:row 3"].reason
    assert "[reasoning_image_2]" in skips[f"{a}:row 4"].reason
    assert "'Final Answer'" in skips[f"{c}:row 1"].reason

    report_lines = read_jsonl(out / "train.skipped.jsonl")
    assert [(d["location"], d["id"], d["reason"]) for d in report_lines] == [tuple(s) for s in report.skipped]
    # the undecodable row left no image behind
    assert not (out / "images" / "zebra-cot-maze-a-000001").exists()


def test_zebra_cot_without_pyarrow(zebra_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(DatasetImportError, match=r"latentvl\[import\]"):
        import_dataset("zebra-cot", zebra_dir, tmp_path / "out")
    assert not (tmp_path / "out" / "data.jsonl").exists()
    assert not list((tmp_path / "out").glob("*.tmp"))


# --------------------------------------------------------------------------------------------- Mirage


@pytest.fixture()
def mirage_file(tmp_path) -> Path:
    root = tmp_path / "mirage"
    save_png(root / "imgs" / "q1.png", "red")
    save_png(root / "imgs" / "q2.png", "green")
    save_png(root / "helpers" / "h1.png", "blue")
    save_png(root / "helpers" / "h2.png", "white")
    (root / "imgs" / "fake.png").write_text("this is text, not a PNG")
    lines = [
        json.dumps(
            {
                "text_input": "Which piece fits?",
                "text_output": "<think>the second helper shows it</think> so <answer> 42 </answer>",
                "image_input": ["imgs/q1.png", "imgs/q2.png"],
                "image_output": "helpers/h1.png",
            }
        ),
        "",
        "{not json",
        json.dumps({"text_output": "x", "image_input": "imgs/q1.png"}),
        json.dumps({"text_input": "Q", "text_output": "A", "image_output": ["helpers/missing.png"]}),
        json.dumps({"text_input": "Q", "text_output": "A", "image_input": "imgs/fake.png"}),
        json.dumps(
            {
                "id": "keep-me",
                "text_input": "  Go left or right? ",
                "text_output": "  Left  ",
                "image_input": "imgs/q2.png",
                "image_output": ["helpers/h2.png", "helpers/h1.png"],
            }
        ),
        json.dumps(["a", "list"]),
        json.dumps({"text_input": "Q", "text_output": "<answer>  </answer>"}),
        json.dumps({"id": "keep-me", "text_input": "Q", "text_output": "A"}),
    ]
    path = root / "train.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_mirage_jsonl(mirage_file, tmp_path):
    out = tmp_path / "out"
    report = import_dataset("mirage", mirage_file, out)
    assert report.converted == 2
    records = check_contract(out / "data.jsonl")
    assert [r["id"] for r in records] == ["mirage-000001", "keep-me"]
    first, second = records
    assert first["question"] == "Which piece fits?"
    assert first["answer"] == "42"
    assert [pixel(out / p) for p in first["images"]] == [COLORS["red"], COLORS["green"]]
    assert [pixel(out / p) for p in first["cot_images"]] == [COLORS["blue"]]
    assert second["question"] == "Go left or right?"
    assert second["answer"] == "Left"
    assert [pixel(out / p) for p in second["cot_images"]] == [COLORS["white"], COLORS["blue"]]

    skips = by_location(report.skipped)
    assert set(skips) == {f"{mirage_file}:{n}" for n in (3, 4, 5, 6, 8, 9, 10)}
    assert "invalid JSON" in skips[f"{mirage_file}:3"].reason
    assert "'text_input'" in skips[f"{mirage_file}:4"].reason
    line5, line6 = skips[f"{mirage_file}:5"].reason, skips[f"{mirage_file}:6"].reason
    assert "missing.png" in line5 and "not found" in line5
    assert "fake.png" in line6 and "cannot decode" in line6
    assert "JSON object" in skips[f"{mirage_file}:8"].reason
    assert skips[f"{mirage_file}:9"].reason == "empty answer"
    assert "duplicate id 'keep-me'" in skips[f"{mirage_file}:10"].reason
    assert f"{mirage_file}:7" in skips[f"{mirage_file}:10"].reason


def test_mirage_limit_link_and_rerun(mirage_file, tmp_path):
    out = tmp_path / "out"
    report = import_dataset("mirage", mirage_file, out, limit=1)
    assert report.converted == 1 and report.skipped == []
    assert len(read_jsonl(out / "data.jsonl")) == 1

    report = import_dataset("mirage", mirage_file, out, link=True)
    assert report.converted == 2
    (record, _) = check_contract(out / "data.jsonl")
    assert os.path.samefile(out / record["images"][0], mirage_file.parent / "imgs" / "q1.png")
    # nothing temporary is left behind
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]


def test_image_root_option(mirage_file, tmp_path):
    moved = tmp_path / "elsewhere"
    moved.mkdir()
    for name in ("imgs", "helpers"):
        (mirage_file.parent / name).rename(moved / name)
    without = import_dataset("mirage", mirage_file, tmp_path / "a")
    # only the line without images (line 10, now not a duplicate) survives
    assert [r["id"] for r in read_jsonl(tmp_path / "a" / "data.jsonl")] == ["keep-me"]
    assert sum("not found" in s.reason for s in without.skipped) == 4  # lines 1, 5, 6, 7
    import_dataset("mirage", mirage_file, tmp_path / "b", image_root=moved)
    assert [r["id"] for r in check_contract(tmp_path / "b" / "data.jsonl")] == ["mirage-000001", "keep-me"]


@pytest.fixture()
def mirage_repo(tmp_path) -> Path:
    """Mirage's published layout: the JSONL under data/examples/, image paths relative to the repository
    root (the directory its scripts run from), written as ./data/..."""
    repo = tmp_path / "Mirage"
    save_png(repo / "data" / "images" / "q1.png", "red")
    save_png(repo / "data" / "images" / "h1.png", "blue")
    save_png(repo / "data" / "examples" / "local.png", "green")  # next to the JSONL
    save_png(repo / "local.png", "white")  # the same relative name under the root: the JSONL's folder wins
    rows = [
        {"text_input": "Q1?", "text_output": "<answer>A</answer>", "image_input": ["./data/images/q1.png"],
         "image_output": ["./data/images/h1.png"]},
        {"text_input": "Q2?", "text_output": "B", "image_input": "local.png", "image_output": "./data/images/h1.png"},
        {"text_input": "Q3?", "text_output": "C", "image_input": "./data/images/absent.png"},
    ]
    (repo / "data" / "examples" / "sample.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return repo


def test_mirage_paths_relative_to_the_working_directory(mirage_repo, tmp_path, monkeypatch, capsys):
    """Run from the repository root as Mirage's README does: paths missing under the JSONL's folder
    are found under the working directory, and the command says which root it used."""
    from latentvl.cli import main

    monkeypatch.chdir(mirage_repo)
    out = tmp_path / "out"
    rc = main(["import", "--format", "mirage", "data/examples/sample.jsonl", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    records = check_contract(out / "data.jsonl")
    assert [r["question"] for r in records] == ["Q1?", "Q2?"]
    first, second = records
    assert [pixel(out / p) for p in first["images"] + first["cot_images"]] == [COLORS["red"], COLORS["blue"]]
    assert [pixel(out / p) for p in second["images"]] == [COLORS["green"]]  # the JSONL's folder first
    cwd, folder = mirage_repo.resolve(), (mirage_repo / "data" / "examples").resolve()
    assert f"{cwd} (the working directory): 3 image(s)" in text
    assert f"{folder}: 1 image(s)" in text
    [skip] = read_jsonl(out / "data.skipped.jsonl")
    assert "absent.png" in skip["reason"] and "--image-root" in skip["reason"]
    assert str(folder / "data" / "images" / "absent.png") in skip["reason"]
    assert str(mirage_repo / "data" / "images" / "absent.png") in skip["reason"]


def test_mirage_image_root_turns_the_working_directory_lookup_off(mirage_repo, tmp_path, monkeypatch):
    monkeypatch.chdir(mirage_repo)
    jsonl = Path("data/examples/sample.jsonl")
    report = import_dataset("mirage", jsonl, tmp_path / "a", image_root=mirage_repo / "data" / "examples")
    # only the JSONL's folder is looked at: "./data/..." is not under it
    assert report.converted == 0 and report.image_roots == {}
    assert all("not found" in s.reason for s in report.skipped)
    report = import_dataset("mirage", jsonl, tmp_path / "b", image_root=mirage_repo)
    assert report.converted == 2 and report.image_roots == {mirage_repo: 4}
    second = read_jsonl(tmp_path / "b" / "data.jsonl")[1]
    assert pixel(tmp_path / "b" / second["images"][0]) == COLORS["white"]  # local.png under the root given


# ---------------------------------------------------------------------------------------------- Monet


def _text(t):
    return {"type": "text", "text": t}


def _img(p, key="image"):
    return {"type": "image", key: p}


@pytest.fixture()
def monet_file(tmp_path) -> Path:
    root = tmp_path / "monet"
    save_png(root / "q.png", "red")
    save_png(root / "steps" / "s1.png", "green")
    save_png(root / "steps" / "s2.png", "blue")
    system = {"role": "system", "content": "You are a helpful assistant."}
    items = [
        {  # 0: good, id from metadata, boxed answer after the last image
            "data": [
                system,
                {"role": "user", "content": [_img("q.png"), _text("How many cats?")]},
                {
                    "role": "assistant",
                    "content": [
                        _text("Zoom in. <abs_vis_token></abs_vis_token>"),
                        _img("steps/s1.png"),
                        _text("<observation>two cats</observation> and <abs_vis_token></abs_vis_token>"),
                        _img("steps/s2.png"),
                        _text("So the answer is \\boxed{\\frac{4}{2}}."),
                    ],
                },
            ],
            "metadata": {"id": "chart-7", "source": "x"},
        },
        {  # 1: assistant split over two messages, image_file_name key, no metadata
            "data": [
                {"role": "user", "content": [_text("Is it red?"), _img("q.png", key="image_file_name")]},
                {
                    "role": "assistant",
                    "content": [_text("look"), _img("steps/s2.png", key="image_file_name")],
                },
                {
                    "role": "assistant",
                    "content": [_text("<observation>red</observation> <answer>yes</answer>")],
                },
            ]
        },
        {  # 2: nothing after the last image and no marker anywhere
            "data": [
                {"role": "user", "content": [_text("Q")]},
                {"role": "assistant", "content": [_text("thinking"), _img("steps/s1.png")]},
            ]
        },
        "not an object",
        {  # 4: missing helper image
            "data": [
                {"role": "user", "content": [_text("Q")]},
                {"role": "assistant", "content": [_img("steps/gone.png"), _text("A")]},
            ],
            "metadata": {"id": "gone-1"},
        },
        {  # 5: duplicate id
            "data": [
                {"role": "user", "content": [_text("Q")]},
                {"role": "assistant", "content": [_text("A")]},
            ],
            "metadata": {"id": "chart-7"},
        },
        {  # 6: plain tail answer, reasoning before the image dropped
            "data": [
                {"role": "user", "content": "What color?"},
                {
                    "role": "assistant",
                    "content": [_text("I check."), _img("steps/s1.png"), _text(" Green. ")],
                },
            ]
        },
        {  # 7: unsupported part
            "data": [
                {"role": "user", "content": [{"type": "video", "video": "v.mp4"}, _text("Q")]},
                {"role": "assistant", "content": [_text("A")]},
            ]
        },
        {  # 8: a marker before the last image loses to the one after it
            "data": [
                {"role": "user", "content": [_text("Count?")]},
                {
                    "role": "assistant",
                    "content": [_text("maybe <answer>3</answer>"), _img("steps/s1.png"), _text("\\boxed{5}")],
                },
            ]
        },
    ]
    path = root / "sft.json"
    path.write_text(json.dumps(items), encoding="utf-8")
    return path


def test_monet_json(monet_file, tmp_path):
    out = tmp_path / "out"
    report = import_dataset("monet", monet_file, out)
    assert report.converted == 4
    records = check_contract(out / "data.jsonl")
    assert [r["id"] for r in records] == ["chart-7", "monet-000001", "monet-000006", "monet-000008"]
    first, second, third, fourth = records
    assert first["question"] == "How many cats?"
    assert first["answer"] == "\\frac{4}{2}"
    assert [pixel(out / p) for p in first["images"]] == [COLORS["red"]]
    assert [pixel(out / p) for p in first["cot_images"]] == [COLORS["green"], COLORS["blue"]]
    assert second["question"] == "Is it red?"
    assert second["answer"] == "yes"
    assert [pixel(out / p) for p in second["cot_images"]] == [COLORS["blue"]]
    assert third["question"] == "What color?"
    assert third["answer"] == "Green."
    assert third["images"] == []
    assert fourth["answer"] == "5"

    skips = by_location(report.skipped)
    assert set(skips) == {f"{monet_file}:item {i}" for i in (2, 3, 4, 5, 7)}
    assert "no answer" in skips[f"{monet_file}:item 2"].reason
    assert skips[f"{monet_file}:item 2"].id == "monet-000002"
    assert "got str" in skips[f"{monet_file}:item 3"].reason
    assert skips[f"{monet_file}:item 4"].id == "gone-1"
    assert "gone.png" in skips[f"{monet_file}:item 4"].reason
    assert "duplicate id 'chart-7'" in skips[f"{monet_file}:item 5"].reason
    assert "'video'" in skips[f"{monet_file}:item 7"].reason


def test_monet_unreadable_file_is_reported(tmp_path):
    bad = tmp_path / "in" / "broken.json"
    bad.parent.mkdir()
    bad.write_text('{"data": [', encoding="utf-8")
    report = import_dataset("monet", bad, tmp_path / "out")
    assert report.converted == 0
    assert [s.location for s in report.skipped] == [str(bad)]
    assert "cannot read JSON" in report.skipped[0].reason


# ------------------------------------------------------------------------------------ answers, errors


@pytest.mark.parametrize(
    ("text", "answer"),
    [
        ("reasoning <answer> C </answer>", "C"),
        ("<answer>1</answer> more <answer>2</answer>", "2"),
        ("<answer>so \\boxed{7}</answer>", "7"),
        ("x \\boxed{a} then \\boxed{\\sqrt{2}+{1}}", "\\sqrt{2}+{1}"),
        ("<think>long</think>  The door on the left.", "The door on the left."),
        ("unbalanced \\boxed{oops", "unbalanced \\boxed{oops"),
    ],
)
def test_extract_answer(text, answer):
    assert extract_answer(text) == answer


def test_clear_errors(mirage_file, tmp_path):
    with pytest.raises(ValueError, match="unknown format"):
        import_dataset("llava", mirage_file, tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="nope"):
        import_dataset("mirage", tmp_path / "nope.jsonl", tmp_path / "out")
    with pytest.raises(DatasetImportError, match="overwrite"):
        import_dataset("mirage", mirage_file, mirage_file.parent, split_name="train")
    with pytest.raises(DatasetImportError, match="no .parquet files"):
        import_dataset("zebra-cot", mirage_file.parent, tmp_path / "out")
    with pytest.raises(ValueError, match="split name"):
        import_dataset("mirage", mirage_file, tmp_path / "out", split_name="../x")
    assert mirage_file.read_text(encoding="utf-8").startswith('{"text_input": "Which piece fits?"')


def test_output_inside_input_directory_is_not_read_back(mirage_file):
    root = mirage_file.parent
    first = import_dataset("mirage", root, root)
    second = import_dataset("mirage", root, root)
    assert first.converted == second.converted == 2
    assert [s.location for s in second.skipped] == [s.location for s in first.skipped]


def test_cli_entry(mirage_file, tmp_path, capsys):
    from latentvl.cli import main

    out = tmp_path / "cli"
    rc = main(["import", "--format", "mirage", str(mirage_file), str(out), "--split-name", "dev"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "converted 2 record(s)" in text
    assert f"{mirage_file}:3: invalid JSON" in text
    assert f"{mirage_file}:10 (id 'keep-me'): duplicate id" in text
    assert len(read_jsonl(out / "dev.jsonl")) == 2
    assert len(read_jsonl(out / "dev.skipped.jsonl")) == 7

    rc = main(["import", "--format", "mirage", str(tmp_path / "absent.jsonl"), str(out)])
    assert rc == 2
    assert "input not found" in capsys.readouterr().err
