"""The budget function (design §3): how many latent slots a chain-of-thought image gets."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch


def compute_latent_budget(
    num_visual_tokens: int, alpha: float, gamma: float, min_budget: int, max_budget: int
) -> int:
    """``B = clip(ceil(alpha * N**gamma), min_budget, max_budget)`` for an image of N visual tokens."""
    if num_visual_tokens < 0:
        raise ValueError(f"num_visual_tokens={num_visual_tokens} must be >= 0")
    if min_budget < 1 or max_budget < min_budget:
        raise ValueError(f"need 1 <= min_budget <= max_budget, got {min_budget}, {max_budget}")
    raw = math.ceil(alpha * float(num_visual_tokens) ** gamma)
    return int(min(max(raw, min_budget), max_budget))


def num_visual_tokens(grid_thw: Sequence[int] | torch.Tensor, spatial_merge_size: int) -> int:
    """``N = t*h*w // merge**2``: the number of LLM tokens the image becomes (the model's split size)."""
    t, h, w = (int(x) for x in grid_thw)
    return (t * h * w) // (spatial_merge_size**2)


def budgets_from_grids(
    grids_per_sample: Sequence[Sequence[Sequence[int]] | torch.Tensor],
    spatial_merge_size: int,
    alpha: float,
    gamma: float,
    min_budget: int,
    max_budget: int,
) -> list[list[int]]:
    """Per-sample lists of budgets, one per CoT image, from each sample's CoT ``image_grid_thw`` rows."""
    return [
        [
            compute_latent_budget(
                num_visual_tokens(g, spatial_merge_size), alpha, gamma, min_budget, max_budget
            )
            for g in grids
        ]
        for grids in grids_per_sample
    ]
