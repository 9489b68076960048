"""The stage losses of SPEC §5.5 and D4/D7 as small pure functions (no model, no data)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def stop_target_length(budget: int, ratio: float) -> int:
    """``t = max(1, round(ratio * budget))``, rounding halves up (2.5 -> 3) rather than to even."""
    return max(1, int(math.floor(ratio * budget + 0.5)))


def stop_labels(budget: int, ratio: float) -> list[float]:
    """Per-step stop labels of a segment: 0 for steps ``k < t-1``, 1 for steps ``k >= t-1``."""
    t = stop_target_length(budget, ratio)
    return [0.0 if k < t - 1 else 1.0 for k in range(budget)]


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
