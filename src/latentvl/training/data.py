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

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from ..data.image_cache import DecodedImageCache
from ..data.records import Record, RecordDataset, load_records
from ..errors import CollatorInputError, RecordError, TrainDataError


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


SKIPPED_FILE = "skipped_records.json"


class SkipReport:
    """The records left out of a run, kept in ``output_dir/skipped_records.json``.

    The file is one JSON object, ``{"total": N, "records": [{"split", "source", "id", "reason",
    "when"}, ...]}`` (``when``: ``"load"`` for the load-time check, ``"batch"`` for an image that failed
    to decode when its batch was built), rewritten atomically whenever a record is added. Only the main
    process writes (``path=None`` elsewhere). A resumed run keeps the batch-time entries already there.
    """

    def __init__(self, path: Path | None, keep_batch_entries: bool = False):
        self.path = path
        self.entries: list[dict[str, Any]] = []
        if path is not None and keep_batch_entries and path.is_file():
            try:
                old = json.loads(path.read_text(encoding="utf-8"))
                self.entries = [e for e in old.get("records", []) if e.get("when") == "batch"]
            except (OSError, ValueError, AttributeError):
                self.entries = []

    def add(self, split: str, entries: list[dict[str, Any]], when: str) -> list[dict[str, Any]]:
        """Add entries (``source``, ``id``, ``reason``); returns those not seen before."""
        seen = {(e["split"], e["source"]) for e in self.entries}
        new = []
        for e in entries:
            row = {"split": split, "source": e["source"], "id": e.get("id"), "reason": e["reason"], "when": when}
            if (split, row["source"]) not in seen:
                seen.add((split, row["source"]))
                new.append(row)
        if new:
            self.entries.extend(new)
            self._write()
        return new

    @property
    def total(self) -> int:
        return len(self.entries)

    def _write(self) -> None:
        if self.path is None:
            return
        from ..fileio import write_atomic

        payload = {"total": len(self.entries), "records": self.entries}
        write_atomic(self.path, json.dumps(payload, indent=1) + "\n")


def load_split(
    path: str | Path, skip_invalid: bool = False, report: SkipReport | None = None, split: str = "train"
) -> list[Record]:
    """Records of a JSONL file; with ``skip_invalid`` invalid ones are left out, counted and reported
    (on stdout and in ``report``)."""
    records, skipped = load_records(path, skip_invalid=skip_invalid)
    for s in skipped:
        print(f"skipped {s.source} (id {s.id!r}): {s.reason}")
    if skipped:
        where = f", listed in {report.path}" if report is not None and report.path is not None else ""
        print(f"skipped {len(skipped)} of {len(records) + len(skipped)} records of {path}{where}")
        if report is not None:
            report.add(split, [{"source": s.source, "id": s.id, "reason": s.reason} for s in skipped], "load")
    if not records:
        raise TrainDataError(f"{path}: no valid records" + (f" ({len(skipped)} skipped)" if skipped else ""))
    return records


class BatchTimeDataset(Dataset):
    """Records as model inputs, decoded when their batch is built.

    An image can pass the load-time check (its header and chunk checksums) and still fail to decode.
    Without ``skip_invalid`` that raises :class:`~latentvl.errors.RecordError` naming the record
    and the file. With it the record is replaced by the next record (in file order) that decodes, and
    the item carries ``"skipped"``: the records passed over (``source``, ``id``, ``reason``), and
    ``"record_index"``. The replacement depends only on the index, so a resumed run reads the same
    samples. :meth:`collatable` does the same for a record the collator rejects (e.g. over
    ``max_length``).
    """

    def __init__(self, records: list[Record], skip_invalid: bool = False,
                 decoded_cache: DecodedImageCache | None = None):
        self.items = RecordDataset(records, decoded_cache)
        self.skip_invalid = skip_invalid

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not self.skip_invalid:
            return self.items[index]
        skipped = []
        n = len(self.items)
        for k in range(n):
            j = (index + k) % n
            try:
                item = self.items[j]
            except RecordError as err:
                rec = self.items.records[j]
                skipped.append({"source": rec.source, "id": rec.id, "reason": str(err)})
                continue
            item["skipped"] = skipped
            item["record_index"] = j
            return item
        raise TrainDataError(f"no record can be read: every image failed to decode ({skipped[0]['reason']} ...)")

    def collatable(self, item: dict[str, Any], collator) -> dict[str, Any]:
        """``item`` if the collator takes it alone, else the next record (in file order) that it takes,
        with the records passed over added to ``"skipped"``."""
        skipped = list(item.get("skipped", []))
        start = int(item["record_index"])
        n = len(self.items)
        candidate = item
        for k in range(n):
            if k:
                candidate = self[(start + k) % n]
                skipped.extend(candidate.get("skipped", []))
            try:
                collator([candidate])
            except CollatorInputError as err:
                rec = self.items.records[int(candidate["record_index"])]
                skipped.append({"source": rec.source, "id": rec.id, "reason": str(err)})
                continue
            return {**candidate, "skipped": skipped}
        raise TrainDataError(f"no record can be collated ({skipped[0]['reason']} ...)")


def collate_reporting(collator, dataset: BatchTimeDataset | None = None):
    """Wrap a collator: the batch gets ``"skipped"``, the records its items passed over. With a
    ``dataset`` that skips invalid records, an item the collator rejects is replaced
    (:meth:`BatchTimeDataset.collatable`) instead of failing the batch."""

    def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
        try:
            batch = collator(items)
        except CollatorInputError:
            if dataset is None or not dataset.skip_invalid:
                raise
            items = [dataset.collatable(item, collator) for item in items]
            batch = collator(items)
        batch["skipped"] = [s for item in items for s in item.get("skipped", [])]
        return batch

    return collate


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


def micro_batches(
    records: list[Record], collator, sampler: StreamBatchSampler, num_workers: int = 0, skip_invalid: bool = False,
    decoded_cache: DecodedImageCache | None = None,
):
    """An endless iterator of collated micro-batches in the sampler's order (see :class:`BatchTimeDataset`:
    each batch has ``"skipped"``; ``decoded_cache`` decodes each image file once)."""
    dataset = BatchTimeDataset(records, skip_invalid, decoded_cache)
    loader = DataLoader(
        dataset,
        batch_sampler=sampler,
        collate_fn=collate_reporting(collator, dataset),
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
    )
    return iter(loader)
