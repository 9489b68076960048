"""A memo of a frozen vision tower's features, one entry per distinct image.

A training run with ``freeze_vision`` runs the same fixed function on the same images every epoch, for the
question images and (with alignment) the CoT images. :class:`VisionFeatureCache` keeps each image's
features, keyed by the image's pixel rows (their bytes and ``grid_thw``), so that an image is encoded once
per run. An image not yet seen is encoded **alone**, so its features do not depend on which other images
shared its batch: a run with the cache is deterministic, and a resumed run (its cache empty) computes the
same values the first run did. (Encoded alone, features can differ from the batched encoding in the last
float bits; a run with the cache is a different run from one without it, each one reproducible.)

The cache is only valid while the tower's weights do not change: :meth:`VisionFeatureCache.features` refuses
a tower with any parameter that requires grad. It is bounded (``max_bytes``, least recently used first out)
and lives on the model (``model.vision_cache``; ``None`` = off), attached by the trainer
(``TrainConfig.vision_cache_mb``).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Callable

import torch
from torch import nn

__all__ = ["VisionFeatureCache"]

Features = tuple[list[torch.Tensor], list[torch.Tensor] | None]


class VisionFeatureCache:
    """Per-image features of a frozen vision tower.

    Args:
        tower: the vision module whose parameters must stay frozen (checked on every call).
        max_bytes: the most bytes of features kept; the least recently used images are dropped first.
    """

    def __init__(self, tower: nn.Module, max_bytes: int):
        if max_bytes < 1:
            raise ValueError(f"max_bytes={max_bytes} must be >= 1")
        self.tower = tower
        self.max_bytes = int(max_bytes)
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self._entries: OrderedDict[tuple, tuple[torch.Tensor, list[torch.Tensor] | None, int]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def features(self, encode: Callable[[torch.Tensor, torch.Tensor], Features], pixel_values: torch.Tensor,
                 image_grid_thw: torch.Tensor) -> Features:
        """``encode``'s result for these images (``[sum patches, D]`` rows, ``grid_thw [n, 3]``): one ``[N_i, H]``
        tensor per image and the DeepStack features (one ``[sum N_i, H]`` tensor per layer) or None, without
        gradient. Images already seen come from the cache; the others are encoded one at a time."""
        trainable = [n for n, p in self.tower.named_parameters() if p.requires_grad]
        if trainable:
            raise RuntimeError(
                f"the vision feature cache needs a frozen vision tower, but {trainable[0]!r} (and "
                f"{len(trainable) - 1} more) require grad: set freeze_vision (with freeze_vision_merger) or "
                f"vision_cache_mb: 0")
        grids = image_grid_thw.tolist()
        total = sum(g[0] * g[1] * g[2] for g in grids)
        if total != pixel_values.shape[0]:
            raise ValueError(f"pixel_values has {pixel_values.shape[0]} rows; image_grid_thw accounts for {total}")
        merged: list[torch.Tensor] = []
        deep: list[list[torch.Tensor]] | None = None
        start = 0
        for grid in grids:
            n = grid[0] * grid[1] * grid[2]
            rows = pixel_values[start:start + n]
            start += n
            raw = rows.detach().contiguous().view(torch.uint8).cpu().numpy().tobytes()  # any dtype, bf16 too
            key = (tuple(grid), str(rows.dtype), hashlib.blake2b(raw, digest_size=16).digest())
            entry = self._entries.get(key)
            if entry is None:
                self.misses += 1
                with torch.no_grad():
                    feats, stack = encode(rows, image_grid_thw.new_tensor([grid]))
                size = feats[0].numel() * feats[0].element_size() + sum(
                    t.numel() * t.element_size() for t in stack or [])
                entry = (feats[0].detach(), None if stack is None else [t.detach() for t in stack], size)
                self._entries[key] = entry
                self.bytes += size
                self._evict(keep=key)
            else:
                self.hits += 1
                self._entries.move_to_end(key)
            merged.append(entry[0])
            if entry[1] is not None:
                deep = [[] for _ in entry[1]] if deep is None else deep
                for layer, t in zip(deep, entry[1], strict=True):
                    layer.append(t)
        return merged, None if deep is None else [torch.cat(layer, dim=0) for layer in deep]

    def _evict(self, keep: tuple) -> None:
        while self.bytes > self.max_bytes and len(self._entries) > 1:
            key, (_, _, size) = next(iter(self._entries.items()))
            if key == keep:
                break
            del self._entries[key]
            self.bytes -= size
