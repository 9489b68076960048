"""Halting against difficulty: latents used per difficulty, Spearman(used, difficulty), accuracy vs full budget.

The report text and plot: :mod:`latentvl.reports.halting`; the command: ``latentvl halting``.

How halting follows difficulty, measured on the same stage-C model at learned halting and at full budget.

Records may carry a ``difficulty`` value (any number: hops, moves, ...). Everything here works on per-sample
rows ``{"id", "correct", "budgets", "used_lens"}`` (what :func:`latentvl.evaluation.teacher_forced.evaluate_records`
returns with ``per_sample=True``) plus a ``difficulty`` per id.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from ..config import LatentSettings
from .metrics import used_ratio
from .teacher_forced import evaluate_records

__all__ = ["evaluate_halting", "full_budget", "halting_summary", "read_difficulties", "spearman"]


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
            "used_ratio": used_ratio([r[1] for r in rows], [r[2] for r in rows]) or 0.0,
            "accuracy": sum(r[3] for r in rows) / len(rows),
        }
    return {
        "n": n,
        "accuracy": sum(bool(s["correct"]) for s in samples) / n if n else None,
        "used_ratio": used_ratio(used, budget),
        "spearman_used_difficulty": spearman([r[1] for r in rated], [r[0] for r in rated]),
        "by_difficulty": table,
    }


@contextlib.contextmanager
def full_budget(model: Any) -> Iterator[None]:
    """Run ``model`` as in stage A inside the block (every latent active, no stop head); restored after."""
    before = LatentSettings.from_config(model.config)
    before.replace(latent_mode_stage="A").apply_to(model.config)  # D12: stage A applies no stop or cost weight
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
    learned = evaluate_records(model, collator, list(records), batch_size=batch_size, threshold=threshold,
                               per_sample=True)
    with full_budget(model):
        full = evaluate_records(model, collator, list(records), batch_size=batch_size, per_sample=True)
    a, b = halting_summary(learned["samples"], difficulty), halting_summary(full["samples"], difficulty)
    return {"learned": a, "full_budget": b, "accuracy_drop": b["accuracy"] - a["accuracy"]}
