"""The design §8 checks, run on one batch before the first training step (of each stage).

1. every slot inside a segment is ``latent_token_id``;
2. every segment's length equals its budget (stage A's fixed length; in stage C the budget is the
   upper bound, and design §2 keeps the full-budget segments in the sequence);
3. pass 1 (``latent_mode=True``) returns, per segment, ``1 <= used_len <= budget`` and a
   ``latent_kv_mask`` that reads True...True False...False inside the segment (used_len Trues) and
   True everywhere else; in stage A ``used_len == budget`` and the mask is all True;
4. with ``latent_kv_mask`` False at every latent slot, pass 2's logits at every other position equal
   (within ``tolerance``, relative to the logit scale) the logits of the "no think" sequence: the same
   sample with its latent slots deleted, every other token keeping its position (design D2). With
   ``latent_null_scale > 0`` the slots are only softly suppressed, so the check reports the distance and
   is skipped.

:func:`run_checks` collects every result into a :class:`CheckReport`; :class:`PreflightError` carries a
failed report. A check that raises (e.g. the model rejecting bad segments) is reported as failed with
the exception's message.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from ..config import LatentSettings
from ..data.collator import to_device
from ..segments import segment_problems


@dataclass
class CheckResult:
    name: str
    passed: bool | None  # None = skipped
    detail: str = ""

    @property
    def status(self) -> str:
        return {True: "PASS", False: "FAIL", None: "SKIP"}[self.passed]


@dataclass
class CheckReport:
    stage: str
    results: list[CheckResult] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(r.passed is not False for r in self.results)

    @property
    def failed(self) -> list[CheckResult]:
        return [r for r in self.results if r.passed is False]

    def format(self) -> str:
        lines = [f"design §8 checks (stage {self.stage}): {'all passed' if self.ok else 'FAILED'}"]
        for r in self.results:
            lines.append(f"  [{r.status}] {r.name}" + (f": {r.detail}" if r.detail else ""))
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            "stage": self.stage,
            "ok": self.ok,
            "results": [{"name": r.name, "status": r.status, "detail": r.detail} for r in self.results],
        }


class PreflightError(RuntimeError):
    """A design §8 check failed; ``report`` says which and why."""

    def __init__(self, report: CheckReport):
        super().__init__(report.format())
        self.report = report


def _who(batch: dict[str, Any], b: int) -> str:
    ids = batch.get("ids")
    return f"sample {b}" + (f" (id {ids[b]!r})" if ids and b < len(ids) else "")


def _segments(batch: dict[str, Any]) -> list[list[tuple[int, int, int]]]:
    return [[tuple(int(v) for v in seg) for seg in segs] for segs in batch["latent_segments"]]


# ------------------------------------------------------------------------------------------- 1 and 2
def _segment_check(name: str, batch: dict[str, Any], kinds: tuple[str, ...], latent_token_id: int, stage: str,
                   passed_detail: str = "") -> CheckResult:
    """The problems of :func:`latentvl.segments.segment_problems` of the given kinds, as one result."""
    problems = [p.message for p in segment_problems(batch["input_ids"], batch["latent_segments"],
                                                    batch["latent_budgets"], latent_token_id, stage,
                                                    batch.get("ids"))
                if p.kind in kinds]
    if problems:
        return CheckResult(name, False, "; ".join(problems[:5]) + (" ..." if len(problems) > 5 else ""))
    return CheckResult(name, True, passed_detail)


def check_segment_tokens(batch: dict[str, Any], latent_token_id: int) -> CheckResult:
    """§8.1: every slot inside a segment (and inside the sequence) is ``latent_token_id``."""
    n = sum(len(segs) for segs in batch["latent_segments"])
    return _segment_check("1. every slot inside a segment is latent_token_id", batch, ("bounds", "tokens"),
                          latent_token_id, "A", f"{n} segments")


def check_segment_lengths(batch: dict[str, Any], stage: str) -> CheckResult:
    """§8.2: one segment per CoT image, each as long as its budget."""
    name = (
        "2. stage A: every segment length equals its budget"
        if stage == "A"
        else "2. every segment spans its full budget (design §2; the upper bound in stage C)"
    )
    return _segment_check(name, batch, ("count", "index", "budget", "length"), -1, stage)


# ------------------------------------------------------------------------------------------------ 3
def check_halting_masks(
    batch: dict[str, Any], stage: str, used_lens: list[list[int]], kv_mask: torch.Tensor
) -> CheckResult:
    """Check pass 1's ``latent_used_lens`` and ``latent_kv_mask`` against the segments (§8.3)."""
    name = (
        "3. stage C: used_len <= budget and each segment's mask reads True..True False..False"
        if stage == "C"
        else "3. stage A: every latent used and latent_kv_mask all True"
    )
    problems = []
    kv_mask = kv_mask.bool().cpu()
    inside = torch.zeros_like(kv_mask)
    total_used = total_budget = 0
    for b, (segs, budgets) in enumerate(zip(_segments(batch), batch["latent_budgets"], strict=True)):
        used_b = list(used_lens[b]) if b < len(used_lens) else []
        if len(used_b) != len(segs):
            problems.append(f"{_who(batch, b)}: {len(used_b)} used lengths for {len(segs)} segments")
            continue
        for i, ((start, end, img), used) in enumerate(zip(segs, used_b, strict=True)):
            budget = int(budgets[img])
            where = f"{_who(batch, b)}, segment {i}"
            total_used += used
            total_budget += budget
            inside[b, start:end] = True
            if not 1 <= used <= budget:
                problems.append(f"{where}: used_len {used} not in [1, budget={budget}]")
                continue
            if stage == "A" and used != budget:
                problems.append(f"{where}: stage A used_len {used} != budget {budget}")
            expect = torch.tensor([True] * used + [False] * (end - start - used))
            got = kv_mask[b, start:end]
            if not torch.equal(got, expect):
                pattern = "".join("T" if v else "F" for v in got.tolist())
                problems.append(f"{where}: mask {pattern}, expected {'T' * used}{'F' * (end - start - used)}")
    outside_false = (~kv_mask & ~inside).nonzero().tolist()
    if outside_false:
        b, p = outside_false[0]
        problems.append(f"{_who(batch, b)}: latent_kv_mask is False at position {p}, outside every segment")
    if problems:
        return CheckResult(name, False, "; ".join(problems[:5]) + (" ..." if len(problems) > 5 else ""))
    if total_budget == 0:
        return CheckResult(name, None, "no latent segments in this batch")
    ratio = total_used / total_budget
    return CheckResult(name, True, f"used/budget {total_used}/{total_budget} = {ratio:.3f}")


# ------------------------------------------------------------------------------------------------ 4
def _drop_latent_slots(batch: dict[str, Any], position_ids: torch.Tensor):
    """The "no think" batch: latent slots deleted, other tokens keep their (full-budget) positions."""
    ids, att = batch["input_ids"], batch["attention_mask"]
    mm = batch.get("mm_token_type_ids")
    B, S = ids.shape
    keep = torch.ones(B, S, dtype=torch.bool)
    for b, segs in enumerate(_segments(batch)):
        for start, end, _img in segs:
            keep[b, start:end] = False
    kept_cols = [keep[b].nonzero().flatten() for b in range(B)]
    S2 = max(len(c) for c in kept_cols)
    pad = ids.new_full((B, S2), int(ids[0, -1]) if S else 0)
    ids2, att2 = pad.clone(), torch.zeros(B, S2, dtype=att.dtype)
    mm2 = torch.zeros(B, S2, dtype=mm.dtype) if mm is not None else None
    pos2 = position_ids.new_zeros(position_ids.shape[0], B, S2)
    for b, cols in enumerate(kept_cols):
        n = len(cols)
        ids2[b, :n] = ids[b, cols]
        att2[b, :n] = att[b, cols]
        if mm2 is not None:
            mm2[b, :n] = mm[b, cols]
        pos2[:, b, :n] = position_ids[:, b, cols.to(position_ids.device)]
    return ids2, att2, mm2, pos2, keep, kept_cols


@torch.no_grad()
def check_no_think(
    model, batch: dict[str, Any], tolerance: float, kv_mask: torch.Tensor | None = None
) -> CheckResult:
    """§8.4. ``kv_mask`` replaces the all-False-at-latents mask (a test hook to show the check can fail)."""
    name = "4. latent_kv_mask all False at the latent slots gives the no-think output"
    segs = _segments(batch)
    settings = LatentSettings.from_config(model.config)
    device = next(model.parameters()).device
    on = to_device(batch, device)
    ids, att, mm = on["input_ids"], on["attention_mask"], on.get("mm_token_type_ids")
    pix, grid = on.get("pixel_values"), on.get("image_grid_thw")
    pos = model.compute_position_ids(ids, att, mm, grid)
    ids2, att2, mm2, pos2, keep, kept_cols = _drop_latent_slots(batch, pos.cpu())
    if kv_mask is None:
        kv_mask = keep.clone()
    # Both calls run on every process, latents or not, through embed_inputs (one vision call each, a
    # dummy image where the batch has none): distributed processes make the same calls in lockstep.
    embeds, visual = model.embed_inputs(ids, pix, grid, return_visual=True)
    logits = model(
        input_ids=ids,
        inputs_embeds=embeds,
        latent_visual=visual,
        attention_mask=att,
        position_ids=pos,
        mm_token_type_ids=mm,
        latent_kv_mask=kv_mask.to(device),
    ).logits.float()
    ids2 = ids2.to(device)
    embeds2, visual2 = model.embed_inputs(ids2, pix, grid, return_visual=True)
    logits2 = model(
        input_ids=ids2,
        inputs_embeds=embeds2,
        latent_visual=visual2,
        attention_mask=att2.to(device),
        position_ids=pos2.to(device),
        mm_token_type_ids=mm2.to(device) if mm2 is not None else None,
    ).logits.float()
    if not any(segs):
        return CheckResult(name, None, "no latent segments in this batch")
    # NaN is a failure: comparisons are written "not (x <= y)" so that a NaN wins every max and fails
    # the final "rel <= tolerance" (garbled weights give NaN logits, never a difference of 0)
    worst, worst_where, scale = 0.0, "", 1.0
    for b, cols in enumerate(kept_cols):
        real = att[b, cols.to(device)].bool()
        n = len(cols)
        a = logits[b, cols.to(device)][real]
        c = logits2[b, :n][real]
        if a.numel() == 0:
            continue
        c_max = float(c.abs().max())
        if not c_max <= scale and not math.isnan(scale):
            scale = c_max
        diff = (a - c).abs().max(dim=-1).values  # max propagates NaN
        j = int(torch.where(diff.isnan(), float("inf"), diff).argmax())
        if not float(diff[j]) <= worst and not math.isnan(worst):
            worst = float(diff[j])
            worst_where = f"{_who(batch, b)}, position {int(cols[real.cpu()][j])}"
    rel = worst / scale
    detail = f"max |logit difference| {worst:.3g} (relative {rel:.3g}, tolerance {tolerance:g})"
    if worst_where:
        detail += f" at {worst_where}"
    if settings.latent_null_scale > 0:
        return CheckResult(
            name,
            None,
            f"latent_null_scale={settings.latent_null_scale} > 0 (soft gating): {detail}; "
            "exact check skipped",
        )
    if math.isnan(rel):
        detail += " (not a number: non-finite logits)"
    return CheckResult(name, bool(rel <= tolerance), detail)


# ------------------------------------------------------------------------------------------- all four
@torch.no_grad()
def run_checks(
    model, batch: dict[str, Any], stage: str, threshold: float | None = None, tolerance: float = 1e-4
) -> CheckReport:
    """Run the four checks on ``batch`` with ``model`` (the plain latent model, not a DDP wrapper).

    Every process of a distributed run must call it (pass 1 all-reduces its step count).
    """
    was_training = model.training
    model.eval()  # no dropout: the checks are deterministic and draw nothing from the RNG
    try:
        return _run_checks(model, batch, stage, threshold, tolerance)
    finally:
        model.train(was_training)


def _run_checks(
    model, batch: dict[str, Any], stage: str, threshold: float | None, tolerance: float
) -> CheckReport:
    settings = LatentSettings.from_config(model.config)
    report = CheckReport(stage)
    report.results.append(
        _guard(
            "1. every slot inside a segment is latent_token_id",
            lambda: check_segment_tokens(batch, settings.latent_token_id),
        )
    )
    report.results.append(_guard("2. segment lengths", lambda: check_segment_lengths(batch, stage)))

    def third() -> CheckResult:
        get = to_device(batch, next(model.parameters()).device)
        out = model(
            input_ids=get["input_ids"],
            attention_mask=get["attention_mask"],
            pixel_values=get.get("pixel_values"),
            image_grid_thw=get.get("image_grid_thw"),
            mm_token_type_ids=get.get("mm_token_type_ids"),
            latent_mode=True,
            latent_segments=batch["latent_segments"],
            latent_budgets=batch["latent_budgets"],
            latent_threshold=threshold,
        )
        return check_halting_masks(batch, stage, out.latent_used_lens, out.latent_kv_mask)

    report.results.append(_guard("3. pass 1 used lengths and latent_kv_mask", third))
    report.results.append(_guard("4. no-think equivalence", lambda: check_no_think(model, batch, tolerance)))
    return report


def _guard(name: str, fn) -> CheckResult:
    try:
        return fn()
    except Exception as err:  # a check that cannot even run has failed; say why
        return CheckResult(name, False, f"{type(err).__name__}: {err}")
