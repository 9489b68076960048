"""Choosing the stop threshold on held-out records: the rule, the grid evaluation, the command and the trainer."""

import json

import pytest
import torch
from helpers import talking_tiny_model
from hypothesis import example, given, settings
from hypothesis import strategies as st

from latentvl import LatentCollator, build_tiny_model, set_latent_fields
from latentvl.cli import main
from latentvl.data.records import load_records
from latentvl.data.tasks.writer import make_relay_bands
from latentvl.errors import LatentConfigError, TrainConfigError
from latentvl.evaluation.calibration import (
    TOLERANCE_SLACK,
    calibrate_threshold,
    calibration_markdown,
    choose_threshold,
    write_model_threshold,
)
from latentvl.evaluation.teacher_forced import evaluate_records
from latentvl.model.loading import load_latent_model, save_latent_checkpoint
from latentvl.training.config import TrainConfig
from latentvl.training.trainer import train

STAGE_C = {"latent_mode_stage": "C", "latent_stop_loss_weight": 1.0, "latent_cost_weight": 1e-3}
BUDGETS = {"latent_budget_alpha": 1.0, "latent_budget_gamma": 1.0, "latent_budget_max": 4}


def _rows(*triples):
    return [{"threshold": t, "accuracy": a, "used_ratio": u} for t, a, u in triples]


# ------------------------------------------------------------------------------------ the rule
def test_cheapest_threshold_within_tolerance_of_the_best():
    rows = _rows((0.3, 0.80, 0.40), (0.5, 0.95, 0.55), (0.7, 0.96, 0.70), (0.9, 0.96, 1.0))
    got = choose_threshold(rows, tolerance=0.01, used_slack=0.0)
    assert got == {"threshold": 0.5, "accuracy": 0.95, "used_ratio": 0.55, "best_accuracy": 0.96,
                   "within_tolerance": True}
    assert choose_threshold(rows, tolerance=0.0, used_slack=0.0)["threshold"] == 0.7  # 0.9 is as accurate, dearer
    assert choose_threshold(rows, tolerance=0.2, used_slack=0.0)["threshold"] == 0.3


def test_ties_go_to_the_more_accurate_then_the_higher_threshold():
    rows = _rows((0.3, 0.90, 0.5), (0.4, 0.91, 0.5), (0.6, 0.91, 0.5), (0.8, 0.91, 0.9))
    assert choose_threshold(rows, tolerance=0.05, used_slack=0.0)["threshold"] == 0.6
    rows = _rows((0.3, 0.5, 1.0), (0.6, 0.5, 1.0))  # a head that never halts: the higher threshold
    assert choose_threshold(rows, used_slack=0.0)["threshold"] == 0.6


def test_a_used_ratio_within_the_slack_is_a_tie():
    """A validation curve flat from 0.6 to 0.9 (one held-out demo seed's): the lowest used/budget alone sits at
    the edge where accuracy starts to fall; within a slack of 0.05 the most accurate, then the highest, wins."""
    rows = _rows((0.55, 0.921, 0.581), (0.6, 0.954, 0.594), (0.7, 0.954, 0.606), (0.75, 0.958, 0.617),
                 (0.9, 0.958, 0.628), (0.95, 0.954, 0.651))
    assert choose_threshold(rows, 0.01, reference=0.954, used_slack=0.0)["threshold"] == 0.6
    assert choose_threshold(rows, 0.01, reference=0.954)["threshold"] == 0.9  # the default slack, 0.05
    assert choose_threshold(rows, 0.01, reference=0.954, used_slack=0.015)["threshold"] == 0.7
    assert choose_threshold(rows, 0.01, reference=0.954, used_slack=1.0)["threshold"] == 0.9  # more accurate


def test_rule_refuses_bad_input():
    with pytest.raises(ValueError, match="no thresholds"):
        choose_threshold([])
    with pytest.raises(ValueError, match="tolerance"):
        choose_threshold(_rows((0.5, 1.0, 0.5)), tolerance=-0.1)
    with pytest.raises(ValueError, match="used_slack"):
        choose_threshold(_rows((0.5, 1.0, 0.5)), used_slack=-0.1)
    with pytest.raises(ValueError, match="used_slack"):
        choose_threshold(_rows((0.5, 1.0, 0.5)), used_slack=float("nan"))


unit = st.floats(0.0, 1.0, allow_nan=False)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(unit, unit, unit), min_size=1, max_size=12, unique_by=lambda r: r[0]),
       st.floats(0.0, 0.3), st.none() | unit, st.sampled_from([0.0, 0.01, 0.05, 0.2]))
@example([(0.0, 0.0, 0.0), (1.0, 0.0, 7.3e-92)], 0.0, None, 0.0)  # used/budget equal within float rounding
def test_choice_is_the_cheapest_row_within_tolerance(triples, tolerance, reference, used_slack):
    rows = _rows(*triples)
    got = choose_threshold(rows, tolerance, reference, used_slack=used_slack)
    best = max([r["accuracy"] for r in rows] + ([reference] if reference is not None else []))
    eligible = [r for r in rows if r["accuracy"] >= best - tolerance - TOLERANCE_SLACK]
    assert got["best_accuracy"] == best
    assert got["within_tolerance"] == bool(eligible)
    assert any(r["threshold"] == got["threshold"] and r["accuracy"] == got["accuracy"] for r in rows)
    if eligible:
        lowest = min(r["used_ratio"] for r in eligible)
        tied = [r for r in eligible if r["used_ratio"] <= lowest + used_slack + TOLERANCE_SLACK]
        assert got["accuracy"] >= best - tolerance - TOLERANCE_SLACK
        assert any(r["threshold"] == got["threshold"] for r in tied)  # within the slack of the cheapest
        assert not any((r["accuracy"], r["threshold"]) > (got["accuracy"], got["threshold"]) for r in tied)
        if used_slack == 0.0:  # used/budget within float rounding (TOLERANCE_SLACK) of the lowest is the lowest
            assert got["used_ratio"] <= lowest + TOLERANCE_SLACK
    else:
        assert got["accuracy"] == max(r["accuracy"] for r in rows)


# ------------------------------------------------------------------------------------ on a model
@pytest.fixture(scope="module")
def relay(tmp_path_factory):
    out = tmp_path_factory.mktemp("calibration_data")
    make_relay_bands(40, 0, out, rule="fixed", test_fraction=0.2)  # one CoT strip of 4 tokens per record
    return out


def _stage_c_model():
    model, processor = talking_tiny_model()
    set_latent_fields(model.config, **BUDGETS, **STAGE_C, latent_stop_threshold=0.5)
    return model, processor


def test_every_threshold_is_evaluated_as_evaluate_records_would(relay):
    records, _ = load_records(relay / "test.jsonl")
    model, processor = _stage_c_model()
    collator = LatentCollator(processor, model.config)
    grid = [1.0, 0.0, 0.45, 0.5, 0.55]
    result = calibrate_threshold(model, collator, records, grid=grid, tolerance=0.0, batch_size=4)
    assert result["grid"] == sorted(grid) == [r["threshold"] for r in result["rows"]]
    for row in result["rows"]:
        ref = evaluate_records(model, collator, records, threshold=row["threshold"], batch_size=4)
        assert (row["accuracy"], row["used_ratio"]) == (ref["accuracy"], ref["used_ratio"])
    used = [r["used_ratio"] for r in result["rows"]]
    assert used[0] == pytest.approx(0.25) and used[-1] == 1.0  # threshold 0 stops after the first latent
    assert used == sorted(used) and len(set(used)) > 2  # one segment each: a higher threshold never stops sooner
    assert result["full_budget"]["used_ratio"] == 1.0 and result["n"] == len(records)
    choice = choose_threshold(result["rows"], 0.0, reference=result["full_budget"]["accuracy"])
    assert {k: result[k] for k in choice} == choice
    # the model comes back as it was
    assert model.config.latent_mode_stage == "C" and model.config.latent_stop_threshold == 0.5
    assert "**chosen**" in calibration_markdown(result) and "full budget" in calibration_markdown(result)


def test_a_stage_a_model_and_a_bad_grid_are_refused(relay):
    records, _ = load_records(relay / "test.jsonl")
    model, processor = build_tiny_model(seed=0)
    collator = LatentCollator(processor, model.config)
    with pytest.raises(LatentConfigError, match="stage-C model"):
        calibrate_threshold(model, collator, records)
    set_latent_fields(model.config, **STAGE_C)
    with pytest.raises(ValueError, match="grid"):
        calibrate_threshold(model, collator, records, grid=[0.5, 1.5])


def test_write_model_threshold_changes_only_the_threshold(tmp_path):
    model, processor = build_tiny_model(seed=0)
    set_latent_fields(model.config, **STAGE_C)
    save_latent_checkpoint(model, processor, tmp_path / "m")
    before = json.loads((tmp_path / "m" / "config.json").read_text())
    write_model_threshold(tmp_path / "m", 0.65)
    after = json.loads((tmp_path / "m" / "config.json").read_text())
    assert after == {**before, "latent_stop_threshold": 0.65} and before["latent_stop_threshold"] != 0.65
    assert sorted(p.name for p in (tmp_path / "m").iterdir() if p.name.startswith(".")) == []  # no temp file
    loaded, _ = load_latent_model(tmp_path / "m")
    assert loaded.config.latent_stop_threshold == 0.65
    with pytest.raises(LatentConfigError, match="config.json"):
        write_model_threshold(tmp_path / "missing", 0.5)


# ------------------------------------------------------------------------------------ the command
def test_command_line(relay, tmp_path, capsys):
    model, processor = _stage_c_model()
    save_latent_checkpoint(model, processor, tmp_path / "stage_c")
    data = str(relay / "val.jsonl") if (relay / "val.jsonl").stat().st_size else str(relay / "test.jsonl")
    args = ["calibrate", "--model", str(tmp_path / "stage_c"), "--data", data, "--batch-size", "4"]
    assert main([*args, "--grid", "0,0.5,1", "--tolerance", "0", "--out", str(tmp_path / "cal.json"), "--write"]) == 0
    printed = capsys.readouterr().out
    result = json.loads((tmp_path / "cal.json").read_text())
    assert [r["threshold"] for r in result["rows"]] == [0.0, 0.5, 1.0]
    assert "| threshold | accuracy | used/budget |" in printed and "written to" in printed
    saved = json.loads((tmp_path / "stage_c" / "config.json").read_text())
    assert saved["latent_stop_threshold"] == result["threshold"]
    # without --write the model stays as it is
    write_model_threshold(tmp_path / "stage_c", 0.123)
    assert main([*args, "--grid", "0.5"]) == 0
    assert json.loads((tmp_path / "stage_c" / "config.json").read_text())["latent_stop_threshold"] == 0.123
    capsys.readouterr()
    # a stage-A model, a negative tolerance and a bad grid are refused with the reason
    set_latent_fields(model.config, latent_mode_stage="A", latent_stop_loss_weight=0.0, latent_cost_weight=0.0)
    save_latent_checkpoint(model, processor, tmp_path / "stage_a")
    assert main(["calibrate", "--model", str(tmp_path / "stage_a"), "--data", data]) == 2
    assert "stage-C model" in capsys.readouterr().err
    assert main([*args, "--tolerance", "-1"]) == 2
    assert "--tolerance" in capsys.readouterr().err
    assert main([*args, "--used-slack", "-0.1"]) == 2
    assert "--used-slack" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*args, "--grid", "0.5,2"])
    assert "--grid" in capsys.readouterr().err


# ------------------------------------------------------------------------------------ the trainer
def _train_cfg(relay, out, **kw):
    base = dict(train_data=str(relay / "train.jsonl"), eval_data=str(relay / "test.jsonl"), output_dir=str(out),
                batch_size=4, tiny_hidden_size=64, tiny_num_layers=2, max_steps=2, stage="C",
                latent={**BUDGETS, "latent_stop_threshold": 0.6}, progress_bar=False, tensorboard=False,
                num_threads=1, seed=0, calibrate_stop_threshold=True, calibration_tolerance=0.0)
    base.update(kw)
    return TrainConfig(**base).validate()


def test_trainer_calibrates_at_the_end_and_writes_final(relay, tmp_path):
    res = train(_train_cfg(relay, tmp_path / "run"))
    cal = json.loads((tmp_path / "run" / "calibration.json").read_text())
    assert cal == json.loads(json.dumps(res.calibration))
    assert cal["n"] == len(load_records(relay / "test.jsonl")[0]) and len(cal["rows"]) == 14
    final = json.loads((res.final_model / "config.json").read_text())
    assert final["latent_stop_threshold"] == cal["threshold"]
    # the checkpoint keeps the training's threshold (a resumed run continues the same schedule)
    saved = json.loads((res.checkpoint / "model" / "config.json").read_text())
    assert saved["latent_stop_threshold"] == 0.6
    # the calibrated model answers as calibration measured
    model, processor = load_latent_model(res.final_model)
    torch.set_num_threads(1)
    again = evaluate_records(model, LatentCollator(processor, model.config), load_records(relay / "test.jsonl")[0],
                             batch_size=4)
    assert (again["accuracy"], again["used_ratio"]) == (cal["accuracy"], cal["used_ratio"])


@pytest.mark.parametrize("change, why", [({"stage": "A"}, "stage C"), ({"eval_data": None}, "eval_data"),
                                         ({"calibration_tolerance": -0.5}, ">= 0"),
                                         ({"calibration_used_slack": -0.5}, "calibration_used_slack")])
def test_trainer_option_is_validated(relay, tmp_path, change, why):
    with pytest.raises(TrainConfigError, match=why):
        _train_cfg(relay, tmp_path, **change)
