"""The latent segments of a batch: their checks (design §4, §8, D6) and the shifted step layout of the
batched pass (D8). One home for every segment rule: the model checks its inputs with
:func:`check_latent_inputs`, the collator its output with :func:`verify_segments`, and the pre-training
checks (design §8.1, §8.2) report :func:`segment_problems`.

A segment is ``(start, end, img_idx)``: latent slots ``start..end-1`` of one sample for its CoT image
``img_idx``; ``budgets[b][img_idx]`` is that image's budget.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from .errors import CollatorInputError, LatentInputError
from .tokens import LATENT_END, LATENT_START

__all__ = [
    "Layout",
    "Problem",
    "build_layout",
    "check_latent_inputs",
    "segment_problems",
    "verify_segments",
]

Segment = tuple[int, int, int]


@dataclass
class Layout:
    """Where each sample's latent region sits, and how pass 1 walks it.

    ``rows`` are the batch indices that pass 1 runs (samples with at least one segment); row r is
    shifted right by ``shifts[r]`` so every first latent slot falls on column ``prefix_len``.
    ``num_steps`` is the longest latent region (first slot to last slot, text between included).
    """

    segments: list[list[tuple[int, int, int]]]
    budgets: list[list[int]]
    rows: list[int]
    shifts: list[int]
    real_rows: list[bool]
    prefix_len: int
    num_steps: int

    @property
    def max_segments(self) -> int:
        return max((len(s) for s in self.segments), default=0)

    def _per_step(self, steps: int, fill, value) -> list[list]:
        table = [[fill] * steps for _ in self.rows]
        for r, (b, shift) in enumerate(zip(self.rows, self.shifts)):
            if not self.real_rows[r]:
                continue
            for seg_idx, (start, end, _img) in enumerate(self.segments[b]):
                for col in range(start, end):
                    j = col + shift - self.prefix_len
                    table[r][j] = value(seg_idx, col - start, end - start)
        return table

    def is_latent(self, steps: int) -> list[list[bool]]:
        return self._per_step(steps, False, lambda s, k, n: True)

    def slot_index(self, steps: int) -> list[list[int]]:
        return self._per_step(steps, -1, lambda s, k, n: k)

    def segment_index(self, steps: int) -> list[list[int]]:
        return self._per_step(steps, -1, lambda s, k, n: s)

    def is_last_slot(self, steps: int) -> list[list[bool]]:
        return self._per_step(steps, False, lambda s, k, n: k == n - 1)


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a batch's segments. ``kind`` groups the rules: ``batch`` (missing or
    mis-sized inputs), ``count`` (segments per CoT image), ``index`` (img_idx out of range), ``order``
    (a repeated image, overlap or out-of-order segment), ``bounds``, ``tokens`` (a slot that is not the
    latent id), ``budget`` (a budget below 1), ``length`` (length != budget), ``frame`` (a segment not
    framed by the latent start/end tokens) and ``stray`` (a latent id outside every segment)."""

    kind: str
    sample: int | None
    message: str


def _name(b: int, sample_ids: list[str] | None) -> str:
    return f"sample {b}" + (f" (id {sample_ids[b]!r})" if sample_ids and b < len(sample_ids) else "")


def segment_problems(
    input_ids: torch.Tensor,
    latent_segments: list[list[Segment]] | None,
    latent_budgets: list[list[int]] | None,
    latent_token_id: int,
    stage: str,
    sample_ids: list[str] | None = None,
    latent_start_token_id: int | None = None,
    latent_end_token_id: int | None = None,
    framing: bool = False,
) -> Iterator[Problem]:
    """Every problem of the segments against ``input_ids`` ``[B, S]`` and the budgets, in a fixed order
    (per sample, per segment: index, order, bounds, order, tokens, budget, length).

    With ``framing`` it then checks, per sample, that segment ``i`` belongs to CoT image ``i``, that no latent id lies
    outside the segments and, when the ids are given, that each segment is framed by ``<|latent_start|>``
    and ``<|latent_end|>`` (what the collator builds).
    """
    if latent_segments is None or latent_budgets is None:
        yield Problem("batch", None, "latent_mode=True needs latent_segments and latent_budgets (from the collator)")
        return
    B, S = input_ids.shape
    if len(latent_segments) != B or len(latent_budgets) != B:
        yield Problem("batch", None, f"batch has {B} samples but latent_segments has {len(latent_segments)} and "
                                     f"latent_budgets {len(latent_budgets)} entries")
        return
    ids = input_ids.tolist()
    counted = []  # samples with one segment per CoT image
    for b in range(B):
        who = _name(b, sample_ids)
        budgets = latent_budgets[b]
        segs = [tuple(int(v) for v in seg) for seg in latent_segments[b]]
        if len(segs) != len(budgets):
            yield Problem("count", b, f"{who}: {len(segs)} latent segments for {len(budgets)} CoT images "
                                      "(need exactly one each)")
            continue
        counted.append((b, who, segs))
        yield from _sample_problems(b, who, ids[b], S, segs, budgets, latent_token_id, stage)
    if framing:
        for b, who, segs in counted:
            yield from _framing_problems(b, who, ids[b], segs, latent_token_id, latent_start_token_id,
                                         latent_end_token_id)


def _sample_problems(b, who, row, S, segs, budgets, latent_token_id, stage) -> Iterator[Problem]:
    seen: set[int] = set()
    prev_end, prev_img = -1, -1
    for i, seg in enumerate(segs):
        if len(seg) != 3:
            yield Problem("count", b, f"{who}, segment {i}: expected (start, end, img_idx), got {seg}")
            continue
        start, end, img = seg
        where = f"{who}, segment {i} {seg}"
        in_range = 0 <= img < len(budgets)
        if not in_range:
            yield Problem("index", b, f"{where}: img_idx {img} out of range for {len(budgets)} CoT images")
        elif img in seen:
            yield Problem("order", b, f"{where}: CoT image {img} has more than one segment")
        seen.add(img)
        in_bounds = 0 <= start < end <= S
        if not in_bounds:
            yield Problem("bounds", b, f"{where}: bounds outside the sequence of length {S} or empty")
        elif start < prev_end or img < prev_img:
            yield Problem("order", b, f"{where}: overlaps or precedes the previous segment")
        prev_end, prev_img = max(prev_end, end), img
        if in_bounds:
            bad = [p for p in range(start, end) if row[p] != latent_token_id]
            if bad:
                yield Problem("tokens", b, f"{where}: position {bad[0]} holds token {row[bad[0]]}, not "
                                           f"latent_token_id {latent_token_id} ({len(bad)} bad slot(s))")
        if in_range and budgets[img] < 1:
            yield Problem("budget", b, f"{where}: budget {budgets[img]} must be >= 1")
        elif in_range and end - start != budgets[img]:
            yield Problem("length", b, f"{where}: length {end - start} != budget {budgets[img]} (stage {stage}: "
                                       "segments always span the full budget)")


def _framing_problems(b, who, row, segs, latent_token_id, start_id, end_id) -> Iterator[Problem]:
    for i, (start, end, img) in enumerate(segs):
        where = f"{who}: segment {i} ({start}, {end}, {img})"
        if img != i:
            yield Problem("frame", b, f"{where}: belongs to CoT image {img}, expected {i}")
        if start_id is not None and (start == 0 or row[start - 1] != start_id):
            yield Problem("frame", b, f"{where}: not preceded by {LATENT_START}")
        if end_id is not None and (end >= len(row) or row[end] != end_id):
            yield Problem("frame", b, f"{where}: not followed by {LATENT_END}")
    inside = sum(end - start for start, end, _ in segs)
    total = sum(1 for t in row if t == latent_token_id)
    if total != inside:
        yield Problem("stray", b, f"{who}: {total} latent tokens in input_ids but the segments cover {inside}")


def check_latent_inputs(
    input_ids: torch.Tensor,
    latent_segments: list[list[Segment]] | None,
    latent_budgets: list[list[int]] | None,
    latent_token_id: int,
    stage: str,
    sample_ids: list[str] | None = None,
) -> list[list[Segment]]:
    """Validate segments against ``input_ids`` and budgets; return them as int tuples.

    Raises :class:`LatentInputError` with the first of :func:`segment_problems`: missing segments or
    budgets; a batch-size mismatch; a segment count different from the number of CoT images; an
    ``img_idx`` out of range or repeated; a segment out of bounds, empty, overlapping another, or out of
    image order; a slot that is not ``latent_token_id``; a segment length different from its budget
    (stage A's fixed length, and stage C's upper bound, design §2).
    """
    for problem in segment_problems(input_ids, latent_segments, latent_budgets, latent_token_id, stage,
                                    sample_ids):
        raise LatentInputError(problem.message)
    return [[tuple(int(v) for v in seg) for seg in segs] for segs in latent_segments]


def verify_segments(
    input_ids: torch.Tensor,
    segments: list[list[Segment]],
    budgets: list[list[int]],
    latent_token_id: int,
    sample_ids: list[str],
    latent_start_token_id: int | None = None,
    latent_end_token_id: int | None = None,
) -> None:
    """The collator's check of a batch it built: :func:`check_latent_inputs` (raising
    :class:`LatentInputError`), then the framing rules of :func:`segment_problems` (raising
    :class:`CollatorInputError`, naming the sample id): segment ``i`` for CoT image ``i``, no latent id
    outside the segments, each segment framed by ``<|latent_start|>`` and ``<|latent_end|>``."""
    for problem in segment_problems(input_ids, segments, budgets, latent_token_id, "A", sample_ids,
                                    latent_start_token_id, latent_end_token_id, framing=True):
        error = CollatorInputError if problem.kind in ("frame", "stray") else LatentInputError
        raise error(problem.message)


def build_layout(
    input_ids: torch.Tensor,
    latent_segments,
    latent_budgets,
    latent_token_id: int,
    stage: str,
    sample_ids: list[str] | None = None,
) -> Layout:
    """Validate, then place every sample with latents so their first slots line up."""
    segments = check_latent_inputs(input_ids, latent_segments, latent_budgets, latent_token_id, stage, sample_ids)
    budgets = [list(map(int, b)) for b in latent_budgets]
    rows = [b for b, segs in enumerate(segments) if segs]
    if not rows:
        # Nothing to think about. A dummy row keeps a distributed rank able to step with the others; its
        # prefix is two tokens long, since a one-token call of pass 1 is a latent step, not a prefix.
        return Layout(segments, budgets, rows=[0], shifts=[0], real_rows=[False], prefix_len=2, num_steps=0)
    firsts = [segments[b][0][0] for b in rows]
    prefix = max(firsts)
    steps = max(segments[b][-1][1] - segments[b][0][0] for b in rows)
    return Layout(segments, budgets, rows=rows, shifts=[prefix - f for f in firsts],
                  real_rows=[True] * len(rows), prefix_len=prefix, num_steps=steps)
