"""Evaluation: teacher-forced (during training), generated answers (``latentvl eval``), halting against
difficulty, the causal checks and instruments, and the metrics they share (:mod:`.metrics`)."""
