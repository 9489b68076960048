"""Evaluate a latent model on a JSONL test set: accuracy, latent usage, speed and causal checks.

``latentvl eval --model DIR --data test.jsonl --out DIR`` writes ``report.md``, ``report.json``,
``predictions.jsonl`` and two plots (``used_latents_hist.png``: used latents per budget;
``accuracy_vs_latents.png``: accuracy against the number of latents a sample used). The Python entry
point is :func:`evaluate`. Answers are decoded greedily with the two inference steps (design §9) and
compared by exact match after :func:`~latentvl.inference.generate.normalize_answer`.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from .alignment import AlignmentProbe
from .causal import CHECK_RULES, CHECKS, DonorPool, effective_rank, mask_latents, noise_latents, swap_latents
from .generate import (
    BatchOutcome,
    GenerationSettings,
    InferenceResult,
    LatentInference,
    Patches,
    normalize_answer,
)
from .instruments import (
    InstrumentRunner,
    accuracy_by_difficulty,
    collect_segment_latents,
    fit_linear_probe,
    read_record_fields,
    record_fields,
    task_of_data,
)

__all__ = ["add_arguments", "chance_from_metadata", "evaluate", "run"]

REPORT_FILES = {
    "json": "report.json",
    "markdown": "report.md",
    "predictions": "predictions.jsonl",
    "used_hist": "used_latents_hist.png",
    "accuracy_vs_latents": "accuracy_vs_latents.png",
    "accuracy_by_difficulty": "accuracy_by_difficulty.png",
}


def _gold(record: Any) -> str | None:
    value = record.get("answer") if isinstance(record, dict) else getattr(record, "answer", None)
    return value if isinstance(value, str) else None


def _batch_seconds(timings: dict[str, float]) -> float:
    return timings["encode_s"] + timings["latent_pass_s"] + timings["generation_s"]


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


class _CausalRunner:
    """Runs the three checks on each batch after the normal answers, and collects their answers."""

    def __init__(self, engine: LatentInference, gen: GenerationSettings, seed: int,
                 max_rank_rows: int = 8192):
        self.engine = engine
        self.max_rank_rows = max_rank_rows
        self.gen = gen
        self.pool = DonorPool()
        self.noise_gen = torch.Generator().manual_seed(seed)
        self.answers: dict[str, dict[int, str]] = {name: {} for name in CHECKS}
        self.latents: list[torch.Tensor] = []  # the first max_rank_rows vectors, for the effective rank
        self.kept = 0

    def __call__(self, outcome: BatchOutcome) -> None:
        p1 = outcome.latent
        results = outcome.results
        latents = [r.latents for r in results]
        for x in latents:
            if x is not None and x.shape[0] > 0 and self.kept < self.max_rank_rows:
                self.latents.append(x[: self.max_rank_rows - self.kept])
                self.kept += self.latents[-1].shape[0]
        has_latents = [sum(r.used_lens) > 0 for r in results]
        if p1 is None or not any(has_latents):
            return
        base = Patches.from_pass(p1)
        structures = [tuple(r.used_lens) for r in results]
        donors = self.pool.donors(structures, latents)
        variants = {
            "mask": mask_latents(base, outcome.batch["input_ids"], self.engine.latent_token_id),
            "swap": swap_latents(base, donors) if any(d is not None for d in donors) else None,
            "noise": noise_latents(base, self.noise_gen),
        }
        for name, patches in variants.items():
            if patches is None:
                continue
            new_tokens = self.engine.generate(outcome.batch, outcome.embeds, patches, self.gen)
            decoded = self.engine.decode(new_tokens)
            for b, (r, (text, _ids, _fin)) in enumerate(zip(results, decoded, strict=True)):
                if has_latents[b] and (name != "swap" or donors[b] is not None):
                    self.answers[name][r.index] = text

    def summary(self, rows: dict[int, dict[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name in CHECKS:
            got = self.answers[name]
            n = len(got)
            base_correct = [rows[i]["correct"] for i in got]
            correct = [normalize_answer(a) == normalize_answer(rows[i]["gold"]) for i, a in got.items()]
            changed = [normalize_answer(a) != normalize_answer(rows[i]["prediction"]) for i, a in got.items()]
            out[name] = {
                "n": n,
                "accuracy": _mean(correct),
                "accuracy_base": _mean(base_correct),
                "answer_change_rate": _mean(changed),
                "rule": CHECK_RULES[name],
            }
            for i, a in got.items():
                rows[i][f"prediction_{name}"] = a
        stacked = torch.cat(self.latents) if self.latents else torch.zeros(0, 0)
        rank = effective_rank(stacked) if stacked.numel() else math.nan
        out["effective_rank"] = {
            "value": None if math.isnan(rank) else rank,
            "num_vectors": int(stacked.shape[0]),
            "dim": int(stacked.shape[1]) if stacked.ndim == 2 and stacked.numel() else None,
            "max_possible": int(min(stacked.shape)) if stacked.numel() else None,
        }
        return out


def evaluate(
    model: Any,
    processor: Any,
    records: Sequence[Any],
    out_dir: str | Path | None = None,
    batch_size: int = 8,
    max_new_tokens: int = 16,
    threshold: float | None = None,
    causal_checks: bool = True,
    use_latents: bool = True,
    chance_accuracy: float | None = None,
    default_num_segments: int = 1,
    seed: int = 0,
    extra_errors: Sequence[dict[str, Any]] = (),
    fields: Mapping[str, Mapping[str, Any]] | None = None,
    task: str | None = None,
    instruments: bool = True,
    probe_records: Sequence[Any] | None = None,
    probe_fields: Mapping[str, Mapping[str, Any]] | None = None,
) -> dict[str, Any]:
    """Answer every record greedily and report; with ``out_dir``, also write the report files.

    ``records``: :class:`~latentvl.data.records.Record` objects or dicts (``answer`` is the gold
    answer). ``use_latents=False`` evaluates a model trained without latent segments (no step 1, no
    causal checks). ``extra_errors`` (``{"id", "kind", "error"}``) are samples that failed before this
    call (e.g. invalid JSONL lines) and are counted as errors.

    Instruments (``latentvl.inference.instruments``): ``fields`` maps a record id to its raw JSON
    object (for records that are not dicts), whose optional ``difficulty`` and ``cot_states`` enable
    accuracy by difficulty, the implant's follow rate and the linear probe; ``task`` names the task for
    the implied answers. With ``instruments`` (and latents and causal checks on), truncation and implant
    run; with ``probe_records`` (and ``probe_fields``), the linear probe is fit on their latents.

    Returns the report (see ``docs/inference.md`` for every key) with ``predictions`` (one dict per
    record, in order) added.
    """
    engine = LatentInference(model, processor, threshold=threshold, use_latents=use_latents,
                             default_num_segments=default_num_segments)
    gen = GenerationSettings(max_new_tokens=max_new_tokens)
    do_causal = causal_checks and use_latents
    causal = _CausalRunner(engine, gen, seed) if do_causal else None
    alignment = AlignmentProbe(model, engine.collator.image_processor) if do_causal else None
    rec_fields = [record_fields(r, fields) for r in records]
    instr = InstrumentRunner(engine, gen, rec_fields, task, seed) if do_causal and instruments else None
    results: list[InferenceResult] = []
    batch_times: list[float] = []
    model_was_training = model.training
    model.eval()
    try:
        for outcome, errors in engine.iter_batches(records, gen, batch_size, return_latents=use_latents):
            results.extend(errors)
            if outcome is None:
                continue
            results.extend(outcome.results)
            batch_times.append(_batch_seconds(outcome.results[0].timings))
            if causal is not None:
                causal(outcome)
                alignment(outcome.results, records)
            if instr is not None:
                instr(outcome)
            for r in outcome.results:
                r.latents = None  # only the causal and alignment checks need them
    finally:
        model.train(model_was_training)

    results.sort(key=lambda r: r.index)
    rows: dict[int, dict[str, Any]] = {}
    for r in results:
        gold = _gold(records[r.index])
        row = r.to_dict()
        row.update(gold=gold, prediction=r.answer)
        row["correct"] = r.ok and gold is not None and normalize_answer(r.answer) == normalize_answer(gold)
        del row["answer"]
        rows[r.index] = row
    report = _summarise(rows, batch_times, chance_accuracy, extra_errors)
    report["accuracy_by_difficulty"] = accuracy_by_difficulty([rows[i] for i in sorted(rows)],
                                                              [rec_fields[i] for i in sorted(rows)])
    probe = None
    if instr is not None and probe_records is not None and instr.probe_rows:
        p_fields = [record_fields(r, probe_fields) for r in probe_records]
        model.eval()
        try:
            train_rows = collect_segment_latents(engine, probe_records, p_fields, batch_size)
        finally:
            model.train(model_was_training)
        if train_rows:
            probe = fit_linear_probe(train_rows, instr.probe_rows)
    if threshold is None:
        threshold = getattr(model.config, "latent_stop_threshold", None)
    report.update(
        use_latents=use_latents,
        stage=getattr(model.config, "latent_mode_stage", None),
        threshold=threshold,
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
        causal=causal.summary(rows) if causal is not None else None,
        alignment=alignment.summary() if alignment is not None else None,
        **(instr.summary(rows) if instr is not None else {"truncation": None, "implant": None}),
        probe=probe,
    )
    predictions = [rows[i] for i in sorted(rows)]
    if out_dir is not None:
        report["files"] = write_report(report, predictions, Path(out_dir))
    return {**report, "predictions": predictions}


def _summarise(
    rows: dict[int, dict[str, Any]], batch_times: list[float], chance: float | None,
    extra_errors: Sequence[dict[str, Any]],
) -> dict[str, Any]:
    ok = [r for r in rows.values() if r["error"] is None]
    errors = [{"id": r["id"], "kind": r["error_kind"], "error": r["error"]}
              for r in rows.values() if r["error"]]
    errors += [dict(e) for e in extra_errors]
    n_correct = sum(r["correct"] for r in ok)
    n_total = len(rows) + len(extra_errors)

    ratios, used_all, budget_all = [], [], []
    by_budget: dict[int, Counter] = defaultdict(Counter)
    by_total: dict[int, list[bool]] = defaultdict(list)
    for r in ok:
        for u, b in zip(r["used_lens"], r["budgets"]):
            ratios.append(u / b)
            used_all.append(u)
            budget_all.append(b)
            by_budget[b][u] += 1
        by_total[sum(r["used_lens"])].append(r["correct"])

    latency = [_batch_seconds(r["timings"]) for r in ok]
    total_time = sum(batch_times)
    return {
        "n_samples": n_total,
        "n_evaluated": len(ok),
        "n_errors": len(errors),
        "n_correct": n_correct,
        "accuracy": n_correct / len(ok) if ok else None,
        "accuracy_errors_as_wrong": n_correct / n_total if n_total else None,
        "chance_accuracy": chance,
        "latents": {
            "num_images": len(ratios),
            "mean_used_per_image": _mean(used_all),
            "mean_budget_per_image": _mean(budget_all),
            "mean_used_over_budget": _mean(ratios),
            "used_over_budget_total": sum(used_all) / sum(budget_all) if budget_all else None,
            "mean_used_per_sample": _mean([sum(r["used_lens"]) for r in ok]),
            "by_budget": {
                str(b): {"count": c.total(), "mean_used": sum(u * n for u, n in c.items()) / c.total(),
                         "hist": {str(u): c[u] for u in sorted(c)}}
                for b, c in sorted(by_budget.items())
            },
        },
        "accuracy_by_latents_used": {
            str(k): {"n": len(v), "accuracy": sum(v) / len(v)} for k, v in sorted(by_total.items())
        },
        "timing": {
            "latency_s_per_sample": _mean(latency),
            **{f"{part}_per_sample": _mean([r["timings"][part] / r["timings"]["batch_size"] for r in ok])
               for part in ("encode_s", "latent_pass_s", "generation_s")},
            "throughput_samples_per_s": len(ok) / total_time if total_time > 0 else None,
            "total_s": total_time,
            "num_batches": len(batch_times),
        },
        "errors": errors,
    }


# ---------------------------------------------------------------------------------------------- output
def write_report(report: dict[str, Any], predictions: list[dict[str, Any]], out_dir: Path) -> dict[str, str]:
    """Write the JSON, markdown, predictions and (when there are latents) the plots; return their names."""
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {k: v for k, v in REPORT_FILES.items() if k in ("json", "markdown", "predictions")}
    if report["latents"]["num_images"]:
        _plot_used_hist(report, out_dir / REPORT_FILES["used_hist"])
        _plot_accuracy_vs_latents(report, out_dir / REPORT_FILES["accuracy_vs_latents"])
        files.update({k: REPORT_FILES[k] for k in ("used_hist", "accuracy_vs_latents")})
    if report.get("accuracy_by_difficulty"):
        _plot_accuracy_by_difficulty(report, out_dir / REPORT_FILES["accuracy_by_difficulty"])
        files["accuracy_by_difficulty"] = REPORT_FILES["accuracy_by_difficulty"]
    report = {**report, "files": files}
    (out_dir / files["json"]).write_text(json.dumps(report, indent=2, allow_nan=False, default=_json_default)
                                         + "\n", encoding="utf-8")
    with open(out_dir / files["predictions"], "w", encoding="utf-8") as f:
        for row in predictions:
            f.write(json.dumps(row, default=_json_default) + "\n")
    (out_dir / files["markdown"]).write_text(render_markdown(report), encoding="utf-8")
    return files


def _json_default(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, torch.Tensor):
        return value.tolist()
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


def _fmt(value: Any, pct: bool = False, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if pct:
        return f"{100 * value:.1f}%"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 1e-3 or abs(value) >= 1e4 else f"{value:.{digits}f}"
    return str(value)


def _alignment_markdown(al: dict[str, Any] | None) -> list[str]:
    if not al or not al["n_segments"]:
        return []
    return [
        "## Do the latents look like their CoT images?",
        "",
        "Read from the records' CoT images for this measurement only (the answers never see them): each",
        "image's visual tokens (vision tower and merger) pooled into as many groups as its segment used",
        "latents, as in the alignment loss.",
        "",
        "| metric | value |",
        "|---|---|",
        f"| segments (latents) | {al['n_segments']} ({al['n_latents']}) |",
        f"| mean cosine, latent vs its own pooled target | {_fmt(al['mean_cosine'])} |",
        f"| retrieval top-1: mean latent closest to its own target among {al['retrieval_set']} | "
        f"{_fmt(al['retrieval_top1'], pct=True)} (chance {_fmt(al['chance'], pct=True)}) |",
        f"| mean cosine, a segment's mean latent vs its own mean target | {_fmt(al['mean_cosine_own'])} |",
        f"| mean cosine, a segment's mean latent vs the other segments' | {_fmt(al['mean_cosine_other'])} |",
        "",
    ]


def _instruments_markdown(report: dict[str, Any]) -> list[str]:
    lines: list[str] = []
    chance = report.get("chance_accuracy")
    by_d = report.get("accuracy_by_difficulty")
    if by_d:
        lines += ["## Accuracy by difficulty", "", f"Records' `difficulty` field; chance {_fmt(chance, pct=True)}.",
                  "", "| difficulty | samples | accuracy |", "|---|---|---|"]
        lines += [f"| {d} | {v['n']} | {_fmt(v['accuracy'], pct=True)} |" for d, v in by_d.items()]
        lines.append("")
    trunc = report.get("truncation")
    if trunc:
        lines += ["## Truncation: only the first j segments' latents kept", "",
                  "The later segments' latent slots are masked out of attention in step 2; counted over the "
                  "samples with more than j segments.", "",
                  "| segments kept (j) | n | accuracy | accuracy (all kept) | answer-change rate |",
                  "|---|---|---|---|---|"]
        lines += [f"| {j} | {v['n']} | {_fmt(v['accuracy'], pct=True)} | {_fmt(v['accuracy_base'], pct=True)} | "
                  f"{_fmt(v['answer_change_rate'], pct=True)} |" for j, v in trunc.items()]
        lines.append("")
    imp = report.get("implant")
    if imp and imp["n"]:
        lines += ["## Implant: does the answer follow an implanted state?", "",
                  f"{imp['rule']}. {imp['n']} samples implanted, {imp['n_with_implied_answer']} with a known "
                  "implied answer.", "",
                  f"- follow rate: {_fmt(imp['follow_rate'], pct=True)}",
                  f"- unchanged rate: {_fmt(imp['unchanged_rate'], pct=True)}", ""]
        if imp["by_segment"]:
            lines += ["| implanted segment | n | follow rate |", "|---|---|---|"]
            lines += [f"| {j} | {v['n']} | {_fmt(v['follow_rate'], pct=True)} |" for j, v in imp["by_segment"].items()]
            lines.append("")
    probe = report.get("probe")
    if probe:
        lines += ["## Linear probe: does segment i's latent decode the state of CoT image i?", "",
                  "Softmax regression per segment index, fit on the probe records' latents, scored here.", "",
                  "| segment | train / test latents | states | probe accuracy | majority state |",
                  "|---|---|---|---|---|"]
        lines += [f"| {j} | {v['n_train']} / {v['n_test']} | {v['classes']} | {_fmt(v['accuracy'], pct=True)} | "
                  f"{_fmt(v['majority'], pct=True)} |" for j, v in probe.items()]
        lines.append("")
    return lines


def render_markdown(report: dict[str, Any]) -> str:
    """The human-readable report."""
    lat, tim = report["latents"], report["timing"]
    lines = [
        "# Evaluation report",
        "",
        f"Stage {report.get('stage')}, latents {'on' if report.get('use_latents') else 'off'}, "
        f"stop threshold {_fmt(report.get('threshold'))}, batch size {report.get('batch_size')}, "
        f"max new tokens {report.get('max_new_tokens')}.",
        "",
        "| metric | value |",
        "|---|---|",
        f"| samples | {report['n_samples']} ({report['n_evaluated']} evaluated, "
        f"{report['n_errors']} errors) |",
        f"| accuracy (exact match) | {_fmt(report['accuracy'], pct=True)} ({report['n_correct']} correct) |",
        f"| accuracy, errors counted wrong | {_fmt(report['accuracy_errors_as_wrong'], pct=True)} |",
        f"| chance accuracy | {_fmt(report['chance_accuracy'], pct=True)} |",
        f"| mean used / budget per image | {_fmt(lat['mean_used_over_budget'])} |",
        f"| mean used latents per image | {_fmt(lat['mean_used_per_image'])} |",
        f"| mean budget per image | {_fmt(lat['mean_budget_per_image'])} |",
        f"| latency per sample (its batch, s) | {_fmt(tim['latency_s_per_sample'])} |",
        f"| encoding per sample (s) | {_fmt(tim['encode_s_per_sample'])} |",
        f"| latent pass per sample (s) | {_fmt(tim['latent_pass_s_per_sample'])} |",
        f"| generation per sample (s) | {_fmt(tim['generation_s_per_sample'])} |",
        f"| throughput (samples/s) | {_fmt(tim['throughput_samples_per_s'])} |",
        "",
    ]
    if lat["by_budget"]:
        lines += ["## Latents used, by budget", "", "| budget | images | mean used | used: count |",
                  "|---|---|---|---|"]
        for b, v in lat["by_budget"].items():
            hist = ", ".join(f"{u}: {n}" for u, n in v["hist"].items())
            lines.append(f"| {b} | {v['count']} | {_fmt(v['mean_used'])} | {hist} |")
        lines.append("")
    if report["accuracy_by_latents_used"]:
        lines += ["## Accuracy by latents used per sample", "", "| latents used | samples | accuracy |",
                  "|---|---|---|"]
        for k, v in report["accuracy_by_latents_used"].items():
            lines.append(f"| {k} | {v['n']} | {_fmt(v['accuracy'], pct=True)} |")
        lines.append("")
    causal = report.get("causal")
    if causal:
        lines += [
            "## Causal checks: does the answer depend on the latents?",
            "",
            "Each check changes only the latents handed to generation; `n` counts the samples it applies to.",
            "Accuracy and answer-change rate are on those samples; `accuracy (unchanged)` is the normal",
            "accuracy on the same samples. A model that uses its latents changes answers under every check.",
            "",
            "| check | n | accuracy | accuracy (unchanged) | answer-change rate | how |",
            "|---|---|---|---|---|---|",
        ]
        for name in CHECKS:
            c = causal[name]
            cells = [name, c["n"], _fmt(c["accuracy"], pct=True), _fmt(c["accuracy_base"], pct=True),
                     _fmt(c["answer_change_rate"], pct=True), c["rule"]]
            lines.append("| " + " | ".join(map(str, cells)) + " |")
        er = causal["effective_rank"]
        lines += ["", f"Effective rank of the {er['num_vectors']} latent vectors: {_fmt(er['value'])} "
                      f"(at most {_fmt(er['max_possible'])}; exp of the entropy of the normalised singular "
                      "values).", ""]
    elif report.get("use_latents"):
        lines += ["Causal checks were not run.", ""]
    lines += _alignment_markdown(report.get("alignment"))
    lines += _instruments_markdown(report)
    files = report.get("files") or {}
    plots = (("accuracy_by_difficulty", "Accuracy by difficulty"), ("used_hist", "Used latents per budget"),
             ("accuracy_vs_latents", "Accuracy vs latents used"))
    for key, title in plots:
        if key in files:
            lines += [f"![{title}]({files[key]})", ""]
    if report["errors"]:
        lines += ["## Errors", "", "| id | kind | error |", "|---|---|---|"]
        for e in report["errors"]:
            msg = str(e.get("error", "")).replace("|", "\\|").replace("\n", " ")
            lines.append(f"| {e.get('id')} | {e.get('kind')} | {msg} |")
        lines.append("")
    return "\n".join(lines)


def _plot_used_hist(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_budget = report["latents"]["by_budget"]
    budgets = list(by_budget)[-12:]  # the largest budgets when there are many
    cols = min(4, len(budgets))
    nrows = math.ceil(len(budgets) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(3.2 * cols, 2.6 * nrows), squeeze=False)
    for ax, b in zip(axes.flat, budgets):
        hist = by_budget[b]["hist"]
        xs = list(range(1, int(b) + 1))
        ax.bar(xs, [hist.get(str(x), 0) for x in xs], color="tab:blue")
        ax.set_title(f"budget {b} ({by_budget[b]['count']} images)", fontsize=9)
        ax.set_xlabel("latents used")
        ax.set_ylabel("images")
        ax.set_xlim(0.4, int(b) + 0.6)
        ax.xaxis.get_major_locator().set_params(integer=True)
    for ax in list(axes.flat)[len(budgets):]:
        ax.axis("off")
    fig.suptitle("Latents used per CoT image, by budget")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _plot_accuracy_by_difficulty(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = report["accuracy_by_difficulty"]
    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.plot(list(data), [100 * v["accuracy"] for v in data.values()], "o-", color="tab:blue", label="accuracy")
    if report.get("chance_accuracy") is not None:
        ax.axhline(100 * report["chance_accuracy"], color="grey", linestyle="--", label="chance")
    ax.set_xlabel("difficulty")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(-5, 105)
    ax.legend(loc="best", fontsize=8)
    ax.set_title("Accuracy by difficulty")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _plot_accuracy_vs_latents(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = report["accuracy_by_latents_used"]
    xs = [int(k) for k in data]
    ys = [100 * v["accuracy"] for v in data.values()]
    ns = [v["n"] for v in data.values()]
    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.plot(xs, ys, color="tab:blue", linewidth=1, zorder=1)
    ax.scatter(xs, ys, s=[20 + 180 * n / max(ns) for n in ns], color="tab:blue", zorder=2)
    for x, y, n in zip(xs, ys, ns):
        ax.annotate(f"n={n}", (x, y), textcoords="offset points", xytext=(0, 8), ha="center", fontsize=8)
    if report.get("chance_accuracy") is not None:
        ax.axhline(100 * report["chance_accuracy"], color="grey", linestyle="--", label="chance")
        ax.legend(loc="best", fontsize=8)
    ax.set_xlabel("latents used by the sample (all its CoT images)")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(-5, 110)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_title("Accuracy against latents used")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------- CLI
def chance_from_metadata(data_path: str | Path) -> float | None:
    """Chance accuracy from the ``meta.json`` beside the data: its split's when named there, else overall."""
    from ..data.records import load_metadata

    meta = load_metadata(data_path)
    if not meta:
        return None
    name = Path(data_path).name
    for split in (meta.get("splits") or {}).values():
        if isinstance(split, dict) and split.get("file") == name and split.get("chance_accuracy") is not None:
            return float(split["chance_accuracy"])
    value = meta.get("chance_accuracy")
    return float(value) if value is not None else None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``latentvl eval``."""
    from .cli import add_model_arguments

    add_model_arguments(parser)
    parser.add_argument("--data", type=Path, required=True, help="JSONL records to evaluate, e.g. test.jsonl")
    parser.add_argument("--out", type=Path, default=None,
                        help="report directory (default: eval-<data file stem> in the current directory)")
    parser.add_argument("--batch-size", type=int, default=8, help="samples per batch (default: 8)")
    parser.add_argument("--max-new-tokens", type=int, default=16, help="answer length limit (default: 16)")
    parser.add_argument("--limit", type=int, default=None, help="evaluate only the first N records")
    parser.add_argument("--no-causal", action="store_true",
                        help="skip the causal checks (mask, swap, noise) and the alignment check")
    parser.add_argument("--chance", type=float, default=None,
                        help="chance accuracy (default: from meta.json beside the data, when present)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the noise check and the implant draws "
                        "(default: 0)")
    parser.add_argument("--probe-data", type=Path, default=None,
                        help="JSONL records (with cot_states) to fit the linear probe on, e.g. train.jsonl")
    parser.add_argument("--probe-limit", type=int, default=512,
                        help="records of --probe-data used (default: 512)")
    parser.add_argument("--task", default=None,
                        help="task name for implied answers (default: meta.json beside the data)")


def run(args: argparse.Namespace) -> int:
    """Run ``latentvl eval``."""
    from ..data.records import RecordError, load_records
    from .cli import load_for_inference

    try:
        records, skipped = load_records(args.data, skip_invalid=True, check_images=False)
        chance = args.chance if args.chance is not None else chance_from_metadata(args.data)
    except RecordError as err:
        print(f"eval: error: {err}", file=sys.stderr)
        return 2
    if args.limit is not None:
        records = records[: args.limit]
    extra = [{"id": s.id, "kind": "invalid_record", "error": f"{s.source}: {s.reason}"} for s in skipped]
    try:
        model, processor = load_for_inference(args)
    except (OSError, ValueError) as err:
        print(f"eval: error: {err}", file=sys.stderr)
        return 2
    out = args.out if args.out is not None else Path(f"eval-{args.data.stem}")
    probe_records = probe_fields = None
    try:
        fields = read_record_fields(args.data)
        if args.probe_data is not None:
            probe_records, _ = load_records(args.probe_data, skip_invalid=True, check_images=False)
            probe_records = probe_records[: args.probe_limit]
            probe_fields = read_record_fields(args.probe_data)
    except (OSError, RecordError) as err:
        print(f"eval: error: {err}", file=sys.stderr)
        return 2
    task = args.task if args.task is not None else task_of_data(args.data)
    report = evaluate(
        model, processor, records, out_dir=out, batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens, threshold=args.threshold, causal_checks=not args.no_causal,
        use_latents=not args.no_latents, chance_accuracy=chance, default_num_segments=args.num_segments,
        seed=args.seed, extra_errors=extra, fields=fields, task=task, probe_records=probe_records,
        probe_fields=probe_fields,
    )
    lat = report["latents"]
    print(f"accuracy {_fmt(report['accuracy'], pct=True)} on {report['n_evaluated']} samples "
          f"({report['n_errors']} errors; chance {_fmt(report['chance_accuracy'], pct=True)}); "
          f"used/budget per image {_fmt(lat['mean_used_over_budget'])}; "
          f"{_fmt(report['timing']['throughput_samples_per_s'])} samples/s")
    if report["causal"]:
        parts = [f"{k}: acc {_fmt(report['causal'][k]['accuracy'], pct=True)}, changed "
                 f"{_fmt(report['causal'][k]['answer_change_rate'], pct=True)}" for k in CHECKS]
        print("causal checks -- " + "; ".join(parts))
    if report.get("implant") and report["implant"]["n"]:
        imp = report["implant"]
        print(f"implant -- follow {_fmt(imp['follow_rate'], pct=True)}, unchanged "
              f"{_fmt(imp['unchanged_rate'], pct=True)} ({imp['n']} samples)")
    print(f"report: {out / REPORT_FILES['markdown']}")
    return 0 if report["n_evaluated"] else 1
