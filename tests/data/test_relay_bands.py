"""The relay_bands task: a chain of hops whose length varies while the CoT image (and so the budget) does not."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from latentvl import LatentCollator, build_tiny_model, set_latent_fields
from latentvl.data.records import load_records
from latentvl.data.tasks.relay_bands import PALETTE, relay_bands_sample
from latentvl.data.tasks.writer import make_relay_bands


def _token_colours(img, row: int = 0):
    """The RGB of the left and right 14 px halves of every 28 px token of a one-token-high strip."""
    a = np.asarray(img)
    return [(tuple(a[row, x + 3]), tuple(a[row, x + 20])) for x in range(0, a.shape[1], 28)]


@given(st.integers(0, 10_000), st.integers(1, 4), st.sampled_from("RGBYM"))
def test_sample_follows_the_drawn_rule(seed, hops, target):
    s = relay_bands_sample(random.Random(seed), hops, target)
    rgb_to_letter = {v: k for k, v in PALETTE.items()}
    tokens = _token_colours(s.images[0])
    left, right = tokens[0]
    assert left == right  # the start tile is one colour
    c0 = rgb_to_letter[left]
    rule = {rgb_to_letter[a]: rgb_to_letter[b] for a, b in tokens[1:]}
    assert sorted(rule) == sorted(rule.values()) == sorted("RGBYM")  # every colour once a source, once a target
    chain = [c0]
    for _ in range(hops):
        chain.append(rule[chain[-1]])
    assert chain[-1] == s.answer == target
    assert len(set(chain)) == hops + 1  # no colour repeats along the chain
    # the CoT strip: one hop per cell, then the last colour held
    cells = [rgb_to_letter[a] for a, b in _token_colours(s.cot_images[0])]
    assert cells == [chain[min(j + 1, hops)] for j in range(4)]
    assert s.question == f"{hops} hops?" and s.annotation["difficulty"] == hops


def test_budget_does_not_reveal_the_difficulty():
    model, processor = build_tiny_model(seed=0)
    set_latent_fields(model.config, latent_budget_alpha=1.0, latent_budget_gamma=1.0, latent_budget_max=8)
    samples = []
    for hops in (1, 2, 3, 4):
        s = relay_bands_sample(random.Random(hops), hops, "R")
        samples.append({"id": f"h{hops}", "question": s.question, "images": s.images, "cot_images": s.cot_images,
                        "answer": s.answer})
    batch = LatentCollator(processor, model.config)(samples)
    assert batch["latent_budgets"] == [[4]] * 4  # four merged tokens in every strip
    assert {s["cot_images"][0].size for s in samples} == {(112, 28)}


def test_dataset_is_balanced_deterministic_and_loadable(tmp_path):
    meta = make_relay_bands(100, 3, tmp_path / "a")
    make_relay_bands(100, 3, tmp_path / "b")
    for name in ("train.jsonl", "test.jsonl", "annotations.jsonl", "meta.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert meta["splits"]["train"]["difficulty_counts"] == {1: 20, 2: 20, 3: 20, 4: 20}
    assert set(meta["splits"]["train"]["answer_counts"].values()) == {16}
    assert meta["chance_accuracy"] == pytest.approx(0.2)
    records, skipped = load_records(tmp_path / "a" / "train.jsonl")
    assert len(records) == 80 and not skipped
    rows = [json.loads(x) for x in (tmp_path / "a" / "train.jsonl").read_text().splitlines()]
    assert all(r["difficulty"] in (1, 2, 3, 4) for r in rows)
    with pytest.raises(FileExistsError, match="already holds a dataset"):
        make_relay_bands(10, 3, tmp_path / "a")


@pytest.mark.parametrize("knobs, message", [
    ({"max_hops": 5}, "max_hops=5 must be < colours=5"),
    ({"colours": 9}, "colours=9"),
    ({"min_hops": 0}, "min_hops"),
    ({"cells": 2}, "cells=2"),
    ({"hops": 3}, "unknown knob"),
])
def test_bad_knobs_are_named(tmp_path, knobs, message):
    with pytest.raises(ValueError, match=message):
        make_relay_bands(10, 0, tmp_path, **knobs)


def test_command_line(tmp_path, capsys):
    from latentvl.cli import main

    assert main(["make-relay-bands", "--n", "20", "--out", str(tmp_path), "--rule", "fixed"]) == 0
    assert "wrote 20 relay_bands records" in capsys.readouterr().out
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert meta["knobs"]["rule"] == "fixed"


def test_fixed_rule_is_one_cycle_for_every_sample():
    rules = {str(relay_bands_sample(random.Random(s), 2, "G", {"rule": "fixed"}).annotation["f"]) for s in range(20)}
    assert len(rules) == 1
    s = relay_bands_sample(random.Random(0), 2, "G", {"rule": "fixed"})
    assert s.annotation["f"] == {"R": "G", "G": "B", "B": "Y", "Y": "M", "M": "R"}  # the palette order
    assert s.annotation["chain"] == ["M", "R", "G"]
    colours = np.asarray(s.images[0]).reshape(-1, 3)
    assert s.images[0].size == (56, 56) and {tuple(c) for c in colours} == {PALETTE["M"]}  # the start tile alone
