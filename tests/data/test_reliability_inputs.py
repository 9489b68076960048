"""Issue #27: bad input is refused by name (wide images, 16-bit PNGs, huge images, special tokens)."""

from __future__ import annotations

import json
import re
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from latentvl.data.collator import LatentCollator
from latentvl.data.records import RecordDataset, load_records
from latentvl.errors import CollatorInputError, ImageReadError, InputError, RecordError, SampleError
from latentvl.evaluation.teacher_forced import evaluate_records
from latentvl.images import MAX_PIXELS_ENV, image_file_problem, max_image_pixels, open_rgb, read_image
from latentvl.inference.generate import LatentInference
from latentvl.training.data import SKIPPED_FILE, BatchTimeDataset, SkipReport, load_split


def _write_records(tmp_path: Path, rows: list[dict]) -> Path:
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _row(rid: str, image: str, answer: str = "A", question: str = "Q?") -> dict:
    return {"id": rid, "question": question, "images": [image], "cot_images": [image], "answer": answer}


# --------------------------------------------------------------------------- 4. wide images
@pytest.fixture()
def wide_data(tmp_path):
    Image.new("RGB", (3000, 1), "red").save(tmp_path / "wide.png")
    Image.new("RGB", (56, 56), "blue").save(tmp_path / "ok.png")
    return _write_records(tmp_path, [_row("good", "ok.png"), _row("wide-1", "wide.png")])


def test_wide_image_names_the_record_at_load(wide_data):
    # what `latentvl calibrate` and training without skip_invalid load
    with pytest.raises(RecordError, match=r"train\.jsonl:2 \(id 'wide-1'\): images\[0\] 'wide\.png' is 3000x1: "
                                          r"aspect ratio 3000 is over 200"):
        load_records(wide_data)


def test_wide_image_skipped_and_listed_in_training(wide_data, tmp_path):
    report = SkipReport(tmp_path / "out" / SKIPPED_FILE)
    (tmp_path / "out").mkdir()
    records = load_split(wide_data, skip_invalid=True, report=report)
    assert [r.id for r in records] == ["good"]
    listed = json.loads((tmp_path / "out" / SKIPPED_FILE).read_text())
    assert listed["total"] == 1
    assert listed["records"][0]["id"] == "wide-1" and "aspect ratio" in listed["records"][0]["reason"]


def test_wide_image_refused_before_the_processor(wide_data, tiny):
    model, processor = tiny
    records, _ = load_records(wide_data, check_images=False)
    # batch time: the record is named, with skip_invalid it is replaced by the next one
    with pytest.raises(RecordError, match=r"id 'wide-1'\): images\[0\] .*wide\.png.*aspect ratio"):
        RecordDataset(records)[1]
    item = BatchTimeDataset(records, skip_invalid=True)[1]
    assert item["id"] == "good" and item["skipped"][0]["id"] == "wide-1"
    # an image already in memory: the collator names the sample and the field, not a bare ValueError
    sample = {"id": "mem", "question": "Q?", "images": [Image.new("RGB", (1, 3000))], "cot_images": [],
              "answer": "A"}
    with pytest.raises(CollatorInputError, match=r"sample 'mem': images\[0\]: image is 1x3000: aspect ratio"):
        LatentCollator(processor, model.config)([sample])


# --------------------------------------------------------------------------- 6. 16-bit PNGs
@pytest.mark.parametrize("mode", ["I;16", "I;16B", "I"])
def test_16bit_gradient_keeps_its_gradient(tmp_path, mode):
    grad = np.tile(np.linspace(0, 65535, 256).astype(np.uint16), (8, 1))
    if mode == "I;16B":
        im = Image.frombytes("I;16B", (256, 8), grad.astype(">u2").tobytes())
    elif mode == "I":
        im = Image.fromarray(grad.astype(np.int32))
    else:
        im = Image.fromarray(grad)
    assert im.mode == mode
    path = tmp_path / ("grad.tif" if mode == "I" else "grad.png")  # PIL writes no 32-bit PNG
    im.save(path)
    for out in (open_rgb(path), read_image(im)):
        a = np.asarray(out)
        assert out.mode == "RGB"
        assert abs(a.mean() - 127.5) < 2, a.mean()
        assert a[0, 0, 0] == 0 and a[0, -1, 0] == 255
        assert (a == 255).mean() < 0.05


def test_32bit_gray_out_of_16bit_range_scales_by_its_range():
    a = np.tile(np.linspace(-1000, 1_000_000, 100).astype(np.int32), (4, 1))
    out = np.asarray(read_image(Image.fromarray(a)))
    assert out[0, 0, 0] == 0 and out[0, -1, 0] == 255 and abs(out.mean() - 127.5) < 2


# --------------------------------------------------------------------------- 8. pixel limit
def test_pixel_limit_is_configurable(tmp_path, monkeypatch):
    path = tmp_path / "big.png"
    Image.new("RGB", (100, 50)).save(path)
    assert open_rgb(path).size == (100, 50)
    with pytest.raises(ImageReadError, match=r"big\.png' is 100x50 = 5000 pixels, over the limit of 4999"):
        open_rgb(path, max_pixels=4999)
    monkeypatch.setenv(MAX_PIXELS_ENV, "4999")
    assert max_image_pixels() == 4999
    with pytest.raises(ImageReadError, match="over the limit"):
        read_image(path)
    with pytest.raises(ImageReadError, match="over the limit"):
        read_image(path, header_only=True)
    assert "over the limit" in image_file_problem(path)
    rows = [_row("big-1", "big.png")]
    with pytest.raises(RecordError, match=r"id 'big-1'\): images\[0\] 'big\.png' is 100x50"):
        load_records(_write_records(tmp_path, rows))
    monkeypatch.setenv(MAX_PIXELS_ENV, "0")
    assert open_rgb(path).size == (100, 50)
    monkeypatch.setenv(MAX_PIXELS_ENV, "lots")
    with pytest.raises(InputError, match=MAX_PIXELS_ENV):
        open_rgb(path)


def _huge_png(path: Path, width: int, height: int) -> None:
    """A black 8-bit grayscale PNG written chunk by chunk (never held in memory): a few hundred KB."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")

    comp = zlib.compressobj(9)
    row = b"\0" * (width + 1)
    body = b"".join(comp.compress(row) for _ in range(height)) + comp.flush()
    ihdr = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, 0, 0, 0, 0])
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", body) + chunk(b"IEND", b""))


def test_huge_png_refused_without_decoding(tmp_path, monkeypatch):
    path = tmp_path / "huge.png"
    _huge_png(path, 8000, 8000)  # 64 megapixels, under PIL's warning limit, over latentvl's default
    assert path.stat().st_size < 1_000_000
    decoded = []
    real_load = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: decoded.append(1) or real_load(self))
    monkeypatch.delenv(MAX_PIXELS_ENV, raising=False)
    with pytest.raises(ImageReadError, match=r"huge\.png' is 8000x8000 = 64000000 pixels, over the limit"):
        open_rgb(path)
    assert "over the limit" in image_file_problem(path)
    assert not decoded


# --------------------------------------------------------------------------- 9. reserved tokens
@pytest.mark.parametrize("token", ["<|video_pad|>", "<|endoftext|>"])
@pytest.mark.parametrize("field", ["question", "answer"])
def test_special_tokens_refused_at_train_infer_eval(tiny, token, field, tmp_path):
    model, processor = tiny
    Image.new("RGB", (56, 56), "blue").save(tmp_path / "ok.png")
    text = {"question": "Q?", "answer": "A"}
    text[field] = f"x{token}y"
    sample = {"id": "tok-1", "question": text["question"], "images": [Image.new("RGB", (56, 56))],
              "cot_images": [Image.new("RGB", (56, 56))], "answer": text["answer"]}
    pattern = re.escape(f"sample 'tok-1': field '{field}' contains reserved tokens ['{token}']")
    # train
    with pytest.raises(CollatorInputError, match=pattern):
        LatentCollator(processor, model.config)([sample])
    # eval (teacher-forced, the training layout)
    records, _ = load_records(_write_records(tmp_path, [{**_row("tok-1", "ok.png"), **text}]))
    with pytest.raises(CollatorInputError, match=pattern):
        evaluate_records(model, LatentCollator(processor, model.config), records, batch_size=1)
    # infer (the question only: an answer is not read at inference)
    if field == "question":
        engine = LatentInference(model, processor)
        with pytest.raises(SampleError, match=pattern):
            engine.prepare(sample, 0, max_new_tokens=4)


def test_answer_still_ends_with_the_appended_end_of_turn(tiny):
    model, processor = tiny
    batch = LatentCollator(processor, model.config)(
        [{"id": "ok", "question": "Q?", "images": [], "cot_images": [], "answer": "AB"}])
    labels = [t for t in batch["labels"][0].tolist() if t != -100]
    assert processor.tokenizer.convert_ids_to_tokens(labels) == ["A", "B", "<|im_end|>"]
