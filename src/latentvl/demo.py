"""Run the whole method end to end on the tiny model and a synthetic task, and write a report.

``latentvl demo`` generates a synthetic visual chain-of-thought task, trains stage A (fixed latent
budgets), then stage C from the stage-A checkpoint (learned halting, threshold annealed), and, on the
same data for the same number of steps, a baseline that answers right after the question (no latents).
It evaluates the three models on the held-out test split and writes ``report.md``, ``report.json``,
``loss_curves.png`` and ``latents.png`` into the output folder. ``--quick`` runs a few steps on a few
records (a smoke test of the pipeline, not of the method).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path
from typing import Any

import yaml

# The demo's settings; configs/demo.yaml holds the same values (pass --config to change them).
DEFAULTS: dict[str, Any] = {
    "demo": {
        "task": "shapes",
        "n": 1200,  # records over train/val/test (80/10/10)
        "seed": 0,
        "data": {"size_min": 84, "size_max": 168, "max_cot": 3},  # 9..36 visual tokens: budgets 3..6
        "steps_a": 250,
        "steps_c": 120,
        "eval_batch_size": 16,
        "bars": {
            "min_accuracy_over_chance": 2.0,
            "used_ratio_range": [0.5, 0.9],
            "max_c_accuracy_drop": 0.05,
        },
    },
    "quick": {"n": 60, "steps_a": 4, "steps_c": 3},
    "train": {
        "model": "tiny",
        "tiny_hidden_size": 128,
        "tiny_num_layers": 4,
        "batch_size": 8,
        "grad_accum": 1,
        "optimizer": "adamw",
        "lr": 1.0e-3,
        "weight_decay": 0.0,
        "lr_scheduler": "cosine",
        "warmup_steps": 20,
        "min_lr_ratio": 0.1,
        "grad_clip": 1.0,
        "threshold_start": 0.9,
        "threshold_anneal_steps": 40,
        "num_threads": 1,
        "progress_bar": True,
        "latent": {
            "latent_budget_alpha": 1.0,
            "latent_budget_gamma": 0.5,
            "latent_budget_min": 1,
            "latent_budget_max": 8,
            "latent_stop_threshold": 0.5,
            "latent_stop_loss_weight": 1.0,
            "latent_cost_weight": 1.0e-3,
            "latent_align_weight": 1.0,
        },
    },
}


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def load_demo_settings(path: str | Path | None = None, quick: bool = False) -> dict[str, Any]:
    """The built-in settings, updated from a YAML file of the same shape; ``quick`` shrinks the run."""
    settings = copy.deepcopy(DEFAULTS)
    if path is not None:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        unknown = set(data) - set(DEFAULTS)
        if unknown:
            raise ValueError(f"{path}: unknown section(s) {sorted(unknown)}; known: {sorted(DEFAULTS)}")
        settings = _merge(settings, data)
    if quick:
        settings["demo"].update(settings["quick"])
    return settings


# --------------------------------------------------------------------------------------------- runs
def _train_config(settings: dict[str, Any], **fields: Any):
    from .training.config import TrainConfig

    cfg = TrainConfig.from_dict({**settings["train"], **fields}, validate=False)
    cfg.seed = int(settings["demo"]["seed"])
    return cfg.validate()


def _evaluate(
    model_dir: Path,
    records,
    settings: dict[str, Any],
    use_latents: bool,
    threshold: float | None,
    chance: float,
    out_dir: Path,
) -> dict[str, Any]:
    """Greedy two-step inference on ``records`` (``latentvl.inference.evaluate``), causal checks included.

    Returns the summary the report needs plus ``samples`` (budgets and used latents per test record).
    """
    from .inference.evaluate import evaluate
    from .model.loading import load_latent_model
    from .training.checkpoint import quiet_hf_progress

    with quiet_hf_progress():
        model, processor = load_latent_model(model_dir)
    ev = evaluate(
        model,
        processor,
        records,
        out_dir=out_dir,
        batch_size=int(settings["demo"]["eval_batch_size"]),
        max_new_tokens=8,
        threshold=threshold,
        causal_checks=use_latents,
        use_latents=use_latents,
        chance_accuracy=chance,
        seed=int(settings["demo"]["seed"]),
    )
    preds = ev["predictions"]
    used = sum(sum(p["used_lens"]) for p in preds if p["error"] is None)
    budget = sum(sum(p["budgets"]) for p in preds if p["error"] is None)
    causal = {}
    for name in ("mask", "noise", "swap"):
        part = (ev.get("causal") or {}).get(name)
        if part:
            causal[name] = {
                "n": part["n"],
                "accuracy": part["accuracy"],
                "answer_change_rate": part["answer_change_rate"],
            }
    return {
        "n": ev["n_evaluated"],
        "n_errors": ev["n_errors"],
        "accuracy": ev["accuracy"],
        "used": used,
        "budget": budget,
        "used_ratio": used / budget if budget else None,
        "causal": causal,
        "alignment": ev.get("alignment"),
        "eval_report": str(out_dir / "report.md"),
        "samples": [
            {"id": p["id"], "correct": p["correct"], "budgets": p["budgets"], "used_lens": p["used_lens"]}
            for p in preds
            if p["error"] is None
        ],
    }


def run_demo(out: str | Path, settings: dict[str, Any], log=print) -> dict[str, Any]:
    """Data, three trainings, evaluation, report. Returns the report's JSON content."""
    import torch

    from .data.records import load_metadata, load_records
    from .data.synthetic import make_dataset
    from .training.metrics import read_metrics
    from .training.trainer import train

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    demo = settings["demo"]
    threads = settings["train"].get("num_threads")
    if threads:
        torch.set_num_threads(int(threads))
    timings: dict[str, float] = {}
    t_start = time.perf_counter()

    # 1. data
    t0 = time.perf_counter()
    data_dir = out / "data"
    meta = make_dataset(
        demo["task"], int(demo["n"]), int(demo["seed"]), data_dir, overwrite=True, **demo["data"]
    )
    timings["data"] = time.perf_counter() - t0
    train_file, test_file = data_dir / "train.jsonl", data_dir / "test.jsonl"
    test_records, _ = load_records(test_file)
    test_meta = load_metadata(test_file) or meta
    chance = float(test_meta["splits"]["test"]["chance_accuracy"] or test_meta["chance_accuracy"])
    log(f"data: {meta['n']} {meta['task']} records in {data_dir} (chance accuracy {chance:.3f})")

    steps_a, steps_c = int(demo["steps_a"]), int(demo["steps_c"])
    common = {"train_data": str(train_file), "save_every": 0, "keep_last": 1}

    # 2. stage A: fixed budgets
    t0 = time.perf_counter()
    log(f"stage A: {steps_a} steps")
    cfg_a = _train_config(settings, stage="A", max_steps=steps_a, output_dir=str(out / "stage_a"), **common)
    res_a = train(cfg_a)
    timings["train_stage_a"] = time.perf_counter() - t0

    # 3. stage C: learned halting, from the stage-A checkpoint
    t0 = time.perf_counter()
    log(f"stage C: {steps_c} steps from {res_a.checkpoint}")
    cfg_c = _train_config(
        settings,
        stage="C",
        max_steps=steps_c,
        output_dir=str(out / "stage_c"),
        init_from=str(res_a.checkpoint),
        warmup_steps=0,
        **common,
    )
    res_c = train(cfg_c)
    timings["train_stage_c"] = time.perf_counter() - t0

    # 4. baseline: no latents, same data, same number of steps
    t0 = time.perf_counter()
    log(f"baseline without latents: {steps_a + steps_c} steps")
    cfg_b = _train_config(
        settings,
        stage="A",
        use_latents=False,
        max_steps=steps_a + steps_c,
        output_dir=str(out / "baseline"),
        **common,
    )
    res_b = train(cfg_b)
    timings["train_baseline"] = time.perf_counter() - t0

    # 5. held-out evaluation
    t0 = time.perf_counter()
    final_thr = cfg_c.final_threshold
    ev_dir = out / "eval"
    ev_a = _evaluate(
        res_a.checkpoint / "model", test_records, settings, True, None, chance, ev_dir / "stage_a"
    )
    ev_c = _evaluate(
        res_c.checkpoint / "model", test_records, settings, True, final_thr, chance, ev_dir / "stage_c"
    )
    ev_b = _evaluate(
        res_b.checkpoint / "model", test_records, settings, False, None, chance, ev_dir / "baseline"
    )
    timings["evaluate"] = time.perf_counter() - t0

    # 6. report
    bars = demo["bars"]
    lo, hi = bars["used_ratio_range"]
    checks = {
        "stage_a_accuracy_at_least_2x_chance": ev_a["accuracy"] >= bars["min_accuracy_over_chance"] * chance,
        "stage_c_used_ratio_in_range": lo <= ev_c["used_ratio"] <= hi,
        "stage_c_accuracy_within_5_points_of_a": ev_c["accuracy"]
        >= ev_a["accuracy"] - bars["max_c_accuracy_drop"],
    }
    timings["total"] = time.perf_counter() - t_start
    report = {
        "task": meta["task"],
        "n_records": meta["n"],
        "splits": {k: v["size"] for k, v in meta["splits"].items()},
        "test_chance_accuracy": chance,
        "steps": {"stage_a": steps_a, "stage_c": steps_c, "baseline": steps_a + steps_c},
        "final_threshold": final_thr,
        "results": {
            "stage_a": _summary(ev_a),
            "stage_c": _summary(ev_c),
            "baseline_no_latents": _summary(ev_b),
        },
        "bars": bars,
        "checks": checks,
        "all_bars_met": all(checks.values()),
        "per_sample": {"stage_a": ev_a["samples"], "stage_c": ev_c["samples"]},
        "preflight": {
            "stage_a": [r.to_dict() for r in res_a.checks],
            "stage_c": [r.to_dict() for r in res_c.checks],
        },
        "timings_s": {k: round(v, 1) for k, v in timings.items()},
        "settings": settings,
        "out": str(out),
        "outputs": {
            "stage_a": str(res_a.checkpoint),
            "stage_c": str(res_c.checkpoint),
            "baseline": str(res_b.checkpoint),
        },
    }
    curves = {
        name: read_metrics(Path(r.output_dir), kind="train")
        for name, r in (("stage_a", res_a), ("stage_c", res_c), ("baseline", res_b))
    }
    _plot_losses(out / "loss_curves.png", curves, steps_a)
    _plot_latents(out / "latents.png", curves["stage_c"], ev_c["samples"], report)
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "report.md").write_text(_markdown(report))
    return report


def _summary(ev: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in ev.items() if k != "samples"}


# ------------------------------------------------------------------------------------------- report
def results_table(report: dict[str, Any]) -> str:
    r = report["results"]
    chance = report["test_chance_accuracy"]
    st = report["steps"]

    def ratio(x: dict[str, Any]) -> str:
        return f"{x['used_ratio']:.3f} ({x['used']}/{x['budget']})" if x["budget"] else "- (no latents)"

    rows = [
        "| model | train steps | test accuracy | mean used/budget |",
        "|---|---|---|---|",
        f"| chance (most frequent answer) | - | {chance:.3f} | - |",
        f"| stage A (fixed budgets) | {st['stage_a']} | {r['stage_a']['accuracy']:.3f} "
        f"| {ratio(r['stage_a'])} |",
        f"| stage C (learned halting, threshold {report['final_threshold']:g}) "
        f"| {st['stage_a']} + {st['stage_c']} | {r['stage_c']['accuracy']:.3f} | {ratio(r['stage_c'])} |",
        f"| no latents (answer right after the question) | {st['baseline']} | "
        f"{r['baseline_no_latents']['accuracy']:.3f} | {ratio(r['baseline_no_latents'])} |",
    ]
    return "\n".join(rows) + "\n"


def causal_table(report: dict[str, Any]) -> str:
    rows = ["| model | latents masked | latents noised | latents swapped |", "|---|---|---|---|"]
    names = {"stage_a": "stage A", "stage_c": "stage C"}
    for key, label in names.items():
        causal = report["results"][key].get("causal") or {}
        cells = []
        for check in ("mask", "noise", "swap"):
            c = causal.get(check)
            cells.append(f"{c['answer_change_rate']:.3f} ({c['accuracy']:.3f})" if c else "-")
        rows.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(rows) + "\n"


def alignment_table(report: dict[str, Any]) -> str:
    rows = ["| model | cosine, latent vs its pooled target | segment mean vs own / other images | "
            "retrieval top-1 (chance) |", "|---|---|---|---|"]
    for key, label in {"stage_a": "stage A", "stage_c": "stage C"}.items():
        al = report["results"][key].get("alignment")
        if not al or al.get("retrieval_top1") is None:
            rows.append(f"| {label} | - | - | - |")
            continue
        rows.append(f"| {label} | {al['mean_cosine']:.3f} | {al['mean_cosine_own']:.3f} / "
                    f"{al['mean_cosine_other']:.3f} | {al['retrieval_top1']:.3f} ({al['chance']:.3f}, "
                    f"{al['retrieval_set']} segments) |")
    return "\n".join(rows) + "\n"


def _alignment_reading(report: dict[str, Any]) -> str:
    al = report["results"]["stage_c"].get("alignment")
    if not al or al.get("retrieval_top1") is None:
        return ""
    own, other = al["mean_cosine_own"], al["mean_cosine_other"]
    found = f"find their own image {al['retrieval_top1']:.0%} of the time against {al['chance']:.1%} by chance"
    if own - other < 0.02:
        return (
            f"Reading: the stage-C latents sit close to CoT-image features (segment means: cosine {own:.2f}) "
            f"but as close to other samples' images ({other:.2f}), and {found}: they learned what a CoT "
            "image looks like in general, little of the one they stand for.\n"
        )
    return (
        f"Reading: the stage-C latents are closer to their own CoT image (segment means: cosine {own:.2f}) "
        f"than to other samples' ({other:.2f}) and {found}.\n"
    )


def _setup(report: dict[str, Any]) -> str:
    t = report["settings"]["train"]
    lat = t["latent"]
    budgets: dict[int, int] = {}
    for s in report["per_sample"]["stage_a"]:
        for b in s["budgets"]:
            budgets[int(b)] = budgets.get(int(b), 0) + 1
    spread = ", ".join(f"{b}: {n}" for b, n in sorted(budgets.items()))
    return (
        f"Tiny Qwen2.5-VL (hidden {t['tiny_hidden_size']}, {t['tiny_num_layers']} layers), batch "
        f"{t['batch_size']}, {t['optimizer']} lr {t['lr']:g} ({t['lr_scheduler']}, "
        f"{t['warmup_steps']} warm-up steps). Budgets: alpha {lat['latent_budget_alpha']:g}, "
        f"gamma {lat['latent_budget_gamma']:g}, max {lat['latent_budget_max']}; CoT images of the test "
        f"split per budget: {spread}. Stage C: stop threshold {t['threshold_start']:g} -> "
        f"{report['final_threshold']:g} over {t['threshold_anneal_steps']} steps, stop weight "
        f"{lat['latent_stop_loss_weight']:g}, cost weight {lat['latent_cost_weight']:g}.\n"
    )


def _causal_reading(report: dict[str, Any]) -> str:
    causal = report["results"]["stage_c"].get("causal") or {}
    mask = causal.get("mask")
    if not mask:
        return ""
    if mask["answer_change_rate"] < 0.05:
        return (
            "Reading: masking every latent changes fewer than 5% of the answers, so on this task the models "
            "answer from the question image and the latents carry little of the decision; the no-latent "
            "baseline's accuracy says the same. The demo shows the mechanics (fixed budgets, learned "
            f"halting at {report['results']['stage_c']['used_ratio']:.0%} of the budget, exact gating); a "
            "task whose answer needs the intermediate states, and a larger model, are where the latents can "
            "matter.\n"
        )
    return (
        f"Reading: masking the latents changes {mask['answer_change_rate']:.0%} of the stage-C answers: "
        "the models use them.\n"
    )


def _markdown(report: dict[str, Any]) -> str:
    ok = {True: "met", False: "NOT met"}
    c = report["checks"]
    bars = report["bars"]
    lo, hi = bars["used_ratio_range"]
    lines = [
        "# latentvl demo report",
        "",
        f"Task `{report['task']}`: {report['n_records']} generated records ("
        + " / ".join(f"{n} {split}" for split, n in report["splits"].items())
        + "). All numbers below are measured on the held-out test split "
        f"({report['results']['stage_a']['n']} records).",
        "",
        results_table(report),
        _setup(report),
        "## Bars",
        "",
        f"- stage-A accuracy >= {bars['min_accuracy_over_chance']:g} x chance: "
        f"{ok[c['stage_a_accuracy_at_least_2x_chance']]}",
        f"- stage-C mean used/budget in [{lo:g}, {hi:g}]: {ok[c['stage_c_used_ratio_in_range']]}",
        f"- stage-C accuracy no more than {bars['max_c_accuracy_drop'] * 100:g} points below stage A: "
        f"{ok[c['stage_c_accuracy_within_5_points_of_a']]}",
        "",
        "Accuracy: greedy two-step inference (latent pass, then generate), exact match of the answer. "
        "Stage C halts with the final threshold. used/budget: latents used over the budget, summed over "
        "every CoT segment of the test split.",
        "",
        "## Do the answers depend on the latents?",
        "",
        "Causal checks of `latentvl.inference.evaluate` on the test split: the share of answers that "
        "change when every latent is masked out of attention, replaced by noise of the same norm, or "
        "swapped with another sample's latents (accuracy after the change in brackets).",
        "",
        causal_table(report),
        _causal_reading(report),
        "## Do the latents look like their CoT images?",
        "",
        "Each test record's CoT images, read for this measurement only, encoded by the vision tower and "
        "pooled into as many groups as the segment used latents (the alignment loss's targets): the "
        "cosine of each latent with its own group; and whether a segment's mean latent is closer to "
        "its own target than to any other segment's of the test split.",
        "",
        alignment_table(report),
        _alignment_reading(report),
        "Per-model evaluation reports: "
        + ", ".join(
            f"[{name}]({Path(r['eval_report']).relative_to(report['out']).as_posix()})"
            for name, r in report["results"].items()
            if r.get("eval_report")
        )
        + ".",
        "",
        "## Plots",
        "",
        "![loss curves](loss_curves.png)",
        "",
        "![latents used against budget](latents.png)",
        "",
        "## Time",
        "",
        "| part | seconds |",
        "|---|---|",
        *[f"| {k} | {v} |" for k, v in report["timings_s"].items()],
        "",
    ]
    return "\n".join(lines)


def _smooth(values: list[float], window: int) -> list[float]:
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def _plot_losses(path: Path, curves: dict[str, list[dict[str, Any]]], steps_a: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    a, c, b = curves["stage_a"], curves["stage_c"], curves["baseline"]
    window = max(1, (len(a) + len(c)) // 40)

    def series(rows, key, offset=0):
        xs = [r["step"] + offset for r in rows]
        return xs, _smooth([float(r[key]) for r in rows], window)

    panels = [
        ("loss", "total loss"),
        ("ce", "answer cross-entropy"),
        ("align", "alignment (1 - cos)"),
        ("stop", "stop loss (stage C)"),
    ]
    for ax, (key, title) in zip(axes.flat, panels, strict=True):
        if key != "stop":
            ax.plot(*series(a, key), label="stage A", color="tab:blue")
        ax.plot(*series(c, key, steps_a), label="stage C", color="tab:orange")
        if key in ("loss", "ce"):
            ax.plot(*series(b, key), label="no latents", color="tab:gray", alpha=0.8)
        if key != "stop":
            ax.axvline(steps_a, color="k", lw=0.8, ls=":")
        ax.set_title(title)
        ax.set_xlabel("training step")
        if key in ("loss", "ce"):
            ax.set_yscale("log")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.suptitle(f"Training curves (moving average over {window} steps; dotted line: switch to stage C)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_latents(
    path: Path, c_rows: list[dict[str, Any]], samples: list[dict[str, Any]], report: dict[str, Any]
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.5))
    steps = [r["step"] for r in c_rows]
    ax1.plot(
        steps, [r["used_ratio"] for r in c_rows], color="tab:orange", alpha=0.35, label="used/budget (batch)"
    )
    ax1.plot(
        steps,
        _smooth([r["used_ratio"] for r in c_rows], max(1, len(c_rows) // 20)),
        color="tab:orange",
        label="used/budget (moving average)",
    )
    ax1.plot(steps, [r["threshold"] for r in c_rows], color="k", ls="--", label="stop threshold")
    lo, hi = report["bars"]["used_ratio_range"]
    ax1.axhspan(lo, hi, color="tab:green", alpha=0.08, label=f"target band [{lo:g}, {hi:g}]")
    ax1.set_ylim(0, 1.05)
    ax1.set_xlabel("stage-C training step")
    ax1.set_title("Stage C: latents used per budget during training")
    ax1.legend(fontsize=8, loc="lower left")
    ax1.grid(alpha=0.3)

    per_budget: dict[int, list[int]] = {}
    for s in samples:
        for budget, used in zip(s["budgets"], s["used_lens"], strict=True):
            per_budget.setdefault(int(budget), []).append(int(used))
    if per_budget:
        budgets = sorted(per_budget)
        for bud in budgets:
            used = per_budget[bud]
            counts: dict[int, int] = {}
            for u in used:
                counts[u] = counts.get(u, 0) + 1
            ax2.scatter(
                [bud] * len(counts),
                list(counts),
                s=[20 + 200 * k / len(used) for k in counts.values()],
                color="tab:orange",
                alpha=0.5,
            )
        ax2.plot(
            budgets,
            [sum(per_budget[b]) / len(per_budget[b]) for b in budgets],
            "o-",
            color="tab:red",
            label="mean used (test)",
        )
        top = max(budgets)
        ax2.plot([0, top + 0.5], [0, top + 0.5], color="tab:blue", ls="--", label="used = budget (stage A)")
        ax2.set_xlim(0, top + 1)
        ax2.set_ylim(0, top + 1)
    ax2.set_xlabel("budget B_i of the CoT image")
    ax2.set_ylabel("latents used L_i'")
    ax2.set_title("Held-out test split: used latents against budget (dot size = share)")
    ax2.legend(fontsize=8, loc="upper left")
    ax2.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------- CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = __doc__
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument(
        "--out", type=Path, default=Path("runs/demo"), help="output folder (default: runs/demo)"
    )
    parser.add_argument(
        "--config",
        type=Path,
        default=None,
        help="YAML with 'demo', 'quick' and 'train' sections (see configs/demo.yaml)",
    )
    parser.add_argument(
        "--quick", action="store_true", help="a few steps on a few records (pipeline smoke test)"
    )
    parser.add_argument("--task", default=None, help="synthetic task (shapes or maze)")
    parser.add_argument("--steps-a", type=int, default=None, help="stage-A steps")
    parser.add_argument("--steps-c", type=int, default=None, help="stage-C steps")
    parser.add_argument("--n", type=int, default=None, help="records to generate")
    parser.add_argument("--seed", type=int, default=None, help="seed for data, model and order")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    try:
        settings = load_demo_settings(args.config, quick=args.quick)
    except (OSError, ValueError, yaml.YAMLError) as err:
        print(f"demo: error: {err}", file=sys.stderr)
        return 2
    for key in ("task", "steps_a", "steps_c", "n", "seed"):
        value = getattr(args, key)
        if value is not None:
            settings["demo"][key] = value
    if args.no_progress:
        settings["train"]["progress_bar"] = False
    t0 = time.perf_counter()
    report = run_demo(args.out, settings)
    print()
    print(results_table(report), end="")
    for name, ok in report["checks"].items():
        print(f"  {'ok  ' if ok else 'MISS'} {name}")
    minutes = (time.perf_counter() - t0) / 60
    print(
        f"\nreport: {Path(args.out) / 'report.md'} (also report.json, loss_curves.png, latents.png); "
        f"{minutes:.1f} min"
    )
    return 0 if report["all_bars_met"] or args.quick else 1
