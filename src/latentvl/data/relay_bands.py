"""``relay_bands``: a colour relay whose number of hops varies while every segment's budget stays the same.

A task for learned halting (stage C): the difficulty of a segment (its number of hops ``m``) varies, but
its CoT image, and so its latent budget (design §3), has the same size for every ``m``, so the budget says
nothing about the difficulty. A stop target that follows the content can learn ``m``; a fixed ratio
cannot.

One sample:

- **question image**: one row of ``C + 1`` merged tokens (28 x 28 px each, ``28 x 28(C+1)`` px): token 0 is
  the start tile, filled with the start colour ``c0``; tokens ``1..C`` are the rule cells of a random
  single ``C``-cycle ``f`` over the palette, at shuffled positions, each cell's left 14 px half colour
  ``a`` and right half ``f(a)`` (the patch merger concatenates the four 14 px patches of a token, so the
  two halves stay distinct inside one token);
- **question text**: ``"{m} hops?"``;
- **answer**: the palette letter of ``c_m = f^m(c0)``; the ``f^j(c0)`` are distinct for ``j < C``;
- **one CoT image**: a strip of ``cells`` merged tokens (``28 x 28*cells`` px, the same for every ``m``);
  cell ``j`` shows ``c_{min(j+1, m)}``: the chain one hop per cell, then its last colour held.

Why the chain is held rather than stretched over ``m`` bands: a latent is computed before the stop head
decides where its segment ends, so its content cannot depend on the used length. With held cells, latent
``j`` aligns to ``c_{j+1}`` (one lookup per latent step) until the chain is done, and every latent from
``m-1`` on carries the answer: a segment needs exactly ``m`` latents, which is the stop target an answer-
driven rule should find. Pooled into fewer groups (stage C's alignment, D4) the last group is still the
final colour whenever ``used >= m``.

Knob ``rule``: ``"table"`` (default) draws a random ``C``-cycle per sample in the question image, as above:
a hop is a lookup in the image, which no single forward can chain. ``"fixed"`` uses one cycle for every
sample (the palette order R -> G -> B -> Y -> M -> R), learned into the weights; the question image is then
the start tile alone (56 x 56 px). The fixed rule is learnable within minutes on the tiny model, the
drawn table is not (at chance after 600 stage-A steps), but a fixed rule can also be applied ``m`` times in
one forward, so the latents are not necessary for it.

``annotations.jsonl`` holds the palette order, ``f``, ``c0``, the chain and ``m`` per record; each record
also carries ``"difficulty": m`` (records ignore unknown keys; evaluation reads it).
"""

from __future__ import annotations

import json
import os
import random
from collections import Counter
from pathlib import Path
from typing import Any

from PIL import Image

from ..fileio import write_atomic
from .palettes import RELAY_BANDS_PALETTE
from .synthetic import Sample, _jsonl, _png_bytes

__all__ = ["PALETTE", "RELAY_BANDS_DEFAULTS", "make_relay_bands", "relay_bands_sample"]

TOKEN_PX = 28  # one merged visual token (2 x 2 patches of 14 px)
HALF_PX = TOKEN_PX // 2
PALETTE = RELAY_BANDS_PALETTE  # latentvl.data.palettes
RULES = ("table", "fixed")
RELAY_BANDS_DEFAULTS: dict[str, Any] = {
    "colours": 5,
    "min_hops": 1,
    "max_hops": 4,
    "cells": None,  # CoT strip length in tokens; None = max_hops
    "rule": "table",  # "table": a random cycle drawn per sample; "fixed": one cycle for every sample, not drawn
    "val_fraction": 0.1,
    "test_fraction": 0.1,
}


def _check(knobs: dict[str, Any]) -> dict[str, Any]:
    unknown = set(knobs) - set(RELAY_BANDS_DEFAULTS)
    if unknown:
        raise ValueError(f"relay_bands: unknown knob(s) {sorted(unknown)}; known: {sorted(RELAY_BANDS_DEFAULTS)}")
    k = {**RELAY_BANDS_DEFAULTS, **knobs}
    for name in ("colours", "min_hops", "max_hops"):
        if isinstance(k[name], bool) or not isinstance(k[name], int):
            raise ValueError(f"relay_bands: {name}={k[name]!r} must be an integer")
    if not 3 <= k["colours"] <= len(PALETTE):
        raise ValueError(f"relay_bands: colours={k['colours']} must be in [3, {len(PALETTE)}]")
    if not 1 <= k["min_hops"] <= k["max_hops"]:
        raise ValueError(f"relay_bands: need 1 <= min_hops <= max_hops, got {k['min_hops']}, {k['max_hops']}")
    if k["max_hops"] >= k["colours"]:
        raise ValueError(
            f"relay_bands: max_hops={k['max_hops']} must be < colours={k['colours']} (the chain must not repeat)")
    if k["rule"] not in RULES:
        raise ValueError(f"relay_bands: rule={k['rule']!r} must be one of {RULES}")
    if k["cells"] is None:
        k["cells"] = k["max_hops"]
    if isinstance(k["cells"], bool) or not isinstance(k["cells"], int) or k["cells"] < k["max_hops"]:
        raise ValueError(f"relay_bands: cells={k['cells']!r} must be an integer >= max_hops={k['max_hops']}")
    for name in ("val_fraction", "test_fraction"):
        if not 0.0 <= float(k[name]) < 1.0:
            raise ValueError(f"relay_bands: {name}={k[name]} must be in [0, 1)")
    if k["val_fraction"] + k["test_fraction"] >= 1.0:
        raise ValueError("relay_bands: val_fraction + test_fraction must be < 1")
    return k


def _fill(img: Image.Image, x0: int, width: int, rgb: tuple[int, int, int]) -> None:
    img.paste(rgb, (x0, 0, x0 + width, TOKEN_PX))


def relay_bands_sample(rng: random.Random, hops: int, target: str, knobs: dict[str, Any] | None = None) -> Sample:
    """One sample with ``hops`` hops whose answer is the palette letter ``target``."""
    k = _check(dict(knobs or {}))
    letters = list(PALETTE)[: k["colours"]]
    if target not in letters:
        raise ValueError(f"relay_bands: target {target!r} is not one of the palette letters {letters}")
    if not k["min_hops"] <= hops <= k["max_hops"]:
        raise ValueError(f"relay_bands: hops={hops} outside [{k['min_hops']}, {k['max_hops']}]")
    order = letters[:]
    if k["rule"] == "table":
        rng.shuffle(order)
    f = {order[i]: order[(i + 1) % len(order)] for i in range(len(order))}  # a single C-cycle
    # start where the chain of `hops` steps ends at the target
    c0 = target
    for _ in range(hops):
        c0 = next(a for a, b in f.items() if b == c0)
    chain = [c0]
    for _ in range(hops):
        chain.append(f[chain[-1]])
    if chain[-1] != target:
        raise RuntimeError(f"relay_bands: chain {chain} does not end at {target!r}")

    n = len(letters)
    if k["rule"] == "table":
        question = Image.new("RGB", (TOKEN_PX * (n + 1), TOKEN_PX))
        _fill(question, 0, TOKEN_PX, PALETTE[c0])
        sources = letters[:]
        rng.shuffle(sources)
        for pos, a in enumerate(sources, start=1):
            _fill(question, pos * TOKEN_PX, HALF_PX, PALETTE[a])
            _fill(question, pos * TOKEN_PX + HALF_PX, HALF_PX, PALETTE[f[a]])
    else:  # the rule is the palette order itself, learned from the data: the image is the start tile alone
        question = Image.new("RGB", (2 * TOKEN_PX, 2 * TOKEN_PX), PALETTE[c0])
        sources = []
    cells = k["cells"]
    strip = Image.new("RGB", (TOKEN_PX * cells, TOKEN_PX))
    for j in range(cells):
        _fill(strip, j * TOKEN_PX, TOKEN_PX, PALETTE[chain[min(j + 1, hops)]])
    annotation = {"difficulty": hops, "c0": c0, "chain": chain, "f": f, "rule_positions": sources}
    return Sample(question=f"{hops} hops?", answer=target, images=[question], cot_images=[strip],
                  annotation=annotation)


def make_relay_bands(n: int, seed: int, out: str | os.PathLike[str], overwrite: bool = False,
                     **knobs: Any) -> dict[str, Any]:
    """Write ``n`` records (train/val/test JSONL, images, annotations, ``meta.json``) into ``out``.

    Hops cycle through ``min_hops..max_hops`` and answers through the palette independently, so both are
    balanced within each split. Deterministic: the same arguments give byte-identical files.
    """
    k = _check(knobs)
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
    letters = list(PALETTE)[: k["colours"]]
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
            sample = relay_bands_sample(random.Random(f"relay_bands:{seed}:sample:{index}"), m, target, k)
            q_name, c_name = f"{rec_id}-q0.png", f"{rec_id}-cot0.png"
            write_atomic(images / q_name, _png_bytes(sample.images[0]), sync=False)
            write_atomic(images / c_name, _png_bytes(sample.cot_images[0]), sync=False)
            rows[split].append({"id": rec_id, "question": sample.question, "images": [f"images/{q_name}"],
                                "cot_images": [f"images/{c_name}"], "answer": sample.answer, "difficulty": m})
            annotations.append({"id": rec_id, "split": split, "answer": sample.answer, **sample.annotation})
            index += 1
    for split, split_rows in rows.items():
        write_atomic(out / f"{split}.jsonl", _jsonl(split_rows))
    write_atomic(out / "annotations.jsonl", _jsonl(annotations))
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
