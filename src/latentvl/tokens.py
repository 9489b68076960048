"""The three latent tokens (design D1) and how they are added to a tokenizer and a model."""

from __future__ import annotations

from typing import Any

import torch

LATENT_START = "<|latent_start|>"
LATENT_PAD = "<|latent_pad|>"
LATENT_END = "<|latent_end|>"
LATENT_TOKENS = (LATENT_START, LATENT_PAD, LATENT_END)


def add_latent_tokens(tokenizer: Any) -> dict[str, int]:
    """Add the latent tokens as special tokens (idempotent). Returns ``{token: id}``."""
    missing = [t for t in LATENT_TOKENS if t not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_tokens(missing, special_tokens=True)
    return {t: tokenizer.convert_tokens_to_ids(t) for t in LATENT_TOKENS}


@torch.no_grad()
def resize_embeddings_for_latents(model: Any, tokenizer: Any, new_token_ids: list[int]) -> None:
    """Give the new tokens embedding rows: each gets the mean of the trained rows, in the input and
    (when untied) the output matrix.

    The new tokens were appended after every token the tokenizer had, so the trained rows are those
    below the first new id. The matrices grow only when the tokenizer outgrows them; a checkpoint
    padded beyond its tokenizer (Qwen2.5-VL: 151936 rows for 151665 tokens) keeps its size, and the
    new tokens take padding rows, which were never trained: they are initialised all the same. The
    mean embedding keeps the new tokens inside the distribution the model already knows (the usual
    choice for added special tokens). Trained rows are never touched; the matrices never shrink.
    """
    if not new_token_ids:
        return
    old_rows = model.get_input_embeddings().weight.shape[0]
    need = max(len(tokenizer), max(new_token_ids) + 1)
    if need > old_rows:
        model.resize_token_embeddings(need, mean_resizing=False)
    trained = min(old_rows, min(new_token_ids))
    matrices = [model.get_input_embeddings().weight]
    out = model.get_output_embeddings()
    if out is not None and out.weight.data_ptr() != matrices[0].data_ptr():
        matrices.append(out.weight)
    for w in matrices:
        w[list(new_token_ids)] = w[:trained].float().mean(0).to(w.dtype)
