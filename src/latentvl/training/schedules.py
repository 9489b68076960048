"""Step schedules: the learning rate (warm-up, then constant / linear / cosine), the stop threshold and the
teacher-forcing probability.

All are pure functions of the step, so a resumed run recomputes them exactly.
"""

from __future__ import annotations

import math


def lr_factor(step: int, warmup_steps: int, max_steps: int, kind: str, min_ratio: float = 0.0) -> float:
    """Multiplier of the base learning rate at optimiser step ``step`` (0-based).

    Linear warm-up from ``1/warmup_steps`` to 1 over the first ``warmup_steps`` steps, then ``kind``:
    ``constant`` (1), ``linear`` or ``cosine`` decay to ``min_ratio`` at ``max_steps``.
    """
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if kind == "constant":
        return 1.0
    span = max(1, max_steps - warmup_steps)
    progress = min(1.0, max(0.0, (step - warmup_steps) / span))
    if kind == "linear":
        shape = 1.0 - progress
    elif kind == "cosine":
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        raise ValueError(f"lr_scheduler={kind!r}: must be constant, linear or cosine")
    return min_ratio + (1.0 - min_ratio) * shape


def threshold_at(c_step: int, start: float, final: float, anneal_steps: int, shape: str = "linear") -> float:
    """Stop threshold at the ``c_step``-th step of stage C (0-based).

    Goes from ``start`` (step 0) to ``final`` (reached at step ``anneal_steps`` and kept after);
    ``anneal_steps == 0`` means ``final`` from the first step. Only the threshold changes: the model's
    halting rule (stop when ``p >= threshold``) is the same at every step.
    """
    if c_step < 0:
        raise ValueError(f"c_step={c_step} must be >= 0")
    if anneal_steps <= 0 or c_step >= anneal_steps:
        return float(final)
    frac = c_step / anneal_steps
    if shape == "cosine":
        frac = 0.5 * (1.0 - math.cos(math.pi * frac))
    elif shape != "linear":
        raise ValueError(f"threshold_anneal_shape={shape!r}: must be linear or cosine")
    return float(start + (final - start) * frac)


def teacher_forcing_at(step: int, start: float, decay_steps: int) -> float:
    """``latent_teacher_forcing`` at optimiser step ``step`` (0-based): ``start`` falling linearly to 0 at
    step ``decay_steps`` and 0 after; ``decay_steps == 0`` keeps ``start`` at every step."""
    if step < 0:
        raise ValueError(f"step={step} must be >= 0")
    if decay_steps <= 0:
        return float(start)
    return float(start) * max(0.0, 1.0 - step / decay_steps)
