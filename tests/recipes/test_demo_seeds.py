"""The demo's bars (one rule, halting included) and the demo over seeds: parsing, aggregation, resuming."""

import json
import os
from pathlib import Path

import pytest

from latentvl.cli import main
from latentvl.recipes.demo import seeds as seeds_mod
from latentvl.recipes.demo.bars import BARS, bar_metrics, check_bars
from latentvl.recipes.demo.recipe import default_settings, load_demo_settings, train_speed
from latentvl.recipes.demo.report import ARMS
from latentvl.recipes.demo.seeds import aggregate, parse_seeds, run_seeds, seeds_markdown, spread

BARS_DEFAULT = default_settings()["demo"]["bars"]


def _report(seed: int, a: float = 0.9, c: float = 0.88, base: float = 0.3, spearman: float | None = 0.8,
            halting_ratio: float = 0.6, c_ratio: float = 0.7) -> dict:
    """A hand-made demo report: stage A at ``a``, stage C at ``c``, the controls at ``base`` (every k)."""
    acc = {arm: base for arm in ARMS}
    acc.update(stage_a=a, stage_c=c)
    results = {arm: {"accuracy": acc[arm], "accuracy_by_difficulty": {"4": {"n": 10, "accuracy": acc[arm]}},
                     "used_ratio": None} for arm in ARMS}
    results["stage_a"].update(causal={"mask": {"accuracy": 0.2}}, implant={"follow_rate": 0.7}, used_ratio=1.0)
    results["stage_c"]["used_ratio"] = c_ratio
    report = {"results": results, "hardest_difficulty": "4", "bars": dict(BARS_DEFAULT),
              "stage_c_halting": {"learned": {"spearman_used_difficulty": spearman, "used_ratio": halting_ratio}},
              "settings": {"demo": {"seed": seed}}, "timings_s": {"total": 60.0}}
    report["bar_metrics"] = bar_metrics(report)
    report["checks"] = check_bars(report["bar_metrics"], report["bars"])
    report["all_bars_met"] = all(report["checks"].values())
    return report


# ------------------------------------------------------------------------------------------------ bars
def test_the_shipped_bars_include_halting_and_every_bar_has_its_value():
    assert BARS_DEFAULT["min_c_spearman"] == 0.6 and BARS_DEFAULT["max_c_halting_used_ratio"] == 0.8
    assert {bar.key for bar in BARS} == set(BARS_DEFAULT)
    assert len({bar.check for bar in BARS}) == len({bar.metric for bar in BARS}) == len(BARS)


def test_a_report_that_meets_everything_meets_everything():
    r = _report(0)
    assert r["all_bars_met"], r["checks"]


@pytest.mark.parametrize("kwargs, missed", [
    ({"spearman": 0.59}, "stage_c_halting_follows_difficulty"),
    ({"spearman": None}, "stage_c_halting_follows_difficulty"),  # halting never measured: not met
    ({"halting_ratio": 0.81}, "stage_c_halting_saves_latents"),
    ({"c_ratio": 1.0}, "stage_c_used_ratio_below_1"),  # strictly below
    ({"c": 0.84}, "stage_c_within_5_points_of_a"),
    ({"base": 0.65}, "stage_a_over_no_latents_at_hardest"),
])
def test_each_bar_misses_alone(kwargs, missed):
    r = _report(0, **kwargs)
    assert [name for name, ok in r["checks"].items() if not ok] == [missed]
    assert r["all_bars_met"] is False


def test_bars_at_their_value_are_met_despite_floating_point():
    r = _report(0, a=0.9, c=0.85, spearman=0.6, halting_ratio=0.8)  # 0.9 - 0.85 > 0.05 in floating point
    assert r["checks"]["stage_c_within_5_points_of_a"]
    assert r["checks"]["stage_c_halting_follows_difficulty"] and r["checks"]["stage_c_halting_saves_latents"]


def test_a_config_file_can_move_a_halting_bar(tmp_path):
    custom = tmp_path / "d.yaml"
    custom.write_text("demo:\n  bars:\n    min_c_spearman: 0.9\n")
    bars = load_demo_settings(custom)["demo"]["bars"]
    assert bars["min_c_spearman"] == 0.9 and bars["max_c_halting_used_ratio"] == 0.8
    assert not check_bars(_report(0)["bar_metrics"], bars)["stage_c_halting_follows_difficulty"]


def test_train_speed_reads_the_trainers_step_times():
    rows = [{"step": i + 1, "step_time": 0.25} for i in range(8)]
    speed = train_speed({"stage_a": rows, "pause": [{"step": 1}]}, {"stage_a": 4.0, "pause": 0.0})
    assert speed["stage_a"] == {"steps": 8, "steps_per_s": 4.0, "wall_s": 4.0, "wall_steps_per_s": 2.0}
    assert speed["pause"] == {"steps": 1, "steps_per_s": None, "wall_s": 0.0, "wall_steps_per_s": None}


# ----------------------------------------------------------------------------------------------- seeds
@pytest.mark.parametrize("text, seeds", [("0-4", [0, 1, 2, 3, 4]), ("0,3,7", [0, 3, 7]), ("0-2,9", [0, 1, 2, 9]),
                                         ("5", [5]), ("2,2,1-2", [2, 1]), (" 1 , 3 ", [1, 3])])
def test_parse_seeds(text, seeds):
    assert parse_seeds(text) == seeds


@pytest.mark.parametrize("text", ["", "a", "4-2", "1,,2", "-1", "1-", "0-x"])
def test_parse_seeds_refuses(text):
    with pytest.raises(ValueError, match="--seeds"):
        parse_seeds(text)


def test_spread_mean_std_and_worst():
    s = spread({0: 0.8, 1: 0.6, 2: 1.0})
    assert s["n"] == 3 and s["mean"] == pytest.approx(0.8) and s["std"] == pytest.approx(0.2)
    assert (s["worst_seed"], s["worst"]) == (1, 0.6)
    low = spread({0: 0.8, 1: 0.6, 2: 1.0}, higher_is_better=False)
    assert (low["worst_seed"], low["worst"]) == (2, 1.0)
    assert spread({3: 0.5})["std"] is None and spread({3: 0.5})["mean"] == 0.5
    unmeasured = spread({0: 0.9, 4: None, 5: 0.1})
    assert (unmeasured["worst_seed"], unmeasured["worst"], unmeasured["n"]) == (4, None, 2)
    assert spread({}) == {"n": 0, "mean": None, "std": None, "worst_seed": None, "worst": None}


def test_aggregate_names_the_worst_seed_per_arm_and_per_bar():
    reports = {0: _report(0, a=0.9, spearman=0.8), 3: _report(3, a=0.7, c=0.68, spearman=0.5, halting_ratio=0.9),
               7: _report(7, a=0.8, c=0.8, spearman=0.7, halting_ratio=0.5)}
    agg = aggregate(reports)
    assert agg["seeds"] == [0, 3, 7] and agg["all_seeds_met"] is False and agg["seeds_incomplete"] == []
    a = agg["arms"]["stage_a"]["accuracy"]
    assert a["mean"] == pytest.approx(0.8) and a["std"] == pytest.approx(0.1) and a["worst_seed"] == 3
    rho = agg["bars"]["stage_c_spearman_used_difficulty"]
    assert rho["mean"] == pytest.approx(2.0 / 3) and (rho["worst_seed"], rho["worst"]) == (3, 0.5)
    assert rho["bar"] == 0.6 and rho["seeds_missing"] == [3]
    ratio = agg["bars"]["stage_c_halting_used_ratio"]  # lower is better: the worst seed has the highest
    assert (ratio["worst_seed"], ratio["worst"]) == (3, 0.9) and ratio["seeds_missing"] == [3]
    drop = agg["bars"]["stage_c_accuracy_drop"]
    assert drop["worst_seed"] in (0, 3) and drop["seeds_missing"] == []
    assert [r["all_bars_met"] for r in agg["rows"]] == [True, False, True]
    md = seeds_markdown(agg)
    assert "2 of 3 meet every bar" in md and "| stage_c_spearman_used_difficulty | >= 0.6 |" in md
    assert "| stage_c_used_ratio | < 1.0 |" in md
    json.dumps(agg)  # seeds.json


def test_aggregate_counts_a_seed_without_a_report_as_missing():
    agg = aggregate({0: _report(0), 1: None}, {1: "RuntimeError: boom"})
    assert agg["all_seeds_met"] is False and agg["seeds_incomplete"] == [1]
    assert agg["rows"][1] == {"seed": 1, "complete": False, "all_bars_met": False, "error": "RuntimeError: boom"}
    assert agg["arms"]["stage_a"]["accuracy"]["n"] == 1
    assert "RuntimeError: boom" in seeds_markdown(agg)
    assert aggregate({0: _report(0)})["all_seeds_met"] is True


def test_a_killed_seeds_run_resumes_without_rerunning_finished_seeds(tmp_path, monkeypatch):
    ran = []

    def fake_run_one(out, settings, seed):
        ran.append((seed, settings["demo"]["seed"]))
        if seed == 2 and len(ran) <= 3:
            raise RuntimeError("killed")
        d = seeds_mod.seed_dir(out, seed)
        d.mkdir(parents=True)
        (d / "report.json").write_text(json.dumps({**_report(seed), "settings": settings}))

    monkeypatch.setattr(seeds_mod, "_run_one", fake_run_one)
    settings = load_demo_settings(None, quick=True)
    first = run_seeds(tmp_path, settings, [0, 1, 2], jobs=1, log=lambda *a: None)
    assert ran == [(0, 0), (1, 1), (2, 2)] and first["all_seeds_met"] is False and first["seeds_incomplete"] == [2]
    on_disk = json.loads((tmp_path / "seeds.json").read_text())
    assert on_disk["seeds_incomplete"] == [2] and (tmp_path / "seeds.md").is_file()
    # a half-written report is no report: its seed runs again (from an emptied folder)
    (seeds_mod.seed_dir(tmp_path, 1) / "report.json").write_text('{"checks": {')
    (seeds_mod.seed_dir(tmp_path, 2)).mkdir()
    (seeds_mod.seed_dir(tmp_path, 2) / "leftover").write_text("x")
    again = run_seeds(tmp_path, settings, [0, 1, 2], jobs=1, log=lambda *a: None)
    assert ran[3:] == [(1, 1), (2, 2)] and again["all_seeds_met"] is True
    assert not (seeds_mod.seed_dir(tmp_path, 2) / "leftover").exists()
    # a report of other settings (another seed, other steps) is not reused; threads and progress bars aside
    report_0 = seeds_mod.seed_dir(tmp_path, 0) / "report.json"
    mine = {**settings, "demo": {**settings["demo"], "seed": 0}}
    assert seeds_mod.completed_report(report_0, mine) is not None
    assert seeds_mod.completed_report(report_0, {**mine, "demo": {**mine["demo"], "seed": 5}}) is None
    assert seeds_mod.completed_report(report_0, {**mine, "demo": {**mine["demo"], "steps_a": 99}}) is None
    assert seeds_mod.completed_report(report_0, {**mine, "train": {**mine["train"], "num_threads": 1,
                                                                   "progress_bar": False}}) is not None
    run_seeds(tmp_path, {**settings, "demo": {**settings["demo"], "steps_c": 1}}, [0], jobs=1, log=lambda *a: None)
    assert ran[5:] == [(0, 0)]


def test_seeds_and_seed_exclude_each_other_and_jobs_needs_seeds(capsys):
    assert main(["demo", "--seeds", "0-1", "--seed", "3"]) == 2
    assert main(["demo", "--jobs", "2"]) == 2
    assert main(["demo", "--seeds", "3-1"]) == 2
    assert "--seeds" in capsys.readouterr().err


@pytest.mark.slow
def test_demo_over_two_seeds_in_two_processes(tmp_path, capsys):
    """Two tiny demos, two at a time: one folder each, the seeds report, exit 1 on a missed bar, and a
    second start runs nothing again."""
    config = tmp_path / "tiny.yaml"
    config.write_text("demo:\n  n: 60\n  steps_a: 3\n  steps_c: 2\n  probe_records: 16\n"
                      "  bars:\n    implant_follow: 1.5\n")  # a bar no seed can meet
    out = tmp_path / "seeds"
    args = ["demo", "--config", str(config), "--seeds", "0,1", "--jobs", "2", "--out", str(out), "--no-progress"]
    assert main(args) == 1
    printed = capsys.readouterr().out
    assert f"seeds report: {out / 'seeds.md'}" in printed and "MISS seed 1" in printed
    report = json.loads((out / "seeds.json").read_text())
    assert report["seeds"] == [0, 1] and report["seeds_incomplete"] == [] and report["all_seeds_met"] is False
    assert report["bars"]["stage_a_implant_follow_rate"]["seeds_missing"] == [0, 1]
    for seed in (0, 1):
        one = json.loads((out / f"seed_{seed}" / "report.json").read_text())
        assert one["settings"]["demo"]["seed"] == seed and one["settings"]["train"]["num_threads"] == 1
        assert one["steps"]["stage_a"] == 3
    assert report["arms"]["stage_a"]["accuracy"]["n"] == 2
    assert "# latentvl demo over seeds" in (out / "seeds.md").read_text()
    before = {s: os.stat(out / f"seed_{s}" / "report.json").st_mtime_ns for s in (0, 1)}
    assert main(args) == 1  # resumed: both seeds complete, none run again
    assert "complete report.json found" in capsys.readouterr().out
    assert {s: os.stat(out / f"seed_{s}" / "report.json").st_mtime_ns for s in (0, 1)} == before


def test_seed_folders_are_inside_the_output_folder():
    assert seeds_mod.seed_dir("runs/x", 3) == Path("runs/x/seed_3")


def test_exit_status_is_1_on_a_missed_bar_except_under_quick():
    from latentvl.commands.demo import exit_status

    assert (exit_status(True, False), exit_status(False, False), exit_status(False, True)) == (0, 1, 0)
