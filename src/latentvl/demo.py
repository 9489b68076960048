"""Run the whole method end to end on the tiny model and a synthetic task, with its controls, and report.

``latentvl demo`` generates a synthetic visual chain-of-thought task (default ``relay``: k-hop colour
lookups, see :mod:`latentvl.data.synthetic`) and trains five arms on the same data with the same model,
optimiser, seed and steps:

- ``baseline_no_latents``: answers right after the question;
- ``pause``: the same latent slots, each filled with one learned vector (``latent_feedback: false``): as
  much extra width, no hidden state fed back;
- ``latents_no_align``: latent thoughts without the alignment loss (``latent_align_weight: 0``);
- ``stage_a``: latent thoughts aligned to the CoT images, fixed budgets;
- ``stage_c``: stage A's checkpoint trained on with learned halting.

The controls train for as many steps as stage A and stage C together, on the same data schedule
(``curriculum``: phases on records of growing difficulty, then the stage-C steps on all records). Every
arm is evaluated on the held-out test split with ``latentvl eval``'s instruments (accuracy by difficulty,
mask / swap / noise, truncation, implant, linear probe, alignment); ``report.md`` leads with accuracy
against difficulty for every arm. ``--quick`` runs a few steps on a few records (a smoke test of the
pipeline, not of the method); ``--full`` runs the longer schedule of the ``full`` section.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from .fileio import write_atomic

ARMS = ("baseline_no_latents", "pause", "latents_no_align", "stage_a", "stage_c")
ARM_LABELS = {
    "baseline_no_latents": "no latents (answer right after the question)",
    "pause": "pause tokens (learned constant slots, no feedback)",
    "latents_no_align": "latents without alignment",
    "stage_a": "stage A (latents, aligned, fixed budgets)",
    "stage_c": "stage C (learned halting)",
}
LATENT_ARMS = ("pause", "latents_no_align", "stage_a", "stage_c")


def _shipped_settings() -> dict[str, Any]:
    """The demo's defaults: ``latentvl/configs/demo.yaml``, shipped as package data (their one home)."""
    text = (resources.files("latentvl") / "configs" / "demo.yaml").read_text(encoding="utf-8")
    return yaml.safe_load(text)


# The demo's settings, read from the shipped configs/demo.yaml (pass --config to change them).
DEFAULTS: dict[str, Any] = _shipped_settings()
# The tasks `--task` accepts: those the shipped settings give generator knobs for.
DEMO_TASKS: tuple[str, ...] = tuple(DEFAULTS["demo"]["data"])
# What each control changes in the latent fields (everything else is shared).
ARM_LATENT = {
    "pause": {"latent_feedback": False, "latent_align_weight": 0.0},
    "latents_no_align": {"latent_align_weight": 0.0},
}


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def load_demo_settings(path: str | Path | None = None, quick: bool = False, full: bool = False) -> dict[str, Any]:
    """The built-in settings, updated from a YAML file of the same shape; ``quick`` shrinks the run and
    ``full`` applies the ``full`` section (the longer schedule)."""
    if quick and full:
        raise ValueError("--quick and --full exclude each other")
    settings = copy.deepcopy(DEFAULTS)
    if path is not None:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: must hold a mapping with sections {sorted(DEFAULTS)}")
        unknown = set(data) - set(DEFAULTS)
        if unknown:
            raise ValueError(f"{path}: unknown section(s) {sorted(unknown)}; known: {sorted(DEFAULTS)}")
        settings = _merge(settings, data)
    if quick:
        settings["demo"].update(settings["quick"])
    if full:
        settings["demo"].update(settings["full"])
    return settings


# --------------------------------------------------------------------------------------------- runs
def _train_config(settings: dict[str, Any], latent: dict[str, Any] | None = None, **fields: Any):
    from .training.config import TrainConfig

    train = copy.deepcopy(settings["train"])
    train["latent"] = {**train.get("latent", {}), **(latent or {})}
    cfg = TrainConfig.from_dict({**train, **fields}, validate=False)
    cfg.seed = int(settings["demo"]["seed"])
    return cfg.validate()



def _curriculum_files(data_dir: Path, curriculum: list[Any]) -> list[Path]:
    """One train file per curriculum phase: the train records with ``difficulty <= d``."""
    from .inference.instruments import read_record_fields

    rows = list(read_record_fields(data_dir / "train.jsonl").values())
    files = []
    for d in curriculum:
        keep = [r for r in rows if r.get("difficulty") is not None and r["difficulty"] <= d]
        if not keep:
            raise ValueError(f"curriculum phase {d!r}: no train record has difficulty <= {d!r}")
        path = data_dir / f"train_difficulty_le_{d}.jsonl"
        write_atomic(path, "".join(json.dumps(r) + "\n" for r in keep))
        files.append(path)
    return files


def _schedule(data_dir: Path, demo: dict[str, Any]) -> list[tuple[Path, int]]:
    """(train file, steps) phases of stage A: the curriculum's steps split evenly, the last takes the rest."""
    steps_a = int(demo["steps_a"])
    curriculum = list(demo.get("curriculum") or [])
    if not curriculum:
        return [(data_dir / "train.jsonl", steps_a)]
    files = _curriculum_files(data_dir, curriculum)
    per = steps_a // len(files)
    phases = [(f, per) for f in files[:-1]] + [(files[-1], steps_a - per * (len(files) - 1))]
    return [(f, n) for f, n in phases if n > 0]


def _train_phases(settings, phases, out_dir: Path, stage: str = "A", init_from: str | None = None, **fields):
    """Train through ``phases`` ((file, steps) pairs), each from the previous one's checkpoint."""
    from .training.trainer import train

    results, history, offset = [], [], 0
    for i, (data_file, steps) in enumerate(phases):
        cfg = _train_config(
            settings, stage=stage, max_steps=steps, output_dir=str(out_dir / f"phase{i}"),
            train_data=str(data_file), save_every=0, keep_last=1, init_from=init_from,
            warmup_steps=settings["train"]["warmup_steps"] if i == 0 and init_from is None else 0, **fields,
        )
        res = train(cfg)
        results.append(res)
        history += [{**r, "step": r["step"] + offset} for r in res.history]
        offset += steps
        init_from = str(res.checkpoint)
    return results, history, cfg


def _evaluate(
    model_dir: Path,
    records,
    settings: dict[str, Any],
    use_latents: bool,
    threshold: float | None,
    chance: float,
    out_dir: Path,
    fields: dict[str, Any],
    task: str,
    probe_records,
    probe_fields,
) -> dict[str, Any]:
    """Greedy two-step inference on ``records`` (``latentvl.inference.evaluate``) with every instrument.

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
        max_new_tokens=4,
        threshold=threshold,
        causal_checks=use_latents,
        use_latents=use_latents,
        chance_accuracy=chance,
        seed=int(settings["demo"]["seed"]),
        fields=fields,
        task=task,
        probe_records=probe_records if use_latents else None,
        probe_fields=probe_fields,
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
        "accuracy_by_difficulty": ev["accuracy_by_difficulty"],
        "used": used,
        "budget": budget,
        "used_ratio": used / budget if budget else None,
        "causal": causal,
        "truncation": ev.get("truncation"),
        "implant": ev.get("implant"),
        "probe": ev.get("probe"),
        "alignment": ev.get("alignment"),
        "eval_report": str(out_dir / "report.md"),
        "samples": [
            {"id": p["id"], "correct": p["correct"], "budgets": p["budgets"], "used_lens": p["used_lens"]}
            for p in preds
            if p["error"] is None
        ],
    }


def _checks(report: dict[str, Any]) -> dict[str, bool]:
    r, bars = report["results"], report["bars"]
    hard = report["hardest_difficulty"]

    def at_hard(arm: str) -> float:
        by = r[arm]["accuracy_by_difficulty"]
        return by[hard]["accuracy"] if hard is not None and hard in by else r[arm]["accuracy"]

    a = at_hard("stage_a")
    mask = (r["stage_a"].get("causal") or {}).get("mask") or {}
    follow = (r["stage_a"].get("implant") or {}).get("follow_rate")
    c_ratio = r["stage_c"]["used_ratio"]
    return {
        "stage_a_over_no_latents_at_hardest": a >= at_hard("baseline_no_latents") + bars["a_over_no_latents"],
        "stage_a_over_pause_at_hardest": a >= at_hard("pause") + bars["a_over_pause"],
        "masking_latents_costs_stage_a": mask.get("accuracy") is not None
        and r["stage_a"]["accuracy"] - mask["accuracy"] >= bars["mask_drop"],
        "implant_followed": follow is not None and follow >= bars["implant_follow"],
        "stage_c_within_5_points_of_a": r["stage_c"]["accuracy"]
        >= r["stage_a"]["accuracy"] - bars["max_c_accuracy_drop"],
        "stage_c_used_ratio_below_1": c_ratio is not None and c_ratio < bars["max_c_used_ratio"],
    }


def run_demo(out: str | Path, settings: dict[str, Any], log=print) -> dict[str, Any]:
    """Data, five arms, evaluation, report. Returns the report's JSON content."""
    import torch

    from .data.records import load_metadata, load_records
    from .data.synthetic import make_dataset
    from .inference.instruments import read_record_fields

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
    task = demo["task"]
    knobs = dict((demo.get("data") or {}).get(task) or {})
    meta = make_dataset(task, int(demo["n"]), int(demo["seed"]), data_dir, overwrite=True, **knobs)
    train_file, test_file = data_dir / "train.jsonl", data_dir / "test.jsonl"
    test_records, _ = load_records(test_file)
    train_records, _ = load_records(train_file)
    test_fields, train_fields = read_record_fields(test_file), read_record_fields(train_file)
    test_meta = load_metadata(test_file) or meta
    chance = float(test_meta["splits"]["test"]["chance_accuracy"] or test_meta["chance_accuracy"])
    has_difficulty = any("difficulty" in f for f in train_fields.values())
    if not has_difficulty:
        demo = {**demo, "curriculum": []}
    phases = _schedule(data_dir, demo)
    timings["data"] = time.perf_counter() - t0
    log(f"data: {meta['n']} {task} records in {data_dir} (chance accuracy {chance:.3f})")

    steps_a, steps_c = int(demo["steps_a"]), int(demo["steps_c"])
    c_phase = [(train_file, steps_c)]
    runs: dict[str, Any] = {}
    histories: dict[str, list[dict[str, Any]]] = {}

    # 2. stage A (curriculum phases), then stage C from its checkpoint on all records
    t0 = time.perf_counter()
    log(f"stage A: {steps_a} steps in {len(phases)} phase(s)")
    res, histories["stage_a"], _ = _train_phases(settings, phases, out / "stage_a")
    runs["stage_a"] = res[-1]
    timings["train_stage_a"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    log(f"stage C: {steps_c} steps from {runs['stage_a'].checkpoint}")
    res, histories["stage_c"], cfg_c = _train_phases(settings, c_phase, out / "stage_c", stage="C",
                                                     init_from=str(runs["stage_a"].checkpoint))
    runs["stage_c"] = res[-1]
    timings["train_stage_c"] = time.perf_counter() - t0

    # 3. the controls: the same phases, then the stage-C steps, as stage A
    for arm in ("baseline_no_latents", "pause", "latents_no_align"):
        t0 = time.perf_counter()
        log(f"{arm}: {steps_a + steps_c} steps")
        extra = {"use_latents": False} if arm == "baseline_no_latents" else {"latent": ARM_LATENT[arm]}
        res, histories[arm], _ = _train_phases(settings, phases + c_phase, out / arm, **extra)
        runs[arm] = res[-1]
        timings[f"train_{arm}"] = time.perf_counter() - t0

    # 4. held-out evaluation with the instruments
    t0 = time.perf_counter()
    final_thr = cfg_c.final_threshold
    probe_records = train_records[: int(demo["probe_records"])]
    evals = {}
    for arm in ARMS:
        log(f"evaluating {arm}")
        evals[arm] = _evaluate(
            runs[arm].checkpoint / "model", test_records, settings, arm != "baseline_no_latents",
            final_thr if arm == "stage_c" else None, chance, out / "eval" / arm, test_fields, task,
            probe_records, train_fields,
        )
    timings["evaluate"] = time.perf_counter() - t0

    # 5. report
    diffs = sorted({d for ev in evals.values() for d in ev["accuracy_by_difficulty"]}, key=_difficulty_key)
    timings["total"] = time.perf_counter() - t_start
    report = {
        "task": task,
        "n_records": meta["n"],
        "splits": {k: v["size"] for k, v in meta["splits"].items()},
        "test_chance_accuracy": chance,
        "hardest_difficulty": diffs[-1] if diffs else None,
        "steps": {"stage_a": steps_a, "stage_c": steps_c,
                  **{arm: steps_a + steps_c for arm in ("baseline_no_latents", "pause", "latents_no_align")}},
        "schedule": [{"train_data": Path(f).name, "steps": n} for f, n in phases],
        "final_threshold": final_thr,
        "results": {arm: _summary(evals[arm]) for arm in ARMS},
        "bars": demo["bars"],
        "per_sample": {"stage_a": evals["stage_a"]["samples"], "stage_c": evals["stage_c"]["samples"]},
        "preflight": {arm: [r.to_dict() for r in runs[arm].checks] for arm in ARMS},
        "timings_s": {k: round(v, 1) for k, v in timings.items()},
        "settings": settings,
        "out": str(out),
        "outputs": {arm: str(runs[arm].checkpoint) for arm in ARMS},
    }
    report["checks"] = _checks(report)
    report["all_bars_met"] = all(report["checks"].values())
    _plot_accuracy_vs_difficulty(out / "accuracy_vs_difficulty.png", report)
    _plot_losses(out / "loss_curves.png", histories, steps_a)
    _plot_latents(out / "latents.png", histories["stage_c"], evals["stage_c"]["samples"], report)
    write_atomic(out / "report.json", json.dumps(report, indent=2) + "\n")
    write_atomic(out / "report.md", _markdown(report))
    return report


def _difficulty_key(d: str) -> tuple[int, float, str]:
    try:
        return (0, float(d), d)
    except ValueError:
        return (1, 0.0, d)


def _summary(ev: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in ev.items() if k != "samples"}


# ------------------------------------------------------------------------------------------- report
def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def difficulty_table(report: dict[str, Any]) -> str:
    """Accuracy per difficulty (rows) for every arm (columns), with chance."""
    r = report["results"]
    diffs = sorted({d for arm in ARMS for d in r[arm]["accuracy_by_difficulty"]}, key=_difficulty_key)
    head = "| difficulty | n | " + " | ".join(ARM_LABELS[a].split(" (")[0] for a in ARMS) + " | chance |"
    rows = [head, "|" + "---|" * (len(ARMS) + 3)]
    for d in diffs:
        n = r["stage_a"]["accuracy_by_difficulty"].get(d, {}).get("n", "-")
        cells = [_pct(r[a]["accuracy_by_difficulty"].get(d, {}).get("accuracy")) for a in ARMS]
        rows.append(f"| {d} | {n} | " + " | ".join(cells) + f" | {report['test_chance_accuracy']:.3f} |")
    cells = [_pct(r[a]["accuracy"]) for a in ARMS]
    rows.append("| all | " + str(r["stage_a"]["n"]) + " | " + " | ".join(cells)
                + f" | {report['test_chance_accuracy']:.3f} |")
    return "\n".join(rows) + "\n"


def results_table(report: dict[str, Any]) -> str:
    r = report["results"]
    chance = report["test_chance_accuracy"]
    st = report["steps"]

    def ratio(x: dict[str, Any]) -> str:
        return f"{x['used_ratio']:.3f} ({x['used']}/{x['budget']})" if x["budget"] else "- (no latents)"

    def steps(arm: str) -> str:
        return f"{st['stage_a']} + {st['stage_c']}" if arm == "stage_c" else str(st[arm])

    rows = [
        "| model | train steps | test accuracy | mean used/budget |",
        "|---|---|---|---|",
        f"| chance (most frequent answer) | - | {chance:.3f} | - |",
    ]
    for arm in ARMS:
        label = ARM_LABELS[arm]
        if arm == "stage_c":
            label = f"stage C (learned halting, threshold {report['final_threshold']:g})"
        rows.append(f"| {label} | {steps(arm)} | {_pct(r[arm]['accuracy'])} | {ratio(r[arm])} |")
    return "\n".join(rows) + "\n"


def causal_table(report: dict[str, Any]) -> str:
    rows = ["| model | latents masked | latents noised | latents swapped |", "|---|---|---|---|"]
    for key in LATENT_ARMS:
        causal = report["results"][key].get("causal") or {}
        cells = []
        for check in ("mask", "noise", "swap"):
            c = causal.get(check)
            cells.append(f"{c['accuracy']:.3f} (changed {c['answer_change_rate']:.3f})" if c else "-")
        rows.append(f"| {ARM_LABELS[key].split(' (')[0]} | " + " | ".join(cells) + " |")
    return "\n".join(rows) + "\n"


def truncation_table(report: dict[str, Any]) -> str:
    r = report["results"]
    keeps = sorted({j for a in LATENT_ARMS for j in (r[a].get("truncation") or {})}, key=int)
    if not keeps:
        return ""
    rows = ["| segments kept | " + " | ".join(ARM_LABELS[a].split(" (")[0] for a in LATENT_ARMS) + " |",
            "|" + "---|" * (len(LATENT_ARMS) + 1)]
    for j in keeps:
        cells = []
        for a in LATENT_ARMS:
            t = (r[a].get("truncation") or {}).get(j)
            cells.append(f"{t['accuracy']:.3f} (n {t['n']})" if t else "-")
        rows.append(f"| {j} | " + " | ".join(cells) + " |")
    return "\n".join(rows) + "\n"


def instrument_table(report: dict[str, Any]) -> str:
    rows = ["| model | implant: follows | implant: unchanged | probe accuracy per segment (majority) |",
            "|---|---|---|---|"]
    for a in LATENT_ARMS:
        x = report["results"][a]
        imp = x.get("implant") or {}
        probe = x.get("probe") or {}
        pr = ", ".join(f"{j}: {v['accuracy']:.2f} ({v['majority']:.2f})" for j, v in probe.items()) or "-"
        rows.append(f"| {ARM_LABELS[a].split(' (')[0]} | {_pct(imp.get('follow_rate'))} (n {imp.get('n', 0)}) "
                    f"| {_pct(imp.get('unchanged_rate'))} | {pr} |")
    return "\n".join(rows) + "\n"


def alignment_table(report: dict[str, Any]) -> str:
    rows = ["| model | cosine, latent vs its pooled target | segment mean vs own / other images | "
            "retrieval top-1 (chance) |", "|---|---|---|---|"]
    for key in LATENT_ARMS:
        label = ARM_LABELS[key].split(" (")[0]
        al = report["results"][key].get("alignment")
        if not al or al.get("retrieval_top1") is None:
            rows.append(f"| {label} | - | - | - |")
            continue
        rows.append(f"| {label} | {al['mean_cosine']:.3f} | {al['mean_cosine_own']:.3f} / "
                    f"{al['mean_cosine_other']:.3f} | {al['retrieval_top1']:.3f} ({al['chance']:.3f}, "
                    f"{al['retrieval_set']} segments) |")
    return "\n".join(rows) + "\n"


def _at(report: dict[str, Any], arm: str, d: str | None) -> float | None:
    by = report["results"][arm]["accuracy_by_difficulty"]
    if d is not None and d in by:
        return by[d]["accuracy"]
    return report["results"][arm]["accuracy"]


def _difficulty_reading(report: dict[str, Any]) -> str:
    d = report["hardest_difficulty"]
    a, b, p, n = (_at(report, arm, d) for arm in ("stage_a", "baseline_no_latents", "pause", "latents_no_align"))
    where = f"at the hardest difficulty ({d})" if d is not None else "overall"
    return (f"Reading: {where} stage A answers {a:.3f}, the no-latent model {b:.3f}, pause tokens {p:.3f} and "
            f"unaligned latents {n:.3f} (chance {report['test_chance_accuracy']:.3f}): stage A is "
            f"{100 * (a - b):+.1f} points over no latents and {100 * (a - p):+.1f} over pause tokens.\n")


def _causal_reading(report: dict[str, Any]) -> str:
    x = report["results"]["stage_a"]
    mask = (x.get("causal") or {}).get("mask")
    if not mask:
        return ""
    drop = x["accuracy"] - mask["accuracy"]
    if mask["answer_change_rate"] < 0.05:
        return ("Reading: masking every latent changes fewer than 5% of stage A's answers: it answers from the "
                "question and the latents carry little of the decision.\n")
    return (f"Reading: masking every latent moves stage A from {x['accuracy']:.3f} to {mask['accuracy']:.3f} "
            f"({100 * drop:+.1f} points lost) and changes {mask['answer_change_rate']:.0%} of its answers.\n")


def _truncation_reading(report: dict[str, Any]) -> str:
    t = report["results"]["stage_a"].get("truncation") or {}
    if not t:
        return ""
    parts = ", ".join(f"{j}: {v['accuracy']:.2f}" for j, v in t.items())
    return (f"Reading: stage A's accuracy with only the first j segments kept ({parts}; all kept: "
            f"{report['results']['stage_a']['accuracy']:.2f}).\n")


def _implant_reading(report: dict[str, Any]) -> str:
    imp = report["results"]["stage_a"].get("implant") or {}
    if not imp.get("n"):
        return "Reading: no implant was possible (the records carry no cot_states).\n"
    if imp.get("follow_rate") is None:
        return (f"Reading: implants changed {1 - imp['unchanged_rate']:.0%} of stage A's answers (the task "
                "supplies no implied answer).\n")
    return (f"Reading: after an implant, stage A gives the answer the implanted state implies in "
            f"{imp['follow_rate']:.0%} of {imp['n_with_implied_answer']} cases and keeps its own answer in "
            f"{imp['unchanged_rate']:.0%}.\n")


def _probe_reading(report: dict[str, Any]) -> str:
    probe = report["results"]["stage_a"].get("probe") or {}
    if not probe:
        return ""
    accs = [v["accuracy"] for v in probe.values()]
    majs = [v["majority"] for v in probe.values()]
    return (f"Reading: a linear probe reads segment i's state from stage A's latents with mean accuracy "
            f"{sum(accs) / len(accs):.2f} (majority state {sum(majs) / len(majs):.2f}).\n")


def _alignment_reading(report: dict[str, Any]) -> str:
    al = report["results"]["stage_a"].get("alignment")
    if not al or al.get("retrieval_top1") is None:
        return ""
    own, other = al["mean_cosine_own"], al["mean_cosine_other"]
    found = f"find their own image {al['retrieval_top1']:.0%} of the time against {al['chance']:.1%} by chance"
    return (f"Reading: stage A's segment means have cosine {own:.2f} with their own CoT image and {other:.2f} with "
            f"other samples' and {found}.\n")


def _setup(report: dict[str, Any]) -> str:
    t = report["settings"]["train"]
    lat = t["latent"]
    budgets: dict[int, int] = {}
    for s in report["per_sample"]["stage_a"]:
        for b in s["budgets"]:
            budgets[int(b)] = budgets.get(int(b), 0) + 1
    spread = ", ".join(f"{b}: {n}" for b, n in sorted(budgets.items()))
    sched = ", ".join(f"{p['steps']} on {p['train_data']}" for p in report["schedule"])
    return (
        f"Tiny Qwen2.5-VL (hidden {t['tiny_hidden_size']}, {t['tiny_num_layers']} language layers), batch "
        f"{t['batch_size']}, {t['optimizer']} lr {t['lr']:g} ({t['lr_scheduler']}, "
        f"{t['warmup_steps']} warm-up steps), seed {report['settings']['demo']['seed']}, the same for every "
        f"arm. Stage-A schedule: {sched}; stage C and the controls' last "
        f"{report['steps']['stage_c']} steps on all train records. Budgets: alpha "
        f"{lat['latent_budget_alpha']:g}, gamma {lat['latent_budget_gamma']:g}, max {lat['latent_budget_max']}; "
        f"CoT images of the test split per budget: {spread}. Stage C: stop threshold {t['threshold_start']:g} -> "
        f"{report['final_threshold']:g} over {t['threshold_anneal_steps']} steps, stop weight "
        f"{lat['latent_stop_loss_weight']:g}, cost weight {lat['latent_cost_weight']:g}. Pause tokens: "
        "`latent_feedback: false`, no alignment (their slot inputs are one constant vector).\n"
    )


_CHECK_TEXT = {
    "stage_a_over_no_latents_at_hardest": "stage A >= no latents + {a_over_no_latents:.0%} at the hardest difficulty",
    "stage_a_over_pause_at_hardest": "stage A >= pause tokens + {a_over_pause:.0%} at the hardest difficulty",
    "masking_latents_costs_stage_a": "masking every latent costs stage A >= {mask_drop:.0%}",
    "implant_followed": "implant: >= {implant_follow:.0%} of stage A's answers follow the implanted state",
    "stage_c_within_5_points_of_a": "stage C no more than {max_c_accuracy_drop:.0%} below stage A",
    "stage_c_used_ratio_below_1": "stage C mean used/budget below {max_c_used_ratio:g}",
}


def _markdown(report: dict[str, Any]) -> str:
    ok = {True: "met", False: "NOT met"}
    bars = report["bars"]
    lines = [
        "# latentvl demo report",
        "",
        f"Task `{report['task']}`: {report['n_records']} generated records ("
        + " / ".join(f"{n} {split}" for split, n in report["splits"].items())
        + "). All numbers below are measured on the held-out test split "
        f"({report['results']['stage_a']['n']} records).",
        "",
        "## Accuracy against difficulty, every arm",
        "",
        "![accuracy against difficulty](accuracy_vs_difficulty.png)",
        "",
        difficulty_table(report),
        _difficulty_reading(report),
        "## Arms",
        "",
        results_table(report),
        _setup(report),
        "## Bars",
        "",
        *[f"- {_CHECK_TEXT[name].format(**bars)}: {ok[v]}" for name, v in report["checks"].items()],
        "",
        "Accuracy: greedy two-step inference (latent pass, then generate), exact match of the answer. "
        "Stage C halts with the final threshold. used/budget: latents used over the budget, summed over "
        "every CoT segment of the test split.",
        "",
        "## Do the answers depend on the latents?",
        "",
        "Causal checks of `latentvl eval` on the test split: accuracy when every latent is masked out of "
        "attention, replaced by noise of the same norm, or swapped with another sample's latents (share of "
        "answers changed in brackets).",
        "",
        causal_table(report),
        _causal_reading(report),
        "Truncation: only the first j CoT segments' latents kept, the rest masked (over the samples with more "
        "than j segments).",
        "",
        truncation_table(report),
        _truncation_reading(report),
        "Implant: one segment's latents replaced, during the latent pass, by those another sample produced "
        "for a different state; the later latents continue from it. Linear probe: per segment index, a "
        "softmax regression from a latent to the state of its CoT image, fit on train-split latents.",
        "",
        instrument_table(report),
        _implant_reading(report),
        _probe_reading(report),
        "## Do the latents look like their CoT images?",
        "",
        "Each test record's CoT images, read for this measurement only, encoded by the vision tower and "
        "pooled into as many groups as the segment used latents (the alignment loss's targets).",
        "",
        alignment_table(report),
        _alignment_reading(report),
        "Per-arm evaluation reports: "
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


def _plot_accuracy_vs_difficulty(path: Path, report: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    r = report["results"]
    diffs = sorted({d for a in ARMS for d in r[a]["accuracy_by_difficulty"]}, key=_difficulty_key)
    fig, ax = plt.subplots(figsize=(7, 4.2))
    styles = {"baseline_no_latents": ("tab:gray", "s"), "pause": ("tab:purple", "v"),
              "latents_no_align": ("tab:green", "^"), "stage_a": ("tab:blue", "o"), "stage_c": ("tab:orange", "D")}
    for arm in ARMS:
        ys = [r[arm]["accuracy_by_difficulty"].get(d, {}).get("accuracy") for d in diffs]
        pts = [(d, y) for d, y in zip(diffs, ys) if y is not None]
        if pts:
            color, marker = styles[arm]
            ax.plot([d for d, _ in pts], [100 * y for _, y in pts], marker=marker, color=color,
                    label=ARM_LABELS[arm].split(" (")[0])
    ax.axhline(100 * report["test_chance_accuracy"], color="k", ls="--", lw=1, label="chance")
    ax.set_xlabel("difficulty (relay: hops k)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_ylim(-3, 103)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    ax.set_title("Held-out accuracy against difficulty, every arm")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


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
    longest = max((len(v) for v in curves.values()), default=1)
    window = max(1, longest // 40)
    colors = {"baseline_no_latents": "tab:gray", "pause": "tab:purple", "latents_no_align": "tab:green",
              "stage_a": "tab:blue", "stage_c": "tab:orange"}

    def series(rows, key, offset=0):
        rows = [r for r in rows if r.get(key) is not None]
        xs = [r["step"] + offset for r in rows]
        return xs, _smooth([float(r[key]) for r in rows], window)

    panels = [("loss", "total loss"), ("ce", "answer cross-entropy"), ("align", "alignment (1 - cos)"),
              ("stop", "stop loss (stage C)")]
    for ax, (key, title) in zip(axes.flat, panels, strict=True):
        for arm, rows in curves.items():
            if key == "align" and arm in ("baseline_no_latents", "pause", "latents_no_align"):
                continue
            if key == "stop" and arm != "stage_c":
                continue
            xs, ys = series(rows, key, steps_a if arm == "stage_c" else 0)
            if xs:
                ax.plot(xs, ys, label=ARM_LABELS[arm].split(" (")[0], color=colors.get(arm), alpha=0.85)
        ax.axvline(steps_a, color="k", lw=0.8, ls=":")
        ax.set_title(title)
        ax.set_xlabel("training step")
        if key in ("loss", "ce"):
            ax.set_yscale("log")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.suptitle(f"Training curves (moving average over {window} steps; dotted line: end of stage A)")
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
        help="YAML with any of the 'demo', 'quick', 'full' and 'train' sections, merged over the shipped "
        "latentvl/configs/demo.yaml",
    )
    parser.add_argument(
        "--quick", action="store_true", help="a few steps on a few records (pipeline smoke test)"
    )
    parser.add_argument("--full", action="store_true", help="the longer schedule of the 'full' section")
    parser.add_argument("--task", default=None, choices=DEMO_TASKS,
                        help=f"synthetic task (default: {DEFAULTS['demo']['task']})")
    parser.add_argument("--steps-a", type=int, default=None, help="stage-A steps")
    parser.add_argument("--steps-c", type=int, default=None, help="stage-C steps")
    parser.add_argument("--n", type=int, default=None, help="records to generate")
    parser.add_argument("--seed", type=int, default=None, help="seed for data, model and order")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    try:
        settings = load_demo_settings(args.config, quick=args.quick, full=args.full)
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
    print(difficulty_table(report), end="")
    print()
    print(results_table(report), end="")
    for name, ok in report["checks"].items():
        print(f"  {'ok  ' if ok else 'MISS'} {name}")
    minutes = (time.perf_counter() - t0) / 60
    print(
        f"\nreport: {Path(args.out) / 'report.md'} (also report.json, accuracy_vs_difficulty.png, "
        "loss_curves.png, latents.png); "
        f"{minutes:.1f} min"
    )
    return 0 if report["all_bars_met"] or args.quick else 1
