"""latentvl: teach Qwen2.5-VL or Qwen3-VL to reason in latent visual thoughts.

Stage A (warm-up) fills a fixed budget of latent slots per chain-of-thought image with the model's
own hidden states; stage C adds a learned stop head that decides how many of those slots to use.

This module is the front door: every name below is defined in the module named beside it and is
imported from there on first use (``import latentvl`` itself loads neither transformers nor accelerate).

=====================================  =============================================================
name                                   home
=====================================  =============================================================
``build_tiny_model``                   :mod:`latentvl.model.tiny` (offline random Qwen2.5-VL or Qwen3-VL)
``load_latent_model``                  :mod:`latentvl.model.loading` (a local checkpoint directory)
``save_latent_checkpoint``             :mod:`latentvl.model.loading`
``LatentQwen2_5_VLForConditionalGeneration``  :mod:`latentvl.model.families.qwen2_5_vl`
``LatentQwen3VLForConditionalGeneration``     :mod:`latentvl.model.families.qwen3_vl`
``LatentSettings``, ``set_latent_fields``     :mod:`latentvl.config` (the latent fields of a config)
``LatentProcessor``                    :mod:`latentvl.processor`
``load_records``, ``RecordDataset``    :mod:`latentvl.data.records` (JSONL records, validated)
``LatentCollator``                     :mod:`latentvl.data.collator` (records to a batch)
``TrainConfig``, ``load_config``       :mod:`latentvl.training.config`
``train``                              :mod:`latentvl.training.trainer` (stage A, C, or both)
``LatentInference``, ``GenerationSettings``, ``infer``  :mod:`latentvl.inference.generate`
``VLLMInference``                      :mod:`latentvl.inference.vllm_engine` (step 2 in vLLM; the vllm extra)
``InputError``, ``LatentInputError``   :mod:`latentvl.errors` (every input error's family)
=====================================  =============================================================
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_HOMES = {
    "build_tiny_model": "latentvl.model.tiny",
    "load_latent_model": "latentvl.model.loading",
    "save_latent_checkpoint": "latentvl.model.loading",
    "LatentQwen2_5_VLForConditionalGeneration": "latentvl.model.families.qwen2_5_vl",
    "LatentQwen3VLForConditionalGeneration": "latentvl.model.families.qwen3_vl",
    "LatentSettings": "latentvl.config",
    "set_latent_fields": "latentvl.config",
    "LatentProcessor": "latentvl.processor",
    "load_records": "latentvl.data.records",
    "RecordDataset": "latentvl.data.records",
    "LatentCollator": "latentvl.data.collator",
    "TrainConfig": "latentvl.training.config",
    "load_config": "latentvl.training.config",
    "train": "latentvl.training.trainer",
    "LatentInference": "latentvl.inference.generate",
    "GenerationSettings": "latentvl.inference.generate",
    "infer": "latentvl.inference.generate",
    "VLLMInference": "latentvl.inference.vllm_engine",
    "InputError": "latentvl.errors",
    "LatentInputError": "latentvl.errors",
}


def __getattr__(name: str) -> Any:
    if name in _HOMES:
        value = getattr(importlib.import_module(_HOMES[name]), name)
        globals()[name] = value  # later look-ups skip this function
        return value
    raise AttributeError(f"module 'latentvl' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_HOMES])


__all__ = sorted(_HOMES)
