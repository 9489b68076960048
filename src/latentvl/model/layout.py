"""Checks on the latent segments (design §4, D6) and the shifted step layout of the batched pass (D8)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


class LatentInputError(ValueError):
    """The latent inputs of a batch are inconsistent; the message names sample, segment and reason."""


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


def _name(b: int, sample_ids: list[str] | None) -> str:
    return f"sample {b}" + (f" (id {sample_ids[b]!r})" if sample_ids and b < len(sample_ids) else "")


def check_latent_inputs(
    input_ids: torch.Tensor,
    latent_segments: list[list[tuple[int, int, int]]] | None,
    latent_budgets: list[list[int]] | None,
    latent_token_id: int,
    stage: str,
    sample_ids: list[str] | None = None,
) -> list[list[tuple[int, int, int]]]:
    """Validate segments against ``input_ids`` and budgets; return them as sorted int tuples.

    Raises :class:`LatentInputError` for: missing segments or budgets; a batch-size mismatch; a
    segment count different from the number of CoT images; an ``img_idx`` out of range or repeated;
    a segment out of bounds, empty, overlapping another, or out of image order; a slot that is not
    ``latent_token_id``; a segment length different from its budget (stage A's fixed length, and
    stage C's upper bound, design §2).
    """
    if latent_segments is None or latent_budgets is None:
        raise LatentInputError("latent_mode=True needs latent_segments and latent_budgets (from the collator)")
    B, S = input_ids.shape
    if len(latent_segments) != B or len(latent_budgets) != B:
        raise LatentInputError(
            f"batch has {B} samples but latent_segments has {len(latent_segments)} and "
            f"latent_budgets {len(latent_budgets)} entries")
    ids = input_ids.tolist()
    checked = []
    for b in range(B):
        who = _name(b, sample_ids)
        budgets = latent_budgets[b]
        segs = [tuple(int(v) for v in seg) for seg in latent_segments[b]]
        if len(segs) != len(budgets):
            raise LatentInputError(
                f"{who}: {len(segs)} latent segments for {len(budgets)} CoT images (need exactly one each)")
        seen: set[int] = set()
        prev_end, prev_img = -1, -1
        for i, seg in enumerate(segs):
            if len(seg) != 3:
                raise LatentInputError(f"{who}, segment {i}: expected (start, end, img_idx), got {seg}")
            start, end, img = seg
            where = f"{who}, segment {i} {seg}"
            if not 0 <= img < len(budgets):
                raise LatentInputError(f"{where}: img_idx {img} out of range for {len(budgets)} CoT images")
            if img in seen:
                raise LatentInputError(f"{where}: CoT image {img} has more than one segment")
            seen.add(img)
            if not 0 <= start < end <= S:
                raise LatentInputError(f"{where}: bounds outside the sequence of length {S} or empty")
            if start < prev_end or img < prev_img:
                raise LatentInputError(f"{where}: overlaps or precedes the previous segment")
            prev_end, prev_img = end, img
            bad = [p for p in range(start, end) if ids[b][p] != latent_token_id]
            if bad:
                raise LatentInputError(
                    f"{where}: position {bad[0]} holds token {ids[b][bad[0]]}, not latent_token_id "
                    f"{latent_token_id}")
            if budgets[img] < 1:
                raise LatentInputError(f"{where}: budget {budgets[img]} must be >= 1")
            if end - start != budgets[img]:
                raise LatentInputError(
                    f"{where}: length {end - start} != budget {budgets[img]} (stage {stage}: segments "
                    "always span the full budget)")
        checked.append(segs)
    return checked


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
