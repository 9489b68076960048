"""The demo end to end at reduced size (--quick): data, three trainings, evaluation, report files."""

import json
from pathlib import Path

import yaml
from PIL import Image

from latentvl.cli import main
from latentvl.demo import DEFAULTS, alignment_table, load_demo_settings, results_table

REPO = Path(__file__).resolve().parents[1]


def test_demo_quick_writes_the_report(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert f"report: {out / 'report.md'}" in printed
    md = (out / "report.md").read_text()
    assert "| model | train steps | test accuracy | mean used/budget |" in md
    for row in ("| chance", "| stage A (fixed budgets) | 4 |", "| stage C (learned halting", "| no latents"):
        assert row in md, row
    report = json.loads((out / "report.json").read_text())
    assert set(report["results"]) == {"stage_a", "stage_c", "baseline_no_latents"}
    assert report["steps"] == {"stage_a": 4, "stage_c": 3, "baseline": 7}
    assert report["results"]["stage_a"]["used_ratio"] == 1.0  # stage A uses every latent
    assert report["results"]["baseline_no_latents"]["budget"] == 0
    n_test = report["splits"]["test"]
    assert report["results"]["stage_c"]["n"] == n_test and n_test > 0
    assert results_table(report) in md
    assert alignment_table(report) in md
    for key in ("stage_a", "stage_c"):  # every test record lists its CoT images: each segment is measured
        al = report["results"][key]["alignment"]
        used = sum(sum(x["used_lens"]) for x in report["per_sample"][key])
        assert al["n_latents"] == used > 0 and -1 <= al["mean_cosine"] <= 1
    assert all(s["ok"] for runs in report["preflight"].values() for s in runs)
    for png in ("loss_curves.png", "latents.png"):
        with Image.open(out / png) as im:
            assert im.format == "PNG" and im.size[0] > 500


def test_example_config_matches_the_built_in_settings(tmp_path):
    shipped = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
    assert shipped == DEFAULTS
    custom = tmp_path / "d.yaml"
    custom.write_text("demo:\n  steps_a: 7\ntrain:\n  lr: 0.01\n")
    settings = load_demo_settings(custom)
    assert settings["demo"]["steps_a"] == 7 and settings["train"]["lr"] == 0.01
    assert settings["train"]["latent"] == DEFAULTS["train"]["latent"]
    quick = load_demo_settings(None, quick=True)
    assert quick["demo"]["steps_a"] == DEFAULTS["quick"]["steps_a"]
