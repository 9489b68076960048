"""An offline tiny Qwen2.5-VL with the latent tokens: for tests, CI and the demo.

It keeps the real architecture's features (GQA, M-RoPE with a 3-way section split, a vision tower
with windowed and full-attention blocks, 2x2 spatial merge, patch size 14) at a size that runs a
batch of 8 in well under a second on a laptop CPU. The tokenizer is character level and is built
locally with the ``tokenizers`` library: any printable ASCII text encodes, plus the Qwen specials.
"""

from __future__ import annotations

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, Qwen2_5_VLConfig
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from ..config import LatentSettings
from ..processor import LatentProcessor
from ..tokens import LATENT_END, LATENT_PAD, LATENT_START, add_latent_tokens

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


def build_tiny_image_processor(min_pixels: int = 28 * 28 * 4, max_pixels: int = 28 * 28 * 256):
    # A fresh size dict: passing min_pixels/max_pixels on 5.17 changes the class-wide default.
    return Qwen2VLImageProcessorPil(size={"shortest_edge": min_pixels, "longest_edge": max_pixels})


def tiny_config(tokenizer, hidden_size: int = 128, num_layers: int = 4) -> Qwen2_5_VLConfig:
    """Qwen2.5-VL config at tiny size, with latent fields set to stage-A defaults."""
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIAL_TOKENS}
    num_heads = 4
    head_dim = hidden_size // num_heads
    half = head_dim // 2
    section = [half - 2 * (3 * half // 8), 3 * half // 8, 3 * half // 8]  # like [16, 24, 24] for 128
    config = Qwen2_5_VLConfig(
        text_config={
            "vocab_size": len(tokenizer),
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
            "patch_size": 14,
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
    LatentSettings(
        latent_token_id=tokenizer.convert_tokens_to_ids(LATENT_PAD),
        latent_start_token_id=tokenizer.convert_tokens_to_ids(LATENT_START),
        latent_end_token_id=tokenizer.convert_tokens_to_ids(LATENT_END),
    ).apply_to(config)
    return config


def build_tiny_model(seed: int = 0, attn_implementation: str = "latent_sdpa", **size):
    """Return ``(model, processor)``: a random tiny latent Qwen2.5-VL, float32, in eval mode. Offline."""
    from .modeling import LatentQwen2_5_VLForConditionalGeneration

    tokenizer = build_tiny_tokenizer()
    config = tiny_config(tokenizer, **size)
    torch.manual_seed(seed)
    model = LatentQwen2_5_VLForConditionalGeneration(config)
    model.set_latent_attention(attn_implementation)
    model.eval()
    processor = LatentProcessor(tokenizer=tokenizer, image_processor=build_tiny_image_processor())
    return model, processor
