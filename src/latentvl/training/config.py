"""The training configuration: one typed dataclass, read from YAML and patched from the command line.

A YAML file holds the :class:`TrainConfig` fields at the top level, plus one nested mapping ``latent:``
for the latent fields of the model config (design §1 and latentvl's own, see
:class:`latentvl.config.LatentSettings`)::

    model: tiny
    train_data: data/shapes/train.jsonl
    stage: AC
    switch_step: 300
    lr: 1.0e-3
    latent:
      latent_budget_alpha: 1.0
      latent_stop_threshold: 0.5

Overrides are ``key=value`` strings; the value is parsed as YAML (``lr=1e-3``, ``lora=true``,
``lora_target_modules=[q_proj,v_proj]``, ``eval_data=null``). Latent fields are written either as
``latent.latent_budget_alpha=0.5`` or simply ``latent_budget_alpha=0.5``. Every error is a
:class:`TrainConfigError` whose message starts with the field's name.

``latent.latent_stop_loss_weight`` and ``latent.latent_cost_weight`` are the weights of stage C; the
trainer sets both to 0 while it runs stage A (design §1). ``latent_mode_stage`` follows the ``stage``
field (giving it here is allowed only when it agrees). The token ids (``latent_token_id``,
``latent_start_token_id``, ``latent_end_token_id``) come from the tokenizer; given here, they must match
it (checked when the model is built).
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from ..config import STAGES, LatentSettings
from ..errors import LatentConfigError, TrainConfigError
from ..model.backbone import BACKBONES

# What a run trains: one of the model's stages (latentvl.config.STAGES), or stage A then stage C.
RUN_STAGES = (*STAGES, "AC")
OPTIMIZERS = ("adamw", "adam", "sgd")
SCHEDULERS = ("constant", "linear", "cosine")
PRECISIONS = ("auto", "no", "bf16", "fp16")
ANNEAL_SHAPES = ("linear", "cosine")
DISTRIBUTED_MODES = ("ddp", "fsdp")

# The latent fields the trainer owns (the stage) and the ones that must come from the tokenizer.
_STAGE_FIELD = "latent_mode_stage"
TOKEN_FIELDS = ("latent_token_id", "latent_start_token_id", "latent_end_token_id")
# The two stage-C weights a run sets with the switch to stage C, unless its `latent` section names them: the
# design's defaults, so that a checkpoint whose config holds 0 (e.g. from an older stage-A run) still trains
# the stop head (D12: LatentSettings.loss_weights applies them in stage C only).
STAGE_C_WEIGHT_DEFAULTS = {"latent_stop_loss_weight": LatentSettings.latent_stop_loss_weight,
                           "latent_cost_weight": LatentSettings.latent_cost_weight}
LORA_DEFAULT_TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)$"


@dataclass
class TrainConfig:
    """Every option of ``latentvl train``. Defaults suit a small CPU run; see ``docs/training.md``."""

    # ---- model
    model: str = "tiny"  # "tiny" (a random tiny model, offline) or a model directory
    # the backbone family ("qwen2_5_vl" or "qwen3_vl"): the tiny model's (null: qwen2_5_vl); with a model
    # directory, null takes the directory's own and a name must match its config.json's model_type
    backbone: str | None = None
    tiny_hidden_size: int = 128
    tiny_num_layers: int = 4
    attn_implementation: str = "latent_sdpa"
    init_from: str | None = None  # start from these weights: a checkpoint dir (its model/) or a model dir
    # ---- data
    train_data: str | None = None  # JSONL records (latentvl.data.records format)
    eval_data: str | None = None
    skip_invalid: bool = False
    use_latents: bool = True  # False: the no-latent baseline (answer right after the question)
    max_length: int | None = None
    system_prompt: str | None = None
    num_workers: int = 0
    # ---- stages (design §7)
    stage: str = "A"  # "A", "C" or "AC" (A until switch_step, then C)
    switch_step: int | None = None  # AC only (ignored otherwise): the first step of stage C
    threshold_start: float = 0.9  # stage C anneals the stop threshold from here ...
    threshold_anneal_steps: int = 100  # ... to latent.latent_stop_threshold over this many C steps
    threshold_anneal_shape: str = "linear"
    latent: dict[str, Any] = field(default_factory=dict)  # LatentSettings fields
    # latent.latent_teacher_forcing falls linearly to 0 over this many steps (0 = constant), stage A only
    teacher_forcing_decay_steps: int = 0
    # ---- optimisation
    optimizer: str = "adamw"
    lr: float = 1e-4
    weight_decay: float = 0.0
    stop_head_lr_scale: float = 1.0  # the stop head learns at lr * this (its own group, no weight decay)
    stop_head_first_steps: int = 0  # stage C's first N steps update the stop head alone (0 = off)
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    momentum: float = 0.0  # sgd only
    lr_scheduler: str = "cosine"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0  # the schedule's floor, as a fraction of lr
    batch_size: int = 8  # per process and micro-batch
    grad_accum: int = 1
    max_steps: int = 1000
    grad_clip: float | None = 1.0  # max global grad norm; null = no clipping
    seed: int = 0
    # ---- evaluation, checkpoints, logs
    output_dir: str = "runs/latentvl"
    eval_every: int = 0  # 0 = only at the end (when eval_data is set)
    eval_max_samples: int | None = None
    eval_batch_size: int | None = None
    # at the end of a stage-C run: choose latent_stop_threshold on eval_data and write it into final/
    calibrate_stop_threshold: bool = False
    calibration_tolerance: float = 0.01  # ... the lowest used/budget within this of the best accuracy
    calibration_used_slack: float = 0.05  # ... a used/budget within this of the lowest counting as a tie
    save_every: int = 0  # 0 = only at the end
    keep_last: int = 2  # checkpoints kept (older ones are deleted); 0 = keep all
    save_final_model: bool = True  # also write output_dir/final (a loadable model directory)
    log_every: int = 1
    tensorboard: bool = True
    progress_bar: bool = True
    resume: str | None = None  # "latest" or a checkpoint dir: continue exactly where it stopped
    # ---- engine
    mixed_precision: str = "auto"  # auto = bf16 on a GPU that supports it, else no
    distributed: str = "ddp"  # under torchrun / accelerate launch: "ddp" or "fsdp"
    ddp_find_unused_parameters: bool = True
    dist_timeout_s: float = 600.0  # multi-process: a collective that waits longer than this fails
    gradient_checkpointing: bool = False  # pass 2 only; the model turns it off inside pass 1
    freeze_vision: bool = False  # freeze the vision tower (ViT blocks and patch embedding)
    freeze_vision_merger: bool = True  # with freeze_vision: freeze the patch merger as well
    vision_cache_mb: int = 0  # with freeze_vision: keep each image's vision features (MiB; 0 = off; docs/training.md)
    image_cache_mb: int = 0  # keep each distinct image's processed patch rows (MiB; 0 = off; docs/training.md)
    lora: bool = False
    lora_r: int = 16
    lora_alpha: float = 32.0
    lora_dropout: float = 0.0
    lora_target_modules: str | list[str] = LORA_DEFAULT_TARGETS
    run_checks: bool = True  # design §8 checks on one batch before the first step (of each stage)
    check_tolerance: float = 1e-4
    num_threads: int | None = None  # torch CPU threads; null = torch's default

    # ------------------------------------------------------------------ derived values
    def latent_settings(self, stage: str, base: LatentSettings | None = None) -> LatentSettings:
        """The model-config latent fields for ``stage`` ("A" or "C"), on top of ``base``."""
        fields_c = self.stage_c_latent_fields()
        # Both stages carry the stage-C weights: the loss applies them in stage C only (D12,
        # LatentSettings.loss_weights); one call sets them with the switch, so a zero stop weight is explicit.
        changes = {**fields_c, "latent_mode_stage": stage}
        return (base or LatentSettings()).replace(**changes).validate()

    def stage_c_latent_fields(self) -> dict[str, Any]:
        return {**STAGE_C_WEIGHT_DEFAULTS, **self.latent}

    def stage_at(self, step: int) -> str:
        """The stage that training step ``step`` (0-based) runs."""
        if self.stage == "AC":
            return "A" if step < int(self.switch_step) else "C"
        return self.stage

    def stage_c_start(self) -> int | None:
        return {"A": None, "C": 0, "AC": self.switch_step}[self.stage]

    def head_only_at(self, step: int) -> bool:
        """Whether training step ``step`` (0-based) updates the stop head alone: the first
        ``stop_head_first_steps`` steps of stage C."""
        start = self.stage_c_start()
        return start is not None and int(start) <= step < int(start) + self.stop_head_first_steps

    @property
    def final_threshold(self) -> float:
        return float(
            self.stage_c_latent_fields().get("latent_stop_threshold", LatentSettings.latent_stop_threshold)
        )

    # ------------------------------------------------------------------ validation
    def validate(self) -> TrainConfig:
        """Raise :class:`TrainConfigError` naming the first invalid field; return self."""
        self._validate_finite()
        self._validate_run()
        self._validate_counts()
        self._validate_optimiser()
        self._validate_latent()
        return self

    def _bad(self, name: str, why: str) -> TrainConfigError:
        return TrainConfigError(f"{name}={getattr(self, name)!r}: {why}")

    def _validate_finite(self) -> None:
        """Non-finite numbers are refused everywhere (NaN passes every "< 0" test; inf trains nothing)."""
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise self._bad(f.name, "must be a finite number")
        for name, value in self.latent.items():
            if isinstance(value, float) and not math.isfinite(value):
                raise TrainConfigError(f"latent.{name}={value!r}: must be a finite number")

    def _validate_run(self) -> None:
        """The choices, the data and the stage schedule."""
        for name, choices in (
            ("stage", RUN_STAGES),
            ("optimizer", OPTIMIZERS),
            ("lr_scheduler", SCHEDULERS),
            ("mixed_precision", PRECISIONS),
            ("threshold_anneal_shape", ANNEAL_SHAPES),
            ("distributed", DISTRIBUTED_MODES),
        ):
            if getattr(self, name) not in choices:
                raise self._bad(name, f"must be one of {list(choices)}")
        if self.train_data is None:
            raise self._bad("train_data", "is required (a JSONL file of records)")
        if self.stage == "AC":
            if self.switch_step is None or not 0 < self.switch_step < self.max_steps:
                raise self._bad("switch_step", f"stage AC needs 0 < switch_step < max_steps={self.max_steps}")
        if self.teacher_forcing_decay_steps and not self.latent.get("latent_teacher_forcing", 0):
            raise self._bad("teacher_forcing_decay_steps", "needs latent.latent_teacher_forcing > 0 to decay")
        if self.calibrate_stop_threshold and (self.stage == "A" or self.eval_data is None):
            raise self._bad("calibrate_stop_threshold", "needs a run that ends in stage C (C or AC) and eval_data")
        if not self.calibration_tolerance >= 0:
            raise self._bad("calibration_tolerance", "must be >= 0")
        if not self.calibration_used_slack >= 0:
            raise self._bad("calibration_used_slack", "must be >= 0")
        if self.vision_cache_mb and not (self.freeze_vision and self.freeze_vision_merger):
            raise self._bad("vision_cache_mb", "caches a frozen tower's features: needs freeze_vision and "
                                               "freeze_vision_merger")
        if self.stage != "A" and not self.use_latents:
            raise self._bad("use_latents", "stage C needs latents (the no-latent baseline is a stage-A run)")

    def _validate_counts(self) -> None:
        """Sizes, steps and intervals."""
        positive = (
            "tiny_hidden_size",
            "tiny_num_layers",
            "batch_size",
            "grad_accum",
            "max_steps",
            "log_every",
            "lora_r",
        )
        for name in positive:
            if getattr(self, name) < 1:
                raise self._bad(name, "must be >= 1")
        for name in (
            "warmup_steps",
            "eval_every",
            "save_every",
            "keep_last",
            "num_workers",
            "threshold_anneal_steps",
            "teacher_forcing_decay_steps",
            "vision_cache_mb",
            "image_cache_mb",
        ):
            if getattr(self, name) < 0:
                raise self._bad(name, "must be >= 0")
        for name in ("max_length", "eval_max_samples", "eval_batch_size", "num_threads"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise self._bad(name, "must be >= 1 or null")
        if self.tiny_hidden_size % 8:
            raise self._bad("tiny_hidden_size", "must be a multiple of 8 (4 heads, rotary halves)")
        if self.backbone is not None and self.backbone not in BACKBONES:
            raise self._bad("backbone", f"must be one of {sorted(BACKBONES)} or null")

    def _validate_optimiser(self) -> None:
        """Optimiser, schedule, threshold, LoRA and the run's tolerances."""
        if not self.lr > 0:
            raise self._bad("lr", "must be > 0")
        if self.weight_decay < 0:
            raise self._bad("weight_decay", "must be >= 0")
        if not self.stop_head_lr_scale > 0:
            raise self._bad("stop_head_lr_scale", "must be > 0")
        if self.stop_head_first_steps < 0:
            raise self._bad("stop_head_first_steps", "must be >= 0")
        for name in ("adam_beta1", "adam_beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise self._bad(name, "must be in [0, 1)")
        if not self.adam_eps > 0:
            raise self._bad("adam_eps", "must be > 0")
        if self.momentum < 0:
            raise self._bad("momentum", "must be >= 0")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise self._bad("min_lr_ratio", "must be in [0, 1]")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise self._bad("grad_clip", "must be > 0 or null")
        if not 0.0 <= self.threshold_start <= 1.0:
            raise self._bad("threshold_start", "must be in [0, 1]")
        if self.lora_alpha <= 0:
            raise self._bad("lora_alpha", "must be > 0")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise self._bad("lora_dropout", "must be in [0, 1)")
        if not self.dist_timeout_s > 0:
            raise self._bad("dist_timeout_s", "must be > 0 (seconds)")
        if not self.check_tolerance > 0:
            raise self._bad("check_tolerance", "must be > 0")

    def _validate_latent(self) -> None:
        known = set(LatentSettings.field_names())
        for name, value in self.latent.items():
            where = f"latent.{name}"
            if name not in known:
                raise TrainConfigError(f"{where}: unknown latent field; known: {sorted(known)}")
            if name == _STAGE_FIELD and value != self.stage:
                raise TrainConfigError(
                    f"{where}={value!r}: disagrees with stage={self.stage!r} (the top-level 'stage' decides: "
                    "A, C or AC)"
                )
            self.latent[name] = _coerce(value, typing.get_type_hints(LatentSettings)[name], where)
        try:
            self.latent_settings("C")
            self.latent_settings("A")
        except LatentConfigError as err:
            raise TrainConfigError(f"latent.{err}") from err

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    @classmethod
    def from_dict(cls, data: dict[str, Any], validate: bool = True) -> TrainConfig:
        """Build from a mapping (unknown keys are errors); ``validate`` checks the whole result."""
        if not isinstance(data, dict):
            raise TrainConfigError(f"config: expected a mapping of options, got {type(data).__name__}")
        cfg = cls()
        for key, value in data.items():
            cfg.set(key, value)
        return cfg.validate() if validate else cfg

    def set(self, key: str, value: Any) -> None:
        """Set one option by name (``latent.X`` or a bare latent field name go to ``latent``)."""
        key = key.strip().replace("-", "_")
        if key.startswith("latent."):
            self.latent[key[len("latent.") :]] = value
            return
        if key == "latent":
            if value is None:
                value = {}
            if not isinstance(value, dict):
                raise TrainConfigError(
                    f"latent: expected a mapping of latent fields, got {type(value).__name__}"
                )
            self.latent.update(value)
            return
        if key in LatentSettings.field_names():
            self.latent[key] = value
            return
        hints = typing.get_type_hints(TrainConfig)
        if key not in hints:
            close = [n for n in self.field_names() if key in n or n in key]
            extra = f"; did you mean {close}?" if close else ""
            raise TrainConfigError(f"{key}: unknown option{extra}")
        setattr(self, key, _coerce(value, hints[key], key))

def parse_override(item: str) -> tuple[str, Any]:
    """``"key=value"`` -> ``(key, value)``, the value read as YAML (empty = None)."""
    if "=" not in item:
        raise TrainConfigError(f"{item}: an override must look like key=value")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as err:
        raise TrainConfigError(f"{key}: cannot parse value {raw!r} ({err})") from err
    return key, value


def _coerce(value: Any, hint: Any, name: str) -> Any:
    """Check ``value`` against a type hint (int -> float allowed, str numbers for YAML quirks)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, name)
            except TrainConfigError as err:
                errors.append(str(err))
        raise TrainConfigError(errors[0] if len(errors) == 1 else f"{name}={value!r}: expected {hint}")
    if origin is list:
        if not isinstance(value, list):
            raise TrainConfigError(f"{name}={value!r}: expected a list")
        (inner,) = typing.get_args(hint) or (Any,)
        return [_coerce(v, inner, f"{name}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise TrainConfigError(f"{name}={value!r}: expected a mapping")
        return dict(value)
    if hint is Any:
        return value
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise TrainConfigError(f"{name}={value!r}: expected true or false")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise TrainConfigError(f"{name}={value!r}: expected an integer")
    if hint is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):  # YAML 1.1 reads "1e-3" as a string
            try:
                number = float(value)
            except ValueError:
                pass
        if number is None:
            raise TrainConfigError(f"{name}={value!r}: expected a number")
        if not math.isfinite(number):
            raise TrainConfigError(f"{name}={value!r}: must be a finite number")
        return number
    if hint is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise TrainConfigError(f"{name}={value!r}: expected a string")
    raise TrainConfigError(f"{name}: unsupported option type {hint}")


def load_config(
    path: str | Path | None = None, overrides: list[str] | None = None, updates: dict[str, Any] | None = None
) -> TrainConfig:
    """Read a YAML file (optional), apply ``key=value`` overrides, then ``updates`` (already typed
    values, e.g. from command-line flags), and validate the whole."""
    cfg = TrainConfig()
    if path is not None:
        path = Path(path)
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except OSError as err:
            raise TrainConfigError(f"config: cannot read {path} ({err})") from err
        except yaml.YAMLError as err:
            raise TrainConfigError(f"config: {path} is not valid YAML ({err})") from err
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise TrainConfigError(f"config: {path} must hold a mapping of options")
        for key, value in data.items():
            cfg.set(str(key), value)
    for item in overrides or []:
        cfg.set(*parse_override(item))
    for key, value in (updates or {}).items():
        cfg.set(key, value)
    return cfg.validate()


# ------------------------------------------------------------------------------------ resume


