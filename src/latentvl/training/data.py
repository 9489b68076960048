"""The training data stream: records, a deterministic order and the per-process micro-batches.

The order is a fixed function of ``(seed, epoch)``: epoch ``e`` is a permutation of the records drawn
from a generator seeded with ``seed`` and ``e``, and the epochs are laid end to end into one stream.
A step consumes the next ``global batch = batch_size * grad_accum * world_size`` positions of the
stream; micro-batch ``k`` of process ``r`` takes positions ``(k * world_size + r) * batch_size ...``.
The data position saved in a checkpoint is therefore one integer, the number of samples consumed,
and a resumed run reads exactly the samples it would have read. A run of ``W`` processes with
``grad_accum = A`` sees the same micro-batches (in another arrangement) as one process with
``grad_accum = A * W``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Sampler

from ..data.records import Record, RecordDataset, load_records


class TrainDataError(ValueError):
    """The training data cannot be used as configured; the message names the file (and record)."""


class StreamBatchSampler(Sampler[list[int]]):
    """Yields this process's micro-batches (lists of record indices) from ``start`` on, forever."""

    def __init__(
        self,
        num_records: int,
        batch_size: int,
        grad_accum: int,
        world_size: int,
        rank: int,
        seed: int,
        start: int = 0,
    ):
        if num_records < 1:
            raise ValueError("the training set is empty")
        self.n = num_records
        self.batch_size = batch_size
        self.grad_accum = grad_accum
        self.world_size = world_size
        self.rank = rank
        self.seed = seed
        self.start = start
        self._perm_epoch = -1
        self._perm: list[int] = []

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.grad_accum * self.world_size

    def _permutation(self, epoch: int) -> list[int]:
        if epoch != self._perm_epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm = torch.randperm(self.n, generator=g).tolist()
            self._perm_epoch = epoch
        return self._perm

    def index_at(self, position: int) -> int:
        return self._permutation(position // self.n)[position % self.n]

    def micro_batch(self, step_start: int, micro: int) -> list[int]:
        """Record indices of micro-batch ``micro`` of the step starting at stream position ``step_start``."""
        first = step_start + (micro * self.world_size + self.rank) * self.batch_size
        return [self.index_at(p) for p in range(first, first + self.batch_size)]

    def __iter__(self) -> Iterator[list[int]]:
        pos = self.start
        while True:
            for micro in range(self.grad_accum):
                yield self.micro_batch(pos, micro)
            pos += self.global_batch

    def __len__(self) -> int:  # pragma: no cover - an endless stream
        raise TypeError("the stream is endless")


def load_split(path: str | Path, skip_invalid: bool = False) -> list[Record]:
    """Records of a JSONL file; with ``skip_invalid`` invalid ones are reported and left out."""
    records, skipped = load_records(path, skip_invalid=skip_invalid)
    for s in skipped:
        print(f"skipped {s.source} (id {s.id!r}): {s.reason}")
    if not records:
        raise TrainDataError(f"{path}: no valid records" + (f" ({len(skipped)} skipped)" if skipped else ""))
    return records


def check_latent_data(records: list[Record], path: str | Path, stage: str, use_latents: bool) -> str | None:
    """Refuse (or warn about) training data without any CoT image when latents are wanted.

    Stage C or AC needs latents to halt: :class:`TrainDataError`. Stage A trains, but as the no-latent
    baseline: the warning (a sentence) is returned for the caller to show. None when all is well.
    """
    if not use_latents or any(r.cot_images for r in records):
        return None
    if stage != "A":
        raise TrainDataError(
            f"{path}: no record has CoT images, so stage {stage} has no latent to halt on; "
            "give records with cot_images, or train stage A with use_latents=false"
        )
    return (
        f"{path}: no record has CoT images: stage A trains without latents "
        "(the no-latent baseline; set use_latents=false to say so)"
    )


def micro_batches(records: list[Record], collator, sampler: StreamBatchSampler, num_workers: int = 0):
    """An endless iterator of collated micro-batches in the sampler's order."""
    loader = DataLoader(
        RecordDataset(records),
        batch_sampler=sampler,
        collate_fn=collator,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
    )
    return iter(loader)
