"""``a5``: a word problem over the alternating group A5, one latent per state.

A word problem over the alternating group A5, which is not solvable, so no constant-depth circuit
(and no fixed number of transformer layers) computes it for every length: a model has to carry a
state step by step. Five state colours ``R G B Y C``; three ops, each a fixed permutation of the
states: ``a`` the 5-cycle (R G B Y C), ``b`` the 3-cycle (R G B), ``c`` the double transposition
(R G)(B Y). The question image is a swatch of the start colour ``s0``; the question text lists the k
ops padded with ``-`` (the identity) to ``max_hops``, one character each: ``"Ops: acb-"``. The one CoT
image is a strip of ``max_hops + 1`` cells of one merged token each, ``s0, s1, ..., sk`` (``s_j`` the
state after j ops) and then ``sk`` held to the end, so with a budget of one latent per cell (alpha 1,
gamma 1) latent j aligns to state j and reads op j at a constant distance in the sequence. The answer
is the letter of ``sk``. A question (ops and start colour) belongs to one split only: no val or test
question is a train question (:func:`question_key`), and each split owns its share of the questions of
each k and answer while they are few (:func:`question_strata`). Records carry ``difficulty`` (k), ``ops`` and
``latent_states``, one list per CoT image with one state per cell (``[[s0, ..., sk, ..., sk]]``), so the
instruments of ``latentvl eval`` work per latent (:func:`a5_implied_answer`).
"""

from __future__ import annotations

import itertools
import random
from typing import Any

from PIL import Image, ImageDraw

from ..palettes import RELAY_COLOURS
from .common import WHITE, Sample

__all__ = ["A5_IDENTITY", "A5_OPS", "A5_STATES", "KNOBS", "QUESTION", "RULE", "a5_apply", "a5_implied_answer",
           "check_knobs", "question_key", "question_strata", "sample"]

KNOBS = ("min_hops", "max_hops", "token_px")  # meta.json order
QUESTION = "Ops: <k ops, then - up to max_hops>"
RULE = ("letter of the state after applying the listed ops (permutations of R G B Y C) in order to the "
        "colour of the question image")

A5_STATES = ("R", "G", "B", "Y", "C")  # RELAY_COLOURS' first five
# op -> the image of each state, by index into A5_STATES; a and b generate A5
A5_OPS: dict[str, tuple[int, ...]] = {
    "a": (1, 2, 3, 4, 0),  # the 5-cycle R -> G -> B -> Y -> C -> R
    "b": (1, 2, 0, 3, 4),  # the 3-cycle R -> G -> B -> R
    "c": (1, 0, 3, 2, 4),  # (R G)(B Y)
}
# Sides in merged visual tokens of `token_px` pixels (28: Qwen2.5-VL's 2x2 patches of 14 px, 32: Qwen3-VL's of 16)
A5_SWATCH_TOKENS = 2  # question image: 2 x 2 visual tokens, the tiny processor's minimum
A5_IDENTITY = "-"
STRATIFIED_QUESTIONS = 729  # questions per (k, answer) up to which question_strata lists them (3^k; k <= 6)


def a5_apply(ops: list[str] | str, state: str) -> str:
    """``state`` after the ``ops`` in order (letters of :data:`A5_OPS`; ``-`` is the identity)."""
    i = A5_STATES.index(state)
    for op in ops:
        if op != A5_IDENTITY:
            i = A5_OPS[op][i]
    return A5_STATES[i]


def sample(rng: random.Random, target: str, knobs: dict[str, Any]) -> Sample:
    k, cells = rng.randint(knobs["min_hops"], knobs["max_hops"]), knobs["max_hops"] + 1
    ops = [rng.choice(sorted(A5_OPS)) for _ in range(k)]
    s0 = next(s for s in A5_STATES if a5_apply(ops, s) == target)  # the ops are a permutation
    chain = [s0]
    for op in ops:
        chain.append(a5_apply(op, chain[-1]))
    held = chain + [chain[-1]] * (cells - len(chain))
    cell = int(knobs["token_px"])  # one strip cell = one merged visual token
    swatch = A5_SWATCH_TOKENS * cell
    question = Image.new("RGB", (swatch, swatch), RELAY_COLOURS[s0])
    strip = Image.new("RGB", (cell * cells, cell), WHITE)
    draw = ImageDraw.Draw(strip)
    for j, state in enumerate(held):
        draw.rectangle((cell * j, 0, cell * (j + 1) - 1, cell - 1), RELAY_COLOURS[state])
    text = _question_text(ops, knobs["max_hops"])
    annotation = {"side": cell * cells, "hops": k, "ops": ops, "chain": chain}
    fields = {"difficulty": k, "latent_states": [held], "ops": ops}
    return Sample(text, chain[-1], [question], [strip], annotation, fields)


def _question_text(ops: list[str] | tuple[str, ...], max_hops: int) -> str:
    return "Ops: " + "".join(ops) + A5_IDENTITY * (max_hops - len(ops))


def _key(question: str, start: str) -> str:
    return f"{question}|{start}"


def question_key(sample: Sample) -> str:
    """What a model is asked: the ops text and the start colour of the question image (``"Ops: acb-|R"``).
    :func:`latentvl.data.tasks.writer.make_dataset` keeps each key in one split."""
    return _key(sample.question, sample.annotation["chain"][0])


def question_strata(knobs: dict[str, Any]) -> dict[tuple[int, str], list[str]]:
    """Every question key (:func:`question_key`) by ``(k, answer)``, for each k whose 3^k questions per answer
    are at most :data:`STRATIFIED_QUESTIONS`; longer words have questions enough for a hash to share them."""
    strata: dict[tuple[int, str], list[str]] = {}
    for k in range(knobs["min_hops"], knobs["max_hops"] + 1):
        if len(A5_OPS) ** k > STRATIFIED_QUESTIONS:
            break
        for ops in itertools.product(sorted(A5_OPS), repeat=k):
            text = _question_text(ops, knobs["max_hops"])
            for start in A5_STATES:
                strata.setdefault((k, a5_apply(ops, start)), []).append(_key(text, start))
    return strata


def a5_implied_answer(record: dict[str, Any], segment: int, state: Any) -> str | None:
    """The answer an a5 record implies when the state at latent ``segment`` of its strip is ``state``:
    ``state`` after the record's ops ``segment + 1 .. k`` (none for the held cells after k); None when the
    record lacks ``ops``, ``segment`` is not a cell of its strip or ``state`` is not a state letter."""
    ops, states = record.get("ops"), record.get("latent_states")
    if not isinstance(ops, list) or state not in A5_STATES or any(op not in A5_OPS for op in ops):
        return None
    nested = isinstance(states, list) and len(states) == 1 and isinstance(states[0], list)
    if not 0 <= segment < (len(states[0]) if nested else len(ops) + 1):
        return None
    return a5_apply(ops[segment:], state)


def check_knobs(k: dict[str, Any]) -> None:
    """Raise ValueError when the a5 knobs of ``k`` (all knobs, defaults filled in) cannot be met."""
    if not 1 <= k["min_hops"] <= k["max_hops"]:
        raise ValueError(f"need 1 <= min_hops <= max_hops, got {k['min_hops']}, {k['max_hops']}")
    if int(k["token_px"]) < 1:
        raise ValueError(f"need token_px >= 1, got {k['token_px']}")
