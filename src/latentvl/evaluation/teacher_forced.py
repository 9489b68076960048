"""Held-out evaluation during training: loss parts, greedy exact-match accuracy and latent usage.

Accuracy is computed by teacher forcing: a sample is correct when the argmax prediction at every
labelled position (the answer tokens and the end-of-turn token) is the label, which is exactly when
greedy decoding after the prompt (and its latents) would produce the answer and stop. It runs the
training unit (``latent_loss``) in eval mode, so stage C halts with the given threshold as in
inference.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist

from ..data.collator import to_device
from ..data.records import Record, RecordDataset
from ..model.objective import LOSS_PARTS
from .metrics import USED_RATIO, used_ratio


def batch_correct(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``[B]`` bool: every labelled next-token prediction is right (and the sample has a label)."""
    preds = logits[:, :-1].argmax(-1)
    targets = labels[:, 1:].to(preds.device)
    mask = targets != -100
    return ((preds == targets) | ~mask).all(-1) & mask.any(-1)


@torch.no_grad()
def evaluate_records(
    model,
    collator,
    records: list[Record],
    *,
    batch_size: int = 8,
    threshold: float | None = None,
    max_samples: int | None = None,
    rank: int = 0,
    world_size: int = 1,
    per_sample: bool = False,
) -> dict[str, Any]:
    """Evaluate ``model`` on ``records``; in a distributed run every process must call it.

    Returns ``n``, ``accuracy``, ``loss``, ``ce``, ``align``, ``stop``, ``cost`` (means over samples),
    ``used``, ``budget``, ``used_ratio`` (:mod:`latentvl.evaluation.metrics`: sum used / sum budget over
    all segments) and, with
    ``per_sample``, ``samples``: ``[{"id", "correct", "budgets", "used_lens"}]`` (this process's share).
    """
    if max_samples is not None:
        records = records[:max_samples]
    mine = records[rank::world_size]
    per_rank = math.ceil(len(records) / world_size)
    n_batches = math.ceil(per_rank / batch_size) if per_rank else 0
    dataset = RecordDataset(mine)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    keys = LOSS_PARTS
    sums = dict.fromkeys(("n", "correct", "used", "budget", *keys), 0.0)
    samples: list[dict[str, Any]] = []
    try:
        for i in range(n_batches):
            idx = list(range(i * batch_size, min(len(mine), (i + 1) * batch_size)))
            weight = 1.0
            source = dataset
            if not idx:  # this process ran out: step with a dummy batch so collectives stay matched
                idx, weight = [0], 0.0
                source = dataset if mine else RecordDataset(records[:1])
            batch = to_device(collator([source[j] for j in idx]), device)
            out = model.latent_loss(batch, threshold=threshold)
            ok = batch_correct(out.logits, batch["labels"])
            n = len(idx) * weight
            sums["n"] += n
            sums["correct"] += float(ok.sum()) * weight
            for k in keys:
                sums[k] += float(getattr(out, k)) * n
            used_lens = out.latent.latent_used_lens
            sums["used"] += sum(sum(u) for u in used_lens) * weight
            sums["budget"] += sum(batch["latent_budget_total"]) * weight
            if per_sample and weight:
                for b, sid in enumerate(batch["ids"]):
                    samples.append(
                        {
                            "id": sid,
                            "correct": bool(ok[b]),
                            "budgets": list(batch["latent_budgets"][b]),
                            "used_lens": list(used_lens[b]),
                        }
                    )
    finally:
        model.train(was_training)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        names = list(sums)
        t = torch.tensor([sums[k] for k in names], dtype=torch.float64, device=device)
        dist.all_reduce(t)
        sums = dict(zip(names, t.tolist(), strict=True))
    n = max(sums["n"], 1.0)
    result: dict[str, Any] = {"n": int(sums["n"]), "accuracy": sums["correct"] / n}
    for k in keys:
        result[k] = sums[k] / n
    result["used"] = int(sums["used"])
    result["budget"] = int(sums["budget"])
    result[USED_RATIO] = used_ratio([sums["used"]], [sums["budget"]])
    if per_sample:
        result["samples"] = samples
    return result
