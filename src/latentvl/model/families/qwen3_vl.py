"""Qwen3-VL (dense): the latent model and its tiny configuration.

Positions: ``get_rope_index`` (a text token after an image advances past the image's largest extent),
applied by an interleaved M-RoPE (``mrope_interleaved``). Question images: merged features at the image
tokens, plus DeepStack features added to the hidden states at the image tokens after the first decoder
layers (:class:`~latentvl.model.visual.VisualStack` carries them). Attention: q/k RMSNorm, then RoPE,
then the registered (gated) attention on the keys and values, so the gate acts exactly as in Qwen2.5-VL.
Latent slots are text tokens, never visual positions: no DeepStack feature ever reaches a latent.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

from ..modeling import LatentModelMixin, register_checkpoint_mapping
from ..visual import VisualStack

NAME = "qwen3_vl"
#: The decoder and vision blocks (FSDP2 wraps each).
BLOCKS = ("Qwen3VLTextDecoderLayer", "Qwen3VLVisionBlock")
#: The vision patch side in pixels; a merged token covers ``2 * PATCH_SIZE``.
PATCH_SIZE = 16


class LatentQwen3VLForConditionalGeneration(LatentModelMixin, Qwen3VLForConditionalGeneration):
    """Qwen3-VL with latent visual thoughts (:class:`~latentvl.model.modeling.LatentModelMixin`)."""

    backbone = NAME
    has_deepstack = True

    def visual_features(self, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor
                        ) -> tuple[list[torch.Tensor], list[torch.Tensor] | None]:
        out = self.model.get_image_features(pixel_values, image_grid_thw)
        return list(out.pooler_output), list(out.deepstack_features)

    def text_visual_kwargs(self, visual: VisualStack | None) -> dict[str, Any]:
        if visual is None or not bool(visual.mask.any()):
            return {}
        mask, features = visual.text_model_inputs()
        return {"visual_pos_masks": mask, "deepstack_visual_embeds": features}


register_checkpoint_mapping(LatentQwen3VLForConditionalGeneration.__name__, "Qwen3VLForConditionalGeneration")


def tiny_config(ids: dict[str, int], vocab_size: int, hidden_size: int = 128, num_layers: int = 4) -> Qwen3VLConfig:
    """Qwen3-VL at tiny size: GQA with q/k norm, interleaved M-RoPE, a vision tower with learned position
    embeddings and DeepStack mergers at blocks 0 and 2 (added after text layers 0 and 1), 2x2 merge,
    patch 16. ``ids``: the Qwen special tokens' ids."""
    num_heads = 4
    head_dim = hidden_size // num_heads
    half = head_dim // 2
    section = [half - 2 * (3 * half // 8), 3 * half // 8, 3 * half // 8]
    return Qwen3VLConfig(
        text_config={
            "vocab_size": vocab_size,
            "hidden_size": hidden_size,
            "intermediate_size": hidden_size * 2,
            "num_hidden_layers": num_layers,
            "num_attention_heads": num_heads,
            "num_key_value_heads": 2,
            "head_dim": head_dim,
            "max_position_embeddings": 4096,
            "rms_norm_eps": 1e-6,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": section,
                                "mrope_interleaved": True},
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
            "num_position_embeddings": 256,
            "deepstack_visual_indexes": [0, 2],
            "in_channels": 3,
        },
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=True,
    )


__all__ = ["BLOCKS", "NAME", "PATCH_SIZE", "LatentQwen3VLForConditionalGeneration", "tiny_config"]
