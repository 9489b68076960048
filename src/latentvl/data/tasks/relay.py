"""``relay``: a serial colour lookup, one hop per CoT image.

A serial lookup task. The question image is a grid of 28 px tiles (each tile is exactly one merged
visual token): for each of C colours a one rule tile whose left half is ``a`` and right half
``f(a)``, with ``f`` a random single C-cycle, and one start tile (left half grey, right half the
start colour ``c0``); positions are shuffled. The question gives the number of hops k; the answer
is the letter of ``f^k(c0)``.
The CoT images are plain swatches of ``c0, f(c0), ..., f^k(c0)`` (k + 1 images, one per state), so
each latent segment can carry one colour and each step does one lookup. There is no shortcut:
every colour is once a source and once a target, positions are random and the ``f^j(c0)`` are
distinct, so a model that resolves fewer than k hops is near chance. Records carry ``difficulty``
(k), ``cot_states`` (the colour letter of each CoT image) and ``rule`` (``{a: f(a)}``), which the
implant instrument of ``latentvl eval`` uses (:func:`relay_implied_answer`).
"""

from __future__ import annotations

import math
import random
from typing import Any

from PIL import Image, ImageDraw

from ..palettes import RELAY_COLOURS
from .common import SIDE_STEP, WHITE, Sample

__all__ = ["KNOBS", "RELAY_QUESTION", "RULE", "check_knobs", "relay_answers", "relay_implied_answer", "sample"]

KNOBS = ("colours", "min_hops", "max_hops")  # meta.json order
RULE = ("letter of f^k(c0): follow the rule tiles (left half -> right half) k times from the start tile "
        "(grey -> c0)")
RELAY_QUESTION = "Relay hops: {k}"
# The answer is the colour's letter (latentvl.data.palettes); ``colours`` takes the first C of them.
RELAY_START = (128, 128, 128)  # left half of the start tile
RELAY_TILE = SIDE_STEP  # one rule tile = one merged visual token (2x2 patches of 14 px)
RELAY_SWATCH = 2 * SIDE_STEP  # CoT swatch side: 4 visual tokens (the tiny processor's minimum)


def relay_answers(colours: int) -> tuple[str, ...]:
    """The answer letters of a relay task over ``colours`` colours."""
    return tuple(RELAY_COLOURS)[:colours]


def _relay_grid(colours: int) -> int:
    return math.ceil(math.sqrt(colours + 1))


def sample(rng: random.Random, target: str, knobs: dict[str, Any]) -> Sample:
    letters = list(relay_answers(knobs["colours"]))
    k = rng.randint(knobs["min_hops"], knobs["max_hops"])
    cycle = letters[:]
    rng.shuffle(cycle)  # f(cycle[i]) = cycle[i + 1]: one C-cycle
    rule = {cycle[i]: cycle[(i + 1) % len(cycle)] for i in range(len(cycle))}
    # start k steps before the target on the cycle, so that f^k(c0) = target
    c0 = cycle[(cycle.index(target) - k) % len(cycle)]
    chain = [c0]
    for _ in range(k):
        chain.append(rule[chain[-1]])
    g = _relay_grid(len(letters))
    side = g * RELAY_TILE
    cells = rng.sample(range(g * g), len(letters) + 1)
    img = Image.new("RGB", (side, side), WHITE)
    draw = ImageDraw.Draw(img)
    half = RELAY_TILE // 2
    tiles = []
    for cell, source in zip(cells, [*sorted(letters), None], strict=True):
        x0, y0 = (cell % g) * RELAY_TILE, (cell // g) * RELAY_TILE
        # The start tile reads like a rule "start -> c0": its left half is grey, a colour no rule uses, so
        # finding it is the same operation as every hop (match the left half, read the right half).
        left = RELAY_START if source is None else RELAY_COLOURS[source]
        right = RELAY_COLOURS[c0 if source is None else rule[source]]
        draw.rectangle((x0, y0, x0 + half - 1, y0 + RELAY_TILE - 1), left)
        draw.rectangle((x0 + half, y0, x0 + RELAY_TILE - 1, y0 + RELAY_TILE - 1), right)
        tiles.append({"cell": cell, "start": c0} if source is None else
                     {"cell": cell, "from": source, "to": rule[source]})
    cot = [Image.new("RGB", (RELAY_SWATCH, RELAY_SWATCH), RELAY_COLOURS[c]) for c in chain]
    annotation = {"side": side, "grid": g, "hops": k, "cycle": cycle, "chain": chain, "tiles": tiles}
    fields = {"difficulty": k, "cot_states": chain, "rule": rule}
    return Sample(RELAY_QUESTION.format(k=k), chain[-1], [img], cot, annotation, fields)


def relay_implied_answer(record: dict[str, Any], segment: int, state: Any) -> str | None:
    """The answer a relay record implies when its CoT state ``segment`` is ``state`` (a colour letter).

    ``f^(k - segment)(state)`` with ``f`` the record's ``rule`` and ``k = len(cot_states) - 1``; None
    when the record lacks the fields or ``state`` is not a colour of its rule.
    """
    rule, states = record.get("rule"), record.get("cot_states")
    if not isinstance(rule, dict) or not isinstance(states, list) or state not in rule:
        return None
    if not 0 <= segment < len(states):
        return None
    x = state
    for _ in range(len(states) - 1 - segment):
        x = rule[x]
    return x



def check_knobs(k: dict[str, Any]) -> None:
    """Raise ValueError when the relay knobs of ``k`` (all knobs, defaults filled in) cannot be met."""
    if not 3 <= k["colours"] <= len(RELAY_COLOURS):
        raise ValueError(f"colours={k['colours']} must be in [3, {len(RELAY_COLOURS)}]")
    if not 1 <= k["min_hops"] <= k["max_hops"] < k["colours"]:
        raise ValueError(
            f"need 1 <= min_hops <= max_hops < colours, got {k['min_hops']}, {k['max_hops']}, {k['colours']}"
        )
