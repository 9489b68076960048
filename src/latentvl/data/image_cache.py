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
from collections.abc import Callable

import torch
from PIL import Image

__all__ = ["DecodedImageCache", "ProcessedImageCache"]

Processed = tuple[torch.Tensor, torch.Tensor]  # (pixel rows [N, D], grid_thw [3] long)


class ProcessedImageCache:
    """Per-image output of an image processor.

    Args:
        max_bytes: the most bytes of pixel rows kept; the least recently used images are dropped first.
    """

    def __init__(self, max_bytes: int):
        if max_bytes < 1:
            raise ValueError(f"max_bytes={max_bytes} must be >= 1")
        self.max_bytes = int(max_bytes)
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self._entries: OrderedDict[bytes, tuple[torch.Tensor, torch.Tensor, int]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

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
            entry = self._entries.get(k)
            if entry is not None:
                self._entries.move_to_end(k)
                self.hits += 1
                pixels, grid, _ = entry
            else:
                self.misses += 1
                pixels, grid = process_one(image)
                self._keep(k, pixels, grid)
            rows.append(pixels)
            grids.append(grid)
        return torch.cat(rows), torch.stack(grids)

    def _keep(self, k: bytes, pixels: torch.Tensor, grid: torch.Tensor) -> None:
        size = pixels.numel() * pixels.element_size()
        if size > self.max_bytes:
            return
        self._entries[k] = (pixels, grid, size)
        self.bytes += size
        while self.bytes > self.max_bytes:
            _, (_, _, dropped) = self._entries.popitem(last=False)
            self.bytes -= dropped


class DecodedImageCache:
    """Decoded images per file.

    Args:
        max_bytes: the most bytes of pixels kept; the least recently used files are dropped first.
    """

    def __init__(self, max_bytes: int):
        if max_bytes < 1:
            raise ValueError(f"max_bytes={max_bytes} must be >= 1")
        self.max_bytes = int(max_bytes)
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self._entries: OrderedDict[tuple[str, int, int], tuple[Image.Image, int]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def open(self, path: str | os.PathLike[str], decode: Callable[[str | os.PathLike[str]], Image.Image]
             ) -> Image.Image:
        """A copy of ``decode(path)``, decoded once while the file keeps its modification time and size."""
        st = os.stat(path)
        k = (os.fspath(path), st.st_mtime_ns, st.st_size)
        entry = self._entries.get(k)
        if entry is not None:
            self._entries.move_to_end(k)
            self.hits += 1
            return entry[0].copy()
        self.misses += 1
        image = decode(path)
        size = len(image.getbands()) * image.size[0] * image.size[1]
        if size <= self.max_bytes:
            self._entries[k] = (image.copy(), size)
            self.bytes += size
            while self.bytes > self.max_bytes:
                _, (_, dropped) = self._entries.popitem(last=False)
                self.bytes -= dropped
        return image
