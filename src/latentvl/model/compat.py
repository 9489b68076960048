"""The one place where the supported transformers versions differ for latentvl (resolved at import).

transformers 5.17 calls the KV cache ``past_key_values`` (forward keyword and output field); newer 5.x
releases (5.24 is tested) call it ``cache``: the old name warns there and goes away in 5.40.
``generate()`` passes the cache under the installed version's name, so the model's forward accepts
both and hands it on under :data:`CACHE_KWARG`. 5.24 also renames ``gradient_checkpointing_enable`` to
``activation_checkpointing_enable`` (the old name warns and goes away in v6).
"""

from __future__ import annotations

import inspect
from typing import Any

from transformers import Qwen2_5_VLForConditionalGeneration

__all__ = ["CACHE_KWARG", "enable_activation_checkpointing", "output_cache", "resolve_cache"]


def _cache_keyword() -> str:
    params = inspect.signature(Qwen2_5_VLForConditionalGeneration.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


#: The name of the KV-cache keyword of the installed transformers' forward and of its output field.
CACHE_KWARG: str = _cache_keyword()


def resolve_cache(cache: Any, past_key_values: Any) -> Any:
    """The cache given under either name (None if neither); both at once is an error."""
    if cache is not None and past_key_values is not None:
        raise TypeError("give the KV cache as `cache` or as `past_key_values`, not both")
    return cache if cache is not None else past_key_values


def output_cache(output: Any) -> Any:
    """The KV cache of a model output (None if it has none), without the old name's warning."""
    return getattr(output, CACHE_KWARG, None)


def enable_activation_checkpointing(model: Any) -> None:
    """Non-reentrant activation (gradient) checkpointing on ``model``'s layers, through the installed
    transformers' own name for it, so no deprecation warning is raised."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
