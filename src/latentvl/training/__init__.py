"""Training: stage A (fixed latent budgets), stage C (learned halting), or both in one run (design §7).

- :func:`latentvl.training.trainer.train` - the loop (accelerate; DDP or FSDP2 under ``torchrun``);
- :class:`latentvl.training.config.TrainConfig` / :func:`~latentvl.training.config.load_config` - options;
- :mod:`latentvl.training.checks` - the design §8 checks run before the first step;
- :mod:`latentvl.training.checkpoint` - atomic checkpoints and exact resume;
- :mod:`latentvl.training.metrics` - JSONL log, TensorBoard, progress bar.

See ``docs/training.md``.
"""

from __future__ import annotations

_LAZY = {
    "train": "trainer",
    "TrainResult": "trainer",
    "NonFiniteLossError": "trainer",
    "TrainConfig": "config",
    "TrainConfigError": "config",
    "load_config": "config",
    "PreflightError": "checks",
    "run_checks": "checks",
}


def __getattr__(name: str):
    # Imported on first use: the trainer pulls in accelerate, which the config tools do not need.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(name)


__all__ = sorted(_LAZY)
