"""Causal checks: does the model's answer depend on its latent thoughts?

Each check changes only what step 1 hands to step 2 (:class:`~latentvl.inference.generate.Patches`);
the prompt, positions and step 1 itself are untouched.

- **mask**: every latent slot is masked out of attention (``latent_kv_mask`` False at all latent
  slots). With ``latent_null_scale == 0`` the answer is then computed as if the latents were absent.
- **swap**: each sample receives the latent vectors of another sample, segment by segment, so only
  their content changes. Candidates are looked at in this order: the nearest earlier sample of the
  same batch, the most recent samples of earlier batches, the nearest later sample of the same batch.
  The first candidate with the same structure (used latents per segment) is the donor; if there is
  none, the first one with as many segments, each at least as long, gives the first vectors of each
  of its segments. A sample without a donor is left out of this check (its count shows in ``n``).
- **noise**: each latent vector is replaced by Gaussian noise rescaled to that vector's norm.
- **truncate** (:func:`truncate_latents`): only the latents of the first j segments (or, per row, the first
  j latents) are kept, the later slots are masked as in *mask*.
- **implant** (:func:`step_overrides`): the inputs of chosen latent slots are replaced *during* step 1,
  so every later latent step builds on the implanted vectors (see ``latentvl.evaluation.instruments``).

A model that relies on its latents changes answers (and usually loses accuracy) under all three.
:func:`effective_rank` measures how many directions the latent vectors actually span.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Collection, Iterator, Mapping

import torch

from ..inference.generate import Patches

__all__ = [
    "CHECKS", "CHECK_RULES", "DonorPool", "effective_rank", "mask_latents", "noise_latents", "step_overrides",
    "swap_latents", "truncate_latents",
]

CHECKS = ("mask", "swap", "noise")
CHECK_RULES = {
    "mask": "latent_kv_mask False at every latent slot",
    "swap": "latents of another sample with the same used latents per segment, else the first vectors of "
            "each segment of one with longer segments (nearest earlier in the batch, then earlier batches, "
            "then later in the batch)",
    "noise": "Gaussian noise rescaled to each latent vector's L2 norm",
}


def latent_slots(input_ids: torch.Tensor, latent_token_id: int) -> torch.Tensor:
    """``[B, S]`` bool: True at every latent slot (active or not)."""
    return input_ids == latent_token_id


def mask_latents(patches: Patches, input_ids: torch.Tensor, latent_token_id: int) -> Patches:
    """Check (a): ``latent_kv_mask`` False at every latent slot, True elsewhere as before."""
    slots = latent_slots(input_ids, latent_token_id)
    kv = patches.latent_kv_mask
    if kv is None:
        kv = torch.ones_like(slots)
    return Patches(patches.ce_patch_pos, patches.ce_patch_vec, kv & ~slots)


def truncate_latents(
    patches: Patches, input_ids: torch.Tensor, segments: list[list[tuple[int, int, int]]], keep: int,
    by_latent: Collection[int] = (),
) -> Patches:
    """``latent_kv_mask`` with only the first ``keep`` units of each row kept: a unit is a CoT segment
    (every slot of each segment whose image index is ``>= keep`` is masked), or, for the rows in
    ``by_latent``, one latent slot (every slot after the row's first ``keep``, counted across its segments
    in image order). Slots already masked stay masked.

    ``segments`` are the collator's ``latent_segments`` (``(start, end, img_idx)`` per row); ``keep=0``
    masks every latent, like :func:`mask_latents`.
    """
    kv = patches.latent_kv_mask
    kv = torch.ones_like(input_ids, dtype=torch.bool) if kv is None else kv.clone()
    for b, segs in enumerate(segments):
        if b in by_latent:
            columns = [c for start, end, _img in sorted(segs, key=lambda x: x[2]) for c in range(start, end)]
            kv[b, columns[keep:]] = False
            continue
        for start, end, img in segs:
            if img >= keep:
                kv[b, start:end] = False
    return Patches(patches.ce_patch_pos, patches.ce_patch_vec, kv)


@contextlib.contextmanager
def step_overrides(model, vectors: Mapping[tuple[int, int], torch.Tensor]) -> Iterator[None]:
    """Inside the block, step 1 uses ``vectors[(row, column)]`` as the input of that latent slot.

    Later steps attend to (and, through the hidden state, continue from) the replaced inputs, and the
    replaced vectors are what step 2 receives at those slots. ``row``/``column`` index the collated batch.
    """
    if getattr(model, "latent_step_override", "missing") == "missing":
        raise TypeError(f"{type(model).__name__} has no latent_step_override hook (not a latentvl model)")
    by_key = dict(vectors)

    def override(x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        hits = [(r, by_key[key]) for r, key in enumerate(zip(rows.tolist(), cols.tolist())) if key in by_key]
        if not hits:
            return x
        idx = torch.tensor([r for r, _ in hits], device=x.device)
        new = torch.stack([v.to(x.device, x.dtype) for _, v in hits])
        return x.index_put((idx,), new)

    before = model.latent_step_override
    model.latent_step_override = override
    try:
        yield
    finally:
        model.latent_step_override = before


def noise_latents(patches: Patches, generator: torch.Generator | None = None) -> Patches:
    """Check (c): every latent vector replaced by Gaussian noise with that vector's L2 norm.

    The noise is drawn on the CPU (float32) with ``generator``, so it does not depend on the device.
    """
    vec = patches.ce_patch_vec
    noise = torch.randn(vec.shape, generator=generator, dtype=torch.float32)
    noise = noise.to(vec.device)
    norms = vec.float().norm(dim=-1, keepdim=True)
    noise = noise / noise.norm(dim=-1, keepdim=True).clamp_min(1e-12) * norms
    return Patches(patches.ce_patch_pos, noise.to(vec.dtype), patches.latent_kv_mask)


def swap_latents(patches: Patches, donors: list[torch.Tensor | None]) -> Patches:
    """Check (b): row b's latent vectors replaced by ``donors[b]`` (same count); None keeps its own."""
    rows = patches.ce_patch_pos[:, 0]
    vec = patches.ce_patch_vec.clone()
    for b, donor in enumerate(donors):
        if donor is None:
            continue
        idx = (rows == b).nonzero(as_tuple=True)[0]
        if donor.shape[0] != idx.numel():
            raise ValueError(f"row {b}: donor has {donor.shape[0]} latents, the row has {idx.numel()}")
        vec[idx] = donor.to(vec.device, vec.dtype)
    return Patches(patches.ce_patch_pos, vec, patches.latent_kv_mask)


class DonorPool:
    """Chooses swap donors (see the module docstring) across the batches of a run."""

    def __init__(self) -> None:
        self._recent: dict[tuple[int, ...], torch.Tensor] = {}  # structure -> latents, oldest first

    def donors(
        self, structures: list[tuple[int, ...]], latents: list[torch.Tensor]
    ) -> list[torch.Tensor | None]:
        """Donor latents for every row of a batch (None: no donor); then remember this batch's rows."""
        out: list[torch.Tensor | None] = []
        pool = list(reversed(self._recent.items()))  # most recent first
        for b, key in enumerate(structures):
            donor = None
            if sum(key) > 0:
                candidates = [(structures[j], latents[j]) for j in range(b - 1, -1, -1)]
                candidates += pool
                candidates += [(structures[j], latents[j]) for j in range(b + 1, len(structures))]
                donor = next((lat for k, lat in candidates if k == key), None)
                if donor is None:
                    donor = next((_take(lat, k, key) for k, lat in candidates if _covers(k, key)), None)
            out.append(donor)
        for key, lat in zip(structures, latents):
            if sum(key) > 0:
                self._recent.pop(key, None)
                self._recent[key] = lat
        return out


def _covers(donor: tuple[int, ...], need: tuple[int, ...]) -> bool:
    return len(donor) == len(need) and all(d >= n for d, n in zip(donor, need))


def _take(latents: torch.Tensor, donor: tuple[int, ...], need: tuple[int, ...]) -> torch.Tensor:
    """The first ``need[i]`` vectors of each of the donor's segments."""
    parts = torch.split(latents, list(donor))
    return torch.cat([part[:n] for part, n in zip(parts, need)])


def effective_rank(vectors: torch.Tensor, max_rows: int = 8192) -> float:
    """``exp(entropy(s / sum(s)))`` of the singular values ``s`` of the stacked vectors ``[N, H]``.

    Between 1 (all vectors on one line) and ``min(N, H)``. Not centred. Above ``max_rows`` rows, an
    evenly spaced subset is used. Returns NaN for an empty input.
    """
    if vectors.ndim != 2 or vectors.shape[0] == 0:
        return float("nan")
    if vectors.shape[0] > max_rows:
        vectors = vectors[torch.linspace(0, vectors.shape[0] - 1, max_rows).long()]
    s = torch.linalg.svdvals(vectors.detach().double().cpu())
    total = float(s.sum())
    if total == 0:
        return float("nan")
    p = s / total
    p = p[p > 0]
    return float(math.exp(-(p * p.log()).sum()))
