"""The instruments of ``latentvl eval``: truncation, implant (step overrides), linear probe, difficulty."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from latentvl import LatentCollator
from latentvl.data.records import load_records
from latentvl.data.tasks.registry import implied_answer
from latentvl.data.tasks.writer import make_dataset
from latentvl.evaluation.causal import step_overrides, truncate_latents
from latentvl.evaluation.instruments import (
    accuracy_by_difficulty,
    fit_linear_probe,
    read_record_fields,
    task_of_data,
)
from latentvl.inference.generate import Patches
from latentvl.reports.evaluation import evaluate, render_markdown


@pytest.fixture(scope="module")
def relay(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("relay")
    make_dataset("relay", 40, 2, out, colours=4, min_hops=1, max_hops=2, val_fraction=0.0, test_fraction=0.3)
    return out


TINY_SIZE = {"num_layers": 2}  # the `tiny` fixture
TINY_LATENT = {"latent_budget_alpha": 1.0, "latent_budget_gamma": 0.5, "latent_budget_max": 2}


def _batch(model, processor, relay: Path, n: int = 3):
    records, _ = load_records(relay / "train.jsonl")
    from latentvl.data.records import RecordDataset

    ds = RecordDataset(records[:n])
    return LatentCollator(processor, model.config)([ds[i] for i in range(n)])


def _pass1(model, batch):
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                     pixel_values=batch["pixel_values"], image_grid_thw=batch["image_grid_thw"],
                     mm_token_type_ids=batch["mm_token_type_ids"], latent_mode=True,
                     latent_segments=batch["latent_segments"], latent_budgets=batch["latent_budgets"])


def test_truncation_masks_exactly_the_later_segments(tiny, relay):
    model, processor = tiny
    batch = _batch(model, processor, relay)
    p1 = _pass1(model, batch)
    base = Patches.from_pass(p1)
    slots = batch["input_ids"] == model.config.latent_token_id
    for keep in range(4):
        kv = truncate_latents(base, batch["input_ids"], batch["latent_segments"], keep).latent_kv_mask
        expect = torch.ones_like(slots)
        for b, segs in enumerate(batch["latent_segments"]):
            for start, end, img in segs:
                if img >= keep:
                    expect[b, start:end] = False
        assert torch.equal(kv, expect)
        assert not (~kv & ~slots).any()  # only latent slots are ever masked
    assert torch.equal(truncate_latents(base, batch["input_ids"], batch["latent_segments"], 0).latent_kv_mask,
                       ~slots)


def test_step_override_replaces_one_slot_and_later_steps_follow(tiny, relay):
    model, processor = tiny
    batch = _batch(model, processor, relay)
    ref = _pass1(model, batch)
    b = 1
    start, end, _ = sorted(batch["latent_segments"][b])[0]
    implant = torch.randn(model.config.text_config.hidden_size)
    with step_overrides(model, {(b, start): implant}):
        got = _pass1(model, batch)
    assert model.latent_step_override is None  # removed on exit
    pos = ref.ce_patch_pos
    assert torch.equal(pos, got.ce_patch_pos)
    row = pos[:, 0] == b
    at = row & (pos[:, 1] == start)
    before = row & (pos[:, 1] < start)
    after = row & (pos[:, 1] > start)
    assert torch.allclose(got.ce_patch_vec[at][0], implant)
    assert torch.equal(got.ce_patch_vec[before], ref.ce_patch_vec[before])
    assert not torch.allclose(got.ce_patch_vec[after], ref.ce_patch_vec[after])  # the chain continues from it
    assert torch.equal(got.ce_patch_vec[~row], ref.ce_patch_vec[~row])  # other samples untouched


def test_step_override_refuses_a_model_without_the_hook():
    with pytest.raises(TypeError, match="latent_step_override"), step_overrides(torch.nn.Linear(2, 2), {}):
        pass


def test_accuracy_by_difficulty_groups_and_orders():
    rows = [{"error": None, "correct": c} for c in (True, False, True, True)] + [{"error": "x", "correct": False}]
    fields = [{"difficulty": 10}, {"difficulty": 2}, {"difficulty": 2}, {}, {"difficulty": 2}]
    assert accuracy_by_difficulty(rows, fields) == {"2": {"n": 2, "accuracy": 0.5}, "10": {"n": 1, "accuracy": 1.0}}


def test_linear_probe_reads_a_linear_code_and_not_noise():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(4, 16, generator=g) * 3

    def rows(n, shuffle=False):
        out = []
        for i in range(n):
            s = i % 4
            label = (i * 7 + 3) % 4 if shuffle else s
            out.append((0, centres[s] + torch.randn(16, generator=g), "RGBY"[label]))
        return out

    good = fit_linear_probe(rows(200), rows(80))["0"]
    assert good["accuracy"] > 0.95 and good["classes"] == 4
    bad = fit_linear_probe(rows(200, shuffle=True), rows(80))["0"]
    assert bad["accuracy"] < 0.5


def test_eval_runs_every_instrument_on_relay_records(tiny, relay, tmp_path):
    model, processor = tiny
    records, _ = load_records(relay / "test.jsonl")
    fields = read_record_fields(relay / "test.jsonl")
    train, _ = load_records(relay / "train.jsonl")
    assert task_of_data(relay / "test.jsonl") == "relay"
    report = evaluate(model, processor, records, out_dir=tmp_path, batch_size=6, max_new_tokens=3,
                      fields=fields, task="relay", probe_records=train[:12],
                      probe_fields=read_record_fields(relay / "train.jsonl"))
    assert set(report["accuracy_by_difficulty"]) == {"1", "2"}
    assert sum(v["n"] for v in report["accuracy_by_difficulty"].values()) == len(records)
    trunc = report["truncation"]
    assert set(trunc) == {"0", "1", "2"}  # k + 1 <= 3 segments
    assert trunc["0"]["n"] == len(records) and trunc["2"]["n"] < len(records)
    assert trunc["0"]["accuracy"] == pytest.approx(report["causal"]["mask"]["accuracy"])
    imp = report["implant"]
    assert imp["n"] > 0 and imp["n_with_implied_answer"] == imp["n"]
    assert 0.0 <= imp["follow_rate"] <= 1.0
    assert set(report["probe"]) == {"0", "1", "2"}
    for row in report["probe"].values():
        assert row["n_test"] > 0 and 0.0 <= row["accuracy"] <= 1.0
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["implant"]["n"] == imp["n"] and "accuracy_by_difficulty.png" in saved["files"].values()
    md = render_markdown(saved)
    for title in ("Accuracy by difficulty", "Truncation", "Implant", "Linear probe"):
        assert title in md


def test_implant_follow_means_the_implied_answer(tiny, relay):
    """The follow rate counts answers equal to the task's implied answer for the implanted state."""
    from latentvl.evaluation.instruments import InstrumentRunner, record_fields
    from latentvl.inference.generate import GenerationSettings, LatentInference

    model, processor = tiny
    records, _ = load_records(relay / "test.jsonl")
    fields = read_record_fields(relay / "test.jsonl")
    engine = LatentInference(model, processor)
    gen = GenerationSettings(max_new_tokens=3)
    per = [record_fields(r, fields) for r in records]
    runner = InstrumentRunner(engine, gen, per, "relay", seed=1, truncation=False)
    rows = {}
    for outcome, _errors in engine.iter_batches(records, gen, 6, return_latents=True):
        runner(outcome)
        for r in outcome.results:
            rows[r.index] = {"gold": records[r.index].answer, "prediction": r.answer,
                             "correct": r.answer == records[r.index].answer}
    assert runner.implants
    for i, x in runner.implants.items():
        assert x["implied"] == implied_answer("relay", per[i], x["segment"], x["state"])
        assert x["state"] != per[i]["cot_states"][x["segment"]]
        assert x["implied"] != rows[i]["prediction"]
    summary = runner.summary(rows)["implant"]
    follow = [x["answer"] == x["implied"] for x in runner.implants.values()]
    assert summary["follow_rate"] == pytest.approx(sum(follow) / len(follow))
