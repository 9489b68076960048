"""latentvl: teach Qwen2.5-VL to reason in latent visual thoughts.

Stage A (warm-up) fills a fixed budget of latent slots per chain-of-thought image with the model's
own hidden states; stage C adds a learned stop head that decides how many of those slots to use.
"""

from .budget import budgets_from_grids, compute_latent_budget, num_visual_tokens
from .config import LatentConfigError, LatentSettings, set_latent_fields
from .errors import InputError, LatentInputError
from .model.modeling import (
    LatentCausalLMOutput,
    LatentLossOutput,
    LatentPassOutput,
    LatentQwen2_5_VLForConditionalGeneration,
)
from .model.tiny import build_tiny_model
from .processor import LatentProcessor

__version__ = "0.1.0"


def __getattr__(name: str):
    # The collator imports data-side modules; load it on first use.
    if name == "LatentCollator":
        from .data.collator import LatentCollator

        return LatentCollator
    raise AttributeError(name)


__all__ = [
    "LatentCausalLMOutput",
    "LatentCollator",
    "LatentConfigError",
    "InputError",
    "LatentInputError",
    "LatentLossOutput",
    "LatentPassOutput",
    "LatentProcessor",
    "LatentQwen2_5_VLForConditionalGeneration",
    "LatentSettings",
    "budgets_from_grids",
    "build_tiny_model",
    "compute_latent_budget",
    "num_visual_tokens",
    "set_latent_fields",
]
