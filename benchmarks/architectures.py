"""The published architectures the GPU benchmarks build with random weights (nothing is downloaded), and
the tiny model of either family: ``build(name, device, dtype, layers, backbone)``.

- ``3b``: Qwen2.5-VL-3B (36 text layers, hidden 2048, GQA 16/2, vision 32 blocks, patch 14);
- ``8b``: Qwen3-VL-8B (36 text layers, hidden 4096, GQA 32/8 with q/k norm, interleaved M-RoPE, vision 27
  blocks with DeepStack at 8, 16, 24, patch 16);
- ``tiny``: ``latentvl.build_tiny_model(backbone=...)``.
"""

from __future__ import annotations

import torch
from transformers import Qwen2_5_VLConfig, Qwen3VLConfig

from latentvl import build_tiny_model, set_latent_fields
from latentvl.model.backbone import latent_model_class

SPECIAL_IDS = {"image_token_id": 151655, "video_token_id": 151656, "vision_start_token_id": 151652,
               "vision_end_token_id": 151653}
#: the published architecture of each ``--model`` name, and its family
MODELS = {"3b": "qwen2_5_vl", "8b": "qwen3_vl"}


def qwen25_vl_3b_config(vocab_size: int = 151_936) -> Qwen2_5_VLConfig:
    """The published Qwen2.5-VL-3B architecture."""
    return Qwen2_5_VLConfig(
        text_config={
            "vocab_size": vocab_size, "hidden_size": 2048, "intermediate_size": 11008, "num_hidden_layers": 36,
            "num_attention_heads": 16, "num_key_value_heads": 2, "max_position_embeddings": 128000,
            "rms_norm_eps": 1e-6, "tie_word_embeddings": True,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]},
        },
        vision_config={
            "depth": 32, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16, "out_hidden_size": 2048,
            "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2, "window_size": 112,
            "fullatt_block_indexes": [7, 15, 23, 31],
        },
        tie_word_embeddings=True, **SPECIAL_IDS,
    )


def qwen3_vl_8b_config(vocab_size: int = 151_936) -> Qwen3VLConfig:
    """The published Qwen3-VL-8B architecture (dense)."""
    return Qwen3VLConfig(
        text_config={
            "vocab_size": vocab_size, "hidden_size": 4096, "intermediate_size": 12288, "num_hidden_layers": 36,
            "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "max_position_embeddings": 262144,
            "rms_norm_eps": 1e-6,
            "rope_parameters": {"rope_type": "default", "rope_theta": 5e6, "mrope_section": [24, 20, 20],
                                "mrope_interleaved": True},
        },
        vision_config={
            "depth": 27, "hidden_size": 1152, "intermediate_size": 4304, "num_heads": 16, "out_hidden_size": 4096,
            "patch_size": 16, "spatial_merge_size": 2, "temporal_patch_size": 2, "num_position_embeddings": 2304,
            "deepstack_visual_indexes": [8, 16, 24],
        },
        tie_word_embeddings=False, **SPECIAL_IDS,
    )


CONFIGS = {"3b": qwen25_vl_3b_config, "8b": qwen3_vl_8b_config}


def build(model_name: str, device: str, dtype: torch.dtype, layers: int | None = None,
          backbone: str = "qwen2_5_vl"):
    """The tiny model of ``backbone``, or a published architecture, in eval mode on ``device`` in ``dtype``.
    ``layers`` overrides the text layers (the tiny model's 4; 2 is the demo's; fewer of a published
    architecture's is a quick check)."""
    if model_name == "tiny":
        model, _ = build_tiny_model(seed=0, backbone=backbone, **({"num_layers": layers} if layers else {}))
    else:
        config = CONFIGS[model_name]()
        if layers is not None:
            config.text_config.num_hidden_layers = layers
            if getattr(config.text_config, "layer_types", None):
                config.text_config.layer_types = config.text_config.layer_types[:layers]
        set_latent_fields(config, latent_token_id=151_700, latent_start_token_id=151_701,
                          latent_end_token_id=151_702)
        with torch.device(device):
            model = latent_model_class(MODELS[model_name])(config)
        model.set_latent_attention("latent_sdpa")
    return model.to(device=device, dtype=dtype).eval()


def describe(model_name: str, backbone: str) -> str:
    """``tiny (qwen3_vl)``, ``3b (qwen2_5_vl)``: what a benchmark line names."""
    return f"{model_name} ({MODELS.get(model_name, backbone)})"
