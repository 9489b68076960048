"""Two-step inference (design §9, D9): parity with training pass 1 and with a slow reference,
batching, budget sources, per-sample errors and the ``latentvl infer`` command."""

import copy
import json

import numpy as np
import pytest
import torch
from helpers import write_random_images
from PIL import Image

from latentvl import LatentCollator, set_latent_fields
from latentvl.budget import compute_latent_budget, num_visual_tokens
from latentvl.cli import main as cli_main
from latentvl.data.collator import grid_from_size
from latentvl.inference.generate import GenerationSettings, LatentInference, normalize_answer, split_latents
from latentvl.model.loading import load_latent_model, save_latent_checkpoint

SIZES = [(84, 84), (112, 56), (140, 112), (56, 140), (98, 98), (126, 70)]
QUESTIONS = ["Which way?", "What colour is the largest shape?", "Count.", "Go", "Is it red? Say yes.", "?"]
MAX_NEW = 10


pytestmark = pytest.mark.usefixtures("one_thread")


def sharpen(model, scale=5.0, eos_scale=None):
    """Scale the text weights of a random tiny model so that its greedy answers depend on the input.

    With ``eos_scale`` the output row of ``<|im_end|>`` is untied and scaled so that some answers end
    early (end of turn) and others run to the token limit.
    """
    with torch.no_grad():
        for name, w in model.model.language_model.named_parameters():
            if w.dim() == 2 and "embed" not in name:
                w.mul_(scale)
        if eos_scale is not None:
            model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
            model.lm_head.weight[model.config.text_config.eos_token_id] *= eos_scale
    return model


def to_stage_c(model, seed=0):
    """A stage-C copy whose stop head gives varied probabilities (some segments halt early)."""
    model = copy.deepcopy(model)
    set_latent_fields(model.config, latent_mode_stage="C", latent_stop_loss_weight=1.0,
                      latent_cost_weight=1e-3)
    head = model.latent_stop_head
    with torch.no_grad():
        head.weight.copy_(torch.randn(head.weight.shape, generator=torch.Generator().manual_seed(seed)) * 0.3)
        head.bias.zero_()
    return model


# the `tiny` fixture: a random model (per backbone) whose sharpened greedy answers both stop and run to the limit
TINY_SEED = {"qwen2_5_vl": 5, "qwen3_vl": 0}
TINY_LATENT = {"latent_budget_alpha": 0.8}  # budgets of 3-4 for these image sizes


@pytest.fixture(scope="module")
def tiny(tiny):
    """The shared tiny model (conftest), sharpened so that its answers depend on the input."""
    return sharpen(tiny[0], eos_scale=2.0), tiny[1]


@pytest.fixture(scope="module")
def tiny_c(tiny, backbone):
    # a stop-head seed per backbone under which some first segment halts mid-way (halting_threshold)
    return to_stage_c(tiny[0], seed={"qwen2_5_vl": 0, "qwen3_vl": 2}[backbone]), tiny[1]


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return write_random_images(tmp_path_factory.mktemp("imgs"), SIZES)


@pytest.fixture(scope="module")
def samples(images):
    """Question image i, CoT images taken from the other files (1 to 3 of them), and an answer."""
    return [
        {"id": f"s{i}", "question": q, "images": [images[i]],
         "cot_images": [images[(i + k + 1) % len(images)] for k in range(1 + i % 3)], "answer": "yes"}
        for i, q in enumerate(QUESTIONS)
    ]


def training_pass1(model, processor, samples, threshold):
    """Pass 1 exactly as the training unit runs it (right padding, answers in the sequence)."""
    batch = LatentCollator(processor, model.config)(samples)
    with torch.no_grad():
        out = model.latent_loss(batch, threshold=threshold)
    return out.latent, batch


def slow_greedy(model, processor, sample, max_new_tokens):
    """Reference decoder: one full forward over the whole sequence per new token, no KV cache."""
    engine = LatentInference(model, processor)
    batch = engine.collate([engine.prepare(sample, 0, max_new_tokens)])
    ids, att, mm = batch["input_ids"], batch["attention_mask"], batch["mm_token_type_ids"]
    with torch.no_grad():
        p1 = model(input_ids=ids, attention_mask=att, pixel_values=batch["pixel_values"],
                   image_grid_thw=batch["image_grid_thw"], mm_token_type_ids=mm, latent_mode=True,
                   latent_segments=batch["latent_segments"], latent_budgets=batch["latent_budgets"])
        emb = model.embed_inputs(ids, batch["pixel_values"], batch["image_grid_thw"])
        emb = emb.index_put((p1.ce_patch_pos[:, 0], p1.ce_patch_pos[:, 1]), p1.ce_patch_vec)
        kv = p1.latent_kv_mask
        out = []
        for _ in range(max_new_tokens):
            pos = model.compute_position_ids(ids, att, mm, batch["image_grid_thw"])
            logits = model(inputs_embeds=emb, attention_mask=att, position_ids=pos, latent_kv_mask=kv).logits
            tok = int(logits[0, -1].argmax())
            if tok == processor.token_id("<|im_end|>"):
                return out, True
            out.append(tok)
            one = torch.ones(1, 1, dtype=att.dtype)
            ids = torch.cat([ids, torch.tensor([[tok]])], 1)
            att = torch.cat([att, one], 1)
            mm = torch.cat([mm, torch.zeros(1, 1, dtype=mm.dtype)], 1)
            kv = torch.cat([kv, torch.ones(1, 1, dtype=torch.bool)], 1)
            emb = torch.cat([emb, model.get_input_embeddings()(torch.tensor([[tok]]))], 1)
    return out, False


def halting_threshold(model, processor, samples):
    """A threshold that stops some first segment after its second slot and before its last.

    Probabilities of a sample's first segment do not depend on the threshold up to where it halts,
    so they are read once with threshold 1 (nothing halts) and the threshold is put halfway between
    the chosen step's probability and the highest one before it.
    """
    p1, _ = training_pass1(model, processor, samples, threshold=1.0)
    for b, segs in enumerate(p1.latent_stop_probs):
        probs = segs[0]
        for k in range(1, len(probs) - 1):
            if probs[k] - max(probs[:k]) > 1e-3:
                return (probs[k] + max(probs[:k])) / 2, b, k
    raise AssertionError("no segment can be made to halt mid-way; change the stop head seed")


# ----------------------------------------------------------------------------------------------- parity
@pytest.mark.parametrize("stage", ["A", "C"])
def test_latents_equal_training_pass1(tiny, tiny_c, samples, stage):
    model, processor = tiny if stage == "A" else tiny_c
    threshold = None
    if stage == "C":
        threshold, b_halt, k_halt = halting_threshold(model, processor, samples)
    train, batch = training_pass1(model, processor, samples, threshold)
    results = LatentInference(model, processor, threshold=threshold).run(
        samples, batch_size=len(samples), max_new_tokens=2, return_latents=True)
    train_rows = split_latents(train, len(samples))
    assert all(r.ok for r in results)
    for b, r in enumerate(results):
        assert r.budgets == batch["latent_budgets"][b]
        assert r.used_lens == train.latent_used_lens[b]
        assert r.latents.shape == train_rows[b].shape
        torch.testing.assert_close(r.latents, train_rows[b], atol=1e-4, rtol=1e-4)
    if stage == "A":
        assert all(r.used_lens == r.budgets for r in results)
    else:
        halted = results[b_halt]
        assert halted.used_lens[0] == k_halt + 1 < halted.budgets[0]  # fired mid-segment
        assert len(halted.stop_probs[0]) == k_halt + 1 and halted.stop_probs[0][-1] >= threshold
        assert any(u < bud for r in results for u, bud in zip(r.used_lens, r.budgets))


@pytest.mark.parametrize("stage", ["A", "C"])
def test_answers_equal_slow_reference(tiny, tiny_c, samples, stage):
    model, processor = tiny if stage == "A" else tiny_c
    engine = LatentInference(model, processor)
    prepared = [engine.prepare(s, i, MAX_NEW) for i, s in enumerate(samples)]
    assert len({p.prompt_len for p in prepared}) > 1  # left padding is exercised
    results = engine.run(samples, batch_size=len(samples), max_new_tokens=MAX_NEW)
    finished = []
    for s, r in zip(samples, results):
        ref, done = slow_greedy(model, processor, s, MAX_NEW)
        assert r.token_ids == ref, s["id"]
        assert r.finished == done
        assert r.answer == processor.tokenizer.decode(ref, skip_special_tokens=True).strip()
        finished.append(done)
    assert any(finished) and not all(finished)  # both stopping rules (end of turn, length) occur


def test_batched_equals_one_by_one(tiny_c, samples):
    model, processor = tiny_c
    engine = LatentInference(model, processor)
    together = engine.run(samples, batch_size=4, max_new_tokens=MAX_NEW)
    alone = [engine.run([s], max_new_tokens=MAX_NEW)[0] for s in samples]
    for a, b in zip(together, alone):
        assert (a.id, a.token_ids, a.used_lens, a.budgets) == (b.id, b.token_ids, b.used_lens, b.budgets)
        np.testing.assert_allclose(sum(a.stop_probs, []), sum(b.stop_probs, []), atol=1e-5)
    assert [r.id for r in together] == [s["id"] for s in samples]
    assert together[0].timings["batch_size"] == 4 and together[-1].timings["batch_size"] == 2
    assert all(r.timings["latent_pass_s"] > 0 and r.timings["generation_s"] > 0 for r in together)


def test_checkpoint_generation_defaults_do_not_change_decoding(tiny, samples):
    model, processor = tiny
    engine = LatentInference(model, processor)
    plain = [r.token_ids for r in engine.run(samples, max_new_tokens=MAX_NEW)]
    saved = model.generation_config
    model.generation_config = copy.deepcopy(saved)
    model.generation_config.repetition_penalty = 5.0  # as a checkpoint's generation_config.json may say
    model.generation_config.no_repeat_ngram_size = 1
    try:
        assert [r.token_ids for r in engine.run(samples, max_new_tokens=MAX_NEW)] == plain
    finally:
        model.generation_config = saved
    assert any(len(set(t)) < len(t) for t in plain)  # repeats exist, so a penalty would have changed them


def test_sampling_is_seeded(tiny, samples):
    model, processor = tiny
    engine = LatentInference(model, processor)
    kw = dict(batch_size=3, max_new_tokens=6, do_sample=True, temperature=5.0)
    first = [r.token_ids for r in engine.run(samples, seed=1, **kw)]
    again = [r.token_ids for r in engine.run(samples, seed=1, **kw)]
    greedy = [r.token_ids for r in engine.run(samples, batch_size=3, max_new_tokens=6)]
    assert first == again
    assert first != greedy


def test_min_new_tokens_holds_the_end_of_turn_back(tiny, samples):
    """With min_new_tokens = max_new_tokens every answer has exactly that many tokens; until then it is the
    greedy answer (an answer that ended early continues past where it would have stopped)."""
    model, processor = tiny
    engine = LatentInference(model, processor)
    free = engine.run(samples, batch_size=3, max_new_tokens=MAX_NEW)
    fixed = engine.run(samples, batch_size=3, max_new_tokens=MAX_NEW, min_new_tokens=MAX_NEW)
    assert any(r.finished for r in free)
    for a, b in zip(free, fixed, strict=True):
        assert len(b.token_ids) == MAX_NEW and not b.finished
        assert b.token_ids[:len(a.token_ids)] == a.token_ids
    with pytest.raises(ValueError, match="min_new_tokens=5 must be in"):
        GenerationSettings(max_new_tokens=4, min_new_tokens=5)


# ----------------------------------------------------------------------------------------- budgets (D9)
def test_budget_sources_in_order(tiny, images, tmp_path):
    model, processor = tiny
    s = model.latent_settings

    def budget(w, h):
        grid = grid_from_size(processor.image_processor, w, h)
        n = num_visual_tokens(grid, processor.merge_size)
        return compute_latent_budget(n, s.latent_budget_alpha, s.latent_budget_gamma, s.latent_budget_min,
                                     s.latent_budget_max)

    # A CoT file whose header is intact but whose pixels are cut off: only its size may be read.
    whole = images[2].read_bytes()
    header_only = tmp_path / "cot_header_only.png"
    header_only.write_bytes(whole[:64])
    with pytest.raises(OSError):
        Image.open(header_only).load()
    big = [(1000, 1000)]
    samples = [
        # explicit budgets win over the CoT images (missing files: never opened) and their sizes
        {"id": "explicit", "question": "q", "images": [images[0]], "latent_budgets": [2, 5],
         "cot_images": [tmp_path / "absent1.png", tmp_path / "absent2.png"], "cot_image_sizes": big * 2},
        # CoT image files: budgets from their sizes alone
        {"id": "cot-files", "question": "q", "images": [images[0]], "cot_images": [header_only, images[3]]},
        # CoT sizes given directly
        {"id": "cot-sizes", "question": "q", "images": [images[0]], "cot_image_sizes": big},
        # nothing: the configured number of segments, each with the first question image's budget
        {"id": "default", "question": "q", "images": [images[4], images[0]]},
        # nothing and no image: no segments
        {"id": "none", "question": "q", "images": []},
    ]
    results = LatentInference(model, processor, default_num_segments=2).run(samples, max_new_tokens=2)
    assert all(r.ok for r in results), [r.error for r in results]
    got = {r.id: (r.budget_source, r.budgets) for r in results}
    w2, h2 = SIZES[2]
    assert got["explicit"] == ("explicit", [2, 5])
    assert got["cot-files"] == ("cot_images", [budget(w2, h2), budget(*SIZES[3])])
    assert got["cot-sizes"] == ("cot_images", [budget(1000, 1000)])
    assert budget(1000, 1000) != budget(*SIZES[4])
    assert got["default"] == ("default", [budget(*SIZES[4])] * 2)
    assert got["none"] == ("none", [])
    assert all(r.used_lens == r.budgets for r in results)  # stage A uses every slot


# ------------------------------------------------------------------------------------- per-sample errors
def test_bad_samples_get_errors_and_the_rest_completes(tiny, samples, images, tmp_path, monkeypatch):
    model, processor = tiny
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"this is not an image")
    bad = [
        {"id": "missing", "question": "q", "images": [tmp_path / "nope.png"]},
        {"id": "unreadable", "question": "q", "images": [broken]},
        {"id": "too-long", "question": "x" * 5000, "images": [images[0]]},
        {"id": "missing-cot", "question": "q", "images": [images[0]], "cot_images": [tmp_path / "gone.png"]},
        {"id": "reserved", "question": "see <|im_end|>", "images": []},
        {"id": "no-question", "images": [images[0]]},
    ]
    mixed = [samples[0], bad[0], bad[1], samples[1], bad[2], bad[3], bad[4], samples[2], bad[5]]
    engine = LatentInference(model, processor)
    results = engine.run(mixed, batch_size=5, max_new_tokens=MAX_NEW)
    assert [r.id for r in results] == [m["id"] for m in mixed]
    kinds = {r.id: r.error_kind for r in results}
    assert kinds == {"s0": None, "missing": "missing_image", "unreadable": "unreadable_image", "s1": None,
                     "too-long": "too_long", "missing-cot": "missing_image", "reserved": "invalid_input",
                     "s2": None, "no-question": "invalid_input"}
    assert "nope.png" in results[1].error and "5000" not in results[4].error
    assert str(model.config.text_config.max_position_embeddings) in results[4].error
    alone = {s["id"]: engine.run([s], max_new_tokens=MAX_NEW)[0] for s in samples[:3]}
    for r in results:
        if r.ok:
            assert r.token_ids == alone[r.id].token_ids
        else:
            assert r.answer is None and r.error

    # A failure inside the batch itself: every sample is retried alone, only the culprit fails.
    real_collate = engine.collate

    def collate(prepared):
        if any(p.id == "s1" for p in prepared):
            raise RuntimeError("boom")
        return real_collate(prepared)

    monkeypatch.setattr(engine, "collate", collate)
    results = engine.run(samples[:3], batch_size=3, max_new_tokens=MAX_NEW)
    assert [r.error_kind for r in results] == [None, "runtime", None]
    assert "boom" in results[1].error
    assert results[0].token_ids == alone["s0"].token_ids and results[2].token_ids == alone["s2"].token_ids


def test_max_length_option_and_normalisation(tiny, samples):
    model, processor = tiny
    engine = LatentInference(model, processor)
    n = engine.prepare(samples[0], 0, 4).prompt_len
    strict = LatentInference(model, processor, max_length=n + 4)
    assert strict.run([samples[0]], max_new_tokens=4)[0].ok
    assert strict.run([samples[0]], max_new_tokens=5)[0].error_kind == "too_long"
    assert normalize_answer("  The  Answer. ") == "the answer"
    assert normalize_answer('"R"') == "r" and normalize_answer(None) == ""


def test_no_latent_mode(tiny, samples):
    model, processor = tiny
    plain = LatentInference(model, processor, use_latents=False)
    [r] = plain.run([samples[1]], max_new_tokens=4)
    assert r.ok and r.budgets == [] and r.used_lens == [] and r.budget_source == "none"
    planned = LatentInference(model, processor).prepare(samples[1], 0, 4)
    assert len(planned.budgets) == 2
    # the same prompt without the segments and their start/end tokens
    assert plain.prepare(samples[1], 0, 4).prompt_len == planned.prompt_len - sum(planned.budgets) - 2 * 2


# ---------------------------------------------------------------------------------------------------- CLI
def test_cli_infer(tiny, samples, images, tmp_path, capsys):
    model, processor = tiny
    ckpt = tmp_path / "ckpt"
    save_latent_checkpoint(model, processor, ckpt)
    loaded, loaded_proc = load_latent_model(ckpt)
    sample = {"id": "question", "question": QUESTIONS[1], "images": [images[1]], "latent_budgets": [3, 4]}
    [expected] = LatentInference(loaded, loaded_proc).run([sample], max_new_tokens=6)

    rc = cli_main(["infer", "--model", str(ckpt), "--image", str(images[1]), "--question", QUESTIONS[1],
                   "--budgets", "3,4", "--max-new-tokens", "6", "--json"])
    assert rc == 0
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert row["answer"] == expected.answer and row["token_ids"] == expected.token_ids
    assert row["budgets"] == [3, 4] and row["used_lens"] == [3, 4] and row["budget_source"] == "explicit"
    assert set(row["timings"]) == {"encode_s", "latent_pass_s", "generation_s", "batch_size"}

    rc = cli_main(["infer", "--model", str(ckpt), "--image", str(images[1]), "--question", QUESTIONS[1],
                   "--cot-image-size", "1000x1000", "--max-new-tokens", "6"])
    text = capsys.readouterr().out
    assert rc == 0 and "answer: " in text and "(cot_images)" in text and "latent pass" in text

    data = tmp_path / "records.jsonl"
    rows = [{**s, "images": [str(p) for p in s["images"]], "cot_images": [str(p) for p in s["cot_images"]]}
            for s in samples[:3]]
    rows[1]["images"] = [str(tmp_path / "missing.png")]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "answers.jsonl"
    rc = cli_main(["infer", "--model", str(ckpt), "--data", str(data), "--out", str(out), "--batch-size", "2",
                   "--max-new-tokens", "4"])
    got = [json.loads(line) for line in out.read_text().splitlines()]
    assert rc == 1  # one sample failed; the others are answered
    assert [g["id"] for g in got] == ["s0", "s1", "s2"]
    assert [g["error_kind"] for g in got] == [None, "missing_image", None]
    assert "1 errors" in capsys.readouterr().out
