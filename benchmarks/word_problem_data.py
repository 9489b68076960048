"""Write the A5 word-problem dataset of docs/training.md ("A non-solvable word problem").

Five state colours ``R G B Y C``; three op tiles, each a fixed permutation of the states: ``a`` (black) the
5-cycle (0 1 2 3 4), ``b`` (magenta) the 3-cycle (0 1 2), ``c`` (orange) (0 1)(2 3); ``a`` and ``b`` generate
A5, a group whose word problem has no constant-depth solution. One record: k ops drawn uniformly (k from
``--k-min`` to ``--k-max``), applied in order to a start colour.

- question image: one row of ``K + 1`` whole-token tiles (28 px each): the start colour, the k op tiles,
  then white tiles (the identity) up to ``K = --k-max``; question text ``"Apply the ops."``
  (``--text-ops``: the ops are written in the question instead, ``"Ops: ab-..."``, and the image is the
  start colour alone);
- one CoT image: a strip of ``K + 1`` cells showing the states s0 .. sK (the last state held over the
  padding), so with budgets alpha 1 / gamma 1 / max >= K + 1 each latent of the one segment aligns to one
  state;
- answer: the final state's letter (chance 1/5); the record also carries ``difficulty`` (k), ``cot_states``
  and ``ops``.

Writes ``train.jsonl``, ``test.jsonl`` (the first ``--n // 10`` records), ``images/`` and ``meta.json``
(``answer_set``, read by relay_learnability.py)::

    python benchmarks/word_problem_data.py --out data/a5 --n 3300
    python benchmarks/relay_learnability.py --data data/a5 --arm A --feedback-norm --budget-gamma 1 \\
        --budget-max 8 --align-weight 1 --steps 3000 --curriculum 2000 --eval-every 500
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from PIL import Image, ImageDraw

from latentvl.data.palettes import RELAY_COLOURS
from latentvl.data.tasks.a5 import A5_OPS, A5_STATES
from latentvl.data.tasks.common import SIDE_STEP, WHITE, png_bytes
from latentvl.fileio import write_atomic

# The states and ops of the library's a5 task (latentvl.data.tasks.a5); this prototype draws the ops as
# tiles in the question image (black, magenta, orange) instead of writing them in the question text.
TILE = SIDE_STEP  # one merged visual token
STATES = {s: RELAY_COLOURS[s] for s in A5_STATES}
OP_TILES = {"a": RELAY_COLOURS["K"], "b": RELAY_COLOURS["M"], "c": RELAY_COLOURS["O"]}
OPS = {op: (A5_OPS[op], OP_TILES[op]) for op in A5_OPS}  # name -> (image of state i, tile colour)
IDENTITY = WHITE


def _row(colours: list[tuple[int, int, int]]) -> Image.Image:
    img = Image.new("RGB", (TILE * len(colours), TILE), IDENTITY)
    draw = ImageDraw.Draw(img)
    for i, colour in enumerate(colours):
        draw.rectangle((TILE * i, 0, TILE * (i + 1) - 1, TILE - 1), colour)
    return img


def sample(rng: random.Random, k_min: int, k_max: int, text_ops: bool) -> tuple[dict, Image.Image, Image.Image]:
    """One record (without image paths), its question image and its CoT strip."""
    letters = list(STATES)
    k = rng.randint(k_min, k_max)
    ops = [rng.choice(list(OPS)) for _ in range(k)]
    states = [rng.randrange(len(letters))]
    for op in ops:
        states.append(OPS[op][0][states[-1]])
    held = [letters[s] for s in states] + [letters[states[-1]]] * (k_max - k)
    if text_ops:
        question = "Ops: " + "".join(ops) + "-" * (k_max - k)
        image = Image.new("RGB", (2 * TILE, 2 * TILE), STATES[held[0]])
    else:
        question = "Apply the ops."
        image = _row([STATES[held[0]], *(OPS[op][1] for op in ops), *[IDENTITY] * (k_max - k)])
    record = {"question": question, "answer": held[-1], "difficulty": k, "cot_states": held, "ops": ops}
    return record, image, _row([STATES[s] for s in held])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--n", type=int, default=3300)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--k-min", type=int, default=1)
    ap.add_argument("--k-max", type=int, default=6)
    ap.add_argument("--text-ops", action="store_true", help="write the ops in the question text")
    a = ap.parse_args()
    if not 1 <= a.k_min <= a.k_max:
        raise SystemExit(f"need 1 <= --k-min <= --k-max, got {a.k_min}, {a.k_max}")
    out = Path(a.out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(a.seed)
    rows = []
    for i in range(a.n):
        record, image, strip = sample(rng, a.k_min, a.k_max, a.text_ops)
        q, cot = f"images/wp-{i:05d}-q0.png", f"images/wp-{i:05d}-cot0.png"
        write_atomic(out / q, png_bytes(image), sync=False)
        write_atomic(out / cot, png_bytes(strip), sync=False)
        rows.append({"id": f"wp-{i:05d}", "images": [q], "cot_images": [cot], **record})
    n_test = a.n // 10
    for name, part in (("test", rows[:n_test]), ("train", rows[n_test:])):
        write_atomic(out / f"{name}.jsonl", "".join(json.dumps(r) + "\n" for r in part).encode("utf-8"))
    meta = {"task": "word_problem_a5", "n": a.n, "seed": a.seed, "answer_set": list(STATES),
            "k_min": a.k_min, "k_max": a.k_max, "text_ops": a.text_ops}
    write_atomic(out / "meta.json", (json.dumps(meta, indent=2) + "\n").encode("utf-8"))
    print(f"wrote {a.n} records to {out} (test {n_test})")


if __name__ == "__main__":
    main()
