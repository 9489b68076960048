"""The training objective of latentvl's model (design §6): both passes on a collated batch and the loss
``L = ce + w_align * align + w_stop * stop + w_cost * cost``.

What the objective adds to the model's two passes lives here, apart from the model class: stage-A
teacher forcing and tail dropout, the alignment targets (D4), the stop labels (the ratio target or the
answer-driven one, D16) and the expected cost (D7). ``LatentQwen2_5_VLForConditionalGeneration.latent_loss``
calls :func:`latent_loss`; the functions read the model only through its passes, its sub-modules and its
config.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.nn import functional as F

from ..errors import LatentInputError
from .losses import (
    alignment_loss,
    answer_stop_target,
    answer_target_candidates,
    expected_length,
    pool_visual_tokens,
    stop_labels_for_length,
    stop_loss,
    stop_target_length,
)
from .pass1 import LatentPassOutput
from .visual import VisualStack

__all__ = ["LatentLossOutput", "compiled_pass2", "latent_loss"]


def _pass2_forward(model, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                   labels: torch.Tensor, gating: dict[str, Any], visual: VisualStack | None = None):
    """Pass 2 in training: the full-sequence forward of ``inputs_embeds`` ``[B, S, H]`` (latents patched in)
    with ``labels`` ``[B, S]`` (its CE loss), the gating keywords (stage C's ``latent_kv_mask``) and the
    question images' ``visual`` extras (a family with DeepStack)."""
    return model.text_forward(inputs_embeds, attention_mask, position_ids, labels=labels, visual=visual,
                              gating=gating, use_cache=False)


@functools.cache
def compiled_pass2(backend: str = "inductor"):
    """:func:`_pass2_forward` through ``torch.compile`` with ``backend`` (``latent_compile`` in training).
    ``dynamic=None``: a batch of a new shape compiles once more, then one graph with dynamic sizes serves
    every later shape, so recompiles stay bounded as batch lengths vary."""
    return torch.compile(_pass2_forward, backend=backend, dynamic=None)


LOSS_PARTS = ("loss", "ce", "ce_full", "align", "align_full", "stop", "cost")  # what training and evaluation log


@dataclass
class LatentLossOutput:
    """The training unit's result: the total loss, each part (:data:`LOSS_PARTS`, for logging) and latent
    statistics. ``ce_full`` is the full-budget answer CE of ``latent_full_budget_ce_weight`` and ``align_full``
    the full-budget alignment loss of ``latent_full_budget_align_weight`` (each 0 when off)."""

    loss: torch.FloatTensor | None = None
    ce: torch.FloatTensor | None = None
    ce_full: torch.FloatTensor | None = None
    align: torch.FloatTensor | None = None
    align_full: torch.FloatTensor | None = None
    stop: torch.FloatTensor | None = None
    cost: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    latent: LatentPassOutput | None = None
    stop_targets: list[list[int]] | None = None
    target_model_calls: int = 0



def latent_loss(model, batch: dict[str, Any], threshold: float | None = None) -> LatentLossOutput:
    """Both passes on a collated batch and the combined loss (design §6):
    ``L = ce + w_align * align + w_stop * stop + w_cost * cost``; ``w_stop`` and ``w_cost`` count
    only in stage C (:meth:`latentvl.config.LatentSettings.loss_weights`). In stage-C training with
    ``latent_full_budget_ce_weight = w_full > 0`` the loss adds ``w_full * ce_full``: the answer CE after
    a second pass 1 + pass 2 with every slot active (D18); its pass 1 also serves the answer stop targets.
    With ``latent_full_budget_align_weight = w_fa > 0`` it adds ``w_fa * align_full``: the alignment loss of
    that full-budget pass 1, each slot against its own share of the CoT image (D20).

    ``batch`` holds the collator's keys. Visual features of the question images are computed
    once and shared by both passes; CoT images are encoded without gradient (alignment targets).
    """
    s = model.latent_settings
    input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]
    embeds, visual = model.embed_inputs(input_ids, batch.get("pixel_values"), batch.get("image_grid_thw"),
                                        return_visual=True)
    position_ids = model.compute_position_ids(input_ids, attention_mask, batch.get("mm_token_type_ids"),
                                             batch.get("image_grid_thw"))
    cot_feats, forcing = None, None
    if model.training and s.latent_teacher_forcing > 0 and s.latent_mode_stage == "A":
        cot_feats = _cot_features(model, batch)
        forcing = _teacher_forcing(model, batch, embeds, cot_feats)
    p1 = model.latent_pass(input_ids, attention_mask, embeds, position_ids, batch["latent_segments"],
                          batch["latent_budgets"], threshold=threshold, sample_ids=batch.get("ids"),
                          forcing=forcing, visual=visual)
    embeds2 = embeds.index_put((p1.ce_patch_pos[:, 0], p1.ce_patch_pos[:, 1]),
                               p1.ce_patch_vec.to(embeds.dtype))
    stage_c = s.latent_mode_stage == "C"
    pass2 = _pass2_forward if s.latent_compile is False else compiled_pass2(
        "inductor" if s.latent_compile is True else s.latent_compile)
    kv_mask = p1.latent_kv_mask if stage_c else None
    if model.training and not stage_c and s.latent_tail_dropout > 0:
        repeat = s.latent_tail_dropout_mode == "repeat"  # D22: cut only where the CoT image repeats its tail
        if repeat and cot_feats is None:
            cot_feats = _cot_features(model, batch)
        kv_mask = _tail_dropout(model, batch, input_ids, cot_feats if repeat else None)
    out = pass2(model, embeds2, attention_mask, position_ids, batch["labels"], model._gating_kwargs(kv_mask), visual)
    ce = out.loss
    zero = ce.new_zeros(())

    ce_full, align_full, full = zero, zero, None
    train_c = stage_c and model.training
    w_full = float(s.latent_full_budget_ce_weight) if train_c else 0.0
    w_full_align = float(s.latent_full_budget_align_weight) if train_c else 0.0
    if w_full > 0 or w_full_align > 0:  # D18, D20: what the full budget computes is kept while the head learns
        full = model.latent_pass(input_ids, attention_mask, embeds, position_ids, batch["latent_segments"],
                                 batch["latent_budgets"], sample_ids=batch.get("ids"), full_budget=True,
                                 visual=visual)
    if w_full > 0:
        embeds_full = embeds.index_put((full.ce_patch_pos[:, 0], full.ce_patch_pos[:, 1]),
                                       full.ce_patch_vec.to(embeds.dtype))
        ce_full = pass2(model, embeds_full, attention_mask, position_ids, batch["labels"],
                        model._gating_kwargs(None), visual).loss
    if w_full_align > 0:
        cot_feats = _cot_features(model, batch) if cot_feats is None else cot_feats
        if full.ce_patch_pos.shape[0] > 0:
            align_full = alignment_loss(full.align_vec, _alignment_targets(model, batch, full, cot_feats))

    align = zero
    if s.latent_align_weight > 0:  # on every process (the CoT features are a vision call)
        targets = _alignment_targets(model, batch, p1, cot_feats)
        if p1.ce_patch_pos.shape[0] > 0:
            align = alignment_loss(p1.align_vec, targets)

    stop = cost = zero
    targets, target_calls = None, 0
    if stage_c and p1.stop_logits is None:
        # no latent anywhere in the batch (on any process): nothing to halt, the head stays in the graph
        stop = cost = 0.0 * sum(p.sum() for p in model.latent_stop_head.parameters()).float()
    elif stage_c:
        if s.latent_stop_target_mode == "answer":
            targets, target_calls = _answer_stop_targets(model, batch, embeds, position_ids, visual, full)
        labels, weights = _stop_label_tensors(model, batch, p1, targets)
        stop = stop_loss(p1.stop_logits, labels, weights)
        if s.latent_cost_mode == "count":
            cost = p1.used_lens.sum(dim=1).float().mean()  # D7: no gradient, logged
        else:
            cost = _expected_cost(model, batch, p1)
    w_stop, w_cost = s.loss_weights()  # (0, 0) in stage A
    loss = (ce + w_full * ce_full + s.latent_align_weight * align + w_full_align * align_full
            + w_stop * stop + w_cost * cost)
    return LatentLossOutput(loss=loss, ce=ce.detach(), ce_full=ce_full.detach(), align=align.detach(),
                            align_full=align_full.detach(), stop=stop.detach(),
                            cost=cost.detach(), logits=out.logits, latent=p1, stop_targets=targets,
                            target_model_calls=target_calls)

@torch.no_grad()
def _cot_features(model, batch: dict[str, Any]) -> list[torch.Tensor]:
    """The CoT images' visual features (one ``[N_i, H]`` tensor per image), without gradient.

    A batch without CoT images returns ``[]``; in a distributed run it still makes the vision call
    (on the model's ``_dummy_image``, result dropped) so that every process makes the same calls.
    """
    pix, grid = batch.get("cot_pixel_values"), batch.get("cot_image_grid_thw")
    if pix is None or grid is None or grid.shape[0] == 0:
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            model.model.get_image_features(*model._dummy_image(batch["input_ids"].device))
        return []
    return model.visual_features(pix, grid)[0]

REPEAT_TOLERANCE = 0.1  # "repeat" tail dropout: a dropped target repeats the kept one within this relative L2


def _tail_dropout(model, batch: dict[str, Any], input_ids: torch.Tensor,
                  feats: list[torch.Tensor] | None = None) -> torch.Tensor:
    """``[B, S]`` bool ``latent_kv_mask`` for stage-A pass 2 with ``latent_tail_dropout = q``: each segment,
    with probability ``q``, keeps its first ``L`` latents, the rest False. ``L`` is uniform in ``1..B``, or,
    given ``feats`` (the CoT features: ``latent_tail_dropout_mode="repeat"``), uniform among the lengths
    whose dropped slots' alignment targets (D4, pooled into ``B``) are all within :data:`REPEAT_TOLERANCE`
    of the last kept slot's, relative to its norm (``B`` itself always qualifies). Draws from the global
    torch RNG, one pair per segment in ``latent_segments`` order, whatever the mode."""
    keep = torch.ones_like(input_ids, dtype=torch.bool)
    q = model.latent_settings.latent_tail_dropout
    k = 0
    for b, segs in enumerate(batch["latent_segments"]):
        for start, end, img in sorted(segs):
            hit, draw = torch.rand(()).item() < q, torch.rand(()).item()
            if not hit:
                continue
            if feats is None:
                lengths = list(range(1, end - start + 1))
            elif feats:
                lengths = _repeating_lengths(pool_visual_tokens(feats[k + img], end - start).float())
            else:  # "repeat" on a batch without CoT images: nothing is known to keep the answer
                lengths = []
            if lengths:
                keep[b, start + lengths[int(draw * len(lengths))]:end] = False
        k += len(batch["latent_budgets"][b])
    return keep


def _repeating_lengths(targets: torch.Tensor) -> list[int]:
    """The lengths ``L`` in ``1..B`` whose dropped targets ``targets[L:]`` (``[B, H]``) are each within
    :data:`REPEAT_TOLERANCE` (relative to its norm) of ``targets[L - 1]``."""
    n = targets.shape[0]
    dist_to = torch.cdist(targets, targets)  # [B, B]
    scale = targets.norm(dim=-1).clamp_min(1e-6)
    return [n_keep for n_keep in range(1, n + 1)
            if bool((dist_to[n_keep - 1, n_keep:] <= REPEAT_TOLERANCE * scale[n_keep - 1]).all())]

def _teacher_forcing(model, batch: dict[str, Any], embeds: torch.Tensor, feats: list[torch.Tensor]
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(forced [B, S] bool, inputs [B, S, H])`` for stage-A training with ``latent_teacher_forcing = p``:
    every latent slot is forced with probability ``p`` (the global torch RNG), and its input is its
    alignment target (the CoT features pooled into the segment's budget, D4). Slots of a batch without
    CoT images are never forced."""
    B, S, H = embeds.shape
    forced = torch.zeros(B, S, dtype=torch.bool, device=embeds.device)
    inputs = embeds.new_zeros(B, S, H)
    if not feats:
        return forced, inputs
    k = 0
    for b, (segs, budgets) in enumerate(zip(batch["latent_segments"], batch["latent_budgets"])):
        for start, end, img in sorted(segs):
            inputs[b, start:end] = pool_visual_tokens(feats[k + img], end - start).to(embeds)
            forced[b, start:end] = True
        k += len(budgets)
    draw = torch.rand(B, S, device=embeds.device) < model.latent_settings.latent_teacher_forcing
    return forced & draw, inputs

def _alignment_targets(model, batch: dict[str, Any], p1: LatentPassOutput,
                       feats: list[torch.Tensor] | None = None) -> torch.Tensor:
    """Pooled CoT visual features, one row per active latent, in ``ce_patch_pos`` order (D4); ``feats``:
    the CoT features when already computed (:func:`_cot_features`)."""
    feats = _cot_features(model, batch) if feats is None else feats
    counts = [len(b) for b in batch["latent_budgets"]]
    if len(feats) != sum(counts):
        raise LatentInputError(
            f"batch has {sum(counts)} CoT images in latent_budgets but {len(feats)} in cot_image_grid_thw")
    targets, k = [], 0
    for b, segs in enumerate(batch["latent_segments"]):
        for (_s, _e, img), used in zip(sorted(segs), p1.latent_used_lens[b]):
            targets.append(pool_visual_tokens(feats[k + img], used))
        k += counts[b]
    if not targets:
        return p1.ce_patch_vec.new_zeros(0, p1.ce_patch_vec.shape[-1])
    return torch.cat(targets).to(p1.ce_patch_vec.device)

def _stop_label_tensors(model, batch, p1: LatentPassOutput, targets: list[list[int]] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``[B, S]`` stop labels and weights: every slot of every segment is labelled (weight 1).

    Pass 1 steps every slot of a segment, the slots after a stop as well (their logits are
    computed), so the design note's per-step labels apply to all of them, not only to the steps up
    to ``used_len``. The target length of segment ``i`` of sample ``b`` is ``targets[b][i]`` (in
    ``latent_segments`` order) when given, else the ratio target ``max(1, round(rho * B))``; either is
    raised to ``latent_min_used`` (at most ``B``), as the halting rule never stops a segment sooner.
    """
    B, S = batch["input_ids"].shape
    labels = torch.zeros(B, S)
    weights = torch.zeros(B, S)
    s = model.latent_settings
    for b, segs in enumerate(batch["latent_segments"]):
        for i, (start, end, _img) in enumerate(segs):
            budget = end - start
            target = stop_target_length(budget, s.latent_stop_target_ratio) if targets is None else targets[b][i]
            row = stop_labels_for_length(budget, min(budget, max(target, s.latent_min_used)))
            labels[b, start:end] = torch.tensor(row)
            weights[b, start:end] = 1.0
    device = p1.stop_logits.device
    return labels.to(device), weights.to(device)

def _answer_ce_per_sample(model, embeds: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
    kv_mask: torch.Tensor, labels: torch.Tensor, visual: VisualStack | None = None,
) -> torch.Tensor:
    """``[R]`` mean answer CE of each row (0 for a row without labels); one language-model call.

    The LM head runs on the labelled positions only (a real vocabulary is large).
    """
    hidden = model.model.language_model(
        inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids, use_cache=False,
        **model._gating_kwargs(kv_mask), **model.text_visual_kwargs(visual),
    ).last_hidden_state
    target = labels[:, 1:]
    r, c = (target != -100).nonzero(as_tuple=True)
    logits = model.lm_head(hidden[r, c]).float()
    tok = F.cross_entropy(logits, target[r, c], reduction="none")
    rows = embeds.shape[0]
    total = tok.new_zeros(rows).index_add_(0, r, tok)
    count = tok.new_zeros(rows).index_add_(0, r, torch.ones_like(tok))
    return total / count.clamp_min(1.0)

@torch.no_grad()
def _answer_stop_targets(model, batch: dict[str, Any], embeds: torch.Tensor, position_ids: torch.Tensor,
                         visual: VisualStack | None = None, full: LatentPassOutput | None = None,
                         ) -> tuple[list[list[int]], int]:
    """Content-aware stop targets (``latent_stop_target_mode="answer"``) and the model calls spent.

    1. Pass 1 at full budget, without gradient (every slot active): the latents a segment has if
       it never stops. A segment truncated to ``L`` keeps the first ``L`` of them, exactly what a
       pass that halts at ``L`` produces for that segment (pass 1 is causal).
    2. The answer CE of every sample with all slots active (the reference), one call.
    3. For each segment index ``i`` (the maximum over processes), one call on ``K`` copies of the
       samples that have a segment ``i``: copy ``j`` masks slots ``[start + L_j, end)`` of segment ``i``
       only (:func:`answer_target_candidates`), every other segment at full budget.
       ``K = min(latent_stop_target_points, largest budget - 1)`` (at least 1).
    4. Target of a segment: the shortest length from which every tried length is within
       ``latent_stop_target_tolerance`` of the reference CE (:func:`answer_stop_target`).

    The number of calls is ``(1 + pass-1 steps) + 1 + max segments``: it depends on the batch's
    layout only (maxima over processes), never on where samples halt. ``full``, when given, is step 1's
    pass already made (the full-budget CE's, D18): its calls are not counted again.
    """
    s = model.latent_settings
    input_ids, attention_mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    segments = batch["latent_segments"]
    B, S = input_ids.shape
    device = input_ids.device
    calls = 0
    if full is None:
        full = model.latent_pass(input_ids, attention_mask, embeds, position_ids, segments,
                                 batch["latent_budgets"], sample_ids=batch.get("ids"), full_budget=True,
                                 visual=visual)
        calls = full.num_model_calls
    patched = embeds.index_put((full.ce_patch_pos[:, 0], full.ce_patch_pos[:, 1]),
                               full.ce_patch_vec.to(embeds.dtype))
    keep = torch.ones(B, S, dtype=torch.bool, device=device)
    ref = _answer_ce_per_sample(model, patched, attention_mask, position_ids, keep, labels, visual).tolist()
    calls += 1
    M = max((len(segs) for segs in segments), default=0)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        t = torch.tensor([M], device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        M = int(t[0])
    P = s.latent_stop_target_points
    targets = [[0] * len(segs) for segs in segments]
    for i in range(M):
        rows = [b for b, segs in enumerate(segments) if i < len(segs)]
        # P copies, or fewer when every budget here is small (then every length is tried anyway). A
        # process with no segment i still makes the call, on one untruncated row.
        K = max(1, min(P, max([segments[b][i][1] - segments[b][i][0] - 1 for b in rows], default=1)))
        pick = torch.tensor(rows or [0], device=device)
        masks = keep[pick].repeat_interleave(K, dim=0)  # row r * K + j
        lengths: dict[int, list[int]] = {}
        for r, b in enumerate(rows):
            start, end, _img = segments[b][i]
            lengths[b] = answer_target_candidates(end - start, K)
            for j, length in enumerate(lengths[b]):
                masks[r * K + j, start + length:end] = False
        ce = _answer_ce_per_sample(model,
            patched[pick].repeat_interleave(K, dim=0), attention_mask[pick].repeat_interleave(K, dim=0),
            position_ids[:, pick].repeat_interleave(K, dim=1), masks, labels[pick].repeat_interleave(K, dim=0),
            None if visual is None else visual.take(pick.repeat_interleave(K)),
        ).view(len(pick), K).tolist()
        calls += 1
        for r, b in enumerate(rows):
            start, end, _img = segments[b][i]
            targets[b][i] = answer_stop_target(lengths[b], ce[r], ref[b], end - start,
                                               s.latent_stop_target_tolerance)
    return targets, calls

def _expected_cost(model, batch, p1: LatentPassOutput) -> torch.Tensor:
    probs = torch.sigmoid(p1.stop_logits)
    skip = model.latent_settings.latent_min_used - 1  # slots whose decision the halting rule ignores
    per_sample = []
    for b, segs in enumerate(batch["latent_segments"]):
        total = probs.new_zeros(())
        for start, end, _img in segs:
            seg = probs[b, start:end]
            if skip > 0:
                seg = torch.cat([seg.new_zeros(min(skip, seg.shape[0])), seg[skip:]])
            total = total + expected_length(seg)
        per_sample.append(total)
    return torch.stack(per_sample).mean()
