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
from ..tiny import tiny_special_ids, tiny_text_config, tiny_vision_config
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

    def image_features(self, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor
                       ) -> tuple[list[torch.Tensor], list[torch.Tensor] | None]:
        out = self.model.get_image_features(pixel_values, image_grid_thw)
        # one [sum N_i, H] tensor per DeepStack layer; newer transformers (5.24) split each layer per image
        deepstack = [torch.cat(f, dim=0) if isinstance(f, (tuple, list)) else f for f in out.deepstack_features]
        return list(out.pooler_output), deepstack

    def text_visual_kwargs(self, visual: VisualStack | None) -> dict[str, Any]:
        if visual is None or not bool(visual.mask.any()):
            return {}
        mask, features = visual.text_model_inputs()
        return {"visual_pos_masks": mask, "deepstack_visual_embeds": features}


register_checkpoint_mapping(LatentQwen3VLForConditionalGeneration.__name__, "Qwen3VLForConditionalGeneration")


def tiny_config(ids: dict[str, int], vocab_size: int, hidden_size: int = 128, num_layers: int = 4) -> Qwen3VLConfig:
    """Qwen3-VL at tiny size (:func:`latentvl.model.tiny.tiny_text_config`): GQA with q/k norm, interleaved
    M-RoPE, a vision tower with learned position embeddings and DeepStack mergers at blocks 0 and 2 (added
    after text layers 0 and 1), 2x2 merge, patch 16."""
    text = tiny_text_config(ids, vocab_size, hidden_size, num_layers, mrope_interleaved=True)
    return Qwen3VLConfig(
        text_config={**text, "head_dim": hidden_size // text["num_attention_heads"]},
        vision_config={**tiny_vision_config(hidden_size, PATCH_SIZE), "num_position_embeddings": 256,
                       "deepstack_visual_indexes": [0, 2]},
        tie_word_embeddings=True, **tiny_special_ids(ids),
    )


__all__ = ["BLOCKS", "NAME", "PATCH_SIZE", "LatentQwen3VLForConditionalGeneration", "tiny_config"]
