"""Task name -> generator: the tasks of ``latentvl make-data``, their knobs and their checks.

Every task module (:mod:`.a5`, :mod:`.maze`, :mod:`.relay`, :mod:`.shapes`) gives a ``sample(rng, target,
knobs)`` generator, a ``check_knobs(knobs)`` and the names of the knobs it reads (``KNOBS``); :data:`TASKS`
binds them to the task's name. :mod:`.relay_bands` balances hops as well as answers, so it has its own
sampler and writer (:func:`latentvl.data.tasks.writer.make_relay_bands`).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from . import a5, maze, relay, shapes
from .common import SIDE_STEP, Sample

__all__ = [
    "DEFAULT_KNOBS",
    "IMPLIED_ANSWERS",
    "TASKS",
    "Task",
    "check_knobs",
    "generate_sample",
    "implied_answer",
    "task_answers",
]

DEFAULT_KNOBS: dict[str, Any] = {
    "val_fraction": 0.1,
    "test_fraction": 0.1,
    "min_cot": 1,
    "max_cot": 4,
    "min_size": 84,
    "max_size": 224,
    "min_grid": 3,
    "max_grid": 6,
    "min_moves": 2,
    "max_shapes": 4,
    "colours": 6,
    "min_hops": 1,
    "max_hops": 4,
    "token_px": SIDE_STEP,  # a5: the side of one merged visual token (28: Qwen2.5-VL, 32: Qwen3-VL)
}


@dataclass(frozen=True)
class Task:
    """One task of ``latentvl make-data``: its answers, question and answer rule (for ``meta.json``), its
    generator, the knobs it reads, their check and, optionally, question-image-only baselines and the
    identity of a sample's question (``question_key``): a task that has one gets splits disjoint by question
    (:func:`latentvl.data.tasks.writer.make_dataset`); ``question_strata`` lists its questions by (difficulty,
    answer) where they are few, so that every split gets its share of each."""

    answers: tuple[str, ...]
    question: str
    rule: str
    make: Callable[[random.Random, str, dict[str, Any]], Sample]
    knobs: tuple[str, ...]
    check: Callable[[dict[str, Any]], None]
    baselines: Callable[[list[dict[str, Any]]], dict[str, float]] | None = None
    question_key: Callable[[Sample], str] | None = None
    question_strata: Callable[[dict[str, Any]], dict[tuple[Any, str], list[str]]] | None = None


TASKS: dict[str, Task] = {
    "a5": Task(a5.A5_STATES, a5.QUESTION, a5.RULE, a5.sample, a5.KNOBS, a5.check_knobs,
               question_key=a5.question_key, question_strata=a5.question_strata),
    "maze": Task(maze.MAZE_ANSWERS, maze.MAZE_QUESTION, maze.RULE, maze.sample, maze.KNOBS, maze.check_knobs,
                 maze.baselines),
    "shapes": Task(shapes.SHAPES_ANSWERS, shapes.SHAPES_QUESTION, shapes.RULE, shapes.sample, shapes.KNOBS,
                   shapes.check_knobs),
    "relay": Task(relay.relay_answers(int(DEFAULT_KNOBS["colours"])), relay.RELAY_QUESTION.format(k="k"),
                  relay.RULE, relay.sample, relay.KNOBS, relay.check_knobs),
}

# task name -> f(record, segment, state) -> the answer implied when CoT state `segment` is `state`
IMPLIED_ANSWERS: dict[str, Callable[[dict[str, Any], int, Any], str | None]] = {
    "relay": relay.relay_implied_answer,
    "a5": a5.a5_implied_answer,
}


def implied_answer(task: str | None, record: dict[str, Any], segment: int, state: Any) -> str | None:
    """The answer ``record`` implies if its CoT state ``segment`` were ``state``; None if unknown.

    ``task`` (a record's ``task`` field or its dataset's ``meta.json`` ``task``) selects the function in
    :data:`IMPLIED_ANSWERS`; a task without one gives None.
    """
    fn = IMPLIED_ANSWERS.get(task or "")
    return fn(record, segment, state) if fn is not None else None


def task_answers(task: str, knobs: dict[str, Any]) -> tuple[str, ...]:
    """The answer set of ``task`` under ``knobs`` (relay: its first ``colours`` letters)."""
    if task == "relay":
        return relay.relay_answers(int(knobs["colours"]))
    return TASKS[task].answers


def check_knobs(task: str, knobs: dict[str, Any]) -> dict[str, Any]:
    """``knobs`` over :data:`DEFAULT_KNOBS` (``overwrite`` ignored), checked for ``task``; ValueError if not."""
    unknown = set(knobs) - set(DEFAULT_KNOBS) - {"overwrite"}
    if unknown:
        raise ValueError(f"unknown knob(s) {sorted(unknown)}; known: {sorted(DEFAULT_KNOBS)}")
    k = {**DEFAULT_KNOBS, **{key: v for key, v in knobs.items() if key != "overwrite"}}
    for name in ("val_fraction", "test_fraction"):
        if not 0.0 <= float(k[name]) < 1.0:
            raise ValueError(f"{name}={k[name]} must be in [0, 1)")
    if k["val_fraction"] + k["test_fraction"] >= 1.0:
        raise ValueError("val_fraction + test_fraction must be < 1")
    if not 1 <= k["min_cot"] <= k["max_cot"]:
        raise ValueError(f"need 1 <= min_cot <= max_cot, got {k['min_cot']}, {k['max_cot']}")
    if not SIDE_STEP <= k["min_size"] <= k["max_size"]:
        raise ValueError(f"need {SIDE_STEP} <= min_size <= max_size, got {k['min_size']}, {k['max_size']}")
    TASKS[task].check(k)
    return k


def generate_sample(task: str, rng: random.Random, target: str, knobs: dict[str, Any] | None = None) -> Sample:
    """One sample of ``task`` whose answer is ``target`` (one of the task's answers)."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose from {sorted(TASKS)}")
    checked = check_knobs(task, knobs or {})
    if target not in task_answers(task, checked):
        raise ValueError(f"target {target!r} is not an answer of task {task!r}")
    return TASKS[task].make(rng, target, checked)
