"""Halting against difficulty: Spearman, the per-difficulty table, the full-budget evaluation switch."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from latentvl import LatentSettings, build_tiny_model, set_latent_fields
from latentvl.evaluation.halting import full_budget, halting_summary, read_difficulties, spearman
from latentvl.reports.halting import halting_markdown


def test_spearman_hand_values():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # ties take mean ranks: x ranks [1.5, 1.5, 3, 4], y ranks [1, 2, 3, 4]
    assert spearman([1, 1, 2, 3], [1, 2, 3, 4]) == pytest.approx(0.9486832980505138)
    assert spearman([2, 2, 2], [1, 2, 3]) is None  # a constant side has no rank correlation
    with pytest.raises(ValueError, match="3 x values but 2"):
        spearman([1, 2, 3], [1, 2])


@given(st.lists(st.tuples(st.integers(0, 5), st.integers(0, 5)), min_size=2, max_size=30))
def test_spearman_is_bounded_and_monotone_invariant(pairs):
    x, y = [p[0] for p in pairs], [p[1] for p in pairs]
    r = spearman(x, y)
    if r is not None:
        assert -1 - 1e-9 <= r <= 1 + 1e-9
        assert spearman([v ** 3 + 7 for v in x], y) == pytest.approx(r)


def test_summary_table():
    samples = [
        {"id": "a", "correct": True, "budgets": [4], "used_lens": [1]},
        {"id": "b", "correct": False, "budgets": [4], "used_lens": [2]},
        {"id": "c", "correct": True, "budgets": [4], "used_lens": [4]},
        {"id": "d", "correct": True, "budgets": [4], "used_lens": [3]},
        {"id": "e", "correct": True, "budgets": [4], "used_lens": [4]},  # no difficulty: counted, not rated
    ]
    s = halting_summary(samples, {"a": 1, "b": 1, "c": 3, "d": 3})
    assert s["n"] == 5 and s["accuracy"] == pytest.approx(0.8)
    assert s["used_ratio"] == pytest.approx(14 / 20)
    assert s["by_difficulty"][1] == {"n": 2, "mean_used": 1.5, "mean_budget": 4.0, "used_ratio": 3 / 8,
                                     "accuracy": 0.5}
    assert s["by_difficulty"][3]["mean_used"] == 3.5
    assert s["spearman_used_difficulty"] == pytest.approx(spearman([1, 2, 4, 3], [1, 1, 3, 3]))
    md = halting_markdown("x", {"learned": s, "full_budget": s, "accuracy_drop": 0.0})
    assert "| 1 | 2 | 1.50 | 4.00 | 0.375 | 0.500 | 0.500 |" in md


def test_read_difficulties(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text(json.dumps({"id": "a", "difficulty": 2}) + "\n" + json.dumps({"id": "b"}) + "\n")
    assert read_difficulties(path) == {"a": 2}
    path.write_text(json.dumps({"id": "c", "difficulty": "hard"}) + "\n")
    with pytest.raises(ValueError, match="id 'c'.*'difficulty' must be a number"):
        read_difficulties(path)


def test_full_budget_switch_restores_the_stage():
    model, _ = build_tiny_model(seed=0)
    set_latent_fields(model.config, latent_mode_stage="C", latent_stop_loss_weight=1.0, latent_cost_weight=1e-3,
                      latent_stop_target_mode="answer")
    with full_budget(model):
        assert model.config.latent_mode_stage == "A"
        assert LatentSettings.from_config(model.config).loss_weights() == (0, 0)
    assert model.config.latent_mode_stage == "C" and model.config.latent_stop_loss_weight == 1.0
    assert model.config.latent_stop_target_mode == "answer"


def test_evaluate_halting_compares_learned_halting_with_full_budget(tmp_path):
    from latentvl import LatentCollator
    from latentvl.data.records import load_records
    from latentvl.data.tasks.writer import make_relay_bands
    from latentvl.evaluation.halting import evaluate_halting

    make_relay_bands(40, 0, tmp_path, rule="fixed", test_fraction=0.2)
    records, _ = load_records(tmp_path / "test.jsonl")
    model, processor = build_tiny_model(seed=0)
    set_latent_fields(model.config, latent_budget_alpha=1.0, latent_budget_gamma=1.0, latent_budget_max=4,
                      latent_mode_stage="C", latent_stop_loss_weight=1.0, latent_cost_weight=1e-3)
    result = evaluate_halting(model, LatentCollator(processor, model.config), records,
                              read_difficulties(tmp_path / "test.jsonl"), threshold=0.0, batch_size=4)
    learned, full = result["learned"], result["full_budget"]
    assert learned["n"] == full["n"] == len(records) == 8
    assert learned["used_ratio"] == pytest.approx(0.25)  # threshold 0: every segment stops after its first latent
    assert full["used_ratio"] == 1.0
    assert sorted(learned["by_difficulty"]) == [1, 2, 3, 4]
    assert learned["spearman_used_difficulty"] is None  # constant used length
    assert result["accuracy_drop"] == pytest.approx(full["accuracy"] - learned["accuracy"])
    assert model.config.latent_mode_stage == "C"


def test_command_line(tmp_path, capsys):
    from latentvl.cli import main
    from latentvl.data.tasks.writer import make_relay_bands
    from latentvl.model.loading import save_latent_checkpoint

    make_relay_bands(20, 0, tmp_path / "data", rule="fixed", test_fraction=0.2)
    model, processor = build_tiny_model(seed=0)
    set_latent_fields(model.config, latent_budget_alpha=1.0, latent_budget_gamma=1.0, latent_budget_max=4)
    save_latent_checkpoint(model, processor, tmp_path / "stage_a")
    args = ["halting", "--data", str(tmp_path / "data" / "test.jsonl"), "--threshold", "0"]
    assert main([*args, "--model", str(tmp_path / "stage_a")]) == 2  # a stage-A model has no halting
    assert "stage-A model" in capsys.readouterr().err
    set_latent_fields(model.config, latent_mode_stage="C", latent_stop_loss_weight=1.0, latent_cost_weight=1e-3)
    save_latent_checkpoint(model, processor, tmp_path / "stage_c")
    assert main([*args, "--model", str(tmp_path / "stage_c"), "--out", str(tmp_path / "out")]) == 0
    assert "Spearman(used, difficulty)" in capsys.readouterr().out
    saved = json.loads((tmp_path / "out" / "halting.json").read_text())
    assert saved["learned"]["used_ratio"] == pytest.approx(0.25) and saved["full_budget"]["used_ratio"] == 1.0
    assert (tmp_path / "out" / "used_by_difficulty.png").stat().st_size > 0
    no_difficulty = tmp_path / "data" / "plain.jsonl"
    no_difficulty.write_text((tmp_path / "data" / "test.jsonl").read_text().replace('"difficulty"', '"level"'))
    assert main(["halting", "--data", str(no_difficulty), "--model", str(tmp_path / "stage_c")]) == 2
    assert "carries a numeric 'difficulty'" in capsys.readouterr().err
