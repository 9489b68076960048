"""The task registry: every registered task generates, and its names are the CLI's choices."""

from __future__ import annotations

import argparse
import random

import pytest

from latentvl.commands import make_data, make_relay_bands
from latentvl.data.tasks import a5, maze, relay, relay_bands, shapes
from latentvl.data.tasks.common import Sample
from latentvl.data.tasks.registry import DEFAULT_KNOBS, TASKS, check_knobs, generate_sample, task_answers


def _task_choices(add_arguments) -> list[str] | None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return next((a.choices for a in parser._actions if a.dest == "task"), None)


def test_registry_names_are_the_make_data_choices() -> None:
    assert sorted(_task_choices(make_data.add_arguments)) == sorted(TASKS) == ["a5", "maze", "relay", "shapes"]


def test_each_task_is_its_own_module() -> None:
    modules = {"a5": a5, "maze": maze, "relay": relay, "shapes": shapes}
    for name, spec in TASKS.items():
        assert spec.make is modules[name].sample and spec.check is modules[name].check_knobs
        assert spec.knobs == modules[name].KNOBS and set(spec.knobs) <= set(DEFAULT_KNOBS)


@pytest.mark.parametrize("task", sorted(TASKS))
def test_every_registered_task_generates(task: str) -> None:
    answers = task_answers(task, check_knobs(task, {}))
    for target in answers:
        sample = generate_sample(task, random.Random(f"{task}:{target}"), target)
        assert isinstance(sample, Sample) and sample.answer == target
        assert sample.images and sample.cot_images


def test_relay_bands_generates_and_its_cli_takes_the_same_knob_names() -> None:
    k = relay_bands.check_knobs({})
    for target in list(relay_bands.PALETTE)[: k["colours"]]:
        sample = relay_bands.relay_bands_sample(random.Random(0), k["max_hops"], target)
        assert sample.answer == target and len(sample.cot_images) == 1
    parser = argparse.ArgumentParser()
    make_relay_bands.add_arguments(parser)
    hops = {a.dest for a in parser._actions if "hops" in a.dest}
    assert hops == {"min_hops", "max_hops"} and hops <= set(DEFAULT_KNOBS)


def test_make_data_takes_the_former_hops_flags() -> None:
    parser = argparse.ArgumentParser()
    make_data.add_arguments(parser)
    new = parser.parse_args(["--out", "x", "--min-hops", "2", "--max-hops", "3"])
    old = parser.parse_args(["--out", "x", "--hops-min", "2", "--hops-max", "3"])
    assert (new.min_hops, new.max_hops) == (old.min_hops, old.max_hops) == (2, 3)


def test_every_range_knob_is_min_or_max_first_and_takes_its_former_flag() -> None:
    """One naming style for the generator's ranges: ``min_*``/``max_*`` (the former ``*_min``/``*_max``
    flags still parse to the same values)."""
    assert not [k for k in DEFAULT_KNOBS if k.endswith(("_min", "_max"))]
    parser = argparse.ArgumentParser()
    make_data.add_arguments(parser)
    pairs = {"size": (90, 150), "grid": (3, 5)}
    for name, (lo, hi) in pairs.items():
        new = parser.parse_args(["--out", "x", f"--min-{name}", str(lo), f"--max-{name}", str(hi)])
        old = parser.parse_args(["--out", "x", f"--{name}-min", str(lo), f"--{name}-max", str(hi)])
        assert vars(new) == vars(old) and (getattr(new, f"min_{name}"), getattr(new, f"max_{name}")) == (lo, hi)
