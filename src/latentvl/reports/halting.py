"""The halting report: a markdown section per model and the plot of latents used against difficulty."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..evaluation.metrics import LABELS, USED_RATIO
from ..fileio import write_atomic

__all__ = ["halting_markdown", "plot_used_by_difficulty", "write_halting_report"]


def _f(value: Any, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def halting_markdown(name: str, result: Mapping[str, Any]) -> str:
    """A markdown section: the headline numbers, then latents used and accuracy per difficulty."""
    learned, full = result["learned"], result["full_budget"]
    lines = [
        f"### {name}",
        "",
        f"- accuracy at learned halting {_f(learned['accuracy'])}, at full budget {_f(full['accuracy'])} "
        f"(drop {_f(result['accuracy_drop'])})",
        f"- {LABELS[USED_RATIO]} {_f(learned['used_ratio'])}; Spearman(used, difficulty) "
        f"{_f(learned['spearman_used_difficulty'])}",
        "",
        "| difficulty | n | mean used | mean budget | used/budget, all latents | accuracy (learned) "
        "| accuracy (full) |",
        "|---|---|---|---|---|---|---|",
    ]
    for d, row in learned["by_difficulty"].items():
        full_acc = full["by_difficulty"].get(d, {}).get("accuracy")
        lines.append(f"| {d} | {row['n']} | {_f(row['mean_used'], 2)} | {_f(row['mean_budget'], 2)} | "
                     f"{_f(row['used_ratio'])} | {_f(row['accuracy'])} | {_f(full_acc)} |")
    return "\n".join(lines) + "\n"


def plot_used_by_difficulty(results: Mapping[str, Mapping[str, Any]], path: str | Path) -> None:
    """Mean latents used against difficulty, one line per named result (its ``learned`` summary)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for name, result in results.items():
        table = result["learned"]["by_difficulty"]
        xs = list(table)
        ax.plot(xs, [table[d]["mean_used"] for d in xs], marker="o", label=name)
        budget = [table[d]["mean_budget"] for d in xs]
    if results:
        ax.plot(xs, budget, linestyle="--", color="grey", label="budget")
    ax.set_xlabel("difficulty")
    ax.set_ylabel("mean latents used")
    ax.legend()
    fig.tight_layout()
    tmp = Path(str(path) + ".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)


def write_halting_report(result: Mapping[str, Any], title: str, out: str | Path) -> None:
    """``halting.json``, ``halting.md`` and ``used_by_difficulty.png`` in ``out`` (created)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "halting.json", json.dumps(result, indent=2) + "\n")
    write_atomic(out / "halting.md", halting_markdown(title, result))
    plot_used_by_difficulty({"learned halting": result}, out / "used_by_difficulty.png")
