"""The evaluation report: ``report.md``, ``report.json``, ``predictions.jsonl`` and its plots
(``used_latents_hist.png``: used latents per budget; ``accuracy_vs_latents.png``: accuracy against the
number of latents a sample used; ``accuracy_by_difficulty.png``).

:func:`evaluate` is the Python entry point of ``latentvl eval``: it measures
(:func:`latentvl.evaluation.generated.evaluate_generated`) and, with ``out_dir``, writes the files.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..evaluation.causal import CHECKS
from ..evaluation.generated import evaluate_generated
from ..evaluation.metrics import LABELS, MEAN_USED_OVER_BUDGET, USED_RATIO
from ..fileio import write_atomic
from .format import fmt as _fmt

__all__ = ["REPORT_FILES", "evaluate", "render_markdown", "write_report"]

REPORT_FILES = {
    "json": "report.json",
    "markdown": "report.md",
    "predictions": "predictions.jsonl",
    "used_hist": "used_latents_hist.png",
    "accuracy_vs_latents": "accuracy_vs_latents.png",
    "accuracy_by_difficulty": "accuracy_by_difficulty.png",
}


def evaluate(
    model: Any,
    processor: Any,
    records: Sequence[Any],
    out_dir: str | Path | None = None,
    **options: Any,
) -> dict[str, Any]:
    """:func:`~latentvl.evaluation.generated.evaluate_generated` (every keyword passes through); with
    ``out_dir``, also write the report files, whose names the report lists under ``files``."""
    result = evaluate_generated(model, processor, records, **options)
    if out_dir is None:
        return result
    predictions = result.pop("predictions")
    result["files"] = write_report(result, predictions, Path(out_dir))
    return {**result, "predictions": predictions}


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
    write_atomic(out_dir / files["json"], json.dumps(report, indent=2, allow_nan=False, default=_json_default) + "\n")
    write_atomic(out_dir / files["predictions"], "".join(json.dumps(row, default=_json_default) + "\n"
                                                          for row in predictions))
    write_atomic(out_dir / files["markdown"], render_markdown(report))
    return files


def _json_default(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, torch.Tensor):
        return value.tolist()
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


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
    unit = report.get("instrument_unit") or "segment"  # "latent" for records with latent_states
    if trunc:
        lines += [f"## Truncation: only the latents of the first j {unit}s kept", "",
                  f"The later {unit}s' latent slots are masked out of attention in step 2; counted over the "
                  f"samples with more than j {unit}s.", "",
                  f"| {unit}s kept (j) | n | accuracy | accuracy (all kept) | answer-change rate |",
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
            lines += [f"| implanted {unit} | n | follow rate |", "|---|---|---|"]
            lines += [f"| {j} | {v['n']} | {_fmt(v['follow_rate'], pct=True)} |" for j, v in imp["by_segment"].items()]
            lines.append("")
    probe = report.get("probe")
    if probe:
        lines += ["## Linear probe: do the latents decode the states they stand for?", "",
                  f"Softmax regression per {unit} index, fit on the probe records' latents, scored here.", "",
                  f"| {unit} | train / test latents | states | probe accuracy | majority state |",
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
        f"| {LABELS[MEAN_USED_OVER_BUDGET]} | {_fmt(lat[MEAN_USED_OVER_BUDGET])} |",
        f"| {LABELS[USED_RATIO]} | {_fmt(lat[USED_RATIO])} |",
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
