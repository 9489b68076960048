"""Moved: :mod:`latentvl.evaluation.causal` (this path re-exports it)."""

from ..evaluation.causal import (
    CHECK_RULES,
    CHECKS,
    DonorPool,
    effective_rank,
    mask_latents,
    noise_latents,
    step_overrides,
    swap_latents,
    truncate_latents,
)

__all__ = [
    "CHECKS",
    "CHECK_RULES",
    "DonorPool",
    "effective_rank",
    "mask_latents",
    "noise_latents",
    "step_overrides",
    "swap_latents",
    "truncate_latents",
]
