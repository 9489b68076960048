"""Memos of the images a run reads again: their decoded pixels per file, and the image processor's output per
distinct image.

A training run shows every image once per epoch, and a synthetic task repeats the same pictures across
records (a5 has five question swatches). The image processor (resize, normalise, cut into patches) is then
the same fixed function on the same pixels each time. :class:`ProcessedImageCache` keeps each image's patch
rows and grid, keyed by the image's pixels (mode, size and bytes), so an image is processed once per run.
The processor handles each image on its own, so the rows of a batch are the concatenation of each image's
rows, cached or not (a test checks the equality). Bounded (``max_bytes``, least recently used first out).
The collator holds it (:class:`latentvl.data.collator.LatentCollator`, ``image_cache``); the trainer attaches
one with ``TrainConfig.image_cache_mb``.

:class:`DecodedImageCache` keeps each image file's decoded pixels, keyed by its path, modification time and
size, so a file read again (the next epoch) is not decoded again; it hands out copies. The training data
(:class:`latentvl.training.data.BatchTimeDataset`) holds one with ``TrainConfig.image_cache_mb``.
"""

from __future__ import annotations

import hashlib
import os
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any

import torch
from PIL import Image

__all__ = ["DecodedImageCache", "ProcessedImageCache"]

Processed = tuple[torch.Tensor, torch.Tensor]  # (pixel rows [N, D], grid_thw [3] long)


class _BytesLRU:
    """A dict bounded by the bytes of its values: the least recently used entries go first; a value larger
    than the bound is not kept. Counts ``hits`` and ``misses``."""

    def __init__(self, max_bytes: int):
        if max_bytes < 1:
            raise ValueError(f"max_bytes={max_bytes} must be >= 1")
        self.max_bytes = int(max_bytes)
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self._entries: OrderedDict[Hashable, tuple[Any, int]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def _get(self, key: Hashable) -> Any | None:
        entry = self._entries.get(key)
        if entry is None:
            self.misses += 1
            return None
        self._entries.move_to_end(key)
        self.hits += 1
        return entry[0]

    def _keep(self, key: Hashable, value: Any, size: int) -> None:
        old = self._entries.pop(key, None)  # a key kept again replaces its entry
        if old is not None:
            self.bytes -= old[1]
        if size > self.max_bytes:
            return
        self._entries[key] = (value, size)
        self.bytes += size
        while self.bytes > self.max_bytes:
            _, (_, dropped) = self._entries.popitem(last=False)
            self.bytes -= dropped


class ProcessedImageCache(_BytesLRU):
    """Per-image output of an image processor.

    Args:
        max_bytes: the most bytes of pixel rows kept; the least recently used images are dropped first.
    """

    @staticmethod
    def key(image: Image.Image) -> bytes:
        """The digest of an image's mode, size and pixel bytes."""
        h = hashlib.blake2b(digest_size=20)
        h.update(f"{image.mode}:{image.size[0]}x{image.size[1]}:".encode())
        h.update(image.tobytes())
        return h.digest()

    def process(self, images: list[Image.Image], process_one: Callable[[Image.Image], Processed]) -> Processed:
        """``(pixel rows [sum N_i, D], grid_thw [n, 3] long)`` for ``images`` in order: cached images from the
        cache, the others from ``process_one`` (one image at a time), then kept."""
        rows, grids = [], []
        for image in images:
            k = self.key(image)
            entry = self._get(k)
            if entry is None:
                entry = process_one(image)
                self._keep(k, entry, entry[0].numel() * entry[0].element_size())
            rows.append(entry[0])
            grids.append(entry[1])
        return torch.cat(rows), torch.stack(grids)


class DecodedImageCache(_BytesLRU):
    """Decoded images per file.

    Args:
        max_bytes: the most bytes of pixels kept; the least recently used files are dropped first.
    """

    def open(self, path: str | os.PathLike[str], decode: Callable[[str | os.PathLike[str]], Image.Image]
             ) -> Image.Image:
        """A copy of ``decode(path)``, decoded once while the file keeps its modification time and size."""
        st = os.stat(path)
        k = (os.fspath(path), st.st_mtime_ns, st.st_size)
        cached = self._get(k)
        if cached is not None:
            return cached.copy()
        image = decode(path)
        self._keep(k, image.copy(), len(image.getbands()) * image.size[0] * image.size[1])
        return image
