"""Halting against difficulty: latents used per difficulty, Spearman(used, difficulty), accuracy vs full budget.

How halting follows difficulty, measured on the same stage-C model at learned halting and at full budget.

Records may carry a ``difficulty`` value (any number: hops, moves, ...). Everything here works on per-sample
rows ``{"id", "correct", "budgets", "used_lens"}`` (what :func:`latentvl.training.evaluation.evaluate_records`
returns with ``per_sample=True``) plus a ``difficulty`` per id.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from ..config import LatentSettings
from ..fileio import write_atomic

__all__ = [
    "add_arguments",
    "evaluate_halting",
    "full_budget",
    "halting_markdown",
    "halting_summary",
    "plot_used_by_difficulty",
    "read_difficulties",
    "run",
    "spearman",
]


def _ranks(values: Sequence[float]) -> list[float]:
    """1-based ranks, ties given the mean of the ranks they span."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Spearman's rank correlation (Pearson on tie-averaged ranks); None when either side is constant."""
    if len(x) != len(y):
        raise ValueError(f"spearman: {len(x)} x values but {len(y)} y values")
    if len(x) < 2:
        return None
    rx, ry = _ranks(x), _ranks(y)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    sxy = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    sxx = sum((a - mx) ** 2 for a in rx)
    syy = sum((b - my) ** 2 for b in ry)
    if sxx == 0 or syy == 0:
        return None
    return sxy / math.sqrt(sxx * syy)


def read_difficulties(path: str | Path) -> dict[str, float]:
    """``{id: difficulty}`` from a records JSONL whose lines carry a numeric ``difficulty``."""
    out: dict[str, float] = {}
    for lineno, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        obj = json.loads(line)
        value = obj.get("difficulty")
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{path}:{lineno} (id {obj.get('id')!r}): 'difficulty' must be a number, got {value!r}")
        out[str(obj["id"])] = value
    return out


def halting_summary(samples: Sequence[Mapping[str, Any]], difficulty: Mapping[str, float]) -> dict[str, Any]:
    """Accuracy, used/budget, Spearman(used, difficulty) and a per-difficulty table of ``samples``.

    ``used`` of a sample is the sum of its used lengths over segments; samples without a difficulty
    count in the accuracy and the ratio but not in the correlation or the table.
    """
    n = len(samples)
    used = [sum(s["used_lens"]) for s in samples]
    budget = [sum(s["budgets"]) for s in samples]
    rated = [(difficulty[s["id"]], u, b, bool(s["correct"]))
             for s, u, b in zip(samples, used, budget) if s["id"] in difficulty]
    table = {}
    for d in sorted({r[0] for r in rated}):
        rows = [r for r in rated if r[0] == d]
        table[d] = {
            "n": len(rows),
            "mean_used": sum(r[1] for r in rows) / len(rows),
            "mean_budget": sum(r[2] for r in rows) / len(rows),
            "used_ratio": sum(r[1] for r in rows) / max(sum(r[2] for r in rows), 1),
            "accuracy": sum(r[3] for r in rows) / len(rows),
        }
    return {
        "n": n,
        "accuracy": sum(bool(s["correct"]) for s in samples) / n if n else None,
        "used_ratio": sum(used) / sum(budget) if sum(budget) else None,
        "spearman_used_difficulty": spearman([r[1] for r in rated], [r[0] for r in rated]),
        "by_difficulty": table,
    }


@contextlib.contextmanager
def full_budget(model: Any) -> Iterator[None]:
    """Run ``model`` as in stage A inside the block (every latent active, no stop head); restored after."""
    before = LatentSettings.from_config(model.config)
    before.replace(latent_mode_stage="A", latent_stop_loss_weight=0.0, latent_cost_weight=0.0).apply_to(model.config)
    try:
        yield
    finally:
        before.apply_to(model.config)


def evaluate_halting(
    model: Any, collator: Any, records: Sequence[Any], difficulty: Mapping[str, float], *,
    threshold: float | None = None, batch_size: int = 16,
) -> dict[str, Any]:
    """The same stage-C model on ``records`` at learned halting and at full budget (greedy exact match).

    Returns ``{"learned": summary, "full_budget": summary, "accuracy_drop": full - learned}``, each
    summary from :func:`halting_summary`.
    """
    from ..training.evaluation import evaluate_records

    learned = evaluate_records(model, collator, list(records), batch_size=batch_size, threshold=threshold,
                               per_sample=True)
    with full_budget(model):
        full = evaluate_records(model, collator, list(records), batch_size=batch_size, per_sample=True)
    a, b = halting_summary(learned["samples"], difficulty), halting_summary(full["samples"], difficulty)
    return {"learned": a, "full_budget": b, "accuracy_drop": b["accuracy"] - a["accuracy"]}


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
        f"- used/budget {_f(learned['used_ratio'])}; Spearman(used, difficulty) "
        f"{_f(learned['spearman_used_difficulty'])}",
        "",
        "| difficulty | n | mean used | mean budget | used/budget | accuracy (learned) | accuracy (full) |",
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


# ------------------------------------------------------------------------------------------------ CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``latentvl halting``."""
    parser.add_argument("--model", required=True, help="a stage-C model directory (e.g. a checkpoint's model/)")
    parser.add_argument("--data", required=True, help="records JSONL whose lines carry a numeric 'difficulty'")
    parser.add_argument("--out", default=None, help="folder for halting.json, halting.md, used_by_difficulty.png")
    parser.add_argument("--threshold", type=float, default=None, help="stop threshold (default: the model's)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-samples", type=int, default=None)



def run(args: argparse.Namespace) -> int:
    """Run ``latentvl halting``: the model at learned halting and at full budget, against difficulty."""
    from ..data.collator import LatentCollator
    from ..data.records import load_records
    from ..model.loading import load_latent_model

    try:
        records, _ = load_records(args.data)
        difficulty = read_difficulties(args.data)
    except (OSError, ValueError) as err:  # RecordError is a ValueError
        print(f"halting: error: {err}", file=sys.stderr)
        return 2
    if args.max_samples is not None:
        records = records[: args.max_samples]
    if not difficulty:
        print(f"halting: error: no record of {args.data} carries a numeric 'difficulty'", file=sys.stderr)
        return 2
    model, processor = load_latent_model(args.model)
    if model.config.latent_mode_stage != "C":
        print(f"halting: error: {args.model} is a stage-{model.config.latent_mode_stage} model; "
              "halting needs a stage-C model", file=sys.stderr)
        return 2
    result = evaluate_halting(model, LatentCollator(processor, model.config), records, difficulty,
                              threshold=args.threshold, batch_size=args.batch_size)
    text = halting_markdown(f"{args.model} on {args.data}", result)
    print(text)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        write_atomic(out / "halting.json", json.dumps(result, indent=2) + "\n")
        write_atomic(out / "halting.md", text)
        plot_used_by_difficulty({"learned halting": result}, out / "used_by_difficulty.png")
    return 0
