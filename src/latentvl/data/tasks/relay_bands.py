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
also carries ``"difficulty": m`` (records ignore unknown keys; evaluation reads it). The writer is
:func:`latentvl.data.tasks.writer.make_relay_bands`.
"""

from __future__ import annotations

import random
from typing import Any

from PIL import Image

from ..palettes import RELAY_BANDS_PALETTE
from .common import Sample

__all__ = ["PALETTE", "RELAY_BANDS_DEFAULTS", "RULES", "check_knobs", "relay_bands_sample"]

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


def check_knobs(knobs: dict[str, Any]) -> dict[str, Any]:
    """``knobs`` over :data:`RELAY_BANDS_DEFAULTS`, checked (``cells`` filled in); ValueError if not."""
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
    k = check_knobs(dict(knobs or {}))
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
