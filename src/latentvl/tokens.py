"""The three latent tokens (SPEC D1) and how they are added to a tokenizer and a model."""

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
    """Grow input/output embeddings to the tokenizer's size; new rows get the mean of the old rows.

    The mean embedding keeps the new tokens inside the distribution the model already knows,
    which is the usual choice for added special tokens. Rows already trained (ids below the old
    vocabulary size) are never touched.
    """
    old_rows = model.get_input_embeddings().weight.shape[0]
    need = max(len(tokenizer), max(new_token_ids) + 1)
    if need > old_rows:
        model.resize_token_embeddings(need, mean_resizing=False)
    fresh = [i for i in new_token_ids if i >= old_rows]
    if not fresh:
        return
    matrices = [model.get_input_embeddings().weight]
    out = model.get_output_embeddings()
    if out is not None and out.weight.data_ptr() != matrices[0].data_ptr():
        matrices.append(out.weight)
    for w in matrices:
        w[fresh] = w[:old_rows].float().mean(0).to(w.dtype)
