"""Training: stage A (fixed latent budgets), stage C (learned halting), or both in one run (design §7).

- :func:`latentvl.training.trainer.train` - the loop, read top to bottom;
- :mod:`latentvl.training.setup` - the model of a stage, freezing / LoRA, the optimiser;
- :mod:`latentvl.training.distributed` - accelerate, FSDP2, the collectives and their errors;
- :class:`latentvl.training.config.TrainConfig` / :func:`~latentvl.training.config.load_config` - options;
- :mod:`latentvl.training.checks` - the design §8 checks run before the first step;
- :mod:`latentvl.training.checkpoint` - the checkpoint format: atomic writes, checksums, safe loading;
- :mod:`latentvl.training.resume` - the folder's lock, the checkpoint to resume from, what may change;
- :mod:`latentvl.training.metrics` - JSONL log, TensorBoard, progress bar.

See ``docs/training.md``.
"""
