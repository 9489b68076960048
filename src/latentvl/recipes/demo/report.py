"""The demo's report: ``report.md`` (tables and readings of every arm), ``report.json`` and its plots
(``accuracy_vs_difficulty.png``, ``loss_curves.png``, ``latents.png``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, TypedDict

from ...evaluation.metrics import LABELS, USED_RATIO
from ...fileio import write_atomic
from ...reports.format import difficulty_key as _difficulty_key
from .bars import BARS

__all__ = [
    "ARMS",
    "ARM_LABELS",
    "ArmResult",
    "DemoReport",
    "LATENT_ARMS",
    "alignment_table",
    "causal_table",
    "difficulty_table",
    "instrument_table",
    "markdown",
    "results_table",
    "truncation_table",
    "time_section",
    "write_demo_plots",
    "write_demo_report",
]

ARMS = ("baseline_no_latents", "pause", "latents_no_align", "stage_a", "stage_c")
ARM_LABELS = {
    "baseline_no_latents": "no latents (answer right after the question)",
    "pause": "pause tokens (learned constant slots, no feedback)",
    "latents_no_align": "latents without alignment",
    "stage_a": "stage A (latents, aligned, fixed budgets)",
    "stage_c": "stage C (learned halting)",
}
LATENT_ARMS = ("pause", "latents_no_align", "stage_a", "stage_c")


class ArmResult(TypedDict, total=False):
    """One arm's evaluation on the test split (``report.json``'s ``results.<arm>``): what
    :func:`latentvl.reports.evaluation.evaluate` measured, summed up by the recipe (less the per-sample rows,
    which the recipe keeps for stage A and stage C under ``per_sample``)."""

    n: int
    n_errors: int
    accuracy: float
    accuracy_by_difficulty: dict[str, float]
    used: int
    budget: int
    used_ratio: float | None
    causal: dict[str, Any]
    truncation: dict[str, Any] | None
    instrument_unit: str | None
    implant: dict[str, Any] | None
    probe: dict[str, Any] | None
    alignment: dict[str, Any] | None
    eval_report: str


class DemoReport(TypedDict, total=False):
    """``report.json``: the contract between the recipe (which measures) and this module (which writes).
    Its keys are the report's; the recipe fills them in :func:`latentvl.recipes.demo.recipe.run_demo`."""

    task: str
    n_records: int
    splits: dict[str, int]
    test_chance_accuracy: float
    hardest_difficulty: str | None
    steps: dict[str, int]
    schedule: list[dict[str, Any]]
    final_threshold: float
    results: dict[str, ArmResult]
    bars: dict[str, float]
    per_sample: dict[str, list[dict[str, Any]]]
    preflight: dict[str, list[dict[str, Any]]]
    timings_s: dict[str, float]
    settings: dict[str, Any]
    out: str
    outputs: dict[str, str]
    bar_metrics: dict[str, float | None]
    checks: dict[str, bool]
    all_bars_met: bool
    train_speed: dict[str, dict[str, Any]]
    arm_workers: dict[str, int]
    stage_c_attempts: dict[str, Any] | None
    stage_c_threshold: float
    calibration: dict[str, Any] | None
    stage_c_halting: dict[str, Any] | None


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def _figure(x: float | None) -> str:
    return "not measured" if x is None else f"measured {x:.3f}"


def difficulty_table(report: DemoReport) -> str:
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


def results_table(report: DemoReport) -> str:
    r = report["results"]
    chance = report["test_chance_accuracy"]
    st = report["steps"]

    def ratio(x: dict[str, Any]) -> str:
        return f"{x['used_ratio']:.3f} ({x['used']}/{x['budget']})" if x["budget"] else "- (no latents)"

    def steps(arm: str) -> str:
        return f"{st['stage_a']} + {st['stage_c']}" if arm == "stage_c" else str(st[arm])

    rows = [
        f"| model | train steps | test accuracy | {LABELS[USED_RATIO]} |",
        "|---|---|---|---|",
        f"| chance (most frequent answer) | - | {chance:.3f} | - |",
    ]
    for arm in ARMS:
        label = ARM_LABELS[arm]
        if arm == "stage_c":
            label = f"stage C (learned halting, threshold {_stage_c_threshold(report):g})"
        rows.append(f"| {label} | {steps(arm)} | {_pct(r[arm]['accuracy'])} | {ratio(r[arm])} |")
    return "\n".join(rows) + "\n"


def _stage_c_threshold(report: DemoReport) -> float:
    """The stop threshold stage C was evaluated at (the calibrated one, else the training's last)."""
    thr = report.get("stage_c_threshold")
    return float(report["final_threshold"] if thr is None else thr)


def calibration_section(report: DemoReport) -> list[str]:
    """The stop-threshold calibration of stage C on the val split (nothing when the demo skipped it)."""
    from ...evaluation.calibration import calibration_markdown
    from ...reports.halting import halting_markdown

    cal, halting = report.get("calibration"), report.get("stage_c_halting")
    lines = [*stage_c_tries_section(report)]
    if cal:
        lines += ["## Stage C's stop threshold", "",
                  f"Stage C trains with the threshold falling to {report['final_threshold']:g}; the threshold it "
                  "is evaluated at is chosen afterwards on the validation split (never the test split) and written "
                  "into its final model (`latentvl calibrate`).", "", calibration_markdown(cal)]
    if halting:
        lines += ["## Stage C's halting against difficulty", "",
                  "The test split by teacher forcing (greedy exact match, as `latentvl halting`), at the threshold "
                  "above and at full budget: does stage C spend its latents where the records need them?", "",
                  halting_markdown(f"stage C, threshold {_stage_c_threshold(report):g}", halting)]
    return lines


def stage_c_tries_section(report: DemoReport) -> list[str]:
    """Stage C's tries (``demo.stage_c_attempts``): each one's val accuracy at full budget against stage A's,
    and the one kept (nothing when one try was all that was allowed)."""
    att = report.get("stage_c_attempts")
    if not att:
        return []
    rows = [f"| {i + 1} | {t['seed']} | {_latent_overrides(t.get('latent'))} | {t['val_full_budget']:.3f} | "
            f"{t['drop']:+.3f} | {'kept' if i == att['kept'] else ''} |" for i, t in enumerate(att["tries"])]
    return ["## Stage C's tries", "",
            f"Stage C is tried again with the next training seed and `stage_c_retry_latent` when its validation "
            f"accuracy at full budget is more than {att['max_drop']:g} under stage A's "
            f"({att['stage_a_val_full_budget']:.3f}), at most {report['settings']['demo'].get('stage_c_attempts')} "
            "tries; the first within that is kept, else the best (the test split is never looked at).", "",
            "| try | seed | latent settings over stage C's | val accuracy, full budget | under stage A | |",
            "|---|---|---|---|---|---|", *rows, ""]


def _latent_overrides(latent: dict[str, Any] | None) -> str:
    return ", ".join(f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}" for k, v in latent.items()) if latent \
        else "as set"


def causal_table(report: DemoReport) -> str:
    rows = ["| model | latents masked | latents noised | latents swapped |", "|---|---|---|---|"]
    for key in LATENT_ARMS:
        causal = report["results"][key].get("causal") or {}
        cells = []
        for check in ("mask", "noise", "swap"):
            c = causal.get(check)
            cells.append(f"{c['accuracy']:.3f} (changed {c['answer_change_rate']:.3f})" if c else "-")
        rows.append(f"| {ARM_LABELS[key].split(' (')[0]} | " + " | ".join(cells) + " |")
    return "\n".join(rows) + "\n"


def _unit(report: DemoReport) -> str:
    """What the instruments counted in (``latent`` for records with ``latent_states``, else ``segment``)."""
    return report["results"]["stage_a"].get("instrument_unit") or "segment"


def truncation_table(report: DemoReport) -> str:
    r = report["results"]
    keeps = sorted({j for a in LATENT_ARMS for j in (r[a].get("truncation") or {})}, key=int)
    if not keeps:
        return ""
    rows = [f"| {_unit(report)}s kept | " + " | ".join(ARM_LABELS[a].split(" (")[0] for a in LATENT_ARMS) + " |",
            "|" + "---|" * (len(LATENT_ARMS) + 1)]
    for j in keeps:
        cells = []
        for a in LATENT_ARMS:
            t = (r[a].get("truncation") or {}).get(j)
            cells.append(f"{t['accuracy']:.3f} (n {t['n']})" if t else "-")
        rows.append(f"| {j} | " + " | ".join(cells) + " |")
    return "\n".join(rows) + "\n"


def instrument_table(report: DemoReport) -> str:
    rows = [f"| model | implant: follows | implant: unchanged | probe accuracy per {_unit(report)} (majority) |",
            "|---|---|---|---|"]
    for a in LATENT_ARMS:
        x = report["results"][a]
        imp = x.get("implant") or {}
        probe = x.get("probe") or {}
        pr = ", ".join(f"{j}: {v['accuracy']:.2f} ({v['majority']:.2f})" for j, v in probe.items()) or "-"
        rows.append(f"| {ARM_LABELS[a].split(' (')[0]} | {_pct(imp.get('follow_rate'))} (n {imp.get('n', 0)}) "
                    f"| {_pct(imp.get('unchanged_rate'))} | {pr} |")
    return "\n".join(rows) + "\n"


def alignment_table(report: DemoReport) -> str:
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


def _at(report: DemoReport, arm: str, d: str | None) -> float | None:
    by = report["results"][arm]["accuracy_by_difficulty"]
    if d is not None and d in by:
        return by[d]["accuracy"]
    return report["results"][arm]["accuracy"]


def _difficulty_reading(report: DemoReport) -> str:
    d = report["hardest_difficulty"]
    a, b, p, n = (_at(report, arm, d) for arm in ("stage_a", "baseline_no_latents", "pause", "latents_no_align"))
    where = f"at the hardest difficulty ({d})" if d is not None else "overall"
    return (f"Reading: {where} stage A answers {a:.3f}, the no-latent model {b:.3f}, pause tokens {p:.3f} and "
            f"unaligned latents {n:.3f} (chance {report['test_chance_accuracy']:.3f}): stage A is "
            f"{100 * (a - b):+.1f} points over no latents and {100 * (a - p):+.1f} over pause tokens.\n")


def _causal_reading(report: DemoReport) -> str:
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


def _truncation_reading(report: DemoReport) -> str:
    t = report["results"]["stage_a"].get("truncation") or {}
    if not t:
        return ""
    parts = ", ".join(f"{j}: {v['accuracy']:.2f}" for j, v in t.items())
    return (f"Reading: stage A's accuracy with only the first j {_unit(report)}s kept ({parts}; all kept: "
            f"{report['results']['stage_a']['accuracy']:.2f}).\n")


def _implant_reading(report: DemoReport) -> str:
    imp = report["results"]["stage_a"].get("implant") or {}
    if not imp.get("n"):
        return "Reading: no implant was possible (the records carry no cot_states or latent_states).\n"
    if imp.get("follow_rate") is None:
        return (f"Reading: implants changed {1 - imp['unchanged_rate']:.0%} of stage A's answers (the task "
                "supplies no implied answer).\n")
    return (f"Reading: after an implant, stage A gives the answer the implanted state implies in "
            f"{imp['follow_rate']:.0%} of {imp['n_with_implied_answer']} cases and keeps its own answer in "
            f"{imp['unchanged_rate']:.0%}.\n")


def _probe_reading(report: DemoReport) -> str:
    probe = report["results"]["stage_a"].get("probe") or {}
    if not probe:
        return ""
    accs = [v["accuracy"] for v in probe.values()]
    majs = [v["majority"] for v in probe.values()]
    return (f"Reading: a linear probe reads {_unit(report)} i's state from stage A's latents with mean accuracy "
            f"{sum(accs) / len(accs):.2f} (majority state {sum(majs) / len(majs):.2f}).\n")


def _alignment_reading(report: DemoReport) -> str:
    al = report["results"]["stage_a"].get("alignment")
    if not al or al.get("retrieval_top1") is None:
        return ""
    own, other = al["mean_cosine_own"], al["mean_cosine_other"]
    found = f"find their own image {al['retrieval_top1']:.0%} of the time against {al['chance']:.1%} by chance"
    return (f"Reading: stage A's segment means have cosine {own:.2f} with their own CoT image and {other:.2f} with "
            f"other samples' and {found}.\n")


def _setup(report: DemoReport) -> str:
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
        f"{report['final_threshold']:g} over {t['threshold_anneal_steps']} steps (evaluated at "
        f"{_stage_c_threshold(report):g}), stop weight "
        f"{lat['latent_stop_loss_weight']:g}, cost weight {lat['latent_cost_weight']:g}. Pause tokens: "
        "`latent_feedback: false`, no alignment (their slot inputs are one constant vector).\n"
    )


def markdown(report: DemoReport) -> str:
    """``report.md`` of the demo's report."""
    ok = {True: "met", False: "NOT met"}
    bars, metrics = report["bars"], report.get("bar_metrics") or {}
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
        *[f"- {bar.text.format(**bars)}: {ok[report['checks'][bar.check]]} "
          f"({_figure(metrics.get(bar.metric))})" for bar in BARS if bar.check in report["checks"]],
        "",
        "Accuracy: greedy two-step inference (latent pass, then generate), exact match of the answer. "
        "Stage C halts at the threshold named in its row. used/budget, all latents: the latents used over the budget, "
        "both summed over every CoT segment of the test split (`used_ratio`).",
        "",
        *calibration_section(report),
        *_latent_sections(report),
    ]
    return "\n".join(lines)


def _latent_sections(report: DemoReport) -> list[str]:
    """The report's sections on the latents themselves: causal checks, truncation, implant and probe,
    alignment, then the links, plots and timings."""
    return [
        "## Do the answers depend on the latents?",
        "",
        "Causal checks of `latentvl eval` on the test split: accuracy when every latent is masked out of "
        "attention, replaced by noise of the same norm, or swapped with another sample's latents (share of "
        "answers changed in brackets).",
        "",
        causal_table(report),
        _causal_reading(report),
        f"Truncation: only the latents of the first j {_unit(report)}s kept, the rest masked (over the samples "
        f"with more than j {_unit(report)}s).",
        "",
        truncation_table(report),
        _truncation_reading(report),
        f"Implant: one {_unit(report)}'s latents replaced, during the latent pass, by those another sample "
        f"produced for a different state; the later latents continue from it. Linear probe: per "
        f"{_unit(report)} index, a softmax regression from a latent to the state it shows, fit on train-split "
        "latents.",
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
        *time_section(report),
    ]


def time_section(report: DemoReport) -> list[str]:
    """The wall time by phase (share of the total) and each arm's training steps per second."""
    t = report.get("timings_s") or {}
    total = t.get("total")
    lines = ["## Time", "", "| phase | seconds | share of the total |", "|---|---|---|"]
    for k, v in t.items():
        share = f"{v / total:.0%}" if total and k != "total" else "-"
        lines.append(f"| {k} | {v} | {share} |")
    speed = report.get("train_speed") or {}
    if speed:
        workers = report.get("arm_workers") or {}
        lines += ["", f"The arms trained {workers.get('workers', 1)} at a time, {workers.get('threads', '-')} "
                  "thread(s) each (`train` is the wall time of them all). Training speed: each arm's seconds, its "
                  "steps per second over the trainer's steps (their per-step `step_time`), and over the arm's "
                  "whole training time (model building and checkpoints included).", "",
                  "| arm | steps | seconds | steps/s | steps/s, wall |", "|---|---|---|---|---|"]
        for arm, s in speed.items():
            lines.append(f"| {ARM_LABELS.get(arm, arm).split(' (')[0]} | {s['steps']} | {s.get('wall_s', '-')} "
                         f"| {_rate(s['steps_per_s'])} | {_rate(s['wall_steps_per_s'])} |")
    return lines + [""]


def _rate(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def _plot_accuracy_vs_difficulty(path: Path, report: DemoReport) -> None:
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
    path: Path, c_rows: list[dict[str, Any]], samples: list[dict[str, Any]], report: DemoReport
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.5))
    steps = [r["step"] for r in c_rows]
    ax1.plot(
        steps, [r["used_ratio"] for r in c_rows], color="tab:orange", alpha=0.35,
        label="used/budget, all latents (batch)"
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




def write_demo_plots(out: Path, report: DemoReport, histories: dict[str, list[dict[str, Any]]],
                     stage_c_samples: list[dict[str, Any]]) -> None:
    """The report's plots in ``out``: ``accuracy_vs_difficulty.png``, ``loss_curves.png``, ``latents.png``."""
    steps_a = report["steps"]["stage_a"]
    _plot_accuracy_vs_difficulty(out / "accuracy_vs_difficulty.png", report)
    _plot_losses(out / "loss_curves.png", histories, steps_a)
    _plot_latents(out / "latents.png", histories["stage_c"], stage_c_samples, report)


def write_demo_report(out: Path, report: DemoReport) -> None:
    """``report.md``, then ``report.json`` in ``out``, each written atomically: a complete ``report.json``
    marks a finished demo (``latentvl demo --seeds`` does not run its seed again)."""
    write_atomic(out / "report.md", markdown(report))
    write_atomic(out / "report.json", json.dumps(report, indent=2) + "\n")
