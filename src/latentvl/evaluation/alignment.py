"""Do the latents look like the visual thoughts they stand for? Alignment on held-out records.

For every evaluated sample whose record lists one CoT image per latent segment, :class:`AlignmentProbe`
encodes those images as training does for its alignment targets (vision tower and merger, no gradient),
pools each image's visual tokens into as many groups as the segment used latents (D4) and measures:

- ``mean_cosine``: the cosine of each latent with its own target group (what the alignment loss
  trains), averaged over every latent;
- ``retrieval_top1``: for each segment, whether its mean latent is closer (cosine) to the mean of its
  own pooled target than to that of every other segment collected; ``chance`` is 1/n. Segments of
  near-identical images (successive states of one drawing) are hard to tell apart by design;
- ``mean_cosine_own`` / ``mean_cosine_other``: the cosine of a segment's mean latent with its own mean
  target / with the other segments' mean targets, averaged. Own above other means the latents carry
  something of their particular image; equal means they only look like CoT images in general.

CoT images are read only here, for the measurement; the answers never see them (design §9).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ..data.collator import load_image
from ..model.losses import pool_visual_tokens

__all__ = ["AlignmentProbe"]


def _cot_images(record: Any) -> list[Any]:
    value = record.get("cot_images") if isinstance(record, dict) else getattr(record, "cot_images", None)
    return list(value) if value else []


class AlignmentProbe:
    """Collects per-segment statistics batch by batch (``__call__``) and reports them (``summary``).

    ``max_segments`` bounds the retrieval set (an ``n x n`` similarity matrix); the mean cosine uses
    every segment.
    """

    def __init__(self, model: Any, image_processor: Any, max_segments: int = 4096) -> None:
        self.model = model
        self.image_processor = image_processor
        self.max_segments = max_segments
        self.cos_sum = 0.0
        self.n_latents = 0
        self.n_segments = 0
        self.skipped: dict[str, int] = {"no_cot_images": 0, "segment_count_differs": 0}
        self.mean_latents: list[torch.Tensor] = []
        self.mean_targets: list[torch.Tensor] = []

    @torch.no_grad()
    def __call__(self, results: list[Any], records: Any) -> None:
        """``results``: the batch's inference results (with ``latents`` and ``used_lens``)."""
        todo = []
        for r in results:
            if r.latents is None or not sum(r.used_lens):
                continue
            cot = _cot_images(records[r.index])
            if not cot:
                self.skipped["no_cot_images"] += 1
            elif len(cot) != len(r.used_lens):
                self.skipped["segment_count_differs"] += 1
            else:
                todo.append((r, [load_image(v, r.id, f"cot_images[{i}]") for i, v in enumerate(cot)]))
        if not todo:
            return
        feats = self._features([im for _, ims in todo for im in ims])
        k = 0
        for r, _ in todo:
            latents = r.latents.float()
            start = 0
            for used in r.used_lens:
                if used == 0:  # no latent for this image: nothing to compare
                    k += 1
                    continue
                target_tokens = feats[k].float().to(latents.device)
                vecs = latents[start : start + used]
                target = pool_visual_tokens(target_tokens, used)
                self.cos_sum += F.cosine_similarity(vecs, target, dim=-1).sum().item()
                self.n_latents += used
                self.n_segments += 1
                if len(self.mean_latents) < self.max_segments:
                    self.mean_latents.append(vecs.mean(0).cpu())
                    self.mean_targets.append(target.mean(0).cpu())
                start += used
                k += 1

    def _features(self, images: list[Any]) -> list[torch.Tensor]:
        out = self.image_processor(images=images, return_tensors="pt")
        param = next(self.model.parameters())
        pixels = out["pixel_values"].to(param.device, param.dtype)
        grid = out["image_grid_thw"].long().to(param.device)
        return list(self.model.model.get_image_features(pixels, grid).pooler_output)

    def summary(self) -> dict[str, Any]:
        n = len(self.mean_latents)
        out: dict[str, Any] = {
            "n_segments": self.n_segments,
            "n_latents": self.n_latents,
            "skipped_samples": dict(self.skipped),
            "mean_cosine": self.cos_sum / self.n_latents if self.n_latents else None,
            "retrieval_set": n,
            "retrieval_top1": None,
            "chance": 1.0 / n if n else None,
            "mean_cosine_own": None,
            "mean_cosine_other": None,
        }
        if n >= 2:
            sim = F.normalize(torch.stack(self.mean_latents), dim=-1) @ F.normalize(
                torch.stack(self.mean_targets), dim=-1).T
            out["retrieval_top1"] = (sim.argmax(dim=1) == torch.arange(n)).float().mean().item()
            out["mean_cosine_own"] = sim.diagonal().mean().item()
            out["mean_cosine_other"] = ((sim.sum() - sim.diagonal().sum()) / (n * (n - 1))).item()
        return out
