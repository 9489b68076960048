"""The instruments per latent, on records whose ``latent_states`` give one state per latent (the a5 strip)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from latentvl.data.records import load_records
from latentvl.data.tasks.registry import implied_answer
from latentvl.data.tasks.writer import make_dataset
from latentvl.evaluation.causal import truncate_latents
from latentvl.evaluation.instruments import InstrumentRunner, read_record_fields, record_fields, state_units
from latentvl.inference.generate import GenerationSettings, LatentInference, Patches
from latentvl.reports.evaluation import evaluate, render_markdown

TINY_SIZE = {"num_layers": 2}  # the `tiny` fixture
TINY_LATENT = {"latent_budget_alpha": 1.0, "latent_budget_gamma": 1.0, "latent_budget_max": 8}


@pytest.fixture(scope="module")
def a5(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("a5")
    make_dataset("a5", 40, 2, out, min_hops=1, max_hops=3, val_fraction=0.0, test_fraction=0.3)
    return out


def test_state_units_per_latent_or_per_segment():
    per_latent = {"latent_states": [["R", "G"], ["B"]], "cot_states": ["x", "y"]}
    kind, units = state_units(per_latent, [2, 1])
    assert kind == "latent" and [(u.index, u.offset, u.count, u.state) for u in units] == [
        (0, 0, 1, "R"), (1, 1, 1, "G"), (2, 2, 1, "B")]
    kind, units = state_units(per_latent, [1, 1])  # a segment stopped early: per latent no longer fits
    assert kind == "segment" and [(u.offset, u.count, u.state) for u in units] == [(0, 1, "x"), (1, 1, "y")]
    assert state_units({"latent_states": [["R"]]}, [2]) is None
    assert state_units({}, [1]) is None


def test_truncation_by_latent_keeps_the_first_latents_across_segments():
    ids = torch.zeros(2, 12, dtype=torch.long)
    segments = [[(6, 8, 1), (2, 4, 0)], [(3, 6, 0)]]  # row 0: image 0 at 2..3, image 1 at 6..7
    base = Patches(None, None, None)
    for keep, row0, row1 in [(0, [], []), (1, [2], [3]), (3, [2, 3, 6], [3, 4, 5]), (9, [2, 3, 6, 7], [3, 4, 5])]:
        kv = truncate_latents(base, ids, segments, keep, by_latent={0, 1}).latent_kv_mask
        masked0 = {c for c in (2, 3, 6, 7) if not kv[0, c]}
        assert {c for c in (2, 3, 6, 7)} - masked0 == set(row0)
        assert {c for c in (3, 4, 5) if kv[1, c]} == set(row1)
        assert kv[:, [0, 1, 5, 8, 9, 10, 11]][0].all()  # columns outside the segments are never masked
    # rows not counted by latent keep whole segments: row 1 by latent, row 0 by segment (image 0 only)
    kv = truncate_latents(base, ids, segments, 1, by_latent={1}).latent_kv_mask
    assert [bool(kv[0, c]) for c in (2, 3, 6, 7)] == [True, True, False, False]
    assert [bool(kv[1, c]) for c in (3, 4, 5)] == [True, False, False]


def test_eval_runs_every_instrument_per_latent(tiny, a5, tmp_path):
    model, processor = tiny
    records, _ = load_records(a5 / "test.jsonl")
    fields = read_record_fields(a5 / "test.jsonl")
    train, _ = load_records(a5 / "train.jsonl")
    report = evaluate(model, processor, records, out_dir=tmp_path, batch_size=6, max_new_tokens=3,
                      fields=fields, task="a5", probe_records=train[:12],
                      probe_fields=read_record_fields(a5 / "train.jsonl"))
    assert report["instrument_unit"] == "latent"
    trunc = report["truncation"]
    assert set(trunc) == {"0", "1", "2", "3"}  # four latents per record (max_hops + 1 cells)
    assert all(v["n"] == len(records) for v in trunc.values())
    assert trunc["0"]["accuracy"] == pytest.approx(report["causal"]["mask"]["accuracy"])
    imp = report["implant"]
    assert imp["n"] > 0 and imp["n_with_implied_answer"] == imp["n"]
    assert set(imp["by_segment"]) <= {"0", "1", "2", "3"}
    assert set(report["probe"]) == {"0", "1", "2", "3"}
    md = render_markdown(report)
    assert "latents kept (j)" in md and "implanted latent" in md and "per latent index" in md


def test_implant_replaces_one_latent_with_a_latent_from_the_same_position(tiny, a5):
    model, processor = tiny
    records, _ = load_records(a5 / "test.jsonl")
    per = [record_fields(r, read_record_fields(a5 / "test.jsonl")) for r in records]
    engine = LatentInference(model, processor)
    gen = GenerationSettings(max_new_tokens=3)
    runner = InstrumentRunner(engine, gen, per, "a5", seed=1, truncation=False)
    seen_plans = []
    from latentvl.evaluation import instruments

    real = instruments.step_overrides

    def spy(m, plan):
        seen_plans.append(dict(plan))
        return real(m, plan)

    instruments.step_overrides = spy
    try:
        for outcome, _errors in engine.iter_batches(records, gen, 6, return_latents=True):
            runner(outcome)
            for b, r in enumerate(outcome.results):
                if r.index in runner.implants and runner.implants[r.index].get("_checked") is None:
                    x = runner.implants[r.index]
                    (start, _end, _img), = outcome.batch["latent_segments"][b]
                    assert (b, start + x["segment"]) in seen_plans[-1]
                    assert sum(1 for key in seen_plans[-1] if key[0] == b) == 1  # one latent replaced
                    x["_checked"] = True
    finally:
        instruments.step_overrides = real
    assert runner.implants and runner.unit == "latent"
    for i, x in runner.implants.items():
        assert x["state"] != per[i]["latent_states"][0][x["segment"]] and x["source_unit"] == x["segment"]
        assert x["implied"] == implied_answer("a5", per[i], x["segment"], x["state"])
    for _kind, index, n, _state, _vecs in runner.bank:
        assert _kind == "latent" and n == 1 and 0 <= index <= 3
