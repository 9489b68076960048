"""Helpers shared by several test files (imported as ``helpers``; pytest puts this folder on sys.path)."""

from __future__ import annotations

import torch


def legacy_key(key: str) -> str:
    """The public checkpoints' layout: ``model.layers.*``, ``visual.*``, ``lm_head.*``."""
    if key.startswith("model.language_model."):
        return "model." + key[len("model.language_model."):]
    if key.startswith("model.visual."):
        return key[len("model."):]
    return key


def fire_at(model, schedule: dict[int, list[int]]):
    """Make the stop head return +20 at the given pass-1 steps for the given rows, else -20.

    Returns the hook handle; ``schedule`` maps a stop-head call index to the rows that fire there.
    """
    calls = {"n": 0}

    def hook(module, args, output):
        out = torch.full_like(output, -20.0)
        for row in schedule.get(calls["n"], []):
            out[row] = 20.0
        calls["n"] += 1
        return out

    return model.latent_stop_head.register_forward_hook(hook)
