"""What a training run is built from: the model of a stage (tiny, a directory, ``init_from``, or a resumed
checkpoint) with its latent fields, freezing / LoRA / checkpointing, the optimiser's parameter groups, the
module that carries the two-pass loss through DDP and FSDP, and the LoRA state a checkpoint keeps.
"""

from __future__ import annotations

import copy
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from ..config import LatentSettings
from ..errors import TrainConfigError
from ..model.backbone import DEFAULT_BACKBONE
from ..model.compat import enable_activation_checkpointing
from ..model.loading import load_latent_model
from ..model.objective import LOSS_PARTS
from ..model.tiny import build_tiny_model
from ..model.vision_cache import VisionFeatureCache
from . import checkpoint as ckpt
from .config import TOKEN_FIELDS, TrainConfig


class LatentLossModule(nn.Module):
    """Makes the training unit the module's ``forward``, so DDP/FSDP hooks see the whole step.

    Returns a dict: ``loss`` (differentiable), the detached parts, and ``used``/``budget`` (latent slot
    counts summed over the micro-batch).
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batch: dict[str, Any] | None, threshold: float | None = None, call=None) -> Any:
        if call is not None:  # run other code on the model through this forward (FSDP: gathered root)
            return call(self.model)
        out = self.model.latent_loss(batch, threshold=threshold)
        used_lens = out.latent.latent_used_lens if out.latent is not None else []
        return {
            **{k: getattr(out, k) for k in LOSS_PARTS},
            "used": float(sum(sum(u) for u in used_lens)),
            "budget": float(sum(batch["latent_budget_total"])),
        }


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def source_dir(cfg: TrainConfig) -> Path | None:
    """Where the starting weights come from (None = the tiny model)."""
    if cfg.init_from:
        return ckpt.model_dir_of(cfg.init_from)
    if cfg.model != "tiny":
        return Path(cfg.model)
    return None


def build_model(cfg: TrainConfig, stage: str, resume_dir: Path | None = None):
    """``(model, processor)`` with the stage's latent fields written onto the config.

    Without LoRA a resumed run loads the checkpoint's ``model/`` (the exact training weights); with
    LoRA it rebuilds the base model from its source and :func:`train` loads the adapters afterwards.
    """
    source = source_dir(cfg)
    if resume_dir is not None and not cfg.lora:
        source = resume_dir / ckpt.MODEL_DIR
    if source is None:
        model, processor = build_tiny_model(
            seed=cfg.seed,
            attn_implementation=cfg.attn_implementation,
            backbone=cfg.backbone or DEFAULT_BACKBONE,
            hidden_size=cfg.tiny_hidden_size,
            num_layers=cfg.tiny_num_layers,
        )
    else:
        with ckpt.quiet_hf_progress():
            try:
                model, processor = load_latent_model(source, attn_implementation=cfg.attn_implementation)
            except Exception as err:
                if resume_dir is None or cfg.lora:
                    raise
                raise ckpt.CorruptCheckpointError(source, f"cannot be loaded ({type(err).__name__}: {err})") from err
        if cfg.backbone is not None and model.backbone != cfg.backbone:
            raise TrainConfigError(f"backbone: {cfg.backbone!r} was asked for, but {source} holds a {model.backbone!r} "
                                   "model (its config.json's model_type); leave backbone null to take the model's own")
    set_stage(model, cfg, stage)
    return model, processor


def set_stage(model: nn.Module, cfg: TrainConfig, stage: str) -> LatentSettings:
    """Write the latent fields of ``stage`` (A: stop and cost weights 0) onto the model config."""
    current = LatentSettings.from_config(model.config)
    for name in TOKEN_FIELDS:
        if name in cfg.latent and cfg.latent[name] != getattr(current, name):
            raise TrainConfigError(
                f"latent.{name}={cfg.latent[name]!r}: the model's tokenizer has {getattr(current, name)}"
            )
    settings = cfg.latent_settings(stage, base=current)
    settings.apply_to(model.config)
    return settings


def prepare_for_training(model: nn.Module, cfg: TrainConfig) -> nn.Module:
    """Freezing, gradient checkpointing and LoRA; returns the model to train (a PeftModel with LoRA)."""
    if cfg.freeze_vision:
        visual = model.model.visual
        visual.requires_grad_(False)
        if not cfg.freeze_vision_merger:
            visual.merger.requires_grad_(True)
    if cfg.vision_cache_mb:
        if cfg.distributed == "fsdp" and dist.is_initialized() and dist.get_world_size() > 1:
            raise TrainConfigError("vision_cache_mb: a cached image skips the vision tower, whose FSDP2 shards "
                                   "every process must gather together; set vision_cache_mb: 0 with fsdp")
        model.vision_cache = VisionFeatureCache(model.model.visual, cfg.vision_cache_mb * 2**20)
    if cfg.gradient_checkpointing:
        # Pass 2 only: the model switches it off inside pass 1, which needs its KV cache.
        enable_activation_checkpointing(model)
    if cfg.lora:
        from peft import LoraConfig, get_peft_model

        targets = cfg.lora_target_modules
        lora_cfg = LoraConfig(
            r=cfg.lora_r,
            lora_alpha=cfg.lora_alpha,
            lora_dropout=cfg.lora_dropout,
            target_modules=targets,
            modules_to_save=["latent_stop_head", "latent_pause_embedding", "latent_feedback_gain"],
            bias="none",
        )
        model = get_peft_model(model, lora_cfg)
    model.train()
    return model


def latent_model(model: nn.Module) -> nn.Module:
    """The latent model inside a PeftModel (the object with ``latent_loss`` and ``config``)."""
    if hasattr(model, "get_base_model"):
        return model.get_base_model()
    return model


STOP_HEAD = "latent_stop_head"  # the stop head's parameter names contain this


def make_optimizer(cfg: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    """The optimiser over the trainable parameters: weight decay on matrices only; with
    ``stop_head_lr_scale != 1`` the stop head gets its own group at ``lr * stop_head_lr_scale`` (the schedule
    scales every group alike). The logged ``lr`` is the first group's."""
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not params:
        raise ValueError("no trainable parameters (check freeze_vision / lora)")
    head = [p for n, p in params if STOP_HEAD in n] if cfg.stop_head_lr_scale != 1.0 else []
    rest = [(n, p) for n, p in params if not any(p is q for q in head)]
    decay = [p for n, p in rest if p.ndim >= 2]
    no_decay = [p for n, p in rest if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0},
              {"params": head, "weight_decay": 0.0, "lr": cfg.lr * cfg.stop_head_lr_scale}]
    groups = [g for g in groups if g["params"]]
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(groups, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps)
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)


def export_copy(model: nn.Module) -> nn.Module:
    """A plain latent model for ``model/``: LoRA adapters merged into a copy (the training model stays)."""
    if hasattr(model, "merge_and_unload"):
        return copy.deepcopy(model).merge_and_unload()
    return model


def trainable_lora_state(model: nn.Module) -> dict[str, torch.Tensor] | None:
    if not hasattr(model, "merge_and_unload"):
        return None
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


def restore_lora_state(model: nn.Module, state: dict[str, torch.Tensor]) -> list[str]:
    params = dict(model.named_parameters())
    missing = [n for n, p in params.items() if p.requires_grad and n not in state]
    with torch.no_grad():
        for name, value in state.items():
            if name not in params:
                raise ckpt.CheckpointError(f"LoRA state has {name!r}, which the model lacks")
            params[name].copy_(value)
    return missing
