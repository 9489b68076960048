"""Qwen2.5-VL: the latent model and its tiny configuration.

Positions: ``get_rope_index`` (M-RoPE in three sections, a text token after an image advances all three
axes past the image's largest extent). Question images: merged features at the image tokens, nothing
else. Attention: the decoder layers call the registered (gated) attention on post-RoPE keys and values.
"""

from __future__ import annotations

from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

from ..modeling import LatentModelMixin, register_checkpoint_mapping
from ..tiny import tiny_special_ids, tiny_text_config, tiny_vision_config

NAME = "qwen2_5_vl"
#: The decoder and vision blocks (FSDP2 wraps each).
BLOCKS = ("Qwen2_5_VLDecoderLayer", "Qwen2_5_VLVisionBlock")
#: The vision patch side in pixels; a merged token covers ``2 * PATCH_SIZE``.
PATCH_SIZE = 14


class LatentQwen2_5_VLForConditionalGeneration(LatentModelMixin, Qwen2_5_VLForConditionalGeneration):
    """Qwen2.5-VL with latent visual thoughts (:class:`~latentvl.model.modeling.LatentModelMixin`)."""

    backbone = NAME


register_checkpoint_mapping(LatentQwen2_5_VLForConditionalGeneration.__name__, "Qwen2_5_VLForConditionalGeneration")


def tiny_config(ids: dict[str, int], vocab_size: int, hidden_size: int = 128, num_layers: int = 4) -> Qwen2_5_VLConfig:
    """Qwen2.5-VL at tiny size (:func:`latentvl.model.tiny.tiny_text_config`): GQA, M-RoPE in a 3-way section
    split, a vision tower with windowed and full-attention blocks, 2x2 merge, patch 14."""
    return Qwen2_5_VLConfig(
        text_config={**tiny_text_config(ids, vocab_size, hidden_size, num_layers), "tie_word_embeddings": True},
        vision_config={**tiny_vision_config(hidden_size, PATCH_SIZE), "window_size": 56,
                       "fullatt_block_indexes": [1, 3]},
        tie_word_embeddings=True, **tiny_special_ids(ids),
    )


__all__ = ["BLOCKS", "NAME", "PATCH_SIZE", "LatentQwen2_5_VLForConditionalGeneration", "tiny_config"]
