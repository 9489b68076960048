"""The demo end to end at reduced size (--quick): data, five arms, evaluation with instruments, report files."""

import json
from pathlib import Path

import pytest
import yaml
from PIL import Image

from latentvl.cli import main
from latentvl.config import LatentSettings
from latentvl.errors import InputError
from latentvl.evaluation.calibration import DEFAULT_GRID
from latentvl.recipes.demo.recipe import default_settings, load_demo_settings
from latentvl.recipes.demo.report import ARMS, alignment_table, difficulty_table, results_table
from latentvl.training.checkpoint import LORA_FILE
from latentvl.training.metrics import read_metrics

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_demo_quick_writes_the_report(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert f"report: {out / 'report.md'}" in printed
    md = (out / "report.md").read_text()
    report = json.loads((out / "report.json").read_text())
    assert report["task"] == "a5"
    assert report["results"]["stage_a"]["instrument_unit"] == "latent"  # a5 records give one state per latent
    # the report leads with accuracy against difficulty for every arm, with the chance line
    assert md.index("## Accuracy against difficulty") < md.index("## Arms") < md.index("## Bars")
    assert difficulty_table(report) in md and "chance" in difficulty_table(report)
    # the ratio of totals, under its own label (not "mean used/budget", which is the mean of per-image ratios)
    assert "| model | train steps | test accuracy | used/budget, all latents |" in md
    assert report["results"]["stage_a"]["used_ratio"] == report["results"]["stage_a"]["used"] / \
        report["results"]["stage_a"]["budget"]
    assert results_table(report) in md and alignment_table(report) in md
    assert set(report["results"]) == set(ARMS)
    assert report["steps"] == {"stage_a": 4, "stage_c": 3, "baseline_no_latents": 7, "pause": 7,
                               "latents_no_align": 7}
    assert isinstance(report["test_chance_accuracy"], float)
    n_test = report["splits"]["test"]
    for arm in ARMS:
        res = report["results"][arm]
        assert res["n"] == n_test > 0 and 0.0 <= res["accuracy"] <= 1.0
        by_k = res["accuracy_by_difficulty"]
        assert by_k and sum(v["n"] for v in by_k.values()) == n_test
    assert report["hardest_difficulty"] == max(report["results"]["stage_a"]["accuracy_by_difficulty"], key=int)
    assert report["results"]["stage_a"]["used_ratio"] == 1.0  # stage A uses every latent
    assert report["results"]["baseline_no_latents"]["budget"] == 0
    assert report["results"]["pause"]["budget"] == report["results"]["stage_a"]["budget"]  # the same slots
    a = report["results"]["stage_a"]
    assert 0.0 <= a["causal"]["mask"]["accuracy"] <= 1.0
    assert a["implant"]["n"] > 0 and 0.0 <= a["implant"]["follow_rate"] <= 1.0
    assert a["truncation"] and a["probe"]
    assert set(report["checks"]) == {
        "stage_a_over_no_latents_at_hardest", "stage_a_over_pause_at_hardest", "masking_latents_costs_stage_a",
        "implant_followed", "stage_c_within_5_points_of_a", "stage_c_used_ratio_below_1",
        "stage_c_halting_follows_difficulty", "stage_c_halting_saves_latents"}
    assert report["all_bars_met"] == all(report["checks"].values())
    # the halting bars read stage C's halting on the test split at its chosen threshold, and report.md shows them
    learned = report["stage_c_halting"]["learned"]
    assert report["bar_metrics"]["stage_c_spearman_used_difficulty"] == learned["spearman_used_difficulty"]
    assert report["bar_metrics"]["stage_c_halting_used_ratio"] == learned["used_ratio"]
    assert "Spearman(latents used, difficulty) >= 0.6" in md and "used/budget <= 0.8 on the test split" in md
    # the wall time by phase, and each arm's training speed from the trainer's per-step metrics
    t = report["timings_s"]
    phases = ["data", "train", "calibrate", "evaluate_stage_c_halting", "evaluate", "report"]
    assert set(t) == {*phases, "total"}
    assert all(t[k] >= 0 for k in phases) and sum(t[k] for k in phases) <= t["total"] + 0.5
    assert set(report["train_speed"]) == set(ARMS)
    for arm, speed in report["train_speed"].items():
        assert speed["steps"] == report["steps"][arm] and speed["steps_per_s"] > 0 and speed["wall_steps_per_s"] > 0
        assert 0 < speed["wall_s"] <= t["train"] + 0.5
    # the shipped settings train two lanes at once, one thread each
    assert report["arm_workers"] == {"workers": 2, "threads": 1}
    assert "| phase | seconds | share of the total |" in md
    assert "| arm | steps | seconds | steps/s | steps/s, wall |" in md
    assert "The arms trained 2 at a time, 1 thread(s) each" in md
    for key in ("stage_a", "stage_c"):  # every test record lists its CoT images: each segment is measured
        al = report["results"][key]["alignment"]
        used = sum(sum(x["used_lens"]) for x in report["per_sample"][key])
        assert al["n_latents"] == used > 0 and -1 <= al["mean_cosine"] <= 1
    assert all(s["ok"] for runs in report["preflight"].values() for s in runs)
    # stage C's stop threshold is chosen on the val split, written into its final model and used on test
    cal = report["calibration"]
    assert cal["n"] == report["splits"]["val"] > 0 and [r["threshold"] for r in cal["rows"]] == list(DEFAULT_GRID)
    assert report["stage_c_threshold"] == cal["threshold"] and cal["within_tolerance"] in (True, False)
    shipped = default_settings()
    assert cal["tolerance"] == shipped["demo"]["calibration_tolerance"]
    assert cal["used_slack"] == shipped["demo"]["calibration_used_slack"] > 0
    final = json.loads((out / "stage_c" / "phase0" / "final" / "config.json").read_text())
    assert final["latent_stop_threshold"] == cal["threshold"]
    # stage C alone trains without alignment (a5's stage_c_latent, design D19); stage A aligns
    stage_a_final = json.loads((out / "stage_a" / "phase0" / "final" / "config.json").read_text())
    steps_a = read_metrics(out / "stage_a" / "phase0", kind="train")
    steps_c = read_metrics(out / "stage_c" / "phase0", kind="train")
    assert final["latent_align_weight"] == 0.0 and stage_a_final["latent_align_weight"] == 1.0
    assert all(r["align"] == 0.0 for r in steps_c) and any(r["align"] > 0.0 for r in steps_a)
    # ... and keeps the answer CE at full budget (D18), which stage A never computes
    assert final["latent_full_budget_ce_weight"] == 1.0 and stage_a_final["latent_full_budget_ce_weight"] == 0.0
    assert all(r["ce_full"] > 0.0 for r in steps_c) and all(r["ce_full"] == 0.0 for r in steps_a)
    # ... and settles a segment's answer within its own tolerance, where stage A keeps the library's default
    stage_c_latent = shipped["per_task"]["a5"]["stage_c_latent"]
    assert final["latent_stop_target_tolerance"] == stage_c_latent["latent_stop_target_tolerance"]
    assert stage_a_final["latent_stop_target_tolerance"] == LatentSettings().latent_stop_target_tolerance
    # stage A alone cuts its tails only where the dropped cells repeat the kept one (D22)
    assert stage_a_final["latent_tail_dropout_mode"] == "repeat"
    for arm in ("baseline_no_latents", "pause", "latents_no_align"):
        arm_cfg = json.loads((out / arm / "phase0" / "final" / "config.json").read_text())
        assert arm_cfg.get("latent_tail_dropout", 0.0) == 0.0, arm
    # ... and never stops a segment before its own fewest latents (D21), where stage A keeps the library's 1
    assert final["latent_min_used"] == stage_c_latent["latent_min_used"] > 1
    assert stage_a_final["latent_min_used"] == LatentSettings().latent_min_used == 1
    stage_c_used = [u for row in report["per_sample"]["stage_c"] for u in row["used_lens"]]
    assert stage_c_used and min(stage_c_used) >= stage_c_latent["latent_min_used"]
    # the shared rate reaches stage A and every control; stage C alone has its own rates (stage_c_train) and
    # trains LoRA adapters (its checkpoint holds them), where stage A and every control train the whole model
    for arm in ARMS:
        run_cfg = yaml.safe_load((out / arm / "phase0" / "config.yaml").read_text())
        want = shipped["per_task"]["a5"]["stage_c_train"] if arm == "stage_c" else shipped["train"]
        assert run_cfg["lr"] == want["lr"], arm
        assert run_cfg["stop_head_lr_scale"] == want.get("stop_head_lr_scale", 1.0), arm
        assert run_cfg["lora"] is (arm == "stage_c"), arm
        if arm == "stage_c":
            assert run_cfg["lora_r"] == want["lora_r"]
        lora_files = list((out / arm / "phase0" / "checkpoints").glob(f"step-*/{LORA_FILE}"))
        assert bool(lora_files) is (arm == "stage_c"), arm
    assert md.index("## Stage C's stop threshold") < md.index("## Do the answers depend on the latents?")
    assert f"threshold {cal['threshold']:g})" in results_table(report)
    # and its halting against difficulty on the test split, at that threshold and at full budget
    halting = report["stage_c_halting"]
    assert halting["learned"]["n"] == halting["full_budget"]["n"] == n_test
    assert halting["full_budget"]["used_ratio"] == 1.0
    assert sorted(halting["learned"]["by_difficulty"], key=int) == sorted(
        report["results"]["stage_c"]["accuracy_by_difficulty"], key=int)
    assert "## Stage C's halting against difficulty" in md and "Spearman(used, difficulty)" in md
    for png in ("accuracy_vs_difficulty.png", "loss_curves.png", "latents.png"):
        with Image.open(out / png) as im:
            assert im.format == "PNG" and im.size[0] > 500


@pytest.mark.slow
def test_demo_quick_runs_on_qwen3_vl(tmp_path):
    """--backbone qwen3_vl: every arm trains the tiny Qwen3-VL, on a5 images drawn in its 32-px merged tokens."""
    out = tmp_path / "demo_q3"
    assert main(["demo", "--quick", "--backbone", "qwen3_vl", "--out", str(out), "--no-progress"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert set(report["results"]) == set(ARMS)
    meta = json.loads((out / "data" / "meta.json").read_text())
    assert meta["knobs"]["token_px"] == 32
    for arm_dir in ("stage_a", "stage_c", "pause"):
        config = json.loads(next((out / arm_dir).glob("phase*/final/config.json")).read_text())
        assert config["model_type"] == "qwen3_vl"
    a = report["results"]["stage_a"]
    assert a["used_ratio"] == 1.0 and a["budget"] == report["results"]["pause"]["budget"] > 0


def test_backbone_sets_the_a5_token_side_unless_the_file_does(tmp_path):
    assert load_demo_settings(None)["demo"]["data"]["a5"]["token_px"] == 28
    q3 = load_demo_settings(None, backbone="qwen3_vl")
    assert q3["train"]["backbone"] == "qwen3_vl" and q3["demo"]["data"]["a5"]["token_px"] == 32
    cfg = tmp_path / "c.yaml"
    cfg.write_text("train:\n  backbone: qwen3_vl\ndemo:\n  data:\n    a5:\n      token_px: 40\n")
    own = load_demo_settings(cfg)
    assert own["train"]["backbone"] == "qwen3_vl" and own["demo"]["data"]["a5"]["token_px"] == 40


def test_quick_and_full_exclude_each_other_and_full_lengthens():
    full = load_demo_settings(None, full=True)
    assert full["demo"]["steps_a"] == default_settings()["full"]["steps_a"] > default_settings()["demo"]["steps_a"]
    with pytest.raises(ValueError, match="exclude"):
        load_demo_settings(None, quick=True, full=True)


def test_example_config_matches_the_built_in_settings(tmp_path):
    shipped = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
    assert shipped == default_settings()
    # the repository's configs/demo.yaml is the package's file (one home for the demo's defaults)
    package_file = REPO / "src" / "latentvl" / "recipes" / "demo" / "demo.yaml"
    assert (REPO / "configs" / "demo.yaml").read_bytes() == package_file.read_bytes()
    assert 'latentvl = ["recipes/demo/*.yaml"]' in (REPO / "pyproject.toml").read_text()  # shipped as package data
    custom = tmp_path / "d.yaml"
    custom.write_text("demo:\n  steps_a: 7\ntrain:\n  lr: 0.01\n")
    settings = load_demo_settings(custom)
    assert settings["demo"]["steps_a"] == 7 and settings["train"]["lr"] == 0.01
    assert settings["train"]["latent"] == load_demo_settings(None)["train"]["latent"]  # untouched by the file
    quick = load_demo_settings(None, quick=True)
    assert quick["demo"]["steps_a"] == default_settings()["quick"]["steps_a"]


def test_per_task_entry_applies_to_its_task_and_a_config_file_wins(tmp_path):
    a5 = load_demo_settings(None)
    per = default_settings()["per_task"]["a5"]
    assert a5["demo"]["task"] == "a5" and a5["demo"]["steps_a"] == per["steps_a"]
    assert a5["train"]["freeze_vision"] is True and a5["demo"]["curriculum"] == []
    assert a5["train"]["latent"]["latent_budget_gamma"] == per["train"]["latent"]["latent_budget_gamma"]
    assert a5["train"]["lr"] == default_settings()["train"]["lr"]  # what the entry does not name stays
    relay = load_demo_settings(None, task="relay")
    assert relay["demo"]["steps_a"] == default_settings()["demo"]["steps_a"]
    assert relay["demo"]["curriculum"] == [1, 2, 3]
    assert "freeze_vision" not in relay["train"] and "stage_a" not in relay["demo"]
    custom = tmp_path / "d.yaml"
    custom.write_text("demo:\n  steps_a: 7\nper_task:\n  a5:\n    steps_c: 9\n")
    mine = load_demo_settings(custom)
    assert mine["demo"]["steps_a"] == 7 and mine["demo"]["steps_c"] == 9
    assert load_demo_settings(custom, full=True)["demo"]["steps_a"] == default_settings()["full"]["steps_a"]


def test_demo_task_choices_come_from_the_shipped_settings():
    import argparse

    from latentvl.commands.demo import add_arguments
    from latentvl.recipes.demo.recipe import demo_tasks

    assert demo_tasks() == tuple(default_settings()["demo"]["data"]) and {"a5", "relay"} <= set(demo_tasks())
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    for task in demo_tasks():
        assert parser.parse_args(["--task", task]).task == task
    with pytest.raises(SystemExit):
        parser.parse_args(["--task", "no-such-task"])


def test_stage_c_calibration_can_be_switched_off():
    from types import SimpleNamespace

    from latentvl.recipes.demo.recipe import _stage_c_threshold_and_halting

    # nothing to calibrate and no difficulty to measure against: the model is not even loaded
    runs = {"stage_c": SimpleNamespace(checkpoint=Path("/nonexistent"))}
    off = SimpleNamespace(val_records=["r"], test_fields={"a": {}})
    assert _stage_c_threshold_and_halting({"calibrate_threshold": False}, off, runs, 0.7, print) == (None, 0.7, None)
    no_val = SimpleNamespace(val_records=[], test_fields={"a": {"difficulty": True}})  # a bool is no difficulty
    assert _stage_c_threshold_and_halting({}, no_val, runs, 0.6, print) == (None, 0.6, None)


@pytest.mark.slow
def test_arms_trained_at_once_match_arms_trained_in_turn(tmp_path):
    """Two lanes at once, each in its own process with one thread (the shipped arm_workers), train every arm
    exactly as one process does one arm after another with one thread: the same per-step losses and
    gradient norms, bit for bit, and stage C from the stage-A checkpoint of its own run."""
    import copy

    from latentvl.recipes.demo import recipe

    settings = load_demo_settings(None, quick=True)
    settings["train"]["progress_bar"] = False
    data, demo = recipe._make_data(tmp_path, settings["demo"], log=lambda *a: None)
    in_turn, at_once = copy.deepcopy(settings), copy.deepcopy(settings)
    in_turn["train"]["num_threads"], at_once["train"]["num_threads"] = 1, 2
    assert recipe.arm_workers(in_turn) == (1, 1) and recipe.arm_workers(at_once) == (2, 1)
    lines: list[str] = []
    a = recipe._train_arms(in_turn, demo, data, tmp_path / "in_turn", log=lambda *a: None)
    b = recipe._train_arms(at_once, demo, data, tmp_path / "at_once", log=lambda *p: lines.append(" ".join(p)))
    assert list(a.histories) == list(b.histories) == list(b.runs) == list(b.seconds) == list(ARMS)
    assert sorted(ARMS) == sorted(arm for lane in recipe.LANES for arm in lane)
    measured = ("loss", "ce", "align", "stop", "grad_norm", "used", "lr")
    for arm in ARMS:
        assert len(a.histories[arm]) == len(b.histories[arm]) > 0, arm
        for ra, rb in zip(a.histories[arm], b.histories[arm], strict=True):
            assert {k: ra.get(k) for k in measured} == {k: rb.get(k) for k in measured}, (arm, ra["step"])
        assert b.seconds[arm] > 0 and Path(b.runs[arm].checkpoint).is_relative_to(tmp_path / "at_once" / arm)
    assert b.final_threshold == a.final_threshold is not None
    init = yaml.safe_load((tmp_path / "at_once" / "stage_c" / "phase0" / "config.yaml").read_text())["init_from"]
    assert Path(init).is_relative_to(tmp_path / "at_once" / "stage_a")
    assert lines[0].startswith("training the arms 2 at a time, 1 thread(s) each")


@pytest.mark.slow
def test_a_lane_that_fails_stops_the_demo_with_its_error(tmp_path):
    """An error inside a lane's process comes back as itself, and the log names the lane."""
    from latentvl.recipes.demo import recipe

    settings = load_demo_settings(None, quick=True)
    settings["train"]["progress_bar"] = False
    settings["demo"]["stage_c_train"] = {"stop_head_first_steps": -1}
    data, demo = recipe._make_data(tmp_path, settings["demo"], log=lambda *a: None)
    lines: list[str] = []
    with pytest.raises(ValueError, match="stop_head_first_steps"):
        recipe._train_arms(settings, demo, data, tmp_path / "arms", log=lambda *p: lines.append(" ".join(p)))
    assert any(line.startswith("stage_a then stage_c: training failed") for line in lines)


def test_stage_c_is_tried_again_while_it_is_under_stage_a(tmp_path, monkeypatch):
    """A stage-C try more than stage_c_retry_drop under stage A's val accuracy at full budget is followed by one
    with the next seed, up to stage_c_attempts; the first try within the drop is kept, else the best."""
    import types

    from latentvl.recipes.demo import recipe
    from latentvl.recipes.demo.report import stage_c_tries_section

    seen_seeds, seen_latent, accs = [], [], {}

    def fake_arm(settings, demo, phases, train_file, out, arm, init_from=None):
        seen_seeds.append(settings["demo"]["seed"])
        seen_latent.append(demo["stage_c_latent"])
        assert arm == "stage_c" and init_from == "A"
        res = types.SimpleNamespace(checkpoint=out / arm / "ckpt")
        return [res], [{"step": 1}], types.SimpleNamespace(final_threshold=0.9)

    monkeypatch.setattr(recipe, "_train_arm", fake_arm)
    monkeypatch.setattr(recipe, "_val_accuracy_full_budget", lambda ckpt, val, bs: accs[str(ckpt)])
    (tmp_path / "val.jsonl").write_text("")
    settings = load_demo_settings(None)
    settings["demo"]["seed"] = 7
    demo = {**settings["demo"], "stage_c_attempts": 3, "stage_c_retry_drop": 0.02,
            "stage_c_latent": {"latent_min_used": 2, "latent_full_budget_align_weight": 0.0},
            "stage_c_retry_latent": {"latent_full_budget_align_weight": 0.3}}

    def run(a, *tries):
        seen_seeds.clear()
        seen_latent.clear()
        accs.clear()
        accs["A"] = a
        for i, acc in enumerate(tries):
            accs[str((tmp_path if i == 0 else tmp_path / f"stage_c_try{i + 1}") / "stage_c" / "ckpt")] = acc
        res, _, _, att = recipe._train_stage_c(settings, demo, [], tmp_path / "train.jsonl", tmp_path, "A",
                                               log=lambda *p: None)
        return res[-1].checkpoint, att

    ckpt, att = run(1.0, 0.99)  # within the drop: one try
    assert seen_seeds == [7] and att["kept"] == 0 and ckpt == tmp_path / "stage_c" / "ckpt"
    ckpt, att = run(1.0, 0.80, 0.985)  # the second try is within the drop: kept, no third
    assert seen_seeds == [7, 1007] and att["kept"] == 1 and ckpt == tmp_path / "stage_c_try2" / "stage_c" / "ckpt"
    ckpt, att = run(1.0, 0.90, 0.80, 0.85)  # none within: the best is kept
    assert seen_seeds == [7, 1007, 2007] and att["kept"] == 0 and ckpt == tmp_path / "stage_c" / "ckpt"
    assert [round(t["drop"], 3) for t in att["tries"]] == [0.1, 0.2, 0.15]
    # the first try trains stage C as set; the tries after it with stage_c_retry_latent merged over it
    assert seen_latent[0] == {"latent_min_used": 2, "latent_full_budget_align_weight": 0.0}
    assert seen_latent[1:] == [{"latent_min_used": 2, "latent_full_budget_align_weight": 0.3}] * 2
    assert [t["latent"] for t in att["tries"]] == [{}] + [{"latent_full_budget_align_weight": 0.3}] * 2
    md = "\n".join(stage_c_tries_section({"stage_c_attempts": att, "settings": {"demo": demo}}))
    assert "| 1 | 7 | as set | 0.900 | +0.100 | kept |" in md
    assert "| 3 | 2007 | latent_full_budget_align_weight 0.3 | 0.850 | +0.150 |  |" in md
    demo["stage_c_retry_latent"] = {"latent_full_budget_align_weight": -1.0}
    with pytest.raises(InputError, match="stage_c_retry_latent.*latent_full_budget_align_weight"):
        run(1.0, 0.9)
    assert seen_seeds == []  # refused before the first try
    demo["stage_c_attempts"] = 0
    with pytest.raises(ValueError, match="stage_c_attempts"):
        run(1.0, 0.9)


@pytest.mark.slow
def test_stage_c_tries_train_from_stage_a_with_their_own_seeds(tmp_path):
    """The real tries: each from the stage-A checkpoint of its lane, with its own seed and folder, its val
    accuracy measured; the demo keeps the best (a drop bar of -1 is never met, so every try runs)."""
    from latentvl.recipes.demo import recipe

    settings = load_demo_settings(None, quick=True)
    settings["train"]["progress_bar"] = False
    settings["demo"].update(arm_workers=1, stage_c_attempts=2, stage_c_retry_drop=-1.0)
    data, demo = recipe._make_data(tmp_path, settings["demo"], log=lambda *a: None)
    trained = recipe._train_arms(settings, demo, data, tmp_path / "arms", log=lambda *a: None)
    att = trained.stage_c_attempts
    seed = settings["demo"]["seed"]
    assert [t["seed"] for t in att["tries"]] == [seed, seed + 1000]
    accs = [t["val_full_budget"] for t in att["tries"]]
    assert all(0.0 <= a <= 1.0 for a in accs) and att["kept"] == accs.index(max(accs))
    assert 0.0 <= att["stage_a_val_full_budget"] <= 1.0
    kept_dir = Path(att["tries"][att["kept"]]["output_dir"])
    assert Path(trained.runs["stage_c"].checkpoint).is_relative_to(kept_dir)
    aligned = []
    for t in att["tries"]:
        cfg = yaml.safe_load((Path(t["output_dir"]) / "phase0" / "config.yaml").read_text())
        assert cfg["seed"] == t["seed"] and Path(cfg["init_from"]).is_relative_to(tmp_path / "arms" / "stage_a")
        aligned.append(cfg["latent"].get("latent_full_budget_align_weight", 0.0))
    retry = demo["stage_c_retry_latent"]["latent_full_budget_align_weight"]  # the shipped a5 retry setting
    assert aligned == [demo["stage_c_latent"].get("latent_full_budget_align_weight", 0.0), retry] and retry > 0


def test_no_control_trains_less_than_stage_a_and_c(tmp_path, monkeypatch):
    """Every control trains as many steps as stage A + stage C, on the same files in the same order, with the
    same model, seed and batch (the recipe's arms; the trainer itself is replaced by a recorder)."""
    import types

    from latentvl.recipes.demo import recipe
    from latentvl.training import trainer

    seen = []

    def fake_train(cfg):
        seen.append(cfg)
        return types.SimpleNamespace(checkpoint=Path(cfg.output_dir) / "checkpoint", checks=[], final_model=None,
                                     history=[{"step": s + 1} for s in range(cfg.max_steps)])

    monkeypatch.setattr(trainer, "train", fake_train)
    settings = load_demo_settings(None)
    settings["demo"]["arm_workers"] = 1  # in this process, where the recorder stands in for the trainer
    files = [tmp_path / name for name in ("train_difficulty_le_1.jsonl", "train_difficulty_le_2.jsonl", "train.jsonl")]
    data = recipe._DemoData("a5", {}, files[-1], [], [], [], {}, {}, 0.2, [(files[0], 6), (files[1], 7)])
    demo = {**settings["demo"], "steps_a": 13, "steps_c": 5}
    histories = recipe._train_arms(settings, demo, data, tmp_path, log=lambda *a: None).histories
    by_arm: dict[str, list] = {}
    for cfg in seen:
        by_arm.setdefault(Path(cfg.output_dir).parent.name, []).append(cfg)
    assert set(by_arm) == set(ARMS)

    def plan(arm):
        return [(Path(c.train_data).name, c.max_steps) for c in by_arm[arm]]

    reference = plan("stage_a") + plan("stage_c")
    assert reference == [(files[0].name, 6), (files[1].name, 7), ("train.jsonl", 5)]
    for arm in ("baseline_no_latents", "pause", "latents_no_align"):
        assert plan(arm) == reference, arm
        assert len(histories[arm]) == len(histories["stage_a"]) + len(histories["stage_c"]) == 18
    shared = ("model", "tiny_hidden_size", "tiny_num_layers", "seed", "batch_size", "grad_accum", "optimizer",
              "freeze_vision", "max_length")
    first = by_arm["stage_a"][0]
    for arm, cfgs in by_arm.items():
        for cfg in cfgs:
            assert {k: getattr(cfg, k) for k in shared} == {k: getattr(first, k) for k in shared}, arm
