"""Attention functions that gate inactive latent slots (design §5, D3).

Registered with transformers as ``latent_eager``, ``latent_sdpa`` and, when ``flash_attn`` is
importable, ``latent_flash_attention_2``. They read keyword arguments that the latent model
passes down through ``forward(**kwargs)``:

- ``latent_kv_mask``: ``[B, S]`` bool, True = keep; column ``s`` gates key ``s`` (cache included). Keys past
  its end are kept: during ``generate()`` these are the generated tokens (a static cache's free slots are
  masked by the causal mask anyway), so the mask need not grow.
- ``latent_null_scale``: float. K and V at False positions are multiplied by it; when it is 0 the
  positions are also removed from the keys (their score column is masked), so an inactive slot has
  exactly no effect on any other position. When it is > 0 they are only softly suppressed.

- ``latent_kv_store``: a :class:`~latentvl.model.kv_store.LatentKVStore` during pass 1. A one-token
  call (a latent step) attends over the store; a longer call (the prefix) stores its K/V there first.
- ``latent_step_column``: ``[1]`` long, with ``latent_kv_store``: the step is static-shape (its mask
  covers the store's full width, the column is a tensor; ``latent_compile``).

Without these arguments each function is exactly its stock counterpart.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from .kv_store import LatentKVStore

LATENT_ATTENTION = {"eager": "latent_eager", "sdpa": "latent_sdpa", "flash_attention_2": "latent_flash_attention_2"}
STOCK_ATTENTION = {gated: stock for stock, gated in LATENT_ATTENTION.items()}


def gated_attention(name: str | None) -> str:
    """The gated text attention for a requested one: ``None`` (transformers' default) and ``"sdpa"`` give
    ``latent_sdpa``, ``"eager"`` gives ``latent_eager``, ``"flash_attention_2"`` gives
    ``latent_flash_attention_2``; a gated name stays as it is. Anything else cannot gate latent slots
    and raises ``ValueError``, as does a gated name that is not registered (flash_attn not importable)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    gated = LATENT_ATTENTION.get("sdpa" if name is None else name, name)
    if gated not in STOCK_ATTENTION:
        raise ValueError(
            f"attn_implementation={name!r} cannot gate latent slots in the text model; use one of "
            f"{sorted(LATENT_ATTENTION)} (latentvl runs their gated versions {sorted(STOCK_ATTENTION)})")
    if gated not in ALL_ATTENTION_FUNCTIONS.valid_keys():
        raise ValueError(f"attn_implementation={name!r}: {gated} is not registered (it needs the flash_attn package)")
    return gated


def stock_attention(name: str | None) -> str | None:
    """The stock name of a gated attention (the vision tower gates nothing); other names unchanged."""
    return STOCK_ATTENTION.get(name, name) if name is not None else None


def _repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def _keep_mask(
    attention_mask: torch.Tensor | None, q_len: int, kv_len: int, batch: int, device: torch.device
) -> torch.Tensor:
    """``[B, 1, q, kv]`` bool, True = may attend. Builds the causal mask when transformers skipped it.

    A skipped mask (None) means what sdpa's ``is_causal`` means, which transformers relies on when it skips
    one: query ``i`` sees keys ``0..i`` (upper-left; a static cache's prefill has more keys than queries),
    and a single query sees every key. A ``[B, kv]`` padding mask (flash-attention's form) is lower-right
    aligned: the queries are the last ``q`` keys."""
    if attention_mask is None:
        keep = torch.arange(kv_len, device=device)[None, :] <= torch.arange(q_len, device=device)[:, None]
        if q_len == 1:
            keep = torch.ones(1, kv_len, dtype=torch.bool, device=device)
        return keep[None, None].expand(batch, 1, q_len, kv_len)
    if attention_mask.dim() == 2:
        q_pos = torch.arange(kv_len - q_len, kv_len, device=device)
        keep = torch.arange(kv_len, device=device)[None, :] <= q_pos[:, None]
        keep = keep[None, None].expand(batch, 1, q_len, kv_len)
        return keep & attention_mask[:, None, None, :kv_len].bool()
    if attention_mask.dtype == torch.bool:
        return attention_mask[..., :kv_len]
    return attention_mask[..., :kv_len] == 0  # additive float mask: 0 = attend


def gate_kv(
    key: torch.Tensor, value: torch.Tensor, latent_kv_mask: torch.Tensor, null_scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale K/V ``[B, H, S, D]`` by ``null_scale`` where ``latent_kv_mask`` ``[B, S]`` is False."""
    scale = torch.where(latent_kv_mask, 1.0, null_scale).to(key.dtype)[:, None, :, None]
    return key * scale, value * scale


def _gated_inputs(module, query, key, value, attention_mask, latent_kv_mask, null_scale):
    kv_len = key.shape[-2]
    kv_mask = latent_kv_mask[:, :kv_len].to(key.device)
    if kv_mask.shape[1] < kv_len:  # keys past the mask (generated tokens, a static cache's free slots) are kept
        kv_mask = F.pad(kv_mask, (0, kv_len - kv_mask.shape[1]), value=True)
    key, value = gate_kv(key, value, kv_mask, null_scale)
    keep = _keep_mask(attention_mask, query.shape[-2], kv_len, query.shape[0], query.device)
    if null_scale == 0.0:
        keep = keep & kv_mask[:, None, None, :]
    # A row with no key at all (a padding query) would give NaN; let it see everything instead.
    # Its output is never read: padding is masked as a key and carries no label.
    keep = keep | ~keep.any(-1, keepdim=True)
    return key, value, keep


def _sdpa(query, key, value, keep, dropout: float, scaling):
    """sdpa over grouped K/V, repeated: that keeps the fused masked kernels available on every backend."""
    groups = query.shape[1] // key.shape[1]
    return F.scaled_dot_product_attention(query, _repeat_kv(key, groups), _repeat_kv(value, groups), attn_mask=keep,
                                          dropout_p=dropout, scale=scaling)


def _through_kv_store(attention_fn):
    """Pass 1's route, shared by every registered function: with ``latent_kv_store`` given, a one-token
    call (a latent step, whose mask is the ready additive ``[R, 1, 1, c+1]`` key mask, or ``[R, 1, 1, W]``
    with ``latent_step_column``) attends over the store; a longer call (the prefix) stores its K/V there,
    then runs ``attention_fn`` as usual."""

    @functools.wraps(attention_fn)
    def wrapped(module, query, key, value, attention_mask, *args, latent_kv_store: LatentKVStore | None = None,
                latent_step_column: torch.Tensor | None = None, **kwargs):
        if latent_kv_store is not None:
            if query.shape[-2] == 1:
                scaling = kwargs.get("scaling")
                scaling = scaling if scaling is not None else query.shape[-1] ** -0.5
                if latent_step_column is not None:  # static shapes: mask over the store's full width
                    out = latent_kv_store.attend_step_at(module.layer_idx, query, key, value, attention_mask,
                                                         latent_step_column, scaling)
                else:
                    out = latent_kv_store.attend_step(module.layer_idx, query, key, value, attention_mask, scaling)
                return out.transpose(1, 2), None
            key, value = latent_kv_store.write_prefix(module.layer_idx, key, value)
        return attention_fn(module, query, key, value, attention_mask, *args, **kwargs)

    return wrapped


@_through_kv_store
def latent_sdpa_attention(
    module, query, key, value, attention_mask, dropout=0.0, scaling=None, latent_kv_mask=None,
    latent_null_scale=0.0, **kwargs,
):
    causal = getattr(module, "is_causal", False)
    dropout = dropout if module.training else 0.0
    if latent_kv_mask is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    if not causal:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    key, value, keep = _gated_inputs(module, query, key, value, attention_mask, latent_kv_mask,
                                     latent_null_scale)
    out = _sdpa(query, key, value, keep, dropout, scaling)
    return out.transpose(1, 2).contiguous(), None


@_through_kv_store
def latent_eager_attention(
    module, query, key, value, attention_mask, dropout=0.0, scaling=None, latent_kv_mask=None,
    latent_null_scale=0.0, **kwargs,
):
    if latent_kv_mask is not None and getattr(module, "is_causal", False):
        key, value, keep = _gated_inputs(module, query, key, value, attention_mask, latent_kv_mask,
                                         latent_null_scale)
    else:
        keep = _keep_mask(attention_mask, query.shape[-2], key.shape[-2], query.shape[0], query.device)
        if not getattr(module, "is_causal", True) and attention_mask is None:
            keep = torch.ones_like(keep)
    groups = query.shape[1] // key.shape[1]
    key, value = _repeat_kv(key, groups), _repeat_kv(value, groups)
    scaling = scaling if scaling is not None else query.shape[-1] ** -0.5
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    scores = scores.masked_fill(~keep, torch.finfo(scores.dtype).min)
    weights = torch.softmax(scores, dim=-1, dtype=torch.promote_types(scores.dtype, torch.float32)).to(query.dtype)
    weights = F.dropout(weights, p=dropout, training=module.training)
    out = torch.matmul(weights, value)
    return out.transpose(1, 2).contiguous(), weights


@_through_kv_store
def latent_flash_attention_2(
    module, query, key, value, attention_mask, latent_kv_mask=None, latent_null_scale=0.0, **kwargs
):
    """Flash-attention 2 when no key is gated; otherwise the exact sdpa path.

    Flash kernels take no per-key mask, so a call that gates keys (``latent_kv_mask`` given) runs the
    masked sdpa path; stage A and plain text stay on flash. Pass 1's steps attend over the K/V store.
    """
    from transformers.integrations.flash_attention import flash_attention_forward

    plain_mask = attention_mask is None or attention_mask.dim() == 2
    if not getattr(module, "is_causal", False) or (latent_kv_mask is None and plain_mask):
        return flash_attention_forward(module, query, key, value, attention_mask, **kwargs)
    if latent_kv_mask is None:
        latent_kv_mask = torch.ones(key.shape[0], key.shape[-2], dtype=torch.bool, device=key.device)
    kwargs.pop("dropout", None)
    return latent_sdpa_attention(module, query, key, value, attention_mask, scaling=kwargs.pop("scaling", None),
                                 latent_kv_mask=latent_kv_mask, latent_null_scale=latent_null_scale)


def register_latent_attention() -> None:
    """Register the gated functions and their mask builders (idempotent)."""
    AttentionInterface.register("latent_sdpa", latent_sdpa_attention)
    AttentionInterface.register("latent_eager", latent_eager_attention)
    AttentionMaskInterface.register("latent_sdpa", sdpa_mask)
    AttentionMaskInterface.register("latent_eager", sdpa_mask)
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return
    from transformers.masking_utils import flash_attention_mask

    AttentionInterface.register("latent_flash_attention_2", latent_flash_attention_2)
    AttentionMaskInterface.register("latent_flash_attention_2", flash_attention_mask)


register_latent_attention()
