"""The latent fields of the model config (SPEC §1) and their validation.

The fields live as plain attributes on the Hugging Face model config, so they survive
``save_pretrained`` / ``from_pretrained``. :class:`LatentSettings` is the one typed place that
names them, gives their defaults and validates them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields
from typing import Any

STAGES = ("A", "C")
COST_MODES = ("count", "expected")


class LatentConfigError(ValueError):
    """A latent config field has an invalid value; the message names the field and the value."""


@dataclass
class LatentSettings:
    """Every latent field, with SPEC defaults.

    SPEC §1 fields come first; the rest are latentvl's own additions.
    """

    latent_token_id: int = -1
    latent_budget_alpha: float = 0.02
    latent_budget_gamma: float = 0.5
    latent_budget_min: int = 1
    latent_budget_max: int = 32
    latent_mode_stage: str = "A"
    latent_stop_loss_weight: float = 0.0
    latent_cost_weight: float = 0.0
    latent_stop_threshold: float = 0.5
    latent_null_scale: float = 0.0
    # latentvl additions
    latent_start_token_id: int = -1
    latent_end_token_id: int = -1
    latent_align_weight: float = 1.0
    latent_stop_target_ratio: float = 0.7
    latent_cost_mode: str = "count"
    latent_detach_step_inputs: bool = False
    latent_prefix_grad: bool = True
    latent_feedback: bool = True

    def validate(self) -> LatentSettings:
        """Raise :class:`LatentConfigError` naming the first invalid field; return self."""

        def bad(name: str, why: str) -> LatentConfigError:
            return LatentConfigError(f"{name}={getattr(self, name)!r}: {why}")

        if self.latent_mode_stage not in STAGES:
            raise bad("latent_mode_stage", f"must be one of {STAGES}")
        if self.latent_mode_stage == "A":
            for name in ("latent_stop_loss_weight", "latent_cost_weight"):
                if getattr(self, name) != 0:
                    raise bad(name, "must be 0 in stage A (the stop head is not trained during warm-up)")
        for name in ("latent_stop_loss_weight", "latent_cost_weight", "latent_align_weight"):
            if getattr(self, name) < 0:
                raise bad(name, "must be >= 0")
        if not self.latent_budget_alpha > 0:
            raise bad("latent_budget_alpha", "must be > 0")
        if not self.latent_budget_gamma > 0:
            raise bad("latent_budget_gamma", "must be > 0")
        if not isinstance(self.latent_budget_min, int) or self.latent_budget_min < 1:
            raise bad("latent_budget_min", "must be an integer >= 1")
        if not isinstance(self.latent_budget_max, int) or self.latent_budget_max < self.latent_budget_min:
            raise bad("latent_budget_max", f"must be an integer >= latent_budget_min={self.latent_budget_min}")
        if not 0.0 <= self.latent_stop_threshold <= 1.0:
            raise bad("latent_stop_threshold", "must be in [0, 1]")
        if not 0.0 <= self.latent_null_scale <= 1.0:
            raise bad("latent_null_scale", "must be in [0, 1]")
        if not 0.0 < self.latent_stop_target_ratio <= 1.0:
            raise bad("latent_stop_target_ratio", "must be in (0, 1]")
        if self.latent_cost_mode not in COST_MODES:
            raise bad("latent_cost_mode", f"must be one of {COST_MODES}")
        for name in ("latent_detach_step_inputs", "latent_prefix_grad", "latent_feedback"):
            if not isinstance(getattr(self, name), bool):
                raise bad(name, "must be true or false")
        return self

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    @classmethod
    def from_config(cls, config: Any) -> LatentSettings:
        """Read the fields from a model config (missing ones take their defaults)."""
        return cls(**{n: getattr(config, n) for n in cls.field_names() if hasattr(config, n)})

    def replace(self, **changes: Any) -> LatentSettings:
        unknown = set(changes) - set(self.field_names())
        if unknown:
            raise LatentConfigError(f"unknown latent field(s): {sorted(unknown)}")
        return dataclasses.replace(self, **changes)

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
