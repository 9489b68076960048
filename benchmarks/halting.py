"""Halting that follows the content: the answer-driven stop target against the fixed ratio, same task and steps.

    PYTHONPATH=src python benchmarks/halting.py --out runs/halting              # the a5 word problem
    PYTHONPATH=src python benchmarks/halting.py --task relay_bands --out runs/hb

1. data whose one CoT strip has the same size for every record, so the budget says nothing about the
   difficulty: ``a5`` (default; hops 1..4, a strip of 5 cells: the states, the last held) or ``relay_bands``
   (hops 1..4, a strip of 4 tokens);
2. stage A once (every latent active; for a5 with the demo's recipe: the vision tower frozen, teacher
   forcing falling from 1 to 0 over the first 80% of the steps, tail dropout 0.3; stage C then at lr 5e-4
   and stop threshold 0.7);
3. stage C twice from the stage-A weights (a5: 300 steps each), identical but for ``latent_stop_target_mode``:
   ``ratio`` and ``answer``;
4. each stage-C model's stop threshold chosen on the validation split (``latentvl calibrate``, the same rule for
   both modes);
5. each stage-C model on the held-out test split at that threshold and at full budget: accuracy, used/budget,
   Spearman(used, hops), latents used per hop count; also at the training's last threshold.

Writes ``report.json``, ``report.md`` and ``used_by_difficulty.png`` into ``--out``; prints the report. Timings
are wall-clock on whatever else the machine is running.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

from latentvl.data.records import load_records
from latentvl.data.tasks.writer import make_dataset, make_relay_bands
from latentvl.evaluation.calibration import calibrate_threshold
from latentvl.evaluation.halting import evaluate_halting, halting_summary, read_difficulties
from latentvl.evaluation.teacher_forced import evaluate_records
from latentvl.reports.halting import halting_markdown, plot_used_by_difficulty
from latentvl.training.config import TrainConfig
from latentvl.training.trainer import train

TRAIN: dict[str, Any] = {
    "model": "tiny",
    "tiny_hidden_size": 128,
    "tiny_num_layers": 2,
    "batch_size": 8,
    "optimizer": "adamw",
    "lr": 2.0e-3,
    "lr_scheduler": "cosine",
    "warmup_steps": 20,
    "min_lr_ratio": 0.1,
    "grad_clip": 1.0,
    "threshold_start": 0.9,
    "threshold_anneal_steps": 40,
    "num_threads": 1,
    "progress_bar": False,
    "tensorboard": False,
    "save_every": 0,
    "keep_last": 1,
    "latent": {
        "latent_budget_alpha": 1.0,
        "latent_budget_gamma": 1.0,
        "latent_budget_min": 1,
        "latent_budget_max": 4,
        "latent_stop_threshold": 0.5,
        "latent_stop_loss_weight": 1.0,
        "latent_cost_weight": 1.0e-3,
        "latent_align_weight": 1.0,
    },
}


def _cfg(seed: int, **fields: Any) -> TrainConfig:
    latent = {**TRAIN["latent"], **fields.pop("latent", {})}
    return TrainConfig.from_dict({**TRAIN, **fields, "latent": latent, "seed": seed})


def step_cost(records_file: Path, reps: int = 6, batch_size: int = 8, budget_max: int | None = None
              ) -> dict[str, float]:
    """Seconds per stage-C training step (both passes, backward) in each mode, interleaved in one process.

    The same batch, the same weights; the modes alternate so that a busy machine slows both alike. Also
    counts the language-model calls of one step in each mode.
    """
    from latentvl import LatentCollator, build_tiny_model, set_latent_fields
    from latentvl.data.records import RecordDataset

    model, processor = build_tiny_model(seed=0, hidden_size=TRAIN["tiny_hidden_size"],
                                        num_layers=TRAIN["tiny_num_layers"])
    lat = TRAIN["latent"]
    set_latent_fields(model.config, latent_budget_alpha=lat["latent_budget_alpha"],
                      latent_budget_gamma=lat["latent_budget_gamma"],
                      latent_budget_max=budget_max or lat["latent_budget_max"])
    records, _ = load_records(records_file)
    ds = RecordDataset(records[:batch_size])
    batch = LatentCollator(processor, model.config)([ds[i] for i in range(len(ds))])
    calls = {"n": 0}
    model.model.language_model.register_forward_hook(lambda *_: calls.__setitem__("n", calls["n"] + 1))
    times: dict[str, list[float]] = {"ratio": [], "answer": []}
    counts: dict[str, int] = {}
    for rep in range(reps + 1):
        for mode in ("ratio", "answer"):
            set_latent_fields(model.config, latent_mode_stage="C", latent_stop_loss_weight=1.0,
                              latent_cost_weight=1e-3, latent_stop_target_mode=mode)
            calls["n"] = 0
            t0 = time.perf_counter()
            model.latent_loss(batch, threshold=0.5).loss.backward()
            if rep:  # the first round warms up
                times[mode].append(time.perf_counter() - t0)
            counts[mode] = calls["n"]
            model.zero_grad(set_to_none=True)
    med = {m: sorted(v)[len(v) // 2] for m, v in times.items()}
    return {"ratio_step_s": med["ratio"], "answer_step_s": med["answer"],
            "answer_over_ratio": med["answer"] / med["ratio"],
            "ratio_lm_calls": counts["ratio"], "answer_lm_calls": counts["answer"]}


A5_DECAY = 0.8  # the a5 recipe of latentvl/configs/demo.yaml (`per_task.a5`): teacher forcing decays over 80%


def run(out: Path, n: int, steps_a: int, steps_c: int, seed: int, rule: str = "fixed", tolerance: float = 0.1,
        log=print, task: str = "a5") -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    if task == "a5":
        meta = make_dataset("a5", n, seed, out / "data", overwrite=True, min_hops=1, max_hops=4)
        shared = {"freeze_vision": True, "batch_size": 16, "latent": {"latent_budget_max": 5}}
        stage_a = {**shared, "teacher_forcing_decay_steps": round(A5_DECAY * steps_a),
                   "latent": {**shared["latent"], "latent_teacher_forcing": 1.0, "latent_tail_dropout": 0.3}}
        stage_c = {**shared, "lr": 5e-4, "latent": {**shared["latent"], "latent_stop_threshold": 0.7}}
    else:
        meta = make_relay_bands(n, seed, out / "data", overwrite=True, rule=rule)
        shared, stage_a, stage_c = {}, {}, {}
    timings["data_s"] = time.perf_counter() - t0
    train_file, test_file = out / "data" / "train.jsonl", out / "data" / "test.jsonl"
    log(f"data: {n} records, test chance {meta['splits']['test']['chance_accuracy']:.3f}")

    t0 = time.perf_counter()
    res_a = train(_cfg(seed, stage="A", max_steps=steps_a, train_data=str(train_file),
                       output_dir=str(out / "stage_a"), **stage_a))
    timings["stage_a_s"] = time.perf_counter() - t0
    log(f"stage A: {steps_a} steps in {timings['stage_a_s']:.0f} s")

    test_records, _ = load_records(test_file)
    val_records, _ = load_records(out / "data" / "val.jsonl")
    difficulty = read_difficulties(test_file)
    results: dict[str, Any] = {}
    for mode in ("ratio", "answer"):
        t0 = time.perf_counter()
        res = train(_cfg(seed, stage="C", max_steps=steps_c, train_data=str(train_file), warmup_steps=0,
                         init_from=str(res_a.checkpoint), output_dir=str(out / f"stage_c_{mode}"),
                         **{**stage_c, "latent": {**stage_c.get("latent", {}), "latent_stop_target_mode": mode,
                                                  "latent_stop_target_tolerance": tolerance}}))
        timings[f"stage_c_{mode}_s"] = time.perf_counter() - t0
        t1 = time.perf_counter()
        from latentvl import LatentCollator
        from latentvl.model.loading import load_latent_model
        from latentvl.training.checkpoint import quiet_hf_progress

        with quiet_hf_progress():
            model, processor = load_latent_model(res.checkpoint / "model")
        collator = LatentCollator(processor, model.config)
        trained_thr = model.config.latent_stop_threshold
        cal = calibrate_threshold(model, collator, val_records, batch_size=16)
        results[mode] = evaluate_halting(model, collator, test_records, difficulty, threshold=cal["threshold"])
        results[mode]["calibration"] = cal
        at_trained = evaluate_records(model, collator, test_records, batch_size=16, threshold=trained_thr,
                                      per_sample=True)  # full budget is measured once, above
        results[mode]["at_training_threshold"] = {"threshold": trained_thr,
                                                  **halting_summary(at_trained["samples"], difficulty)}
        results[mode]["train_step_s"] = timings[f"stage_c_{mode}_s"] / steps_c
        timings[f"eval_{mode}_s"] = time.perf_counter() - t1
        got = results[mode]
        log(f"stage C ({mode}): {steps_c} steps in {timings[f'stage_c_{mode}_s']:.0f} s; "
            f"threshold {cal['threshold']:g} (chosen on {cal['n']} val records), "
            f"accuracy {got['learned']['accuracy']:.3f} (full budget {got['full_budget']['accuracy']:.3f}), "
            f"used/budget {got['learned']['used_ratio']:.3f}, Spearman {got['learned']['spearman_used_difficulty']}")
    cost = step_cost(train_file, budget_max=shared.get("latent", {}).get("latent_budget_max"))
    log(f"stage-C step, same batch and weights, interleaved: ratio {cost['ratio_step_s']:.3f} s, answer "
        f"{cost['answer_step_s']:.3f} s ({cost['answer_over_ratio']:.2f}x); language-model calls "
        f"{cost['ratio_lm_calls']} vs {cost['answer_lm_calls']}")
    timings["total_s"] = sum(timings.values())
    answer = results["answer"]
    bars = {
        "answer_spearman_at_least_0.6": (answer["learned"]["spearman_used_difficulty"] or 0.0) >= 0.6,
        "answer_accuracy_within_3_points_of_full_budget": answer["accuracy_drop"] <= 0.03,
        "answer_used_ratio_at_most_0.75": answer["learned"]["used_ratio"] <= 0.75,
    }
    report = {
        "task": task, "rule": rule if task == "relay_bands" else None, "tolerance": tolerance, "n": n,
        "seed": seed, "steps_a": steps_a, "steps_c": steps_c,
        "test_n": len(test_records), "test_chance_accuracy": meta["splits"]["test"]["chance_accuracy"],
        "results": results, "bars": bars, "timings": timings,
        "step_cost": cost,
    }
    (out / "report.json").write_text(json.dumps(report, indent=2, default=str) + "\n", encoding="utf-8")
    md = [
        f"# Halting: answer-driven stop target vs fixed ratio ({task})",
        "",
        f"{task}{f' (rule {rule})' if task == 'relay_bands' else ''}, {n} records, test split "
        f"{len(test_records)} (chance "
        f"{report['test_chance_accuracy']:.3f}); stop-target tolerance {tolerance} nats; stage A "
        f"{steps_a} steps, then stage C {steps_c} steps in each mode from the same stage-A weights; seed {seed}.",
        f"A stage-C step (batch 8, both passes and backward, same weights, modes interleaved) takes "
        f"{cost['answer_step_s']:.3f} s with `answer` against {cost['ratio_step_s']:.3f} s with `ratio` "
        f"({cost['answer_over_ratio']:.2f}x; {cost['answer_lm_calls']} language-model calls against "
        f"{cost['ratio_lm_calls']}).",
        "",
        "Each stage-C model's stop threshold is chosen on the validation split (`latentvl calibrate`: the lowest "
        "used/budget within 0.01 of the best accuracy); the tables below are the test split at that threshold.",
        "",
        *(halting_markdown(f"`latent_stop_target_mode: {m}`, threshold {results[m]['calibration']['threshold']:g}",
                           results[m]) for m in ("ratio", "answer")),
        "## At the training's last threshold (not calibrated)",
        "",
        "| mode | threshold | accuracy | used/budget | Spearman(used, difficulty) |",
        "|---|---|---|---|---|",
        *(f"| {m} | {r['threshold']:g} | {r['accuracy']:.3f} | {r['used_ratio']:.3f} | "
          f"{_fmt(r['spearman_used_difficulty'])} |"
          for m, r in ((m, results[m]["at_training_threshold"]) for m in ("ratio", "answer"))),
        "",
        "## Bars (answer mode)",
        "",
        *(f"- {k}: {'pass' if v else 'FAIL'}" for k, v in bars.items()),
        "",
        "## Timings (s)",
        "",
        *(f"- {k}: {v:.1f}" for k, v in timings.items()),
        "",
    ]
    (out / "report.md").write_text("\n".join(md), encoding="utf-8")
    plot_used_by_difficulty({m: results[m] for m in ("ratio", "answer")}, out / "used_by_difficulty.png")
    return report


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/halting")
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--steps-a", type=int, default=None, help="stage-A steps (default: a5 1000, relay_bands 500)")
    p.add_argument("--steps-c", type=int, default=None,
                   help="stage-C steps in each mode (default: a5 300, relay_bands 150)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--task", choices=("a5", "relay_bands"), default="a5")
    p.add_argument("--rule", choices=("fixed", "table"), default="fixed",
                   help="relay_bands rule: fixed (learnable in minutes) or table (a drawn cycle per sample)")
    p.add_argument("--tolerance", type=float, default=0.1, help="latent_stop_target_tolerance of the answer mode")
    args = p.parse_args(argv)
    steps_a = args.steps_a or (1000 if args.task == "a5" else 500)
    steps_c = args.steps_c or (300 if args.task == "a5" else 150)
    report = run(Path(args.out), args.n, steps_a, steps_c, args.seed, args.rule, args.tolerance, task=args.task)
    print((Path(args.out) / "report.md").read_text(encoding="utf-8"))
    return 0 if all(report["bars"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
