"""Write a synthetic task as a dataset: ``images/*.png``, ``train``/``val``/``test.jsonl``, ``annotations.jsonl``
and ``meta.json``.

``latentvl make-data --task relay --n 1000 --seed 0 --out data/maze`` writes ``images/*.png``,
``train.jsonl``, ``val.jsonl``, ``test.jsonl`` (the format of :mod:`latentvl.data.records`, paths relative
to the output directory), ``annotations.jsonl`` (the generator's ground-truth structure per record) and
``meta.json`` (task, sizes, answer set, chance accuracy, knobs). The output is byte-identical for the same
task, n, seed and knobs. Every file is written to a temporary name first and moved into place, so a
killed run never leaves a half-written file behind; ``meta.json`` is written last (and removed first when
overwriting), so a folder without it holds an incomplete dataset.

:func:`make_dataset` writes the tasks of :data:`latentvl.data.tasks.registry.TASKS` (answers balanced per
split; a task with a ``question_key``, such as a5, keeps each question in one split, so no val or test
question is a train question, and each split owns its share of every difficulty and answer that has
questions enough); :func:`make_relay_bands` writes :mod:`latentvl.data.tasks.relay_bands` (hops and answers balanced).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ...fileio import write_atomic
from . import relay_bands
from .common import Sample, jsonl_bytes, png_bytes
from .registry import TASKS, check_knobs, task_answers

__all__ = ["make_dataset", "make_relay_bands"]

_IMAGE_NAME = re.compile(r"^[a-z]+-\d+-(q|cot)\d+\.png$")
_MAX_DRAWS = 10_000  # draws per record for a question of its split (a task with a question_key)
_SAME_DIFFICULTY_DRAWS = 1_000  # ... of which, at the first draw's difficulty


def _split_sizes(n: int, val_fraction: float, test_fraction: float) -> dict[str, int]:
    n_val = int(round(n * val_fraction))
    n_test = int(round(n * test_fraction))
    n_train = n - n_val - n_test
    if n_train < 1:
        raise ValueError(f"n={n} leaves no training records with these val/test fractions")
    return {"train": n_train, "val": n_val, "test": n_test}


def _question_hash(task: str, seed: int, key: str) -> float:
    """A seeded hash of question ``key``, uniform over [0, 1)."""
    digest = hashlib.sha256(f"{task}:{seed}:split:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def _split_of_question(task: str, seed: int, key: str, sizes: dict[str, int]) -> str:
    """The split that owns question ``key`` when its task does not list it by stratum: the seeded hash cut in
    the splits' shares."""
    u, edge, total = _question_hash(task, seed, key), 0.0, sum(sizes.values())
    for split, size in sizes.items():
        edge += size / total
        if u < edge:
            return split
    return next(s for s in reversed(sizes) if sizes[s])


def _shares(m: int, sizes: dict[str, int], turn: int = 0) -> tuple[dict[str, int], int]:
    """``m`` questions of one stratum cut in the splits' shares of the records (largest remainder), each split
    with records getting at least one while the largest split keeps at least half of the stratum; where both
    cannot hold, the smaller splits give up their one in turns (``turn`` counts the strata so cut, so
    consecutive ones favour different splits). A split without records gets none. Returns the shares and the
    next ``turn``."""
    live = sorted((s for s in sizes if sizes[s]), key=lambda s: -sizes[s])
    total = sum(sizes.values())
    exact = {s: m * sizes[s] / total for s in live}
    share = {s: max(1, int(exact[s])) for s in live}
    largest, keep, smaller = live[0], -(-m // 2), live[1:]
    cut = False
    while sum(share.values()) > m:
        if share[largest] > keep or not smaller:
            share[largest] -= 1
            continue
        held = [s for s in smaller if share[s]]
        share[held[turn % len(held)]] -= 1
        cut = True
    for s in sorted(live, key=lambda s: share[s] - exact[s])[: m - sum(share.values())]:
        share[s] += 1
    return {s: share.get(s, 0) for s in sizes}, turn + int(cut)


def _question_owners(task: str, seed: int, k: dict[str, Any], sizes: dict[str, int]) -> dict[str, str]:
    """The split that owns each question its task lists by stratum (``Task.question_strata``): each stratum's
    questions, ordered by the seeded hash, cut in the splits' shares (:func:`_shares`), so every split owns
    questions of every (difficulty, answer) that has enough of them, and the training split at least half of
    each. Empty for a task that lists none."""
    strata = TASKS[task].question_strata
    owners: dict[str, str] = {}
    turn = int(_question_hash(task, seed, "turn") * 1024)  # which small stratum favours which split
    for _stratum, keys in sorted((strata(k) if strata is not None else {}).items(), key=lambda kv: str(kv[0])):
        ranked = sorted(keys, key=lambda key: _question_hash(task, seed, key))
        start = 0
        shares, turn = _shares(len(ranked), sizes, turn)
        for split, count in shares.items():
            owners.update(dict.fromkeys(ranked[start:start + count], split))
            start += count
    return owners


def _balanced_targets(answers: tuple[str, ...], size: int, rng: random.Random) -> list[str]:
    targets = [answers[i % len(answers)] for i in range(size)]
    rng.shuffle(targets)
    return targets


def _chance(counts: Counter, size: int) -> float | None:
    return max(counts.values()) / size if size else None


def _difficulty_counts(rows: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    values = Counter(r["difficulty"] for split_rows in rows.values() for r in split_rows if "difficulty" in r)
    return {"difficulty_counts": {str(v): values[v] for v in sorted(values)}} if values else {}


def make_dataset(task: str, n: int, seed: int, out: str | os.PathLike[str], **knobs: Any) -> dict[str, Any]:
    """Generate ``n`` records of ``task`` into ``out`` and return the metadata written to ``meta.json``.

    Knobs (defaults in :data:`latentvl.data.tasks.registry.DEFAULT_KNOBS`): ``val_fraction``,
    ``test_fraction``, ``min_cot``, ``max_cot`` (CoT images per record), ``min_size``/``max_size`` (image
    side range in px, sides are multiples of 28), maze: ``min_grid``/``max_grid``/``min_moves``, shapes:
    ``max_shapes``, relay: ``colours``/``min_hops``/``max_hops``, a5: ``min_hops``/``max_hops``; and
    ``overwrite`` (default False: refuse to write into a directory that already holds a dataset).
    Deterministic: the same arguments give byte-identical files.
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose from {sorted(TASKS)}")
    if n < 1:
        raise ValueError(f"n={n} must be >= 1")
    overwrite = bool(knobs.get("overwrite", False))
    k = check_knobs(task, knobs)
    out = Path(out)
    sizes = _split_sizes(n, k["val_fraction"], k["test_fraction"])
    image_dir = _prepare_output(out, sizes, overwrite)
    rows, annotations, written = _write_samples(task, seed, k, sizes, image_dir)
    for split, split_rows in rows.items():
        write_atomic(out / f"{split}.jsonl", jsonl_bytes(split_rows))
    write_atomic(out / "annotations.jsonl", jsonl_bytes(annotations))
    meta = _dataset_meta(task, n, seed, k, rows, annotations)
    write_atomic(out / "meta.json", (json.dumps(meta, indent=2) + "\n").encode("utf-8"))
    if overwrite:  # drop images of an earlier, larger run so the folder matches the records
        for old in image_dir.iterdir():
            if _IMAGE_NAME.match(old.name) and old.name not in written:
                old.unlink()
    return meta


def _prepare_output(out: Path, sizes: dict[str, int], overwrite: bool) -> Path:
    """Refuse a folder that holds a dataset unless ``overwrite``; create ``images/``; remove ``meta.json``
    (written last: while it is missing the folder is an incomplete dataset). Returns the image folder."""
    existing = [
        name for name in ("meta.json", "annotations.jsonl", *(f"{s}.jsonl" for s in sizes)) if (out / name).exists()
    ]
    if existing and not overwrite:
        raise FileExistsError(
            f"{out} already holds a dataset ({', '.join(existing)}); use --overwrite (overwrite=True) to replace it"
        )
    image_dir = out / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    (out / "meta.json").unlink(missing_ok=True)
    return image_dir


def _write_samples(task: str, seed: int, k: dict[str, Any], sizes: dict[str, int], image_dir: Path
                   ) -> tuple[dict[str, list[dict[str, Any]]], list[dict[str, Any]], set[str]]:
    """Draw every split's samples (answers balanced per split, one seeded generator per record), write their
    images, and return the records by split, the annotations and the image names written."""
    answers = task_answers(task, k)
    written: set[str] = set()
    rows: dict[str, list[dict[str, Any]]] = {s: [] for s in sizes}
    annotations: list[dict[str, Any]] = []
    index = 0
    barren: set[tuple[str, str, Any]] = set()  # (split, answer, difficulty) without a question of the split
    owners = _question_owners(task, seed, k, sizes)

    def owner(key: str) -> str:
        return owners.get(key) or _split_of_question(task, seed, key, sizes)
    for split, size in sizes.items():
        targets = _balanced_targets(answers, size, random.Random(f"{task}:{seed}:targets:{split}"))
        for target in targets:
            rec_id = f"{task}-{index:05d}"
            sample = _draw_sample(task, seed, index, split, target, k, owner, barren)
            names = [f"{rec_id}-q{j}.png" for j in range(len(sample.images))]
            cot_names = [f"{rec_id}-cot{j}.png" for j in range(len(sample.cot_images))]
            for name, img in zip(names + cot_names, sample.images + sample.cot_images, strict=True):
                write_atomic(image_dir / name, png_bytes(img), sync=False)
                written.add(name)
            rows[split].append(
                {
                    "id": rec_id,
                    "question": sample.question,
                    "images": [f"images/{x}" for x in names],
                    "cot_images": [f"images/{x}" for x in cot_names],
                    "answer": sample.answer,
                    **sample.record_fields,
                }
            )
            annotations.append({"id": rec_id, "split": split, "answer": sample.answer, **sample.annotation})
            index += 1
    return rows, annotations, written


def _draw_sample(task: str, seed: int, index: int, split: str, target: str, k: dict[str, Any],
                 owner: Callable[[str], str], barren: set[tuple[str, str, Any]]) -> Sample:
    """Record ``index``'s sample (answer ``target``) from its own seeded generator.

    A task with a ``question_key`` draws until the question belongs to ``split`` (``owner``: see
    :func:`_question_owners`), so no question is in two splits. It keeps the first draw's ``difficulty``
    while it can, so each split's difficulties keep the generator's shares rather than those of the questions
    the split happens to own; a (split, answer, difficulty) with no question found in
    :data:`_SAME_DIFFICULTY_DRAWS` draws is noted in ``barren`` and later takes the first question of the split
    at any difficulty. ValueError naming the task, split and answer when the knobs leave none.
    """
    spec = TASKS[task]
    rng = random.Random(f"{task}:{seed}:sample:{index}")
    sample = spec.make(rng, target, k)
    if spec.question_key is None:
        return sample
    cell = (split, target, sample.record_fields.get("difficulty"))
    fallback = None
    for draw in range(_MAX_DRAWS):
        if owner(spec.question_key(sample)) == split:
            if cell in barren or sample.record_fields.get("difficulty") == cell[2]:
                return sample
            fallback = fallback or sample
        if draw + 1 == _SAME_DIFFICULTY_DRAWS and cell not in barren:
            barren.add(cell)
            if fallback is not None:
                return fallback
        sample = spec.make(rng, target, k)
    knobs = ", ".join(f"{name}={k[name]}" for name in spec.knobs)
    raise ValueError(
        f"{task}: no {split} question with answer {target!r} in {_MAX_DRAWS} draws; questions are kept to one split "
        f"each, and the knobs ({knobs}) leave too few distinct questions (raise max_hops)"
    )


def _dataset_meta(task: str, n: int, seed: int, k: dict[str, Any], rows: dict[str, list[dict[str, Any]]],
                  annotations: list[dict[str, Any]]) -> dict[str, Any]:
    """``meta.json``: the task, answer set and counts, chance per split, CoT and difficulty counts, knobs."""
    spec = TASKS[task]
    answers = task_answers(task, k)
    all_counts = Counter(r["answer"] for split_rows in rows.values() for r in split_rows)
    cot_counts = Counter(len(r["cot_images"]) for split_rows in rows.values() for r in split_rows)
    sides = [a["side"] for a in annotations]
    splits_meta = {}
    for split, split_rows in rows.items():
        counts = Counter(r["answer"] for r in split_rows)
        splits_meta[split] = {
            "file": f"{split}.jsonl",
            "size": len(split_rows),
            "answer_counts": {a: counts.get(a, 0) for a in answers},
            "chance_accuracy": _chance(counts, len(split_rows)),
            **_difficulty_counts({split: split_rows}),
        }
    meta = {
        "task": task,
        "n": n,
        "seed": seed,
        "question": spec.question,
        "answer_rule": spec.rule,
        "answer_set": list(answers),
        "answer_counts": {a: all_counts.get(a, 0) for a in answers},
        "chance_accuracy": _chance(all_counts, n),
        "chance_method": (
            "rate of the most frequent answer over all records (per split under 'splits'); answers are "
            "balanced within each split by construction, so this is 1/|answer_set| when the split size "
            "is a multiple of |answer_set|"
        ),
        "splits": splits_meta,
        "split_rule": (
            "each question is owned by one split (a seeded hash of the question): no val or test question is a "
            "train question; where the questions of one difficulty and answer are few, each split owns its share "
            "of them, at least one while the training split keeps at least half"
            if spec.question_key is not None else "records drawn independently for each split"
        ),
        "cot_images_per_record": {str(m): cot_counts[m] for m in sorted(cot_counts)},
        **_difficulty_counts(rows),
        "image_side_px": {"min": min(sides), "max": max(sides)},
        "knobs": {key: k[key] for key in ("val_fraction", "test_fraction", *spec.knobs)},
        "annotations": "annotations.jsonl",
    }
    if spec.baselines is not None:
        meta["heuristic_baselines"] = {
            "what": "accuracy over all records of rules that look only at the question image, without "
            "tracing the solution (a model above these uses more than local cues)",
            **spec.baselines(annotations),
        }
    return meta




def make_relay_bands(n: int, seed: int, out: str | os.PathLike[str], overwrite: bool = False,
                     **knobs: Any) -> dict[str, Any]:
    """Write ``n`` records (train/val/test JSONL, images, annotations, ``meta.json``) into ``out``.

    Hops cycle through ``min_hops..max_hops`` and answers through the palette independently, so both are
    balanced within each split. Deterministic: the same arguments give byte-identical files.
    """
    k = relay_bands.check_knobs(knobs)
    if n < 1:
        raise ValueError(f"relay_bands: n={n} must be >= 1")
    out = Path(out)
    if (out / "meta.json").exists() and not overwrite:
        raise FileExistsError(f"{out} already holds a dataset (meta.json); pass overwrite=True to replace it")
    images = out / "images"
    images.mkdir(parents=True, exist_ok=True)
    (out / "meta.json").unlink(missing_ok=True)
    n_test = int(round(n * k["test_fraction"]))
    n_val = int(round(n * k["val_fraction"]))
    sizes = {"train": n - n_val - n_test, "val": n_val, "test": n_test}
    letters = list(relay_bands.PALETTE)[: k["colours"]]
    hop_values = list(range(k["min_hops"], k["max_hops"] + 1))
    rows: dict[str, list[dict[str, Any]]] = {s: [] for s in sizes}
    annotations = []
    index = 0
    for split, size in sizes.items():
        split_rng = random.Random(f"relay_bands:{seed}:{split}")
        hops = [hop_values[i % len(hop_values)] for i in range(size)]
        targets = [letters[i % len(letters)] for i in range(size)]
        split_rng.shuffle(hops)
        split_rng.shuffle(targets)
        for m, target in zip(hops, targets):
            rec_id = f"relay_bands-{index:05d}"
            sample = relay_bands.relay_bands_sample(random.Random(f"relay_bands:{seed}:sample:{index}"), m, target, k)
            q_name, c_name = f"{rec_id}-q0.png", f"{rec_id}-cot0.png"
            write_atomic(images / q_name, png_bytes(sample.images[0]), sync=False)
            write_atomic(images / c_name, png_bytes(sample.cot_images[0]), sync=False)
            rows[split].append({"id": rec_id, "question": sample.question, "images": [f"images/{q_name}"],
                                "cot_images": [f"images/{c_name}"], "answer": sample.answer, "difficulty": m})
            annotations.append({"id": rec_id, "split": split, "answer": sample.answer, **sample.annotation})
            index += 1
    for split, split_rows in rows.items():
        write_atomic(out / f"{split}.jsonl", jsonl_bytes(split_rows))
    write_atomic(out / "annotations.jsonl", jsonl_bytes(annotations))
    splits = {}
    for split, split_rows in rows.items():
        counts = Counter(r["answer"] for r in split_rows)
        splits[split] = {
            "file": f"{split}.jsonl",
            "size": len(split_rows),
            "answer_counts": {a: counts.get(a, 0) for a in letters},
            "difficulty_counts": dict(sorted(Counter(r["difficulty"] for r in split_rows).items())),
            "chance_accuracy": max(counts.values()) / len(split_rows) if split_rows else None,
        }
    total = Counter(r["answer"] for split_rows in rows.values() for r in split_rows)
    meta = {
        "task": "relay_bands",
        "n": n,
        "seed": seed,
        "question": "{m} hops?",
        "answer_rule": "palette letter of f^m(c0): the start tile's colour followed m times through the rule cells",
        "answer_set": letters,
        "chance_accuracy": max(total.values()) / n,
        "chance_method": "rate of the most frequent answer (answers are balanced by construction)",
        "difficulty": "number of hops m; the CoT strip has the same size for every m",
        "splits": splits,
        "knobs": k,
        "annotations": "annotations.jsonl",
    }
    write_atomic(out / "meta.json", (json.dumps(meta, indent=2) + "\n").encode("utf-8"))
    return meta
