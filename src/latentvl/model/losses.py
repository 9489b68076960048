"""The stage losses of design §6 and D4/D7 as small pure functions (no model, no data)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def stop_target_length(budget: int, ratio: float) -> int:
    """``t = max(1, round(ratio * budget))``, rounding halves up (2.5 -> 3) rather than to even."""
    return max(1, int(math.floor(ratio * budget + 0.5)))


def stop_labels_for_length(budget: int, target: int) -> list[float]:
    """Per-step stop labels of a segment of ``budget`` slots whose target length is ``target`` (1..budget)."""
    if not 1 <= target <= budget:
        raise ValueError(f"stop target {target} must be in [1, budget={budget}]")
    return [0.0 if k < target - 1 else 1.0 for k in range(budget)]


def answer_target_candidates(budget: int, points: int) -> list[int]:
    """The truncated lengths tried for a segment of ``budget`` slots: exactly ``points`` values.

    Every length ``1..budget-1`` when there are at most ``points`` of them (the list is then padded
    with ``budget``, a repeat of the reference, so that every segment costs the same rows);
    otherwise an even grid from 1 to ``budget-1``: ``1 + round(j * (budget-2) / (points-1))`` for
    ``j < points`` (just ``[1]`` when ``points`` is 1). Deterministic: every process of a run tries the
    same lengths for the same budget.
    """
    if budget < 1 or points < 1:
        raise ValueError(f"need budget >= 1 and points >= 1, got budget={budget}, points={points}")
    if budget - 1 <= points:
        return list(range(1, budget)) + [budget] * (points - budget + 1)
    if points == 1:
        return [1]
    return [1 + (2 * j * (budget - 2) + points - 1) // (2 * (points - 1)) for j in range(points)]


def answer_stop_target(
    lengths: list[int], losses: list[float], full_loss: float, budget: int, tolerance: float
) -> int:
    """The shortest used length from which the answer loss stays within ``tolerance`` of the full budget's.

    ``losses[j]`` is the answer CE with the segment truncated to ``lengths[j]``; ``full_loss`` the CE
    with all ``budget`` slots. The target is the shortest tried length ``L`` such that every tried length
    ``>= L`` is within tolerance: the answer has *settled* at ``L``. A length that is good only by
    coincidence, with a longer one breaking the answer again (a serial state that passes through the final
    value early), is not a place to stop: a stop head cannot see the coincidence coming, so such labels
    would only teach it to stop too early. The full budget always qualifies, so the result is in
    ``[1, budget]``. When no length changes the loss (nothing helps), the shortest tried length is
    returned: latents that do not lower the loss are not worth spending.
    """
    if len(lengths) != len(losses):
        raise ValueError(f"{len(lengths)} lengths but {len(losses)} losses")
    for length in lengths:
        if not 1 <= length <= budget:
            raise ValueError(f"truncated length {length} must be in [1, budget={budget}]")
    best = budget
    for length, loss in sorted(zip(lengths, losses), key=lambda x: -x[0]):  # longest first
        if loss > full_loss + tolerance:
            if length < budget:
                break  # this length breaks the answer: nothing at or below it has settled
            continue
        best = min(best, length)
    return best


def pool_visual_tokens(features: torch.Tensor, groups: int) -> torch.Tensor:
    """Average-pool ``[N, H]`` visual tokens (raster order) into ``[groups, H]`` contiguous groups.

    Group g covers tokens ``[floor(g*N/groups), ceil((g+1)*N/groups))``, the adaptive-pooling rule:
    every group is non-empty even when ``groups > N`` and the groups tile the sequence in order.
    """
    if features.dim() != 2:
        raise ValueError(f"features must be [N, H], got {tuple(features.shape)}")
    if groups < 1 or features.shape[0] < 1:
        raise ValueError(f"need groups >= 1 and N >= 1, got groups={groups}, N={features.shape[0]}")
    return F.adaptive_avg_pool1d(features.t()[None].float(), groups)[0].t()


def alignment_loss(latents: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean of ``1 - cos(latent, target)`` over the feature axis; both ``[P, H]``. Targets get no gradient."""
    if latents.shape != targets.shape or latents.dim() != 2:
        raise ValueError(f"latents {tuple(latents.shape)} and targets {tuple(targets.shape)} must both be [P, H]")
    if latents.shape[0] == 0:
        return latents.sum() * 0.0
    cos = F.cosine_similarity(latents.float(), targets.detach().float(), dim=-1)
    return (1.0 - cos).mean()


def stop_loss(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """BCE-with-logits averaged over the labelled steps (``weights`` 1) only; all tensors the same shape."""
    per_step = F.binary_cross_entropy_with_logits(logits.float(), labels.float(), reduction="none")
    w = weights.float()
    return (per_step * w).sum() / w.sum().clamp_min(1.0)


def expected_length(stop_probs: torch.Tensor) -> torch.Tensor:
    """Differentiable expected number of used latents of one segment from its ``[B]`` stop probabilities.

    Step 0 is always taken; step k is taken when no earlier step stopped:
    ``E[L] = sum_k prod_{j<k} (1 - p_j)``.
    """
    survive = torch.cumprod(1.0 - stop_probs.float(), dim=0)
    return 1.0 + survive[:-1].sum()
