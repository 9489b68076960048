"""Tests for the JSONL record format: validation, error messages, skipping, and the Dataset."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from latentvl.data.records import (
    Record,
    RecordDataset,
    SkippedRecord,
    load_metadata,
    load_records,
)
from latentvl.errors import RecordError


def _png(path: Path, size=(28, 28), colour=(255, 0, 0), mode="RGB") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, colour).save(path)
    return path


def _write_jsonl(path: Path, rows: list) -> Path:
    lines = [r if isinstance(r, str) else json.dumps(r) for r in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _rec(rec_id: str, **kw) -> dict:
    rec = {
        "id": rec_id,
        "question": "Q?",
        "images": ["img/q.png"],
        "cot_images": ["img/c.png"],
        "answer": "A",
    }
    rec.update(kw)
    return rec


@pytest.fixture()
def data_dir(tmp_path: Path) -> Path:
    _png(tmp_path / "img" / "q.png")
    _png(tmp_path / "img" / "c.png", size=(56, 28), colour=(0, 0, 255))
    return tmp_path


def test_valid_records_load_with_absolute_paths_and_sources(data_dir: Path, monkeypatch) -> None:
    path = _write_jsonl(
        data_dir / "train.jsonl",
        [_rec("a"), "", _rec("b", images=[], cot_images=["img/c.png", "img/q.png"], latent_budgets=[2, 3])],
    )
    monkeypatch.chdir(data_dir.parent)  # relative paths resolve against the JSONL, not the cwd
    records, skipped = load_records(path)
    assert skipped == []
    assert [r.id for r in records] == ["a", "b"]
    a, b = records
    assert a.source == f"{path}:1" and b.source == f"{path}:3"  # the blank line 2 is not a record
    assert a.images == [data_dir / "img" / "q.png"] and a.images[0].is_absolute()
    assert b.images == [] and b.cot_images == [data_dir / "img" / "c.png", data_dir / "img" / "q.png"]
    assert a.latent_budgets is None and b.latent_budgets == [2, 3]
    assert (a.question, a.answer) == ("Q?", "A")


def test_absolute_paths_are_accepted(data_dir: Path, tmp_path_factory) -> None:
    elsewhere = _png(tmp_path_factory.mktemp("other") / "x.png")
    path = _write_jsonl(data_dir / "d.jsonl", [_rec("a", images=[str(elsewhere)])])
    records, _ = load_records(path)
    assert records[0].images == [elsewhere]


def test_error_message_names_file_line_id_and_path(data_dir: Path) -> None:
    path = _write_jsonl(
        data_dir / "train.jsonl",
        [_rec("maze-00015"), _rec("maze-00016", cot_images=["img/c.png", "img/x.png"])],
    )
    with pytest.raises(RecordError) as info:
        load_records(path)
    assert str(info.value) == f"{path}:2 (id 'maze-00016'): cot_images[1] 'img/x.png' does not exist"


@pytest.mark.parametrize(
    ("row", "expected_id", "reason"),
    [
        ("{not json", None, "invalid JSON"),
        ("[1, 2]", None, "must be a JSON object"),
        ({"id": "r", "question": "Q?", "images": [], "answer": "A"}, "r", "missing field(s) cot_images"),
        (_rec(17), None, "'id' must be a string"),
        (_rec("  "), None, "'id' is empty"),
        (_rec("r", answer=""), "r", "'answer' is empty"),
        (_rec("r", answer=" \t"), "r", "'answer' is empty"),
        (_rec("r", answer=3), "r", "'answer' must be a string"),
        (_rec("r", question=""), "r", "'question' is empty"),
        (_rec("r", question=None), "r", "'question' must be a string"),
        (_rec("r", images="img/q.png"), "r", "'images' must be a list"),
        (_rec("r", cot_images=[3]), "r", "cot_images[0] must be a non-empty path string"),
        (_rec("r", images=["img/missing.png"]), "r", "images[0] 'img/missing.png' does not exist"),
        (_rec("r", images=["img"]), "r", "images[0] 'img' is not a file"),
        (_rec("r", cot_images=["img/c.png", "bad.png"]), "r", "cot_images[1] 'bad.png' cannot be opened"),
        (_rec("r", cot_images=["img/c.png", "cut.png"]), "r", "cot_images[1] 'cut.png' cannot be opened"),
        (_rec("r", latent_budgets=[0]), "r", "'latent_budgets' must be a list of ints >= 1"),
        (_rec("r", latent_budgets=[True]), "r", "'latent_budgets' must be a list of ints >= 1"),
        (_rec("r", latent_budgets=[1, 2]), "r", "'latent_budgets' has 2 entries but there are 1 cot_images"),
    ],
)
def test_each_invalid_record_raises_with_location(data_dir: Path, row, expected_id, reason) -> None:
    (data_dir / "bad.png").write_bytes(b"this is not a png")
    good = (data_dir / "img" / "c.png").read_bytes()
    (data_dir / "cut.png").write_bytes(good[: len(good) // 2])  # a truncated PNG
    path = _write_jsonl(data_dir / "d.jsonl", [_rec("ok"), row])
    with pytest.raises(RecordError) as info:
        load_records(path)
    where = f"{path}:2 (id {expected_id!r})" if expected_id is not None else f"{path}:2"
    assert str(info.value).startswith(f"{where}: "), str(info.value)
    assert reason in str(info.value)


def test_duplicate_id_is_an_error_naming_both_lines(data_dir: Path) -> None:
    path = _write_jsonl(data_dir / "d.jsonl", [_rec("a"), _rec("b"), _rec("a")])
    with pytest.raises(RecordError, match=r"d\.jsonl:3 \(id 'a'\): duplicate id, first seen at .*d\.jsonl:1"):
        load_records(path)


def test_skip_invalid_reports_which_records_and_why(data_dir: Path) -> None:
    rows = [
        _rec("a"),
        _rec("b", answer=""),
        "oops",
        _rec("c"),
        _rec("a"),
        _rec("d", cot_images=["img/none.png"]),
        _rec("e", images=[]),
    ]
    path = _write_jsonl(data_dir / "d.jsonl", rows)
    records, skipped = load_records(path, skip_invalid=True)
    assert [r.id for r in records] == ["a", "c", "e"]
    assert [(s.source, s.id) for s in skipped] == [
        (f"{path}:2", "b"),
        (f"{path}:3", None),
        (f"{path}:5", "a"),
        (f"{path}:6", "d"),
    ]
    assert all(isinstance(s, SkippedRecord) for s in skipped)
    assert "'answer' is empty" in skipped[0].reason
    assert "invalid JSON" in skipped[1].reason
    assert "duplicate id" in skipped[2].reason
    assert "cot_images[0] 'img/none.png' does not exist" in skipped[3].reason


def test_check_images_false_skips_only_the_file_checks(data_dir: Path) -> None:
    path = _write_jsonl(data_dir / "d.jsonl", [_rec("a", images=["img/none.png"])])
    records, _ = load_records(path, check_images=False)
    assert records[0].images == [data_dir / "img" / "none.png"]
    with pytest.raises(RecordError, match="does not exist"):
        load_records(path)
    bad = _write_jsonl(data_dir / "e.jsonl", [_rec("a", answer="")])
    with pytest.raises(RecordError, match="'answer' is empty"):
        load_records(bad, check_images=False)


def test_unreadable_file_raises(tmp_path: Path) -> None:
    with pytest.raises(RecordError, match="cannot read record file"):
        load_records(tmp_path / "nope.jsonl", skip_invalid=True)


def test_non_utf8_line_is_reported(data_dir: Path) -> None:
    path = data_dir / "d.jsonl"
    path.write_bytes(json.dumps(_rec("a")).encode() + b"\n\xff\xfe{}\n")
    records, skipped = load_records(path, skip_invalid=True)
    assert [r.id for r in records] == ["a"]
    assert skipped[0].source == f"{path}:2" and "not UTF-8" in skipped[0].reason


def test_load_metadata(tmp_path: Path) -> None:
    jsonl = tmp_path / "train.jsonl"
    assert load_metadata(jsonl) is None
    (tmp_path / "meta.json").write_text(json.dumps({"task": "maze", "chance_accuracy": 0.25}))
    assert load_metadata(jsonl) == {"task": "maze", "chance_accuracy": 0.25}
    (tmp_path / "meta.json").write_text("[1]")
    with pytest.raises(RecordError, match="must be a JSON object"):
        load_metadata(jsonl)
    (tmp_path / "meta.json").write_text("{broken")
    with pytest.raises(RecordError, match="meta.json"):
        load_metadata(jsonl)


def test_dataset_returns_rgb_images_and_optional_budgets(data_dir: Path) -> None:
    _png(data_dir / "img" / "grey.png", mode="L", colour=90)
    _png(data_dir / "img" / "clear.png", mode="RGBA", colour=(0, 0, 0, 0))
    path = _write_jsonl(
        data_dir / "d.jsonl",
        [
            _rec("a", images=["img/grey.png", "img/clear.png"]),
            _rec("b", images=[], latent_budgets=[4]),
            _rec("c", images=[], cot_images=[]),
        ],
    )
    ds = RecordDataset(load_records(path)[0])
    assert len(ds) == 3
    a, b, c = ds[0], ds[1], ds[2]
    assert set(a) == {"id", "question", "images", "cot_images", "answer"}
    assert [im.mode for im in a["images"] + a["cot_images"]] == ["RGB"] * 3
    assert a["images"][0].getpixel((0, 0)) == (90, 90, 90)
    assert a["images"][1].getpixel((0, 0)) == (255, 255, 255)  # transparent -> white, not black
    assert a["cot_images"][0].size == (56, 28) and a["cot_images"][0].getpixel((0, 0)) == (0, 0, 255)
    assert b["latent_budgets"] == [4] and b["images"] == []
    assert c["images"] == [] and c["cot_images"] == [] and "latent_budgets" not in c


def test_dataset_unreadable_image_names_record_and_file(data_dir: Path) -> None:
    _png(data_dir / "img" / "late.png")
    path = _write_jsonl(data_dir / "d.jsonl", [_rec("a"), _rec("b", cot_images=["img/c.png", "img/late.png"])])
    ds = RecordDataset(load_records(path)[0])
    (data_dir / "img" / "late.png").write_bytes(b"garbage")  # broken after validation
    ds[0]
    with pytest.raises(RecordError) as info:
        ds[1]
    msg = str(info.value)
    assert msg.startswith(f"{path}:2 (id 'b'): cot_images[1] '{data_dir / 'img' / 'late.png'}' cannot be read")


_text = st.text(min_size=1, max_size=12).filter(lambda s: s.strip() != "")


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    rows=st.lists(st.tuples(_text, _text, st.lists(st.integers(1, 32), max_size=3)), min_size=1, max_size=6).map(
        lambda rs: list({r[0]: r for r in rs}.values())
    ),  # unique ids
)
def test_round_trip_of_arbitrary_text(tmp_path: Path, rows) -> None:
    records_in = [
        {
            "id": rid,
            "question": q,
            "images": [],
            "cot_images": [f"c{j}.png" for j in range(len(budgets))],
            "answer": q[::-1] if q[::-1].strip() else "x",
            "latent_budgets": budgets,
        }
        for rid, q, budgets in rows
    ]
    path = tmp_path / "rt.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records_in), encoding="utf-8")
    records, skipped = load_records(path, check_images=False)
    assert skipped == []
    for line, (rec, raw) in enumerate(zip(records, records_in, strict=True), start=1):
        assert isinstance(rec, Record)
        assert (rec.id, rec.question, rec.answer, rec.latent_budgets) == (
            raw["id"],
            raw["question"],
            raw["answer"],
            raw["latent_budgets"],
        )
        assert rec.cot_images == [tmp_path / p for p in raw["cot_images"]]
        assert rec.source == f"{path}:{line}"
