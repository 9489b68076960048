"""Time the demo's five arms trained one after another against trained two at a time (``demo.arm_workers``).

The demo's own settings and data (the a5 word problem, the shipped recipe of every arm), with the steps cut to
``--steps-a`` and ``--steps-c`` so that a round takes a minute or two. Each round trains every arm both ways
in this process, the order of the two alternating between rounds (a noisy machine hurts both alike): in turn
with all ``--threads`` threads in this process, and at once with ``--threads`` split between two processes
(the shipped ``arm_workers: 2``; their start-up counted). Printed: each round's seconds, the median of each and
the ratio; each arm's seconds in the last round.

Usage::

    python benchmarks/arm_workers.py                 # 150 + 30 steps, 2 threads, 2 rounds
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
from pathlib import Path

from latentvl.recipes.demo import recipe


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps-a", type=int, default=150)
    ap.add_argument("--steps-c", type=int, default=30)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    settings = recipe.load_demo_settings(None)
    settings["demo"].update(seed=args.seed, steps_a=args.steps_a, steps_c=args.steps_c)
    settings["train"].update(num_threads=args.threads, progress_bar=False)
    variants = {"in turn": copy.deepcopy(settings), "two at a time": copy.deepcopy(settings)}
    variants["in turn"]["demo"]["arm_workers"] = 1
    variants["two at a time"]["demo"]["arm_workers"] = 2
    for name, s in variants.items():
        print(f"{name}: (workers, threads each) = {recipe.arm_workers(s)}")

    def quiet(*_: object) -> None:
        pass

    with tempfile.TemporaryDirectory() as tmp:
        data, demo = recipe._make_data(Path(tmp), settings["demo"], quiet)
        seconds: dict[str, list[float]] = {name: [] for name in variants}
        last = {}
        for r in range(args.rounds):
            order = list(variants) if r % 2 == 0 else list(reversed(variants))
            for name in order:
                t0 = time.perf_counter()
                last[name] = recipe._train_arms(variants[name], demo, data, Path(tmp) / f"r{r}_{name[:4]}", quiet)
                seconds[name].append(time.perf_counter() - t0)
                print(f"round {r + 1}: {name}: {seconds[name][-1]:.1f} s", flush=True)
    med = {name: statistics.median(v) for name, v in seconds.items()}
    print(f"\nfive arms, {args.steps_a} + {args.steps_c} steps, {args.threads} threads in all, median of "
          f"{args.rounds} rounds")
    for name, m in med.items():
        print(f"  {name}: {m:.1f} s")
    print(f"  two at a time is {med['in turn'] / med['two at a time']:.2f}x as fast as in turn")
    for name, part in last.items():
        print(f"  {name}, last round, seconds per arm: "
              + ", ".join(f"{arm} {s:.1f}" for arm, s in part.seconds.items()))


if __name__ == "__main__":
    main()
