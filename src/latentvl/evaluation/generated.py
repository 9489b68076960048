"""Generated-answer evaluation: greedy two-step inference (design §9) on records, exact match, latent usage,
speed, the causal checks and the instruments.

:func:`evaluate_generated` measures and returns the report (every key in ``docs/inference.md``);
:func:`latentvl.reports.evaluation.evaluate` measures and writes the report files, and ``latentvl eval``
(:mod:`latentvl.commands.eval`) runs it from the command line. Answers are compared by exact match after
:func:`~latentvl.inference.generate.normalize_answer`.
"""

from __future__ import annotations

import contextlib
import math
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ..inference.generate import (
    BatchOutcome,
    GenerationSettings,
    InferenceResult,
    LatentInference,
    Patches,
    normalize_answer,
)
from .alignment import AlignmentProbe
from .causal import CHECK_RULES, CHECKS, DonorPool, effective_rank, mask_latents, noise_latents, swap_latents
from .instruments import (
    InstrumentRunner,
    accuracy_by_difficulty,
    collect_segment_latents,
    fit_linear_probe,
    record_fields,
)
from .metrics import MEAN_USED_OVER_BUDGET, USED_RATIO, mean_used_over_budget, used_ratio

__all__ = ["chance_from_metadata", "evaluate_generated"]


def _gold(record: Any) -> str | None:
    value = record.get("answer") if isinstance(record, dict) else getattr(record, "answer", None)
    return value if isinstance(value, str) else None


def _batch_seconds(timings: dict[str, float]) -> float:
    return timings["encode_s"] + timings["latent_pass_s"] + timings["generation_s"]


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


class _CausalRunner:
    """Runs the three checks on each batch after the normal answers, and collects their answers."""

    def __init__(self, engine: LatentInference, gen: GenerationSettings, seed: int,
                 max_rank_rows: int = 8192):
        self.engine = engine
        self.max_rank_rows = max_rank_rows
        self.gen = gen
        self.pool = DonorPool()
        self.noise_gen = torch.Generator().manual_seed(seed)
        self.answers: dict[str, dict[int, str]] = {name: {} for name in CHECKS}
        self.latents: list[torch.Tensor] = []  # the first max_rank_rows vectors, for the effective rank
        self.kept = 0

    def __call__(self, outcome: BatchOutcome) -> None:
        p1 = outcome.latent
        results = outcome.results
        latents = [r.latents for r in results]
        for x in latents:
            if x is not None and x.shape[0] > 0 and self.kept < self.max_rank_rows:
                self.latents.append(x[: self.max_rank_rows - self.kept])
                self.kept += self.latents[-1].shape[0]
        has_latents = [sum(r.used_lens) > 0 for r in results]
        if p1 is None or not any(has_latents):
            return
        base = Patches.from_pass(p1)
        structures = [tuple(r.used_lens) for r in results]
        donors = self.pool.donors(structures, latents)
        variants = {
            "mask": mask_latents(base, outcome.batch["input_ids"], self.engine.latent_token_id),
            "swap": swap_latents(base, donors) if any(d is not None for d in donors) else None,
            "noise": noise_latents(base, self.noise_gen),
        }
        for name, patches in variants.items():
            if patches is None:
                continue
            new_tokens = self.engine.generate(outcome.batch, outcome.embeds, patches, self.gen, outcome.visual)
            decoded = self.engine.decode(new_tokens)
            for b, (r, (text, _ids, _fin)) in enumerate(zip(results, decoded, strict=True)):
                if has_latents[b] and (name != "swap" or donors[b] is not None):
                    self.answers[name][r.index] = text

    def summary(self, rows: dict[int, dict[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name in CHECKS:
            got = self.answers[name]
            n = len(got)
            base_correct = [rows[i]["correct"] for i in got]
            correct = [normalize_answer(a) == normalize_answer(rows[i]["gold"]) for i, a in got.items()]
            changed = [normalize_answer(a) != normalize_answer(rows[i]["prediction"]) for i, a in got.items()]
            out[name] = {
                "n": n,
                "accuracy": _mean(correct),
                "accuracy_base": _mean(base_correct),
                "answer_change_rate": _mean(changed),
                "rule": CHECK_RULES[name],
            }
            for i, a in got.items():
                rows[i][f"prediction_{name}"] = a
        stacked = torch.cat(self.latents) if self.latents else torch.zeros(0, 0)
        rank = effective_rank(stacked) if stacked.numel() else math.nan
        out["effective_rank"] = {
            "value": None if math.isnan(rank) else rank,
            "num_vectors": int(stacked.shape[0]),
            "dim": int(stacked.shape[1]) if stacked.ndim == 2 and stacked.numel() else None,
            "max_possible": int(min(stacked.shape)) if stacked.numel() else None,
        }
        return out


def evaluate_generated(
    model: Any,
    processor: Any,
    records: Sequence[Any],
    batch_size: int = 8,
    max_new_tokens: int = 16,
    threshold: float | None = None,
    causal_checks: bool = True,
    use_latents: bool = True,
    chance_accuracy: float | None = None,
    default_num_segments: int = 1,
    seed: int = 0,
    extra_errors: Sequence[dict[str, Any]] = (),
    fields: Mapping[str, Mapping[str, Any]] | None = None,
    task: str | None = None,
    instruments: bool = True,
    probe_records: Sequence[Any] | None = None,
    probe_fields: Mapping[str, Mapping[str, Any]] | None = None,
    engine: LatentInference | None = None,
) -> dict[str, Any]:
    """Answer every record greedily and measure; :func:`latentvl.reports.evaluation.evaluate` also writes
    the report files.

    ``records``: :class:`~latentvl.data.records.Record` objects or dicts (``answer`` is the gold
    answer). ``use_latents=False`` evaluates a model trained without latent segments (no step 1, no
    causal checks). ``extra_errors`` (``{"id", "kind", "error"}``) are samples that failed before this
    call (e.g. invalid JSONL lines) and are counted as errors.

    Instruments (:mod:`latentvl.evaluation.instruments`): ``fields`` maps a record id to its raw JSON
    object (for records that are not dicts), whose optional ``difficulty`` and ``cot_states`` enable
    accuracy by difficulty, the implant's follow rate and the linear probe; ``task`` names the task for
    the implied answers. With ``instruments`` (and latents and causal checks on), truncation and implant
    run; with ``probe_records`` (and ``probe_fields``), the linear probe is fit on their latents.

    ``engine``: the inference engine to answer with (e.g. a
    :class:`~latentvl.inference.vllm_engine.VLLMInference`, built on ``model`` and ``processor`` with the same
    ``threshold``, ``use_latents`` and ``default_num_segments``); default a :class:`LatentInference`.

    Returns the report (see ``docs/inference.md`` for every key) with ``predictions`` (one dict per
    record, in order) added.
    """
    if engine is None:
        engine = LatentInference(model, processor, threshold=threshold, use_latents=use_latents,
                                 default_num_segments=default_num_segments)
    gen = GenerationSettings(max_new_tokens=max_new_tokens)
    do_causal = causal_checks and use_latents
    causal = _CausalRunner(engine, gen, seed) if do_causal else None
    alignment = AlignmentProbe(model, engine.collator.image_processor) if do_causal else None
    rec_fields = [record_fields(r, fields) for r in records]
    instr = InstrumentRunner(engine, gen, rec_fields, task, seed) if do_causal and instruments else None
    results, batch_times = _answer_all(engine, records, gen, batch_size, use_latents, causal, alignment, instr)
    rows = _graded_rows(results, records)
    report = _summarise(rows, batch_times, chance_accuracy, extra_errors)
    report["accuracy_by_difficulty"] = accuracy_by_difficulty([rows[i] for i in sorted(rows)],
                                                              [rec_fields[i] for i in sorted(rows)])
    probe = None
    if instr is not None and probe_records is not None and instr.probe_rows:
        probe = _fit_probe(engine, instr, probe_records, probe_fields, batch_size)
    if threshold is None:
        threshold = getattr(model.config, "latent_stop_threshold", None)
    report.update(
        use_latents=use_latents,
        stage=getattr(model.config, "latent_mode_stage", None),
        threshold=threshold,
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
        causal=causal.summary(rows) if causal is not None else None,
        alignment=alignment.summary() if alignment is not None else None,
        **(instr.summary(rows) if instr is not None
           else {"truncation": None, "implant": None, "instrument_unit": None}),
        probe=probe,
    )
    return {**report, "predictions": [rows[i] for i in sorted(rows)]}


@contextlib.contextmanager
def _eval_mode(model: Any):
    """``model`` in eval mode inside the block, its training flag restored after."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _answer_all(engine: LatentInference, records: Sequence[Any], gen: GenerationSettings, batch_size: int,
                use_latents: bool, causal: _CausalRunner | None, alignment: AlignmentProbe | None,
                instr: InstrumentRunner | None) -> tuple[list[InferenceResult], list[float]]:
    """Every record's result (in record order) and each batch's wall time; the checks and instruments
    see every batch as it runs."""
    results: list[InferenceResult] = []
    batch_times: list[float] = []
    with _eval_mode(engine.model):
        for outcome, errors in engine.iter_batches(records, gen, batch_size, return_latents=use_latents):
            results.extend(errors)
            if outcome is None:
                continue
            results.extend(outcome.results)
            batch_times.append(_batch_seconds(outcome.results[0].timings))
            if causal is not None:
                causal(outcome)
                alignment(outcome.results, records)
            if instr is not None:
                instr(outcome)
            for r in outcome.results:
                r.latents = None  # only the causal and alignment checks need them
    results.sort(key=lambda r: r.index)
    return results, batch_times


def _graded_rows(results: list[InferenceResult], records: Sequence[Any]) -> dict[int, dict[str, Any]]:
    """One row per record index: the result's fields, ``gold``, ``prediction`` and ``correct``."""
    rows: dict[int, dict[str, Any]] = {}
    for r in results:
        gold = _gold(records[r.index])
        row = r.to_dict()
        row.update(gold=gold, prediction=r.answer)
        row["correct"] = r.ok and gold is not None and normalize_answer(r.answer) == normalize_answer(gold)
        del row["answer"]
        rows[r.index] = row
    return rows


def _fit_probe(engine: LatentInference, instr: InstrumentRunner, probe_records: Sequence[Any],
               probe_fields: Mapping[str, Mapping[str, Any]] | None, batch_size: int) -> dict[str, Any] | None:
    """The linear probe fit on ``probe_records``' latents, scored on the evaluated records' latents."""
    p_fields = [record_fields(r, probe_fields) for r in probe_records]
    with _eval_mode(engine.model):
        train_rows = collect_segment_latents(engine, probe_records, p_fields, batch_size)
    return fit_linear_probe(train_rows, instr.probe_rows) if train_rows else None


def _summarise(
    rows: dict[int, dict[str, Any]], batch_times: list[float], chance: float | None,
    extra_errors: Sequence[dict[str, Any]],
) -> dict[str, Any]:
    ok = [r for r in rows.values() if r["error"] is None]
    errors = [{"id": r["id"], "kind": r["error_kind"], "error": r["error"]}
              for r in rows.values() if r["error"]]
    errors += [dict(e) for e in extra_errors]
    n_correct = sum(r["correct"] for r in ok)
    n_total = len(rows) + len(extra_errors)

    used_all, budget_all = [], []
    by_budget: dict[int, Counter] = defaultdict(Counter)
    by_total: dict[int, list[bool]] = defaultdict(list)
    for r in ok:
        for u, b in zip(r["used_lens"], r["budgets"]):
            used_all.append(u)
            budget_all.append(b)
            by_budget[b][u] += 1
        by_total[sum(r["used_lens"])].append(r["correct"])

    latency = [_batch_seconds(r["timings"]) for r in ok]
    total_time = sum(batch_times)
    return {
        "n_samples": n_total,
        "n_evaluated": len(ok),
        "n_errors": len(errors),
        "n_correct": n_correct,
        "accuracy": n_correct / len(ok) if ok else None,
        "accuracy_errors_as_wrong": n_correct / n_total if n_total else None,
        "chance_accuracy": chance,
        "latents": {
            "num_images": len(used_all),
            "mean_used_per_image": _mean(used_all),
            "mean_budget_per_image": _mean(budget_all),
            MEAN_USED_OVER_BUDGET: mean_used_over_budget(used_all, budget_all),
            USED_RATIO: used_ratio(used_all, budget_all),
            "mean_used_per_sample": _mean([sum(r["used_lens"]) for r in ok]),
            "by_budget": {
                str(b): {"count": c.total(), "mean_used": sum(u * n for u, n in c.items()) / c.total(),
                         "hist": {str(u): c[u] for u in sorted(c)}}
                for b, c in sorted(by_budget.items())
            },
        },
        "accuracy_by_latents_used": {
            str(k): {"n": len(v), "accuracy": sum(v) / len(v)} for k, v in sorted(by_total.items())
        },
        "timing": {
            "latency_s_per_sample": _mean(latency),
            **{f"{part}_per_sample": _mean([r["timings"][part] / r["timings"]["batch_size"] for r in ok])
               for part in ("encode_s", "latent_pass_s", "generation_s")},
            "throughput_samples_per_s": len(ok) / total_time if total_time > 0 else None,
            "total_s": total_time,
            "num_batches": len(batch_times),
        },
        "errors": errors,
    }


def chance_from_metadata(data_path: str | Path) -> float | None:
    """Chance accuracy from the ``meta.json`` beside the data: its split's when named there, else overall."""
    from ..data.records import load_metadata

    meta = load_metadata(data_path)
    if not meta:
        return None
    name = Path(data_path).name
    for split in (meta.get("splits") or {}).values():
        if isinstance(split, dict) and split.get("file") == name and split.get("chance_accuracy") is not None:
            return float(split["chance_accuracy"])
    value = meta.get("chance_accuracy")
    return float(value) if value is not None else None
