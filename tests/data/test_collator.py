"""Tests for ``latentvl.data.collator.LatentCollator`` (design §2, §3, D1, D2, D9)."""

from __future__ import annotations

import random

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from PIL import Image

from latentvl.budget import compute_latent_budget, num_visual_tokens
from latentvl.config import LatentSettings
from latentvl.data.collator import LatentCollator, grid_from_size
from latentvl.errors import CollatorInputError, LatentInputError
from latentvl.segments import check_latent_inputs, verify_segments
from latentvl.tokens import LATENT_END, LATENT_PAD, LATENT_START

PROPERTY = settings(max_examples=25, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])
TEXT = st.text(alphabet=[chr(i) for i in range(32, 127) if chr(i) != "|"] + ["\n"], max_size=16)
SIZES = st.tuples(st.integers(28, 224), st.integers(28, 224))
SPECIALS = ("<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>")


@pytest.fixture(scope="module")
def model(tiny):
    return tiny[0]


@pytest.fixture(scope="module")
def processor(tiny):
    return tiny[1]


@pytest.fixture(scope="module")
def latent_settings(model):
    return LatentSettings.from_config(model.config).replace(
        latent_budget_alpha=0.5, latent_budget_gamma=0.5, latent_budget_max=8)


@pytest.fixture(scope="module")
def ids(processor):
    tid = processor.token_id
    names = {"latent_start": LATENT_START, "latent": LATENT_PAD, "latent_end": LATENT_END}
    out = {k: tid(v) for k, v in names.items()}
    out.update({s: tid(s) for s in SPECIALS})
    out["pad"] = processor.tokenizer.pad_token_id
    return out


def image(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = random.Random(seed * 7919 + width * 31 + height)
    return Image.new("RGB", (width, height), tuple(rng.randrange(256) for _ in range(3)))


def record(sid, question="what is it?", answer="a cat", q_sizes=((56, 56),), cot_sizes=((224, 168),),
           **extra):
    return {
        "id": sid,
        "question": question,
        "images": [image(w, h, i) for i, (w, h) in enumerate(q_sizes)],
        "cot_images": [image(w, h, 10 + i) for i, (w, h) in enumerate(cot_sizes)],
        "answer": answer,
        **extra,
    }


def mixed_batch():
    """Samples with different numbers of question and CoT images (M = 0..3) and lengths."""
    return [
        record("s0", q_sizes=((56, 56),), cot_sizes=((224, 168), (56, 56))),
        record("s1", question="?", answer="no", q_sizes=(), cot_sizes=()),
        record("s2", q_sizes=((112, 84), (56, 112)), cot_sizes=((84, 84), (200, 60), (28, 28))),
        record("s3", question="long question " * 3, answer="x", q_sizes=((140, 70),), cot_sizes=()),
    ]


def budget_of(grid, s: LatentSettings) -> int:
    return compute_latent_budget(num_visual_tokens(grid, 2), s.latent_budget_alpha, s.latent_budget_gamma,
                                 s.latent_budget_min, s.latent_budget_max)


def real(batch, b):
    """The unpadded input ids of row b."""
    return batch["input_ids"][b][batch["attention_mask"][b].bool()].tolist()


def check_batch_invariants(batch, samples, coll: LatentCollator, processor, ids, settings_, training=True):
    """Every structural property of a collated batch that holds for any input."""
    B = len(samples)
    input_ids, mask = batch["input_ids"], batch["attention_mask"]
    S = input_ids.shape[1]
    assert input_ids.dtype == torch.long and mask.dtype == torch.long
    assert batch["mm_token_type_ids"].shape == (B, S)
    assert batch["ids"] == [s["id"] for s in samples]
    # padding: on the right side for right padding, left for left; pad id there
    for b in range(B):
        n = int(mask[b].sum())
        expect = [1] * n + [0] * (S - n) if coll.padding_side == "right" else [0] * (S - n) + [1] * n
        assert mask[b].tolist() == expect
        assert (input_ids[b][mask[b] == 0] == ids["pad"]).all()
    # question images: tokens per image == t*h*w // 4, mm_token_type_ids marks exactly them
    grids = batch["image_grid_thw"]
    n_q = sum(len(s["images"]) for s in samples)
    if n_q == 0:
        assert grids is None and batch["pixel_values"] is None
    else:
        assert grids.shape == (n_q, 3)
        assert batch["pixel_values"].shape[0] == int(grids.prod(-1).sum())
    assert torch.equal(batch["mm_token_type_ids"], (input_ids == ids["<|image_pad|>"]).int())
    g = 0
    for b in range(B):
        row = real(batch, b)
        starts = [i for i, t in enumerate(row) if t == ids["<|vision_start|>"]]
        assert len(starts) == len(samples[b]["images"])
        for st_ in starts:
            end = row.index(ids["<|vision_end|>"], st_)
            t, h, w = grids[g].tolist()
            assert end - st_ - 1 == t * h * w // 4
            assert set(row[st_ + 1:end]) == {ids["<|image_pad|>"]}
            g += 1
    # design §2 fields
    counts, budgets = batch["latent_image_counts"], batch["latent_budgets"]
    segments, totals = batch["latent_segments"], batch["latent_budget_total"]
    assert len(counts) == len(budgets) == len(segments) == len(totals) == B
    for b in range(B):
        assert counts[b] == len(budgets[b]) == len(segments[b])
        assert totals[b] == sum(budgets[b])
        for i, (start, end, img) in enumerate(segments[b]):
            assert img == i
            assert end - start == budgets[b][i]
            assert set(input_ids[b, start:end].tolist()) == {ids["latent"]}
            assert input_ids[b, start - 1] == ids["latent_start"] and input_ids[b, end] == ids["latent_end"]
            assert mask[b, start:end].all()
        assert int((input_ids[b] == ids["latent"]).sum()) == totals[b]
        if len(segments[b]) > 1:
            assert all(segments[b][i][1] < segments[b][i + 1][0] for i in range(len(segments[b]) - 1))
    check_latent_inputs(input_ids, segments, budgets, coll.latent_id, "A", sample_ids=batch["ids"])
    if not training:
        assert batch["labels"] is None
        assert batch["cot_pixel_values"] is None and batch["cot_image_grid_thw"] is None
        return
    # training: budgets from the CoT grids, labels == answer + <|im_end|>
    cot_grids = batch["cot_image_grid_thw"]
    n_cot = sum(len(s["cot_images"]) for s in samples)
    assert (cot_grids is None) == (n_cot == 0)
    if n_cot:
        assert cot_grids.shape == (n_cot, 3)
        assert batch["cot_pixel_values"].shape[0] == int(cot_grids.prod(-1).sum())
    flat = [budget_of(gr, settings_) for gr in (cot_grids.tolist() if n_cot else [])]
    assert [x for bs in budgets for x in bs] == flat
    labels = batch["labels"]
    tok = processor.tokenizer
    for b in range(B):
        lab = labels[b][labels[b] != -100].tolist()
        assert tok.decode(lab) == samples[b]["answer"] + "<|im_end|>"
        pos = (labels[b] != -100).nonzero().flatten().tolist()
        assert pos == list(range(pos[0], pos[0] + len(pos)))  # one contiguous run
        assert labels[b, pos].tolist() == input_ids[b, pos].tolist()
        nxt = pos[-1] + 1  # the "\n" after <|im_end|> is not labelled
        assert input_ids[b, nxt] == tok("\n", add_special_tokens=False)["input_ids"][0]
        last_latent = segments[b][-1][1] if segments[b] else None
        if last_latent is not None:
            assert pos[0] == last_latent + 1  # answer right after the last <|latent_end|>


# --------------------------------------------------------------------------- exact layout
def test_exact_layout_with_system_prompt(processor, latent_settings, ids):
    coll = LatentCollator(processor, latent_settings, system_prompt="Be brief.")
    sample = record("x", question="Q?", answer="A.", q_sizes=((56, 56),), cot_sizes=((56, 56), (224, 168)))
    batch = coll([sample])
    grid_cot = batch["cot_image_grid_thw"].tolist()
    b0, b1 = budget_of(grid_cot[0], latent_settings), budget_of(grid_cot[1], latent_settings)
    assert b0 != b1  # the two CoT images get different budgets
    text = ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n<|vision_start|>"
            + "<|image_pad|>" * 4 + "<|vision_end|>Q?<|im_end|>\n<|im_start|>assistant\n"
            + LATENT_START + LATENT_PAD * b0 + LATENT_END + LATENT_START + LATENT_PAD * b1 + LATENT_END
            + "A.<|im_end|>\n")
    assert processor.tokenizer.decode(batch["input_ids"][0]) == text
    expected = processor.tokenizer(text, add_special_tokens=False)["input_ids"]
    assert batch["input_ids"][0].tolist() == expected
    assert batch["latent_budgets"] == [[b0, b1]]
    first = text.index(LATENT_START)
    start0 = len(processor.tokenizer(text[:first], add_special_tokens=False)["input_ids"]) + 1
    start1 = start0 + b0 + 2
    assert batch["latent_segments"] == [[(start0, start0 + b0, 0), (start1, start1 + b1, 1)]]


def test_no_system_prompt_starts_with_user_turn(processor, latent_settings, ids):
    batch = LatentCollator(processor, latent_settings)([record("x")])
    assert processor.tokenizer.decode(batch["input_ids"][0]).startswith("<|im_start|>user\n<|vision_start|>")


def test_mixed_batch_invariants_both_sides(processor, latent_settings, ids):
    samples = mixed_batch()
    for side in ("right", "left"):
        coll = LatentCollator(processor, latent_settings, padding_side=side)
        batch = coll(samples)
        check_batch_invariants(batch, samples, coll, processor, ids, latent_settings)
        assert batch["latent_image_counts"] == [2, 0, 3, 0]
        assert len({x for bs in batch["latent_budgets"] for x in bs}) >= 3  # budgets vary with the image


def test_left_padding_shifts_segments(processor, latent_settings):
    samples = mixed_batch()
    right = LatentCollator(processor, latent_settings, padding_side="right")(samples)
    left = LatentCollator(processor, latent_settings, padding_side="left")(samples)
    S = right["input_ids"].shape[1]
    for b in range(len(samples)):
        off = S - int(right["attention_mask"][b].sum())
        shifted = [(s + off, e + off, i) for s, e, i in right["latent_segments"][b]]
        assert left["latent_segments"][b] == shifted
        assert real(left, b) == real(right, b)


def test_cot_pixels_match_image_processor(processor, latent_settings):
    samples = mixed_batch()
    batch = LatentCollator(processor, latent_settings)(samples)
    cots = [im for s in samples for im in s["cot_images"]]
    ref = processor.image_processor(images=cots, return_tensors="pt")
    assert torch.equal(batch["cot_pixel_values"], ref["pixel_values"])
    assert torch.equal(batch["cot_image_grid_thw"], ref["image_grid_thw"])
    qs = [im for s in samples for im in s["images"]]
    ref_q = processor.image_processor(images=qs, return_tensors="pt")
    assert torch.equal(batch["pixel_values"], ref_q["pixel_values"])


# --------------------------------------------------------------------------- property tests
@st.composite
def batches(draw, with_answer=True):
    n = draw(st.integers(1, 4))
    out = []
    for b in range(n):
        rec = {
            "id": f"r{b}-{draw(st.integers(0, 999))}",
            "question": draw(TEXT),
            "images": [image(w, h, b) for w, h in draw(st.lists(SIZES, max_size=2))],
            "cot_images": [image(w, h, b + 5) for w, h in draw(st.lists(SIZES, max_size=4))],
        }
        if with_answer:
            rec["answer"] = draw(TEXT)
        out.append(rec)
    return out


@PROPERTY
@given(samples=batches(), side=st.sampled_from(["left", "right"]), system=st.none() | TEXT)
def test_property_training_batches(processor, model, latent_settings, ids, samples, side, system):
    coll = LatentCollator(processor, latent_settings, padding_side=side, system_prompt=system)
    batch = coll(samples)
    check_batch_invariants(batch, samples, coll, processor, ids, latent_settings)
    # each row equals the same sample collated alone, and so do its M-RoPE positions
    pos = model.compute_position_ids(batch["input_ids"], batch["attention_mask"], batch["mm_token_type_ids"],
                                     batch["image_grid_thw"])
    for b, sample in enumerate(samples):
        alone = coll([sample])
        assert real(batch, b) == alone["input_ids"][0].tolist()
        assert batch["latent_budgets"][b] == alone["latent_budgets"][0]
        pos_alone = model.compute_position_ids(alone["input_ids"], alone["attention_mask"],
                                               alone["mm_token_type_ids"], alone["image_grid_thw"])
        keep = batch["attention_mask"][b].bool()
        assert torch.equal(pos[:, b, keep], pos_alone[:, 0])


@PROPERTY
@given(samples=batches(with_answer=False), side=st.sampled_from(["left", "right"]))
def test_property_generation_matches_training(processor, latent_settings, ids, samples, side):
    for s in samples:
        s["answer"] = "unused"
    train = LatentCollator(processor, latent_settings, padding_side=side)(samples)
    gen_coll = LatentCollator(processor, latent_settings, padding_side=side, for_generation=True)
    gen = gen_coll(samples)
    check_batch_invariants(gen, samples, gen_coll, processor, ids, latent_settings, training=False)
    for b, s in enumerate(samples):
        row = real(gen, b)
        if s["cot_images"]:
            assert gen["latent_budgets"][b] == train["latent_budgets"][b]
            assert row[-1] == ids["latent_end"]
            # the generation prompt is the training sequence cut right after the last <|latent_end|>
            cut = train["latent_segments"][b][-1][1] + 1
            assert row == train["input_ids"][b, :cut][train["attention_mask"][b, :cut].bool()].tolist()
        elif s["images"]:
            first_image = sum(len(x["images"]) for x in samples[:b])
            want = budget_of(gen["image_grid_thw"][first_image].tolist(), latent_settings)
            assert gen["latent_budgets"][b] == [want]
        else:
            assert gen["latent_budgets"][b] == []
            assert processor.tokenizer.decode(row).endswith("<|im_start|>assistant\n")


@PROPERTY
@given(width=st.integers(8, 700), height=st.integers(8, 700))
def test_property_grid_from_size_matches_processor(processor, width, height):
    ref = processor.image_processor(images=[image(width, height)], return_tensors="pt")["image_grid_thw"]
    assert grid_from_size(processor.image_processor, width, height) == tuple(ref[0].tolist())


# --------------------------------------------------------------------------- positions
@pytest.mark.parametrize("side", ["left", "right"])
def test_positions_alone_vs_batch(model, processor, latent_settings, side):
    samples = mixed_batch()
    coll = LatentCollator(processor, latent_settings, padding_side=side)
    batch = coll(samples)
    pos = model.compute_position_ids(batch["input_ids"], batch["attention_mask"], batch["mm_token_type_ids"],
                                     batch["image_grid_thw"])
    assert not torch.equal(pos[0], pos[1])  # M-RoPE (not 1-D) positions: image tokens share rows
    for b, sample in enumerate(samples):
        alone = coll([sample])
        pa = model.compute_position_ids(alone["input_ids"], alone["attention_mask"],
                                        alone["mm_token_type_ids"], alone["image_grid_thw"])
        keep = batch["attention_mask"][b].bool()
        assert torch.equal(pos[:, b, keep], pa[:, 0])


# --------------------------------------------------------------------------- modes
def test_generation_budget_sources(processor, latent_settings, ids, tmp_path):
    sizes = ((224, 168), (84, 56), (56, 56))
    train = LatentCollator(processor, latent_settings)([record("t", cot_sizes=sizes)])
    want = train["latent_budgets"][0]
    paths = []
    for i, (w, h) in enumerate(sizes):
        paths.append(tmp_path / f"c{i}.png")
        image(w, h, 10 + i).save(paths[-1])
    gen = LatentCollator(processor, latent_settings, for_generation=True, default_num_segments=2)
    assert gen.padding_side == "left"
    base = {"question": "what is it?", "images": [image(56, 56)]}
    batch = gen([
        {**base, "id": "explicit", "latent_budgets": [3, 1], "cot_images": paths},
        {**base, "id": "sizes", "cot_image_sizes": list(sizes)},
        {**base, "id": "paths", "cot_images": paths},
        {**base, "id": "pil", "cot_images": [image(224, 168), image(84, 56), image(56, 56)]},
        {**base, "id": "default", "cot_images": []},
        {"question": "no image", "id": "none", "images": []},
        {**base, "id": "empty-explicit", "latent_budgets": []},
    ])
    q_budget = budget_of((1, 4, 4), latent_settings)
    assert batch["latent_budgets"] == [[3, 1], want, want, want, [q_budget] * 2, [], []]
    assert batch["latent_budget_total"] == [4, sum(want), sum(want), sum(want), 2 * q_budget, 0, 0]
    assert batch["labels"] is None and batch["cot_pixel_values"] is None
    check_latent_inputs(batch["input_ids"], batch["latent_segments"], batch["latent_budgets"],
                        latent_settings.latent_token_id, "A")
    # default segments: the budget training gives a CoT image identical to the first question image
    same = LatentCollator(processor, latent_settings)(
        [record("t2", q_sizes=((140, 70),), cot_sizes=((140, 70),))])
    g2 = gen([{"id": "d", "question": "q", "images": [image(140, 70)]}])
    assert g2["latent_budgets"] == [same["latent_budgets"][0] * 2]


def test_generation_reads_only_image_headers(processor, latent_settings, tmp_path):
    """A PNG cut after its header still has a size; generation needs only that, training needs pixels."""
    full = tmp_path / "full.png"
    image(224, 168).save(full)
    cut = tmp_path / "cut.png"
    data = full.read_bytes()
    cut.write_bytes(data[: data.index(b"IDAT") + 12])  # header chunks and a few bytes of pixel data
    sample = {"id": "hdr", "question": "q", "images": [], "cot_images": [cut], "answer": "a"}
    gen = LatentCollator(processor, latent_settings, for_generation=True)(
        [sample, {**sample, "id": "ok", "cot_images": [full]}])
    assert gen["latent_budgets"][0] == gen["latent_budgets"][1] == [budget_of((1, 12, 16), latent_settings)]
    with pytest.raises(CollatorInputError, match=r"'hdr'.*cot_images\[0\]"):
        LatentCollator(processor, latent_settings)([sample])


def test_generation_ends_after_last_latent(processor, latent_settings, ids):
    batch = LatentCollator(processor, latent_settings, for_generation=True, padding_side="right")(
        [record("g", cot_sizes=((56, 56), (112, 112)))])
    row = real(batch, 0)
    assert row[-1] == ids["latent_end"]
    assert processor.tokenizer.decode(row).count("<|im_start|>assistant\n") == 1
    assert batch["latent_segments"][0][-1][1] == len(row) - 1


def test_no_latent_baseline(model, processor, latent_settings, ids):
    samples = mixed_batch()
    coll = LatentCollator(processor, latent_settings, use_latents=False)
    batch = coll(samples)
    assert batch["latent_image_counts"] == [0] * 4 and batch["latent_budget_total"] == [0] * 4
    assert batch["latent_budgets"] == [[]] * 4 and batch["latent_segments"] == [[]] * 4
    assert batch["cot_pixel_values"] is None and batch["cot_image_grid_thw"] is None
    latent_ids = {ids["latent"], ids["latent_start"], ids["latent_end"]}
    assert not any(t in latent_ids for t in batch["input_ids"].flatten().tolist())
    for b, s in enumerate(samples):
        text = processor.tokenizer.decode(real(batch, b))
        assert text.endswith("<|im_start|>assistant\n" + s["answer"] + "<|im_end|>\n")
        lab = batch["labels"][b][batch["labels"][b] != -100].tolist()
        assert processor.tokenizer.decode(lab) == s["answer"] + "<|im_end|>"
    gen = LatentCollator(processor, latent_settings, use_latents=False, for_generation=True)(samples)
    assert all(processor.tokenizer.decode(real(gen, b)).endswith("<|im_start|>assistant\n") for b in range(4))
    out = model(**{k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values", "image_grid_thw",
                                         "mm_token_type_ids", "labels")})
    assert torch.isfinite(out.loss)


def test_forward_batch_of_eight(model, processor, latent_settings):
    rng = random.Random(3)
    samples = []
    for b in range(8):
        q = [(rng.randint(56, 224), rng.randint(56, 168)) for _ in range(rng.randint(0, 2))]
        c = [(rng.randint(56, 224), rng.randint(56, 168)) for _ in range(rng.randint(0, 4))]
        samples.append(record(f"f{b}", question=f"question {b}", answer="answer " * (b + 1), q_sizes=q,
                              cot_sizes=c))
    batch = LatentCollator(processor, latent_settings)(samples)
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    pixel_values=batch["pixel_values"], image_grid_thw=batch["image_grid_thw"],
                    mm_token_type_ids=batch["mm_token_type_ids"], labels=batch["labels"])
    assert out.logits.shape[:2] == batch["input_ids"].shape
    assert torch.isfinite(out.loss) and out.loss > 0


def test_model_config_as_settings(model, processor):
    coll = LatentCollator(processor, model.config)
    assert coll.latent_id == model.config.latent_token_id
    batch = coll([record("c")])
    assert batch["latent_budgets"] == [[budget_of((1, 12, 16), LatentSettings.from_config(model.config))]]


# --------------------------------------------------------------------------- limits and errors
def test_max_length(processor, latent_settings):
    sample = record("long-one", question="q" * 30)
    n = int(LatentCollator(processor, latent_settings)([sample])["attention_mask"].sum())
    assert LatentCollator(processor, latent_settings, max_length=n)([sample])["input_ids"].shape[1] == n
    with pytest.raises(ValueError, match=rf"'long-one'.*length {n}\b.*max_length {n - 1}\b"):
        LatentCollator(processor, latent_settings, max_length=n - 1)([record("short"), sample])


@pytest.mark.parametrize(
    ("change", "pattern"),
    [
        ({"question": None}, r"'bad'.*'question'.*missing"),
        ({"answer": None}, r"'bad'.*'answer'.*missing"),
        ({"answer": 3}, r"'bad'.*'answer'.*string"),
        ({"images": "x.png"}, r"'bad'.*'images'.*list"),
        ({"cot_images": [image(56, 56), "/no/such/file.png"]}, r"'bad'.*cot_images\[1\].*no/such/file"),
        ({"images": [42]}, r"'bad'.*images\[0\].*PIL image or a path"),
        ({"question": "a<|image_pad|>b"}, r"'bad'.*'question'.*reserved"),
        ({"answer": "x" + LATENT_PAD}, r"'bad'.*'answer'.*reserved"),
    ],
)
def test_bad_records(processor, latent_settings, change, pattern):
    sample = {**record("bad"), **change}
    with pytest.raises(CollatorInputError, match=pattern):
        LatentCollator(processor, latent_settings)([record("good"), sample])


@pytest.mark.parametrize(
    ("change", "pattern"),
    [
        ({"latent_budgets": [2, 0]}, r"'bad'.*latent_budgets.*\[1\]"),
        ({"cot_images": [], "cot_image_sizes": [(10,)]}, r"'bad'.*cot_image_sizes\[0\]"),
        ({"cot_images": ["/missing.png"]}, r"'bad'.*cot_images\[0\]"),
    ],
)
def test_bad_generation_records(processor, latent_settings, change, pattern):
    sample = {**record("bad", answer=None), **change}
    with pytest.raises(CollatorInputError, match=pattern):
        LatentCollator(processor, latent_settings, for_generation=True)([sample])


def test_answer_not_needed_for_generation(processor, latent_settings):
    batch = LatentCollator(processor, latent_settings, for_generation=True)([record("g", answer=None)])
    assert batch["labels"] is None


def test_verify_segments_catches_mismatches(processor, latent_settings, ids):
    batch = LatentCollator(processor, latent_settings)(mixed_batch())
    args = (batch["latent_budgets"], latent_settings.latent_token_id, batch["ids"],
            ids["latent_start"], ids["latent_end"])
    verify_segments(batch["input_ids"], batch["latent_segments"], *args)
    s, e, _ = batch["latent_segments"][2][1]
    broken = batch["input_ids"].clone()
    broken[2, s] = ids["pad"]
    with pytest.raises(LatentInputError, match="'s2'"):
        verify_segments(broken, batch["latent_segments"], *args)
    stray = batch["input_ids"].clone()
    stray[0, 1] = ids["latent"]
    with pytest.raises(CollatorInputError, match="'s0'.*latent tokens"):
        verify_segments(stray, batch["latent_segments"], *args)
    shifted = [list(x) for x in batch["latent_segments"]]
    shifted[2][1] = (s - 1, e - 1, 1)
    with pytest.raises(LatentInputError, match="'s2'"):
        verify_segments(batch["input_ids"], shifted, *args)


def test_settings_must_agree_with_tokenizer(processor, latent_settings):
    with pytest.raises(ValueError, match="latent_token_id"):
        wrong = latent_settings.replace(latent_token_id=latent_settings.latent_start_token_id)
        LatentCollator(processor, wrong)
    with pytest.raises(ValueError, match="padding_side"):
        LatentCollator(processor, latent_settings, padding_side="middle")
    unset = latent_settings.replace(latent_token_id=-1, latent_start_token_id=-1, latent_end_token_id=-1)
    assert LatentCollator(processor, unset).latent_id == latent_settings.latent_token_id


def test_image_paths_are_read_like_the_dataset_reads_them(processor, latent_settings, tmp_path):
    """A transparent PNG given as a path becomes the same pixels as through RecordDataset (white behind)."""
    from latentvl.images import open_rgb

    rgba = Image.new("RGBA", (56, 56), (200, 30, 30, 0))
    rgba.paste((10, 200, 10, 255), (0, 0, 28, 28))
    path = tmp_path / "transparent.png"
    rgba.save(path)
    collate = LatentCollator(processor, latent_settings)
    sample = {"id": "t", "question": "q?", "answer": "a", "cot_images": []}
    from_path = collate([{**sample, "images": [path]}])["pixel_values"]
    from_dataset = collate([{**sample, "images": [open_rgb(path)]}])["pixel_values"]
    black = collate([{**sample, "images": [rgba.convert("RGB")]}])["pixel_values"]
    assert torch.equal(from_path, from_dataset)
    assert not torch.equal(from_path, black)


@settings(max_examples=50, deadline=None)
@given(text=TEXT)
@example(text="\n\n")
@example(text="a\n\n\nb")
def test_tiny_tokenizer_round_trips_printable_text_and_newlines(processor, text):
    """One token per character, newlines included (runs of them too): nothing becomes <unk>."""
    tok = processor.tokenizer
    ids = tok.encode(text, add_special_tokens=False)
    assert len(ids) == len(text) and tok.unk_token_id not in ids
    assert tok.decode(ids) == text
