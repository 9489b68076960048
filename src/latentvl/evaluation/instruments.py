"""Instruments of ``latentvl eval`` that ask what the latents carry, on any data and checkpoint.

Records may carry optional fields beyond the JSONL format's required ones; the instruments use them when
they are there and skip (saying so) when they are not:

- ``difficulty`` (a number or string): accuracy is also reported per difficulty value;
- ``cot_states`` (one JSON value per CoT image): the state that CoT image shows. The linear probe asks
  whether segment i's latents decode ``cot_states[i]``; the implant asks whether the answer follows an
  implanted state. Which answer a state implies is the one thing only the task knows: it comes from
  :func:`latentvl.data.synthetic.implied_answer`, keyed by the task name (a record's ``task`` field, else
  the ``task`` of the ``meta.json`` beside the data), and a task without such a function gets no
  follow rate (the implant's answer-change rate is still reported).

What each instrument does (all on the same greedy two-step inference as the accuracy):

- **truncation**: for j = 0, 1, ..., only the latents of the first j CoT segments are kept; the later
  segments' slots are masked out of attention in step 2 (j = 0 is the mask check). Counted over the
  samples with more than j segments.
- **implant**: for each sample one segment j is drawn (seeded); its latent inputs are replaced, during
  step 1, by the latents another sample produced for a segment showing a different state s (same
  number of latents, state known, and an implied answer that differs from the sample's prediction), so
  the later latent steps continue from s. ``follow_rate``: the new answer is the one s implies (for the
  relay task ``f^(k-j)(s)``); ``unchanged_rate``: the answer stays as it was.
- **linear probe**: per segment index i, a multinomial logistic regression from a latent vector to the
  state of its CoT image, fit on the latents of a separate set of records (e.g. the train split) and
  scored on the evaluated records; reported with the majority-class rate of the fitting set.
"""

from __future__ import annotations

import json
import random
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
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


def _states(fields: Mapping[str, Any], segments: int) -> list[Any] | None:
    states = fields.get("cot_states")
    if isinstance(states, list) and len(states) == segments:
        return states
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


def _segment_vectors(latents: torch.Tensor | None, used_lens: Sequence[int]) -> list[torch.Tensor]:
    if latents is None:
        return []
    return list(torch.split(latents, list(used_lens)))


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
        self.bank: list[tuple[int, Any, torch.Tensor]] = []  # (used latents, state, vectors)
        self.bank_size = bank_size
        self.trunc_answers: dict[int, dict[int, str]] = defaultdict(dict)  # keep -> index -> answer
        self.implants: dict[int, dict[str, Any]] = {}
        self.probe_rows: list[tuple[int, torch.Tensor, Any]] = []  # (segment, vector, state)

    def _fields(self, index: int) -> Mapping[str, Any]:
        return self.fields[index] if index < len(self.fields) else {}

    def __call__(self, outcome: BatchOutcome) -> None:
        p1 = outcome.latent
        results = outcome.results
        if p1 is None or not any(sum(r.used_lens) for r in results):
            return
        batch, embeds = outcome.batch, outcome.embeds
        segs_by_row = [sorted(s, key=lambda x: x[2]) for s in batch["latent_segments"]]
        per_seg = [_segment_vectors(r.latents, r.used_lens) for r in results]
        states = [_states(self._fields(r.index), len(r.used_lens)) for r in results]
        for vecs, st in zip(per_seg, states, strict=True):
            if st is None:
                continue
            for j, v in enumerate(vecs):
                self.probe_rows.extend((j, x, st[j]) for x in v)
                if v.shape[0]:
                    self.bank.append((v.shape[0], st[j], v))
        self.bank = self.bank[-self.bank_size:]

        base = Patches.from_pass(p1)
        if self.truncation:
            max_m = max(len(r.used_lens) for r in results)
            for keep in range(max_m):
                patches = truncate_latents(base, batch["input_ids"], batch["latent_segments"], keep)
                decoded = self.engine.decode(self.engine.generate(batch, embeds, patches, self.gen))
                for r, (text, _ids, _fin) in zip(results, decoded, strict=True):
                    if len(r.used_lens) > keep and sum(r.used_lens):
                        self.trunc_answers[keep][r.index] = text
        if self.implant:
            self._implant(outcome, segs_by_row, per_seg, states)

    def _implant(self, outcome: BatchOutcome, segs_by_row, per_seg, states) -> None:
        from ..data.synthetic import implied_answer

        plan: dict[tuple[int, int], torch.Tensor] = {}
        chosen: dict[int, dict[str, Any]] = {}
        for b, r in enumerate(outcome.results):
            if states[b] is None or not sum(r.used_lens):
                continue
            fields = self._fields(r.index)
            task = fields.get("task") if isinstance(fields.get("task"), str) else self.task
            segments = [j for j, u in enumerate(r.used_lens) if u > 0]
            j = self.rng.choice(segments)
            used = r.used_lens[j]
            options = []
            for n, state, vecs in self.bank:
                if n != used or _hashable(state) == _hashable(states[b][j]):
                    continue
                implied = implied_answer(task, fields, j, state)
                if implied is not None and normalize_answer(implied) == normalize_answer(r.answer):
                    continue  # following and staying would look the same
                options.append((state, vecs, implied))
            if not options:
                continue
            state, vecs, implied = self.rng.choice(options)
            start = segs_by_row[b][j][0]
            for t in range(used):
                plan[(b, start + t)] = vecs[t]
            chosen[b] = {"segment": j, "state": state, "implied": implied}
        if not chosen:
            return
        with step_overrides(self.engine.model, plan):
            p1 = self.engine.latent_pass(outcome.batch, outcome.embeds)
        decoded = self.engine.decode(self.engine.generate(outcome.batch, outcome.embeds, Patches.from_pass(p1),
                                                          self.gen))
        for b, info in chosen.items():
            r = outcome.results[b]
            self.implants[r.index] = {**info, "answer": decoded[b][0], "before": r.answer}

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
            "rule": "one segment per sample (seeded draw) gets, during step 1, the latents another sample "
                    "produced for a different state; follow = the answer that state implies",
        }
        return {"truncation": trunc, "implant": implant}


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
    todo = [(i, r) for i, r in enumerate(records) if fields[i].get("cot_states")]
    for start in range(0, len(todo), batch_size):
        chunk = todo[start:start + batch_size]
        prepared = [engine.prepare(r, i, 1) for i, r in chunk]
        batch = engine.collate(prepared)
        embeds = engine.encode(batch)
        p1 = engine.latent_pass(batch, embeds)
        if p1 is None:
            return out
        from ..inference.generate import split_latents

        per_row = split_latents(p1, len(prepared))
        for b, (i, _r) in enumerate(chunk):
            st = _states(fields[i], len(p1.latent_used_lens[b]))
            if st is None:
                continue
            for j, v in enumerate(torch.split(per_row[b], list(p1.latent_used_lens[b]))):
                out.extend((j, x, st[j]) for x in v)
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
