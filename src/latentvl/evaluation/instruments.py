"""Instruments of ``latentvl eval`` that ask what the latents carry, on any data and checkpoint.

Records may carry optional fields beyond the JSONL format's required ones; the instruments use them when
they are there and skip (saying so) when they are not:

- ``difficulty`` (a number or string): accuracy is also reported per difficulty value;
- ``cot_states`` (one JSON value per CoT image): the state that CoT image shows. The linear probe asks
  whether segment i's latents decode ``cot_states[i]``; the implant asks whether the answer follows an
  implanted state. Which answer a state implies is the one thing only the task knows: it comes from
  :func:`latentvl.data.tasks.registry.implied_answer`, keyed by the task name (a record's ``task`` field, else
  the ``task`` of the ``meta.json`` beside the data), and a task without such a function gets no
  follow rate (the implant's answer-change rate is still reported).
- ``latent_states`` (one list per CoT image, one JSON value per latent of its segment at full budget):
  the state each pooled group of the image shows, e.g. a strip of cells with one state per latent. With
  it the instruments work per latent instead of per segment (the *unit* below is then one latent,
  numbered across the record's segments in order); it is used where every segment used its full budget.

What each instrument does (all on the same greedy two-step inference as the accuracy):

- **truncation**: for j = 0, 1, ..., only the latents of the first j units (CoT segments, or latents) are
  kept; the later ones are masked out of attention in step 2 (j = 0 is the mask check). Counted over the
  samples with more than j units.
- **implant**: for each sample one unit j is drawn (seeded); its latent inputs are replaced, during
  step 1, by the latents another sample produced for a unit showing a different state s (same number of
  latents, and for latent units the same position; state known, and an implied answer that differs from
  the sample's prediction), so the later latent steps continue from s. ``follow_rate``: the new answer
  is the one s implies (for the relay task ``f^(k-j)(s)``); ``unchanged_rate``: the answer stays as it
  was.
- **linear probe**: per unit index i, a multinomial logistic regression from a latent vector to the
  state of its CoT image, fit on the latents of a separate set of records (e.g. the train split) and
  scored on the evaluated records; reported with the majority-class rate of the fitting set.
"""

from __future__ import annotations

import json
import random
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..inference.generate import BatchOutcome, GenerationSettings, LatentInference, Patches, normalize_answer
from .causal import step_overrides, truncate_latents

__all__ = [
    "InstrumentRunner",
    "accuracy_by_difficulty",
    "collect_segment_latents",
    "fit_linear_probe",
    "read_record_fields",
    "record_fields",
    "state_units",
    "task_of_data",
]


def read_record_fields(path: str | Path) -> dict[str, dict[str, Any]]:
    """Every record of a JSONL file as its raw JSON object, by id (lines that are not records are skipped)."""
    out: dict[str, dict[str, Any]] = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(obj, dict) and isinstance(obj.get("id"), str):
                out[obj["id"]] = obj
    return out


def task_of_data(path: str | Path) -> str | None:
    """The ``task`` named by the ``meta.json`` beside a JSONL file, if any."""
    from ..data.records import load_metadata

    meta = load_metadata(path) or {}
    task = meta.get("task")
    return task if isinstance(task, str) else None


def record_fields(record: Any, extra: Mapping[str, Mapping[str, Any]] | None) -> dict[str, Any]:
    """A record's optional fields: the record itself when it is a dict, else ``extra[record.id]``."""
    if isinstance(record, Mapping):
        return dict(record)
    rid = getattr(record, "id", None)
    return dict((extra or {}).get(rid, {})) if rid is not None else {}


@dataclass(frozen=True)
class Unit:
    """One instrumented piece of a record's latents: ``count`` latents from latent ``offset`` (counted across
    the record's segments in order), showing ``state``."""

    index: int
    offset: int
    count: int
    state: Any


def state_units(fields: Mapping[str, Any], used_lens: Sequence[int]) -> tuple[str, list[Unit]] | None:
    """``("latent", units)`` from ``latent_states`` (when every segment used exactly as many latents as
    it lists), else ``("segment", units)`` from ``cot_states`` (one per segment); None when neither fits."""
    per_latent = fields.get("latent_states")
    if (isinstance(per_latent, list) and len(per_latent) == len(used_lens)
            and all(isinstance(x, list) and len(x) == u for x, u in zip(per_latent, used_lens))):
        flat = [state for seg in per_latent for state in seg]
        return "latent", [Unit(i, i, 1, state) for i, state in enumerate(flat)]
    states = fields.get("cot_states")
    if isinstance(states, list) and len(states) == len(used_lens):
        offsets = [sum(used_lens[:i]) for i in range(len(used_lens))]
        return "segment", [Unit(i, o, u, st) for i, (o, u, st) in enumerate(zip(offsets, used_lens, states))]
    return None


def _hashable(state: Any) -> Any:
    return json.dumps(state, sort_keys=True) if isinstance(state, (dict, list)) else state


def accuracy_by_difficulty(rows: Sequence[Mapping[str, Any]], fields: Sequence[Mapping[str, Any]]
                           ) -> dict[str, dict[str, Any]]:
    """``{difficulty: {"n", "accuracy"}}`` over the rows without errors whose record has ``difficulty``.

    Keys are the values as strings, in numeric order when they are all numbers.
    """
    groups: dict[Any, list[bool]] = defaultdict(list)
    for row, f in zip(rows, fields, strict=True):
        d = f.get("difficulty")
        if row.get("error") is None and d is not None and not isinstance(d, (dict, list)):
            groups[d].append(bool(row["correct"]))
    numeric = all(isinstance(k, (int, float)) and not isinstance(k, bool) for k in groups)
    keys = sorted(groups) if numeric else sorted(groups, key=str)
    return {str(k): {"n": len(groups[k]), "accuracy": sum(groups[k]) / len(groups[k])} for k in keys}


class InstrumentRunner:
    """Runs truncation and implant on each batch after the normal answers and keeps the latents.

    ``fields[i]`` are record i's optional fields; ``task`` selects the implied-answer function.
    """

    def __init__(self, engine: LatentInference, gen: GenerationSettings, fields: Sequence[Mapping[str, Any]],
                 task: str | None, seed: int = 0, truncation: bool = True, implant: bool = True,
                 bank_size: int = 512) -> None:
        self.engine = engine
        self.gen = gen
        self.fields = fields
        self.task = task
        self.rng = random.Random(seed)
        self.truncation = truncation
        self.implant = implant
        self.bank: list[tuple[str, int, int, Any, torch.Tensor]] = []  # (kind, unit, latents, state, vectors)
        self.bank_size = bank_size
        self.unit_kinds: Counter = Counter()
        self.trunc_answers: dict[int, dict[int, str]] = defaultdict(dict)  # keep -> index -> answer
        self.implants: dict[int, dict[str, Any]] = {}
        self.probe_rows: list[tuple[int, torch.Tensor, Any]] = []  # (unit, vector, state)

    def _fields(self, index: int) -> Mapping[str, Any]:
        return self.fields[index] if index < len(self.fields) else {}

    def __call__(self, outcome: BatchOutcome) -> None:
        p1 = outcome.latent
        results = outcome.results
        if p1 is None or not any(sum(r.used_lens) for r in results):
            return
        units = [state_units(self._fields(r.index), r.used_lens) for r in results]
        for r, found in zip(results, units, strict=True):
            if found is None or r.latents is None:
                continue
            kind, row_units = found
            self.unit_kinds[kind] += 1
            for u in row_units:
                v = r.latents[u.offset:u.offset + u.count]
                self.probe_rows.extend((u.index, x, u.state) for x in v)
                if v.shape[0]:
                    self.bank.append((kind, u.index, v.shape[0], u.state, v))
        self.bank = self.bank[-self.bank_size:]

        base = Patches.from_pass(p1)
        if self.truncation:
            self._truncate(outcome, base, units)
        if self.implant:
            self._implant(outcome, units)

    def _truncate(self, outcome: BatchOutcome, base: Patches, units) -> None:
        """Answers with only the first ``keep`` units kept, for every ``keep`` below a row's unit count."""
        batch, results = outcome.batch, outcome.results
        latent_rows = {b for b, u in enumerate(units) if u is not None and u[0] == "latent"}
        counts = [len(units[b][1]) if b in latent_rows else len(r.used_lens) for b, r in enumerate(results)]
        for keep in range(max(counts)):
            patches = truncate_latents(base, batch["input_ids"], batch["latent_segments"], keep, latent_rows)
            decoded = self.engine.decode(self.engine.generate(batch, outcome.embeds, patches, self.gen,
                                                              outcome.visual))
            for b, (r, (text, _ids, _fin)) in enumerate(zip(results, decoded, strict=True)):
                if counts[b] > keep and sum(r.used_lens):
                    self.trunc_answers[keep][r.index] = text

    def _implant(self, outcome: BatchOutcome, units) -> None:
        from ..data.tasks.registry import implied_answer

        segs_by_row = [sorted(s, key=lambda x: x[2]) for s in outcome.batch["latent_segments"]]
        plan: dict[tuple[int, int], torch.Tensor] = {}
        chosen: dict[int, dict[str, Any]] = {}
        for b, r in enumerate(outcome.results):
            if units[b] is None or not sum(r.used_lens):
                continue
            kind, row_units = units[b]
            fields = self._fields(r.index)
            task = fields.get("task") if isinstance(fields.get("task"), str) else self.task
            unit = self.rng.choice([u for u in row_units if u.count > 0])
            options = []
            for bank_kind, index, n, state, vecs in self.bank:
                if bank_kind != kind or n != unit.count or _hashable(state) == _hashable(unit.state):
                    continue
                if kind == "latent" and index != unit.index:
                    continue
                implied = implied_answer(task, fields, unit.index, state)
                if implied is not None and normalize_answer(implied) == normalize_answer(r.answer):
                    continue  # following and staying would look the same
                options.append((state, vecs, implied, index))
            if not options:
                continue
            state, vecs, implied, source = self.rng.choice(options)
            for t, column in enumerate(_latent_columns(segs_by_row[b], r.used_lens)[unit.offset:][:unit.count]):
                plan[(b, column)] = vecs[t]
            chosen[b] = {"segment": unit.index, "state": state, "implied": implied, "source_unit": source}
        if not chosen:
            return
        with step_overrides(self.engine.model, plan):
            p1 = self.engine.latent_pass(outcome.batch, outcome.embeds, outcome.visual)
        decoded = self.engine.decode(self.engine.generate(outcome.batch, outcome.embeds, Patches.from_pass(p1),
                                                          self.gen, outcome.visual))
        for b, info in chosen.items():
            r = outcome.results[b]
            self.implants[r.index] = {**info, "answer": decoded[b][0], "before": r.answer}

    @property
    def unit(self) -> str:
        """What the instruments counted in: ``latent`` when the records had ``latent_states``, else ``segment``."""
        return "latent" if self.unit_kinds["latent"] > self.unit_kinds["segment"] else "segment"

    def summary(self, rows: Mapping[int, Mapping[str, Any]]) -> dict[str, Any]:
        """``truncation`` (per kept segments), ``implant`` and the probe's test rows (``probe_rows``)."""
        trunc = {}
        for keep in sorted(self.trunc_answers):
            got = self.trunc_answers[keep]
            correct = [normalize_answer(a) == normalize_answer(rows[i]["gold"]) for i, a in got.items()]
            changed = [normalize_answer(a) != normalize_answer(rows[i]["prediction"]) for i, a in got.items()]
            trunc[str(keep)] = {"n": len(got), "accuracy": _mean(correct),
                                "accuracy_base": _mean([bool(rows[i]["correct"]) for i in got]),
                                "answer_change_rate": _mean(changed)}
        imp = list(self.implants.values())
        known = [x for x in imp if x["implied"] is not None]
        by_seg: dict[int, list[dict[str, Any]]] = defaultdict(list)
        for x in known:
            by_seg[x["segment"]].append(x)

        def follow(xs):
            return _mean([normalize_answer(x["answer"]) == normalize_answer(x["implied"]) for x in xs])

        implant = {
            "n": len(imp),
            "n_with_implied_answer": len(known),
            "follow_rate": follow(known),
            "unchanged_rate": _mean([normalize_answer(x["answer"]) == normalize_answer(x["before"]) for x in imp]),
            "by_segment": {str(j): {"n": len(xs), "follow_rate": follow(xs)} for j, xs in sorted(by_seg.items())},
            "rule": f"one {self.unit} per sample (seeded draw) gets, during step 1, the latents another sample "
                    "produced for a different state; follow = the answer that state implies",
        }
        return {"truncation": trunc, "implant": implant, "instrument_unit": self.unit}


def _latent_columns(segments: Sequence[tuple[int, int, int]], used_lens: Sequence[int]) -> list[int]:
    """The batch columns of a row's used latents, in order (segments sorted by image index)."""
    return [start + t for (start, _end, _img), used in zip(segments, used_lens) for t in range(used)]


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


@torch.no_grad()
def collect_segment_latents(engine: LatentInference, records: Sequence[Any],
                            fields: Sequence[Mapping[str, Any]], batch_size: int = 16
                            ) -> list[tuple[int, torch.Tensor, Any]]:
    """``(segment index, latent vector, state)`` for every latent of the records with ``cot_states``.

    Runs step 1 only (no answer is generated).
    """
    out: list[tuple[int, torch.Tensor, Any]] = []
    todo = [(i, r) for i, r in enumerate(records) if fields[i].get("cot_states") or fields[i].get("latent_states")]
    for start in range(0, len(todo), batch_size):
        chunk = todo[start:start + batch_size]
        prepared = [engine.prepare(r, i, 1) for i, r in chunk]
        batch = engine.collate(prepared)
        embeds, visual = engine.encode(batch, return_visual=True)
        p1 = engine.latent_pass(batch, embeds, visual)
        if p1 is None:
            return out
        from ..inference.generate import split_latents

        per_row = split_latents(p1, len(prepared))
        for b, (i, _r) in enumerate(chunk):
            found = state_units(fields[i], p1.latent_used_lens[b])
            if found is None:
                continue
            for u in found[1]:
                out.extend((u.index, x, u.state) for x in per_row[b][u.offset:u.offset + u.count])
    return out


def _fit_softmax(x: torch.Tensor, y: torch.Tensor, classes: int, weight_decay: float, steps: int
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """L2-regularised multinomial logistic regression by L-BFGS: weights ``[H, classes]`` and bias."""
    w = torch.zeros(x.shape[1], classes, dtype=x.dtype, requires_grad=True)
    bias = torch.zeros(classes, dtype=x.dtype, requires_grad=True)
    opt = torch.optim.LBFGS([w, bias], max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(x @ w + bias, y) + weight_decay * w.square().sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach(), bias.detach()


def fit_linear_probe(train: Sequence[tuple[int, torch.Tensor, Any]], test: Sequence[tuple[int, torch.Tensor, Any]],
                     weight_decay: float = 1e-3, steps: int = 200) -> dict[str, dict[str, Any]]:
    """Per segment index: a softmax regression from a latent ``[H]`` to its state, fit on ``train``.

    Returns ``{segment: {"n_train", "n_test", "classes", "accuracy", "majority"}}`` (test accuracy; the
    majority rate is that of the most frequent training state on the test rows).
    """
    out: dict[str, dict[str, Any]] = {}
    segments = sorted({j for j, _, _ in train} & {j for j, _, _ in test})
    for j in segments:
        tr = [(v, _hashable(s)) for k, v, s in train if k == j]
        te = [(v, _hashable(s)) for k, v, s in test if k == j]
        classes = sorted({s for _, s in tr}, key=str)
        index = {c: i for i, c in enumerate(classes)}
        majority = Counter(s for _, s in tr).most_common(1)[0][0]
        maj_rate = sum(s == majority for _, s in te) / len(te)
        if len(classes) < 2:
            out[str(j)] = {"n_train": len(tr), "n_test": len(te), "classes": len(classes),
                           "accuracy": maj_rate, "majority": maj_rate}
            continue
        x = torch.stack([v.float() for v, _ in tr]).double()
        y = torch.tensor([index[s] for _, s in tr])
        mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
        x = (x - mean) / std
        w, bias = _fit_softmax(x, y, len(classes), weight_decay, steps)
        xt = (torch.stack([v.float() for v, _ in te]).double() - mean) / std
        with torch.no_grad():
            pred = (xt @ w + bias).argmax(1).tolist()
        acc = sum(classes[p] == s for p, (_, s) in zip(pred, te)) / len(te)
        out[str(j)] = {"n_train": len(tr), "n_test": len(te), "classes": len(classes),
                       "accuracy": acc, "majority": maj_rate}
    return out
