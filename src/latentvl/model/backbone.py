"""The backbone families latentvl runs on, and the one place that maps a name or a checkpoint's
``model_type`` to a family module (:mod:`latentvl.model.families`).

A family module defines ``NAME``, ``BLOCKS`` (the decoder and vision block class names), ``PATCH_SIZE``,
its latent model class (``LatentModelMixin`` first, then the transformers model) and
``tiny_config(ids, vocab_size, hidden_size, num_layers)``. Adding a family is adding one such module and
one line here.
"""

from __future__ import annotations

import importlib
from types import ModuleType

#: family name -> (module, the transformers ``model_type`` of its checkpoints, latent model class name)
BACKBONES: dict[str, tuple[str, str, str]] = {
    "qwen2_5_vl": ("latentvl.model.families.qwen2_5_vl", "qwen2_5_vl", "LatentQwen2_5_VLForConditionalGeneration"),
    "qwen3_vl": ("latentvl.model.families.qwen3_vl", "qwen3_vl", "LatentQwen3VLForConditionalGeneration"),
}
DEFAULT_BACKBONE = "qwen2_5_vl"


def family(name: str) -> ModuleType:
    """The family module of backbone ``name``; an unknown name raises ``ValueError`` listing the known ones."""
    if name not in BACKBONES:
        raise ValueError(f"backbone {name!r} is not supported; choose one of {sorted(BACKBONES)}")
    return importlib.import_module(BACKBONES[name][0])


def backbone_for_model_type(model_type: str, where: str = "config.json") -> str:
    """The backbone whose checkpoints carry ``model_type``; another one raises ``ValueError`` naming ``where``."""
    for name, (_module, mtype, _cls) in BACKBONES.items():
        if mtype == model_type:
            return name
    known = sorted(m for _n, m, _c in BACKBONES.values())
    raise ValueError(f"{where}: model_type {model_type!r} is not a backbone latentvl supports ({known})")


def latent_model_class(name: str) -> type:
    """The latent model class of backbone ``name``."""
    return getattr(family(name), BACKBONES[name][2])


__all__ = ["BACKBONES", "DEFAULT_BACKBONE", "backbone_for_model_type", "family", "latent_model_class"]
