"""design §8 checks: pass on a good batch, fail with a report on a corrupted one, stop a run."""

import copy

import pytest
import torch

from latentvl import build_tiny_model, set_latent_fields
from latentvl.data.collator import LatentCollator
from latentvl.data.records import RecordDataset, load_records
from latentvl.data.tasks.writer import make_dataset
from latentvl.training import trainer as trainer_mod
from latentvl.training.checks import (
    PreflightError,
    check_halting_masks,
    check_no_think,
    check_segment_lengths,
    check_segment_tokens,
    run_checks,
)
from latentvl.training.config import TrainConfig
from latentvl.training.trainer import train

LATENT = {"latent_budget_alpha": 1.0, "latent_budget_max": 8}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("checks_data")
    make_dataset("shapes", 20, 3, out, min_size=84, max_size=112, max_cot=2)
    return out


@pytest.fixture(scope="module")
def model_and_batch(data_dir):
    model, processor = build_tiny_model(0, hidden_size=64, num_layers=2)
    set_latent_fields(model.config, **LATENT)
    records, _ = load_records(data_dir / "train.jsonl")
    ds = RecordDataset(records)
    batch = LatentCollator(processor, model.config)([ds[i] for i in range(4)])
    assert all(batch["latent_budgets"]) and len({b for bs in batch["latent_budgets"] for b in bs}) >= 1
    return model, batch


def test_good_batch_passes_in_both_stages(model_and_batch):
    model, batch = model_and_batch
    report = run_checks(model, batch, "A")
    assert report.ok and [r.passed for r in report.results] == [True, True, True, True], report.format()
    model_c = copy.deepcopy(model)
    set_latent_fields(
        model_c.config, latent_mode_stage="C", latent_stop_loss_weight=1.0, latent_cost_weight=1e-3
    )
    with torch.no_grad():  # a stop head that fires on some slots, so masks are not trivially all True
        model_c.latent_stop_head.weight.normal_(0, 1.0)
        model_c.latent_stop_head.bias.zero_()
    report_c = run_checks(model_c, batch, "C", threshold=0.5)
    assert report_c.ok, report_c.format()
    assert "stage C" in report_c.results[2].name
    assert "design §8 checks (stage C): all passed" in report_c.format()


def test_corrupted_segment_token_fails_with_report(model_and_batch):
    model, batch = model_and_batch
    bad = dict(batch, input_ids=batch["input_ids"].clone())
    start, end, _ = bad["latent_segments"][1][0]
    bad["input_ids"][1, start + 1] = 60  # an ordinary character inside the segment
    report = run_checks(model, bad, "A")
    assert not report.ok
    first = report.results[0]
    assert first.passed is False
    assert repr(batch["ids"][1]) in first.detail and f"position {start + 1}" in first.detail
    with pytest.raises(PreflightError) as err:
        raise PreflightError(report)
    assert "FAIL" in str(err.value) and batch["ids"][1] in str(err.value)
    # the model itself also rejects the batch; the check reports that instead of crashing
    assert report.results[2].passed is False and "LatentInputError" in report.results[2].detail


def test_wrong_segment_length_fails(model_and_batch):
    _, batch = model_and_batch
    bad = dict(batch, latent_budgets=[list(b) for b in batch["latent_budgets"]])
    bad["latent_budgets"][0][0] += 1
    res = check_segment_lengths(bad, "A")
    assert res.passed is False and "!= budget" in res.detail and repr(batch["ids"][0]) in res.detail
    assert check_segment_lengths(batch, "A").passed
    assert check_segment_tokens(batch, model_and_batch[0].config.latent_token_id).passed


def test_halting_mask_check_catches_bad_patterns(model_and_batch):
    _, batch = model_and_batch
    segs = batch["latent_segments"]
    S = batch["input_ids"].shape[1]
    budgets = batch["latent_budgets"]
    used = [[max(1, b - 1) for b in bs] for bs in budgets]
    mask = torch.ones(len(segs), S, dtype=torch.bool)
    for b, ss in enumerate(segs):
        for (start, end, _img), u in zip(ss, used[b], strict=True):
            mask[b, start + u : end] = False
    assert check_halting_masks(batch, "C", used, mask).passed
    assert check_halting_masks(batch, "A", used, mask).passed is False  # stage A must use the full budget
    holey = mask.clone()
    start, end, _ = segs[0][0]
    holey[0, start] = False  # F before T: not True..True False..False
    res = check_halting_masks(batch, "C", used, holey)
    assert res.passed is False and "expected" in res.detail
    too_many = [[b + 1 for b in bs] for bs in budgets]
    assert check_halting_masks(batch, "C", too_many, mask).passed is False
    outside = mask.clone()
    outside[0, 0] = False
    assert "outside every segment" in check_halting_masks(batch, "C", used, outside).detail


def test_no_think_check_detects_an_active_latent(model_and_batch):
    model, batch = model_and_batch
    good = check_no_think(model, batch, 1e-4)
    assert good.passed, good.detail
    keep = torch.ones_like(batch["input_ids"], dtype=torch.bool)
    for b, ss in enumerate(batch["latent_segments"]):
        for start, end, _ in ss:
            keep[b, start:end] = False
    start, _, _ = batch["latent_segments"][0][0]
    keep[0, start] = True  # one latent slot left visible
    res = check_no_think(model, batch, 1e-4, kv_mask=keep)
    assert res.passed is False and repr(batch["ids"][0]) in res.detail
    soft = copy.deepcopy(model)
    set_latent_fields(soft.config, latent_null_scale=0.5)
    assert check_no_think(soft, batch, 1e-4).passed is None  # soft gating: reported, not enforced


def test_failed_check_stops_the_run_before_the_first_step(data_dir, tmp_path, monkeypatch):
    real = trainer_mod.run_checks

    def corrupting(model, batch, stage, threshold, tolerance):
        batch = dict(batch, input_ids=batch["input_ids"].clone())
        start, _, _ = batch["latent_segments"][0][0]
        batch["input_ids"][0, start] = 61
        return real(model, batch, stage, threshold, tolerance)

    monkeypatch.setattr(trainer_mod, "run_checks", corrupting)
    steps = []
    cfg = TrainConfig(
        train_data=str(data_dir / "train.jsonl"),
        output_dir=str(tmp_path / "run"),
        max_steps=3,
        batch_size=2,
        tiny_hidden_size=64,
        tiny_num_layers=2,
        latent=dict(LATENT),
        progress_bar=False,
        tensorboard=False,
    )

    class Spy:
        def on_step_end(self, step, record, model):
            steps.append(step)

    with pytest.raises(PreflightError) as err:
        train(cfg, callbacks=[Spy()])
    assert err.value.report.results[0].passed is False
    assert "1. every slot inside a segment is latent_token_id" in str(err.value)
    assert steps == []
    assert not (tmp_path / "run" / "checkpoints").exists()
