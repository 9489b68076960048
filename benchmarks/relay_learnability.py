"""How fast does one arm learn a serial task? A bare training loop with per-difficulty test accuracy.

Trains one arm of the demo (``A``: latents aligned to the CoT swatches; ``noalign``; ``pause``; ``nolat``)
with ``model.latent_loss`` (AdamW, linear warm-up then cosine to 10%, global-norm clip 1.0) on a dataset
written by ``latentvl make-data --task relay``, and every ``--eval-every`` steps prints the test accuracy
per number of hops (teacher-forced: the arg-max over the answer letters at the answer position, which is
greedy decoding's first token; the letters are the dataset's ``meta.json`` ``answer_set``, else the relay
colours). ``--curriculum N`` grows the largest k sampled from 1 to the data's largest over N steps;
``--answer0`` asks for the start colour instead (zero hops: a control of perception alone).
``--freeze-vision`` freezes the vision tower in every arm; ``--teacher-forcing P`` (with
``--teacher-forcing-decay N``: falling linearly to 0 over N steps) sets ``latent_teacher_forcing``. With arm
A, each evaluation also prints ``DECODE``: per latent position, the share of latents whose own fed-back
state is nearest (cosine) to the mean target of its true state among the states' mean targets (records
with one state per latent), and with teacher forcing ``DECODE-FORCED``, the same with every slot forced
(one hop from the true state). It also runs on the A5 word problem (``latentvl make-data --task a5``, or
the image-ops prototype written by ``benchmarks/word_problem_data.py``)::

    latentvl make-data --task relay --n 3000 --hops-min 1 --hops-max 3 --out data/relay
    python benchmarks/relay_learnability.py --data data/relay --arm A --steps 800 --lr 2e-3 --curriculum 400
    latentvl make-data --task a5 --n 3300 --hops-max 6 --out data/a5
    python benchmarks/relay_learnability.py --data data/a5 --arm A --freeze-vision --teacher-forcing 1 \
        --teacher-forcing-decay 1500 --budget-gamma 1 --budget-max 8 --steps 2000 --eval-every 250
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

import torch

from latentvl import LatentCollator, build_tiny_model, set_latent_fields
from latentvl.data.palettes import RELAY_COLOURS
from latentvl.data.records import RecordDataset, load_records
from latentvl.model.objective import _alignment_targets


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="a relay dataset folder (train.jsonl, test.jsonl)")
    ap.add_argument("--arm", choices=("A", "noalign", "pause", "nolat"), default="A")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--budget-max", type=int, default=2)
    ap.add_argument("--budget-gamma", type=float, default=0.5)
    ap.add_argument("--align-weight", type=float, default=None,
                    help="alignment weight (default: 1 for A, 0 for the other arms, as in the demo)")
    ap.add_argument("--feedback-norm", action="store_true", help="latent_feedback_norm: true (latent arms)")
    ap.add_argument("--teacher-forcing", type=float, default=0.0,
                    help="latent_teacher_forcing: the probability that a slot takes its CoT target (arm A)")
    ap.add_argument("--teacher-forcing-decay", type=int, default=0,
                    help="steps over which the teacher-forcing probability falls linearly to 0 (0: constant)")
    ap.add_argument("--freeze-vision", action="store_true",
                    help="freeze the vision tower and its merger (every arm alike): fixed alignment targets")
    ap.add_argument("--curriculum", type=int, default=0, help="steps over which the largest k grows (0: off)")
    ap.add_argument("--answer0", action="store_true", help="answer the start colour (zero hops)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    rng = random.Random(a.seed)
    model, proc = build_tiny_model(seed=a.seed, hidden_size=a.hidden, num_layers=a.layers)
    align = a.align_weight if a.align_weight is not None else (1.0 if a.arm == "A" else 0.0)
    fields = {"latent_budget_alpha": 1.0, "latent_budget_gamma": a.budget_gamma, "latent_budget_max": a.budget_max,
              "latent_align_weight": 0.0 if a.arm == "noalign" else align, "latent_feedback_norm": a.feedback_norm,
              "latent_teacher_forcing": a.teacher_forcing}
    if a.arm == "pause":
        fields["latent_feedback"] = False
    set_latent_fields(model.config, **fields)
    collate = LatentCollator(proc, model.config, use_latents=a.arm != "nolat")
    train, _ = load_records(f"{a.data}/train.jsonl")
    test, _ = load_records(f"{a.data}/test.jsonl")
    raw = {}
    for split in ("train", "test"):
        with open(f"{a.data}/{split}.jsonl", encoding="utf-8") as f:
            raw.update({r["id"]: r for r in map(json.loads, f)})
    dtr, dte = RecordDataset(train), RecordDataset(test)
    meta = Path(a.data) / "meta.json"
    answer_set = json.loads(meta.read_text(encoding="utf-8")).get("answer_set") if meta.exists() else None
    letters = list(answer_set or RELAY_COLOURS)
    k_top = max(int(raw[r.id]["difficulty"]) for r in train)
    letter_ids = torch.tensor([proc.tokenizer.convert_tokens_to_ids(c) for c in letters])

    def states_of(rid: str) -> list:
        """One state per latent: ``latent_states`` of a one-strip record, else ``cot_states``."""
        rec = raw[rid]
        return rec["latent_states"][0] if "latent_states" in rec else rec["cot_states"]

    def item(ds, i):
        it = ds[i]
        return {**it, "answer": states_of(it["id"])[0]} if a.answer0 else it

    test_items = [item(dte, i) for i in range(len(dte))]
    if a.freeze_vision:
        model.model.visual.requires_grad_(False)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=a.lr, weight_decay=0.0)

    def lr_factor(s: int) -> float:
        if s < a.warmup:
            return (s + 1) / a.warmup
        p = (s - a.warmup) / max(1, a.steps - a.warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p))

    @torch.no_grad()
    def evaluate(forced: bool = False) -> tuple[dict[int, float], dict[int, float]]:
        """Answer accuracy per k, and per slot j the share of latents whose own fed-back state is nearest
        (cosine) to the mean target of its own CoT state among the states' mean targets (arm A only).
        ``forced``: every slot takes its target (teacher forcing at 1), so slot j's state shows whether one
        hop from the true state j is learned."""
        model.train(forced)
        if forced:
            set_latent_fields(model.config, latent_teacher_forcing=1.0)
        by_k: dict[int, list[bool]] = {}
        by_slot: dict[int, list[bool]] = {}
        for i in range(0, len(test_items), 32):
            chunk = test_items[i:i + 32]
            batch = collate(chunk)
            out = model.latent_loss(batch)
            logits = out.logits
            for r, it in enumerate(chunk):
                pos = int((batch["labels"][r] != -100).nonzero()[0, 0]) - 1
                pred = letters[int(logits[r, pos, letter_ids].argmax())]
                by_k.setdefault(raw[it["id"]]["difficulty"], []).append(pred == it["answer"])
            if a.arm == "A" and out.latent.align_vec.shape[0]:
                targets = _alignment_targets(model, batch, out.latent)
                states = [c for it in chunk for c in states_of(it["id"])]
                slots = [j for it in chunk for j in range(len(states_of(it["id"])))]
                if len(states) == targets.shape[0]:
                    names = sorted(set(states))
                    protos = torch.stack([targets[[n == c for c in states]].mean(0) for n in names])
                    cos = torch.nn.functional.cosine_similarity(out.latent.align_vec[:, None], protos[None], dim=-1)
                    for j, c, g in zip(slots, states, cos.argmax(-1).tolist()):
                        by_slot.setdefault(j, []).append(names[g] == c)
        model.train()
        set_latent_fields(model.config, latent_teacher_forcing=a.teacher_forcing)
        return ({k: round(sum(v) / len(v), 3) for k, v in sorted(by_k.items())},
                {j: round(sum(v) / len(v), 2) for j, v in sorted(by_slot.items())})

    model.train()
    order: list[int] = []
    t0 = time.perf_counter()
    ces: list[float] = []
    for s in range(a.steps):
        if a.curriculum:
            k_max = min(k_top, 1 + int(k_top * s / a.curriculum))
            pool = [i for i in range(len(dtr)) if raw[train[i].id]["difficulty"] <= k_max]
            idx = rng.sample(pool, a.batch_size)
        else:
            if len(order) < a.batch_size:
                order = list(range(len(dtr)))
                rng.shuffle(order)
            idx, order = order[:a.batch_size], order[a.batch_size:]
        batch = collate([item(dtr, i) for i in idx])
        for g in opt.param_groups:
            g["lr"] = a.lr * lr_factor(s)
        if a.teacher_forcing_decay:
            set_latent_fields(model.config,
                              latent_teacher_forcing=a.teacher_forcing * max(0.0, 1 - s / a.teacher_forcing_decay))
        out = model.latent_loss(batch)
        opt.zero_grad()
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        ces.append(float(out.ce))
        if (s + 1) % 10 == 0:
            print(f"step {s + 1} ce {sum(ces[-10:]) / 10:.3f} align {float(out.align):.3f} "
                  f"{(time.perf_counter() - t0) / (s + 1):.3f}s/step", flush=True)
        if (s + 1) % a.eval_every == 0 or s + 1 == a.steps:
            acc, decode = evaluate()
            print("EVAL", s + 1, acc, flush=True)
            if decode:
                print("DECODE", s + 1, decode, flush=True)
            if a.teacher_forcing > 0:
                print("DECODE-FORCED", s + 1, evaluate(forced=True)[1], flush=True)


if __name__ == "__main__":
    main()
