"""Qwen2.5-VL: the latent model and its tiny configuration.

Positions: ``get_rope_index`` (M-RoPE in three sections, a text token after an image advances all three
axes past the image's largest extent). Question images: merged features at the image tokens, nothing
else. Attention: the decoder layers call the registered (gated) attention on post-RoPE keys and values.
"""

from __future__ import annotations

from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

from ..modeling import LatentModelMixin, register_checkpoint_mapping

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
    """Qwen2.5-VL at tiny size: GQA, M-RoPE in a 3-way section split, a vision tower with windowed and
    full-attention blocks, 2x2 merge, patch 14. ``ids``: the Qwen special tokens' ids."""
    num_heads = 4
    half = hidden_size // num_heads // 2
    section = [half - 2 * (3 * half // 8), 3 * half // 8, 3 * half // 8]  # like [16, 24, 24] for 128
    return Qwen2_5_VLConfig(
        text_config={
            "vocab_size": vocab_size,
            "hidden_size": hidden_size,
            "intermediate_size": hidden_size * 2,
            "num_hidden_layers": num_layers,
            "num_attention_heads": num_heads,
            "num_key_value_heads": 2,
            "max_position_embeddings": 4096,
            "rms_norm_eps": 1e-6,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": section},
            "tie_word_embeddings": True,
            "pad_token_id": ids["<|endoftext|>"],
            "bos_token_id": ids["<|im_start|>"],
            "eos_token_id": ids["<|im_end|>"],
        },
        vision_config={
            "depth": 4,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_heads": 4,
            "out_hidden_size": hidden_size,
            "patch_size": PATCH_SIZE,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "window_size": 56,
            "fullatt_block_indexes": [1, 3],
            "in_channels": 3,
        },
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=True,
    )


__all__ = ["BLOCKS", "NAME", "PATCH_SIZE", "LatentQwen2_5_VLForConditionalGeneration", "tiny_config"]
