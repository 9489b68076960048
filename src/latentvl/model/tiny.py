"""An offline tiny latent model (Qwen2.5-VL by default, or Qwen3-VL) with the latent tokens: for tests, CI
and the demo.

It keeps the real architecture's features (its family's ``tiny_config``: GQA, M-RoPE, the vision tower's
blocks, 2x2 spatial merge, the family's patch size) at a size that runs a batch of 8 in well under a
second on a laptop CPU. The tokenizer is character level and is built
locally with the ``tokenizers`` library: any printable ASCII text encodes, plus the Qwen specials.
"""

from __future__ import annotations

from typing import Any

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from ..config import LatentSettings
from ..processor import LatentProcessor
from ..tokens import LATENT_END, LATENT_PAD, LATENT_START, add_latent_tokens
from .backbone import DEFAULT_BACKBONE, family, latent_model_class

QWEN_SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)


def build_tiny_tokenizer() -> PreTrainedTokenizerFast:
    """Character-level tokenizer: Qwen special tokens, printable ASCII and newline, then latent tokens."""
    chars = [chr(i) for i in range(32, 127)] + ["\n"]
    vocab = {tok: i for i, tok in enumerate([*QWEN_SPECIAL_TOKENS, *chars, "<unk>"])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # every char, newline too
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<unk>",
        pad_token="<|endoftext|>",
        eos_token="<|im_end|>",
    )
    tokenizer.add_tokens(list(QWEN_SPECIAL_TOKENS), special_tokens=True)
    add_latent_tokens(tokenizer)
    return tokenizer


def build_tiny_image_processor(min_pixels: int = 28 * 28 * 4, max_pixels: int = 28 * 28 * 256,
                               patch_size: int = 14):
    """The Qwen2-VL image processor (PIL backend) with ``patch_size`` (14: Qwen2.5-VL, 16: Qwen3-VL) and 2x2
    merge; ``min_pixels``/``max_pixels`` are given for patch 14 and scaled to the patch's area."""
    scale = (patch_size / 14) ** 2
    # A fresh size dict: passing min_pixels/max_pixels on 5.17 changes the class-wide default.
    return Qwen2VLImageProcessorPil(
        size={"shortest_edge": round(min_pixels * scale), "longest_edge": round(max_pixels * scale)},
        patch_size=patch_size)


def tiny_text_config(ids: dict[str, int], vocab_size: int, hidden_size: int, num_layers: int,
                     **rope: Any) -> dict[str, Any]:
    """The text sub-config every tiny family shares: 4 heads over 2 K/V heads, MLP 2x, M-RoPE sections in the
    proportion of the real models' (like [16, 24, 24] for head dim 128), ``rope`` added to its
    ``rope_parameters``; ``ids``: the Qwen special tokens' ids."""
    num_heads = 4
    half = hidden_size // num_heads // 2
    section = [half - 2 * (3 * half // 8), 3 * half // 8, 3 * half // 8]
    return {
        "vocab_size": vocab_size, "hidden_size": hidden_size, "intermediate_size": hidden_size * 2,
        "num_hidden_layers": num_layers, "num_attention_heads": num_heads, "num_key_value_heads": 2,
        "max_position_embeddings": 4096, "rms_norm_eps": 1e-6,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": section, **rope},
        "pad_token_id": ids["<|endoftext|>"], "bos_token_id": ids["<|im_start|>"], "eos_token_id": ids["<|im_end|>"],
    }


def tiny_vision_config(out_hidden_size: int, patch_size: int) -> dict[str, Any]:
    """The vision sub-config every tiny family shares: 4 blocks of width 64, 2x2 merge into ``out_hidden_size``."""
    return {"depth": 4, "hidden_size": 64, "intermediate_size": 128, "num_heads": 4, "out_hidden_size": out_hidden_size,
            "patch_size": patch_size, "spatial_merge_size": 2, "temporal_patch_size": 2, "in_channels": 3}


def tiny_special_ids(ids: dict[str, int]) -> dict[str, int]:
    """The multimodal token ids of a tiny family's top-level config."""
    return {"image_token_id": ids["<|image_pad|>"], "video_token_id": ids["<|video_pad|>"],
            "vision_start_token_id": ids["<|vision_start|>"], "vision_end_token_id": ids["<|vision_end|>"]}


def tiny_config(tokenizer, hidden_size: int = 128, num_layers: int = 4, backbone: str = DEFAULT_BACKBONE):
    """The ``backbone`` family's config at tiny size (its module's ``tiny_config``), with the latent fields
    set to stage-A defaults."""
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIAL_TOKENS}
    config = family(backbone).tiny_config(ids, len(tokenizer), hidden_size=hidden_size, num_layers=num_layers)
    LatentSettings(
        latent_token_id=tokenizer.convert_tokens_to_ids(LATENT_PAD),
        latent_start_token_id=tokenizer.convert_tokens_to_ids(LATENT_START),
        latent_end_token_id=tokenizer.convert_tokens_to_ids(LATENT_END),
    ).apply_to(config)
    return config


def build_tiny_model(seed: int = 0, attn_implementation: str = "latent_sdpa", backbone: str = DEFAULT_BACKBONE,
                     **size):
    """Return ``(model, processor)``: a random tiny latent model of the ``backbone`` family (``"qwen2_5_vl"``,
    the default, or ``"qwen3_vl"``), float32, in eval mode. Offline."""
    module = family(backbone)
    tokenizer = build_tiny_tokenizer()
    config = tiny_config(tokenizer, backbone=backbone, **size)
    torch.manual_seed(seed)
    model = latent_model_class(backbone)(config)
    model.set_latent_attention(attn_implementation)
    model.eval()
    processor = LatentProcessor(tokenizer=tokenizer,
                                image_processor=build_tiny_image_processor(patch_size=module.PATCH_SIZE))
    return model, processor
