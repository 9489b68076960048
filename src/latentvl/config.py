"""The latent fields of the model config (design §1) and their validation.

The fields live as plain attributes on the Hugging Face model config, so they survive
``save_pretrained`` / ``from_pretrained``. :class:`LatentSettings` is the one typed place that
names them, gives their defaults and validates them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields
from typing import Any

from .errors import LatentConfigError

STAGES = ("A", "C")  # the model's latent stages (a training run's schedules: training.config.RUN_STAGES)
COST_MODES = ("count", "expected")
STOP_TARGET_MODES = ("ratio", "answer")
TAIL_DROPOUT_MODES = ("any", "repeat")
COMPILE_BACKENDS = ("inductor", "aot_eager", "eager")


def check_threshold(value: Any, name: str = "latent_stop_threshold") -> float:
    """``value`` as a stop threshold: a number in [0, 1] (a segment stops once its stop probability reaches
    it). The one check of a threshold's range; raises :class:`LatentConfigError` (a ``ValueError``) naming
    ``name`` otherwise."""
    try:
        thr = float(value)
    except (TypeError, ValueError):
        thr = float("nan")
    if isinstance(value, bool) or not 0.0 <= thr <= 1.0:
        raise LatentConfigError(f"{name}={value!r}: must be a number in [0, 1]")
    return thr


@dataclass
class LatentSettings:
    """Every latent field, with its default (docs/design.md §1).

    design §1 fields come first; the rest are latentvl's own additions.

    ``latent_feedback_norm`` (False): a fed-back hidden state is scaled to unit RMS and multiplied by a learned
    per-feature gain (``latent_feedback_gain``, initialised to the embeddings' init std) before it enters
    its slot; False feeds the last hidden state as it is (the design note's). No effect on pause tokens.

    ``latent_teacher_forcing`` (0.0): in stage-A training (``model.training``), each active slot takes, with
    this probability, its alignment target (the pooled CoT features of its group, rescaled to the norm of the
    fed-back state it replaces) instead of the fed-back state; the alignment loss still scores the model's
    own fed-back state. Evaluation, generation and stage C always feed back the model's own states.
    Needs ``latent_feedback`` and CoT images (see docs/training.md, "Teacher-forced slots").

    ``latent_tail_dropout`` (0.0): in stage-A training, each segment's pass 2 keeps, with this probability,
    only its first ``L`` latents (``L`` uniform in ``1..B``), the rest masked out of attention as in stage
    C; pass 1 and the alignment loss are unchanged. The answer then learns to read whatever latents a
    halted segment leaves, which stage C's answer-driven stop target relies on.

    ``latent_tail_dropout_mode`` ("any"): which lengths tail dropout keeps. "any": ``L`` uniform in ``1..B``.
    "repeat": ``L`` uniform among the lengths whose dropped latents' alignment targets all repeat the last
    kept one's (D22): the answer is then asked only of latents that hold everything the CoT image shows,
    never guessed from the question where the latents have not reached it. Needs CoT images (a segment
    without one keeps every latent).

    ``latent_full_budget_ce_weight`` (0.0): in stage-C training the loss adds this times the answer CE of a second
    pass 1 + pass 2 at full budget (every slot active), so that fine-tuning the stop head does not
    unlearn what stage A's full budget computes; 0 is the design note's loss (docs/model.md, D18).

    ``latent_min_used`` (1): stage C's fewest latents per segment: the stop head's decision counts only from
    a segment's ``latent_min_used``-th slot on (a segment with a smaller budget uses all of it), and the
    stop targets are at least that long. 1 is the design note's rule (a stop may follow the first slot; D21).

    ``latent_full_budget_align_weight`` (0.0): in stage-C training the loss adds this times the alignment loss
    of that full-budget pass 1 (every slot against its own share of the CoT image, as stage A aligns), so
    that the latents keep showing the CoT image's states while the stop head learns (D20); needs CoT images.

    ``latent_compile`` (False): pass 1's steps run static-shape and through ``torch.compile``, and so does
    pass 2's forward in :meth:`latent_loss` (True: the inductor backend; a string names the backend, one of
    :data:`COMPILE_BACKENDS`); False runs them eagerly.

    ``latent_stop_loss_weight`` (1.0) and ``latent_cost_weight`` (1e-3) are stage C's weights, the design
    note's defaults. Stage A trains both at 0 whatever they hold: the loss applies them only in stage C
    (:meth:`loss_weights`), so a config keeps them across the switch. Entering stage C with a stop weight
    of 0 must be asked for: :meth:`replace` (and ``set_latent_fields``) refuses ``latent_mode_stage="C"``
    on a zero stop weight unless ``latent_stop_loss_weight`` is given in the same call.
    """

    latent_token_id: int = -1
    latent_budget_alpha: float = 0.02
    latent_budget_gamma: float = 0.5
    latent_budget_min: int = 1
    latent_budget_max: int = 32
    latent_mode_stage: str = "A"
    latent_stop_loss_weight: float = 1.0
    latent_cost_weight: float = 1e-3
    latent_stop_threshold: float = 0.5
    latent_null_scale: float = 0.0
    # latentvl additions
    latent_start_token_id: int = -1
    latent_end_token_id: int = -1
    latent_align_weight: float = 1.0
    latent_stop_target_ratio: float = 0.7
    latent_stop_target_mode: str = "ratio"
    latent_stop_target_tolerance: float = 0.1
    latent_stop_target_points: int = 8
    latent_min_used: int = 1
    latent_cost_mode: str = "count"
    latent_detach_step_inputs: bool = False
    latent_prefix_grad: bool = True
    latent_compile: bool | str = False
    latent_feedback: bool = True
    latent_feedback_norm: bool = False
    latent_teacher_forcing: float = 0.0
    latent_tail_dropout: float = 0.0
    latent_tail_dropout_mode: str = "any"
    latent_full_budget_ce_weight: float = 0.0
    latent_full_budget_align_weight: float = 0.0

    def validate(self) -> LatentSettings:
        """Raise :class:`LatentConfigError` naming the first invalid field; return self."""

        def bad(name: str, why: str) -> LatentConfigError:
            return LatentConfigError(f"{name}={getattr(self, name)!r}: {why}")

        if self.latent_mode_stage not in STAGES:
            raise bad("latent_mode_stage", f"must be one of {STAGES}")
        for name in ("latent_stop_loss_weight", "latent_cost_weight", "latent_align_weight",
                     "latent_full_budget_ce_weight", "latent_full_budget_align_weight"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
                raise bad(name, "must be a number >= 0")
        if not self.latent_budget_alpha > 0:
            raise bad("latent_budget_alpha", "must be > 0")
        if not self.latent_budget_gamma > 0:
            raise bad("latent_budget_gamma", "must be > 0")
        if not isinstance(self.latent_budget_min, int) or self.latent_budget_min < 1:
            raise bad("latent_budget_min", "must be an integer >= 1")
        if not isinstance(self.latent_budget_max, int) or self.latent_budget_max < self.latent_budget_min:
            raise bad("latent_budget_max", f"must be an integer >= latent_budget_min={self.latent_budget_min}")
        check_threshold(self.latent_stop_threshold)
        if not 0.0 <= self.latent_null_scale <= 1.0:
            raise bad("latent_null_scale", "must be in [0, 1]")
        if not 0.0 < self.latent_stop_target_ratio <= 1.0:
            raise bad("latent_stop_target_ratio", "must be in (0, 1]")
        if self.latent_stop_target_mode not in STOP_TARGET_MODES:
            raise bad("latent_stop_target_mode", f"must be one of {STOP_TARGET_MODES}")
        tol = self.latent_stop_target_tolerance
        if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not tol >= 0:
            raise bad("latent_stop_target_tolerance", "must be a number >= 0 (nats of answer CE)")
        points = self.latent_stop_target_points
        if isinstance(points, bool) or not isinstance(points, int) or points < 1:
            raise bad("latent_stop_target_points", "must be an integer >= 1")
        least = self.latent_min_used
        if isinstance(least, bool) or not isinstance(least, int) or least < 1:
            raise bad("latent_min_used", "must be an integer >= 1")
        drop = self.latent_tail_dropout
        if isinstance(drop, bool) or not isinstance(drop, (int, float)) or not 0.0 <= drop <= 1.0:
            raise bad("latent_tail_dropout", "must be a probability in [0, 1]")
        if self.latent_tail_dropout_mode not in TAIL_DROPOUT_MODES:
            raise bad("latent_tail_dropout_mode", f"must be one of {TAIL_DROPOUT_MODES}")
        tf = self.latent_teacher_forcing
        if isinstance(tf, bool) or not isinstance(tf, (int, float)) or not 0.0 <= tf <= 1.0:
            raise bad("latent_teacher_forcing", "must be a probability in [0, 1]")
        if tf > 0 and not self.latent_feedback:
            raise bad("latent_teacher_forcing", "needs latent_feedback=true (pause tokens feed no state to force)")
        if self.latent_cost_mode not in COST_MODES:
            raise bad("latent_cost_mode", f"must be one of {COST_MODES}")
        for name in ("latent_detach_step_inputs", "latent_prefix_grad", "latent_feedback", "latent_feedback_norm"):
            if not isinstance(getattr(self, name), bool):
                raise bad(name, "must be true or false")
        if not (isinstance(self.latent_compile, bool) or self.latent_compile in COMPILE_BACKENDS):
            raise bad("latent_compile", f"must be true, false or a torch.compile backend in {COMPILE_BACKENDS}")
        return self

    def loss_weights(self) -> tuple[float, float]:
        """``(stop, cost)`` weights the loss applies: the configured ones in stage C, ``(0.0, 0.0)`` in
        stage A (the stop head is not trained during warm-up, design §1, §7)."""
        if self.latent_mode_stage != "C":
            return 0.0, 0.0
        return float(self.latent_stop_loss_weight), float(self.latent_cost_weight)

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    @classmethod
    def from_config(cls, config: Any) -> LatentSettings:
        """Read the fields from a model config (missing ones take their defaults)."""
        return cls(**{n: getattr(config, n) for n in cls.field_names() if hasattr(config, n)})

    def replace(self, **changes: Any) -> LatentSettings:
        """A copy with ``changes``. Switching to stage C on a zero ``latent_stop_loss_weight`` (e.g. one
        a stage-A checkpoint saved) raises unless the weight is part of ``changes``: training stage C
        without a stop loss is a choice to state, never an accident."""
        unknown = set(changes) - set(self.field_names())
        if unknown:
            raise LatentConfigError(f"unknown latent field(s): {sorted(unknown)}")
        result = dataclasses.replace(self, **changes)
        if (changes.get("latent_mode_stage") == "C" and result.latent_stop_loss_weight == 0
                and "latent_stop_loss_weight" not in changes):
            raise LatentConfigError(
                "latent_stop_loss_weight=0.0 with latent_mode_stage='C': stage C would not train the stop head. "
                "Give latent_stop_loss_weight in the same call (the default is 1.0; 0 only if that is the intent)")
        return result

    def apply_to(self, config: Any) -> None:
        """Validate, then write every field onto ``config`` as an attribute."""
        self.validate()
        for name in self.field_names():
            setattr(config, name, getattr(self, name))


def set_latent_fields(config: Any, **changes: Any) -> LatentSettings:
    """Change latent fields on a model config, validating the result as a whole.

    Example: ``set_latent_fields(model.config, latent_mode_stage="C", latent_stop_loss_weight=1.0)``.
    """
    settings = LatentSettings.from_config(config).replace(**changes)
    settings.apply_to(config)
    return settings
