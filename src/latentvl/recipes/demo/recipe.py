"""Run the whole method end to end on the tiny model and a synthetic task, with its controls, and report.

``latentvl demo`` generates a synthetic visual chain-of-thought task (default ``a5``: a word problem over
the group A5, one latent per state, see :mod:`latentvl.data.tasks.a5`) and trains five arms on the same
data with the same model, optimiser, seed and steps:

- ``baseline_no_latents``: answers right after the question;
- ``pause``: the same latent slots, each filled with one learned vector (``latent_feedback: false``): as
  much extra width, no hidden state fed back;
- ``latents_no_align``: latent thoughts without the alignment loss (``latent_align_weight: 0``);
- ``stage_a``: latent thoughts aligned to the CoT images, fixed budgets;
- ``stage_c``: stage A's checkpoint trained on with learned halting; its stop threshold is then chosen on
  the validation split (:mod:`latentvl.evaluation.calibration`, ``calibrate_threshold``).

The controls train for as many steps as stage A and stage C together, on the same data schedule
(``curriculum``: phases on records of growing difficulty, then the stage-C steps on all records), in lanes
(stage A then stage C; each control alone) of which ``arm_workers`` train at once, each in its own process. Every
arm is evaluated on the held-out test split with ``latentvl eval``'s instruments (accuracy by difficulty,
mask / swap / noise, truncation, implant, linear probe, alignment); ``report.md`` leads with accuracy
against difficulty for every arm. ``--quick`` runs a few steps on a few records (a smoke test of the
pipeline, not of the method); ``--full`` runs the longer schedule of the ``full`` section.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from ...errors import InputError
from ...evaluation.metrics import USED_RATIO
from ...fileio import write_atomic
from ...reports.format import difficulty_key
from .bars import bar_metrics, check_bars
from .report import ARMS, DemoReport, write_demo_plots, write_demo_report

__all__ = [
    "ARM_LATENT",
    "LANES",
    "arm_workers",
    "default_settings",
    "demo_tasks",
    "load_demo_settings",
    "run_demo",
    "train_speed",
]


def default_settings() -> dict[str, Any]:
    """The demo's defaults: ``demo.yaml`` beside this module, shipped as package data (their one home);
    a fresh copy on every call (pass ``--config`` to change them)."""
    text = (resources.files(__package__) / "demo.yaml").read_text(encoding="utf-8")
    return yaml.safe_load(text)


def demo_tasks() -> tuple[str, ...]:
    """The tasks ``--task`` accepts: those the shipped settings give generator knobs for."""
    return tuple(default_settings()["demo"]["data"])


# What each control changes in the latent fields (everything else is shared).
ARM_LATENT = {
    "pause": {"latent_feedback": False, "latent_align_weight": 0.0},
    "latents_no_align": {"latent_align_weight": 0.0},
}


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def load_demo_settings(path: str | Path | None = None, quick: bool = False, full: bool = False,
                       task: str | None = None, backbone: str | None = None) -> dict[str, Any]:
    """The demo's settings for ``task`` (default: the file's ``demo.task``, else the shipped one).

    In order, each over the last: the shipped sections; the ``per_task`` entry of the task (the shipped
    one, updated from the file's) over ``demo`` and, for its ``train`` part, ``train``; the file's own
    sections; then ``quick`` (shrinks the run) or ``full`` (the ``full`` section, the longer schedule).
    ``backbone`` (else ``train.backbone``, else Qwen2.5-VL) is the tiny model's family; a task whose images
    are drawn in merged visual tokens (``token_px``) gets that family's token side unless the file sets it.
    """
    if quick and full:
        raise ValueError("--quick and --full exclude each other")
    defaults = default_settings()
    user: dict[str, Any] = {}
    if path is not None:
        user = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        if not isinstance(user, dict):
            raise ValueError(f"{path}: must hold a mapping with sections {sorted(defaults)}")
        unknown = set(user) - set(defaults)
        if unknown:
            raise ValueError(f"{path}: unknown section(s) {sorted(unknown)}; known: {sorted(defaults)}")
    task = task or (user.get("demo") or {}).get("task") or defaults["demo"]["task"]
    per = _merge((defaults.get("per_task") or {}).get(task) or {}, (user.get("per_task") or {}).get(task) or {})
    settings = defaults
    settings["train"] = _merge(settings["train"], per.pop("train", {}))
    settings["demo"] = _merge(settings["demo"], per)
    settings = _merge(settings, {k: v for k, v in user.items() if k != "per_task"})
    settings["demo"]["task"] = task
    if quick:
        settings["demo"].update(settings["quick"])
    if full:
        settings["demo"].update(settings["full"])
    _apply_backbone(settings, backbone)
    return settings


def _apply_backbone(settings: dict[str, Any], backbone: str | None) -> None:
    """Set the tiny model's family and, for a task with a ``token_px`` knob, its merged-token side."""
    from ...data.tasks.registry import TASKS
    from ...model.backbone import DEFAULT_BACKBONE, family

    name = backbone or settings["train"].get("backbone") or DEFAULT_BACKBONE
    settings["train"]["backbone"] = name
    task = settings["demo"]["task"]
    data = settings["demo"].setdefault("data", {}).setdefault(task, {})
    if task in TASKS and "token_px" in TASKS[task].knobs and "token_px" not in data:
        data["token_px"] = 2 * family(name).PATCH_SIZE


# --------------------------------------------------------------------------------------------- runs
def _train_config(settings: dict[str, Any], latent: dict[str, Any] | None = None, **fields: Any):
    from ...training.config import TrainConfig

    train = copy.deepcopy(settings["train"])
    train["latent"] = {**train.get("latent", {}), **(latent or {})}
    cfg = TrainConfig.from_dict({**train, **fields}, validate=False)
    cfg.seed = int(settings["demo"]["seed"])
    return cfg.validate()



def _curriculum_files(data_dir: Path, curriculum: list[Any]) -> list[Path]:
    """One train file per curriculum phase: the train records with ``difficulty <= d``."""
    from ...evaluation.instruments import read_record_fields

    rows = list(read_record_fields(data_dir / "train.jsonl").values())
    files = []
    for d in curriculum:
        keep = [r for r in rows if r.get("difficulty") is not None and r["difficulty"] <= d]
        if not keep:
            raise ValueError(f"curriculum phase {d!r}: no train record has difficulty <= {d!r}")
        path = data_dir / f"train_difficulty_le_{d}.jsonl"
        write_atomic(path, "".join(json.dumps(r) + "\n" for r in keep))
        files.append(path)
    return files


def _schedule(data_dir: Path, demo: dict[str, Any]) -> list[tuple[Path, int]]:
    """(train file, steps) phases of stage A: the curriculum's steps split evenly, the last takes the rest."""
    steps_a = int(demo["steps_a"])
    curriculum = list(demo.get("curriculum") or [])
    if not curriculum:
        return [(data_dir / "train.jsonl", steps_a)]
    files = _curriculum_files(data_dir, curriculum)
    per = steps_a // len(files)
    phases = [(f, per) for f in files[:-1]] + [(files[-1], steps_a - per * (len(files) - 1))]
    return [(f, n) for f, n in phases if n > 0]


def _train_phases(settings, phases, out_dir: Path, stage: str = "A", init_from: str | None = None,
                  decay_fraction: float = 0.0, **fields):
    """Train through ``phases`` ((file, steps) pairs), each from the previous one's checkpoint.
    ``decay_fraction``: each phase's teacher forcing falls to 0 over this fraction of its steps."""
    from ...training.trainer import train

    results, history, offset = [], [], 0
    for i, (data_file, steps) in enumerate(phases):
        if decay_fraction:
            fields["teacher_forcing_decay_steps"] = max(1, round(decay_fraction * steps))
        cfg = _train_config(
            settings, stage=stage, max_steps=steps, output_dir=str(out_dir / f"phase{i}"),
            train_data=str(data_file), save_every=0, keep_last=1, init_from=init_from,
            warmup_steps=settings["train"]["warmup_steps"] if i == 0 and init_from is None else 0, **fields,
        )
        res = train(cfg)
        results.append(res)
        history += [{**r, "step": r["step"] + offset} for r in res.history]
        offset += steps
        init_from = str(res.checkpoint)
    return results, history, cfg


def _evaluate(
    model_dir: Path,
    records,
    settings: dict[str, Any],
    use_latents: bool,
    threshold: float | None,
    chance: float,
    out_dir: Path,
    fields: dict[str, Any],
    task: str,
    probe_records,
    probe_fields,
) -> dict[str, Any]:
    """Greedy two-step inference on ``records`` (``latentvl.evaluation.generated``) with every instrument.

    Returns the summary the report needs plus ``samples`` (budgets and used latents per test record).
    """
    from ...model.loading import load_latent_model
    from ...reports.evaluation import evaluate
    from ...training.checkpoint import quiet_hf_progress

    with quiet_hf_progress():
        model, processor = load_latent_model(model_dir)
    ev = evaluate(
        model,
        processor,
        records,
        out_dir=out_dir,
        batch_size=int(settings["demo"]["eval_batch_size"]),
        max_new_tokens=4,
        threshold=threshold,
        causal_checks=use_latents,
        use_latents=use_latents,
        chance_accuracy=chance,
        seed=int(settings["demo"]["seed"]),
        fields=fields,
        task=task,
        probe_records=probe_records if use_latents else None,
        probe_fields=probe_fields,
    )
    preds = ev["predictions"]
    used = sum(sum(p["used_lens"]) for p in preds if p["error"] is None)
    budget = sum(sum(p["budgets"]) for p in preds if p["error"] is None)
    causal = {}
    for name in ("mask", "noise", "swap"):
        part = (ev.get("causal") or {}).get(name)
        if part:
            causal[name] = {
                "n": part["n"],
                "accuracy": part["accuracy"],
                "answer_change_rate": part["answer_change_rate"],
            }
    return {
        "n": ev["n_evaluated"],
        "n_errors": ev["n_errors"],
        "accuracy": ev["accuracy"],
        "accuracy_by_difficulty": ev["accuracy_by_difficulty"],
        "used": used,
        "budget": budget,
        USED_RATIO: ev["latents"][USED_RATIO],  # used / budget: the figure latentvl eval reports
        "causal": causal,
        "truncation": ev.get("truncation"),
        "instrument_unit": ev.get("instrument_unit"),
        "implant": ev.get("implant"),
        "probe": ev.get("probe"),
        "alignment": ev.get("alignment"),
        "eval_report": str(out_dir / "report.md"),
        "samples": [
            {"id": p["id"], "correct": p["correct"], "budgets": p["budgets"], "used_lens": p["used_lens"]}
            for p in preds
            if p["error"] is None
        ],
    }


@dataclass
class _DemoData:
    """The generated task: its files, records, per-record fields, chance and stage A's schedule."""

    task: str
    meta: dict[str, Any]
    train_file: Path
    train_records: list[Any]
    val_records: list[Any]
    test_records: list[Any]
    train_fields: dict[str, Any]
    test_fields: dict[str, Any]
    chance: float
    phases: list[tuple[Path, int]]


def run_demo(out: str | Path, settings: dict[str, Any], log=print) -> DemoReport:
    """Data, five arms, evaluation, report. Returns the report's JSON content."""
    import torch

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    threads = settings["train"].get("num_threads")
    if threads:
        torch.set_num_threads(int(threads))
    timings: dict[str, float] = {}
    t_start = time.perf_counter()
    data, demo = _make_data(out, settings["demo"], log)  # 1. data
    timings["data"] = time.perf_counter() - t_start
    t0 = time.perf_counter()
    trained = _train_arms(settings, demo, data, out, log)  # 2. and 3. the five arms
    timings["train"] = time.perf_counter() - t0
    runs, histories, final_thr = trained.runs, trained.histories, trained.final_threshold
    # 4. stage C's stop threshold, chosen on the val split, and its halting against difficulty
    calibration, eval_thr, halting = _stage_c_threshold_and_halting(demo, data, runs, final_thr, log, timings)
    t0 = time.perf_counter()
    evals = _evaluate_arms(settings, demo, data, runs, eval_thr, out, log)  # 5. held-out evaluation
    timings["evaluate"] = time.perf_counter() - t0
    t0 = time.perf_counter()  # 6. report
    report = _assemble_report(settings, demo, data, runs, evals, final_thr, out,
                              stage_c_threshold=eval_thr, calibration=calibration, stage_c_halting=halting)
    report["train_speed"] = train_speed(histories, trained.seconds)
    workers, threads = arm_workers(settings)
    report["arm_workers"] = {"workers": workers, "threads": threads}
    report["stage_c_attempts"] = trained.stage_c_attempts
    write_demo_plots(out, report, histories, evals["stage_c"]["samples"])
    timings["report"] = time.perf_counter() - t0
    timings["total"] = time.perf_counter() - t_start
    report["timings_s"] = {k: round(v, 1) for k, v in timings.items()}
    write_demo_report(out, report)
    return report


def train_speed(histories: dict[str, list[dict[str, Any]]], wall_s: dict[str, float]) -> dict[str, dict[str, Any]]:
    """Per arm: ``steps``, ``steps_per_s`` (steps over the summed ``step_time`` of the trainer's per-step
    metrics; None without them), ``wall_s`` (the arm's whole training time, model building and checkpoints
    included) and ``wall_steps_per_s`` (steps over it)."""
    out = {}
    for arm, rows in histories.items():
        times = [float(r["step_time"]) for r in rows if r.get("step_time") is not None]
        wall = wall_s.get(arm)
        out[arm] = {
            "steps": len(rows),
            "steps_per_s": len(times) / sum(times) if times and sum(times) > 0 else None,
            "wall_s": None if wall is None else round(wall, 1),
            "wall_steps_per_s": len(rows) / wall if wall else None,
        }
    return out


def _make_data(out: Path, demo: dict[str, Any], log) -> tuple[_DemoData, dict[str, Any]]:
    """Generate the task into ``out/data``; the demo settings come back without a curriculum when the
    records carry no difficulty."""
    from ...data.records import load_metadata, load_records
    from ...data.tasks.writer import make_dataset
    from ...evaluation.instruments import read_record_fields

    data_dir = out / "data"
    task = demo["task"]
    knobs = dict((demo.get("data") or {}).get(task) or {})
    meta = make_dataset(task, int(demo["n"]), int(demo["seed"]), data_dir, overwrite=True, **knobs)
    train_file, test_file = data_dir / "train.jsonl", data_dir / "test.jsonl"
    test_records, _ = load_records(test_file)
    train_records, _ = load_records(train_file)
    val_records, _ = load_records(data_dir / "val.jsonl")
    test_fields, train_fields = read_record_fields(test_file), read_record_fields(train_file)
    test_meta = load_metadata(test_file) or meta
    chance = float(test_meta["splits"]["test"]["chance_accuracy"] or test_meta["chance_accuracy"])
    if not any("difficulty" in f for f in train_fields.values()):
        demo = {**demo, "curriculum": []}
    log(f"data: {meta['n']} {task} records in {data_dir} (chance accuracy {chance:.3f})")
    data = _DemoData(task, meta, train_file, train_records, val_records, test_records, train_fields, test_fields,
                     chance, _schedule(data_dir, demo))
    return data, demo


# The arms in the lanes they train in: stage C starts from stage A's checkpoint, every control on its own.
# Longest first, so that with two workers the controls share one worker while the stage A -> C chain has the other.
LANES: tuple[tuple[str, ...], ...] = (("stage_a", "stage_c"), ("latents_no_align",), ("pause",),
                                      ("baseline_no_latents",))


@dataclass
class _TrainedArms:
    """Each arm's last training result and whole history, its training seconds (wall, its own lane), and
    stage C's final stop threshold."""

    runs: dict[str, Any]
    histories: dict[str, list[dict[str, Any]]]
    seconds: dict[str, float]
    final_threshold: float | None
    stage_c_attempts: dict[str, Any] | None = None  # see _train_stage_c


def arm_workers(settings: dict[str, Any]) -> tuple[int, int]:
    """``(workers, threads)``: how many lanes train at once and the threads of each. ``demo.arm_workers``
    (default 1) capped at ``train.num_threads``, which the workers share (at least 1 thread each); one worker
    trains in this process with all the threads."""
    threads = int(settings["train"].get("num_threads") or 1)
    workers = max(1, min(int(settings["demo"].get("arm_workers") or 1), threads))
    return workers, max(1, threads // workers)


def _train_arm(settings: dict[str, Any], demo: dict[str, Any], phases: list[tuple[Path, int]], train_file: Path,
               out: Path, arm: str, init_from: str | None = None):
    """One arm through its phases: stage A through ``phases``; stage C ``steps_c`` steps on all records
    from ``init_from`` (stage A's checkpoint); a control through ``phases`` and then the stage-C steps."""
    c_phase = [(train_file, int(demo["steps_c"]))]
    if arm == "stage_a":
        recipe = demo.get("stage_a") or {}  # stage A's own training signals from the CoT images
        decay = float(recipe.get("teacher_forcing_decay", 0.0))
        return _train_phases(settings, phases, out / arm, decay_fraction=decay,
                             **({"latent": recipe["latent"]} if recipe.get("latent") else {}))
    if arm == "stage_c":
        return _train_phases(settings, c_phase, out / arm, stage="C", init_from=init_from, **_stage_c_fields(demo))
    extra = {"use_latents": False} if arm == "baseline_no_latents" else {"latent": ARM_LATENT[arm]}
    return _train_phases(settings, phases + c_phase, out / arm, **extra)


def _stage_c_fields(demo: dict[str, Any]) -> dict[str, Any]:
    """Stage C's own TrainConfig fields over ``train``: ``latent`` (``demo.stage_c_latent``) and
    ``demo.stage_c_train``."""
    return {"latent": dict(demo.get("stage_c_latent") or {}), **dict(demo.get("stage_c_train") or {})}


def _train_lane(settings: dict[str, Any], demo: dict[str, Any], phases: list[tuple[Path, int]], train_file: Path,
                out: Path, lane: tuple[str, ...], log=print) -> _TrainedArms:
    """The arms of ``lane`` one after another (stage C from the stage-A checkpoint of the same lane)."""
    done = _TrainedArms({}, {}, {}, None)
    steps = {"stage_a": int(demo["steps_a"]), "stage_c": int(demo["steps_c"])}
    for arm in lane:
        t0 = time.perf_counter()
        init_from = str(done.runs["stage_a"].checkpoint) if arm == "stage_c" else None
        log(f"{arm}: {steps.get(arm, steps['stage_a'] + steps['stage_c'])} steps"
            + (f" from {init_from}" if init_from else f" in {len(phases) + (arm not in steps)} phase(s)"))
        if arm == "stage_c":
            res, done.histories[arm], cfg, done.stage_c_attempts = _train_stage_c(
                settings, demo, phases, train_file, out, init_from, log)
            done.final_threshold = cfg.final_threshold
        else:
            res, done.histories[arm], cfg = _train_arm(settings, demo, phases, train_file, out, arm, init_from)
        done.runs[arm] = res[-1]
        done.seconds[arm] = time.perf_counter() - t0
    return done


def _val_accuracy_full_budget(checkpoint: Path, val_file: Path, batch_size: int) -> float:
    """Greedy exact-match accuracy of the model at ``checkpoint`` on the records of ``val_file`` with every
    latent slot used (no stop head)."""
    from ...data.collator import LatentCollator
    from ...data.records import load_records
    from ...evaluation.halting import full_budget
    from ...evaluation.teacher_forced import evaluate_records
    from ...model.loading import load_latent_model
    from ...training.checkpoint import quiet_hf_progress

    records, _ = load_records(val_file)
    with quiet_hf_progress():
        model, processor = load_latent_model(Path(checkpoint) / "model")
    with full_budget(model):
        res = evaluate_records(model, LatentCollator(processor, model.config), records, batch_size=batch_size)
    return float(res["accuracy"])


def _train_stage_c(settings: dict[str, Any], demo: dict[str, Any], phases: list[tuple[Path, int]], train_file: Path,
                   out: Path, init_from: str, log=print):
    """Stage C from stage A's checkpoint ``init_from``, tried again when it lost what stage A computes.

    After each try, its accuracy at full budget on the val split is compared with stage A's: a try that is more
    than ``demo.stage_c_retry_drop`` under it is followed by another with the next training seed (``seed +
    1000 * try``) and ``demo.stage_c_retry_latent`` merged over ``stage_c_latent`` (the same steps and data;
    stage A untouched), up to ``demo.stage_c_attempts`` tries in all. The try kept is the first within the
    drop, else the one with the best val accuracy (the first of equals). Returns ``(results, history, config,
    attempts)``: ``attempts`` holds stage A's val accuracy, each try's seed, latent overrides, folder and val
    accuracy, and the index kept (``None`` when one try is allowed or there is no val split)."""
    tries = int(demo.get("stage_c_attempts", 1))
    val_file = train_file.parent / "val.jsonl"
    if tries < 1:
        raise ValueError(f"demo.stage_c_attempts must be >= 1, got {tries}")
    if tries == 1 or not val_file.exists():
        res, history, cfg = _train_arm(settings, demo, phases, train_file, out, "stage_c", init_from)
        return res, history, cfg, None
    batch_size, max_drop = int(demo["eval_batch_size"]), float(demo.get("stage_c_retry_drop", 0.02))
    a_acc = _val_accuracy_full_budget(Path(init_from), val_file, batch_size)
    attempts: dict[str, Any] = {"stage_a_val_full_budget": a_acc, "max_drop": max_drop, "tries": [], "kept": 0}
    retry_latent = dict(demo.get("stage_c_retry_latent") or {})
    retry_demo = {**demo, "stage_c_latent": {**(demo.get("stage_c_latent") or {}), **retry_latent}}
    try:  # a bad retry setting is named now, not after the first try
        _train_config(settings, stage="C", train_data=str(train_file), **_stage_c_fields(retry_demo))
    except (ValueError, TypeError) as err:
        raise InputError(f"demo.stage_c_retry_latent: {err}") from err
    outcomes = []
    for i in range(tries):
        seeded = copy.deepcopy(settings)
        seeded["demo"]["seed"] = int(settings["demo"]["seed"]) + 1000 * i
        overrides = retry_latent if i > 0 else {}
        folder = out if i == 0 else out / f"stage_c_try{i + 1}"
        res, history, cfg = _train_arm(seeded, demo if i == 0 else retry_demo, phases, train_file, folder,
                                       "stage_c", init_from)
        acc = _val_accuracy_full_budget(res[-1].checkpoint, val_file, batch_size)
        attempts["tries"].append({"seed": seeded["demo"]["seed"], "latent": overrides,
                                  "output_dir": str(folder / "stage_c"), "val_full_budget": acc, "drop": a_acc - acc})
        outcomes.append((res, history, cfg))
        log(f"stage_c try {i + 1} of {tries} (seed {seeded['demo']['seed']}): val accuracy at full budget "
            f"{acc:.3f}, stage A {a_acc:.3f}")
        if a_acc - acc <= max_drop:
            break
    accs = [t["val_full_budget"] for t in attempts["tries"]]
    kept = attempts["kept"] = accs.index(max(accs))  # a try within the drop ends the loop and is the best
    return (*outcomes[kept], attempts)


def _train_arms(settings: dict[str, Any], demo: dict[str, Any], data: _DemoData, out: Path, log) -> _TrainedArms:
    """Every lane of :data:`LANES`: stage A through the curriculum phases and stage C from its checkpoint on all
    records; each control through the same phases and the stage-C steps. With ``arm_workers`` above 1 the lanes
    train that many at a time, each in a fresh process with its share of the threads (the same steps, data,
    model and seed as one after another; only stage A's lane keeps a progress bar)."""
    workers, threads = arm_workers(settings)
    merged = _TrainedArms({}, {}, {}, None)

    def take(part: _TrainedArms) -> None:
        merged.runs.update(part.runs)
        merged.histories.update(part.histories)
        merged.seconds.update(part.seconds)
        merged.final_threshold = part.final_threshold if part.final_threshold is not None else merged.final_threshold
        merged.stage_c_attempts = part.stage_c_attempts or merged.stage_c_attempts

    if workers == 1:
        for lane in (LANES[0], *reversed(LANES[1:])):  # stage A and C, then no latents, pause, no alignment
            take(_train_lane(settings, demo, data.phases, data.train_file, out, lane, log))
        return _in_arm_order(merged)
    from concurrent.futures import ProcessPoolExecutor, as_completed
    from multiprocessing import get_context

    log(f"training the arms {workers} at a time, {threads} thread(s) each: "
        + "; ".join(" then ".join(lane) for lane in LANES))
    with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as pool:
        futures = {}
        for i, lane in enumerate(LANES):
            lane_settings = copy.deepcopy(settings)
            lane_settings["train"]["num_threads"] = threads
            lane_settings["train"]["progress_bar"] = bool(settings["train"].get("progress_bar")) and i == 0
            futures[pool.submit(_train_lane, lane_settings, demo, data.phases, data.train_file, out, lane)] = lane
        for fut in as_completed(futures):
            lane = futures[fut]
            try:
                part = fut.result()
            except BaseException:
                log(f"{' then '.join(lane)}: training failed; the lanes not started are cancelled")
                pool.shutdown(wait=True, cancel_futures=True)
                raise
            take(part)
            log(", ".join(f"{arm} trained in {part.seconds[arm]:.0f} s" for arm in lane))
    return _in_arm_order(merged)


def _in_arm_order(trained: _TrainedArms) -> _TrainedArms:
    """The arms in :data:`ARMS` order, whichever lane ended first (the report's tables and plots follow it)."""
    def order(d: dict[str, Any]) -> dict[str, Any]:
        return {arm: d[arm] for arm in ARMS if arm in d}

    return _TrainedArms(order(trained.runs), order(trained.histories), order(trained.seconds),
                        trained.final_threshold, trained.stage_c_attempts)


def _stage_c_threshold_and_halting(demo: dict[str, Any], data: _DemoData, runs: dict[str, Any], final_thr: float,
                                   log, timings: dict[str, float] | None = None,
                                   ) -> tuple[dict[str, Any] | None, float, dict[str, Any] | None]:
    """Stage C's stop threshold chosen on the validation split (:mod:`latentvl.evaluation.calibration`) and
    written into its final model (skipped when ``demo.calibrate_threshold`` is off or there is no val split:
    the threshold is then the training's last, ``final_thr``); then stage C on the test split at that
    threshold and at full budget, against difficulty (what ``latentvl halting`` reports; skipped without
    difficulties). Returns ``(calibration or None, threshold, halting or None)``; the seconds of each part go
    into ``timings`` as ``calibrate`` and ``evaluate_stage_c_halting``."""
    from ...data.collator import LatentCollator
    from ...evaluation.calibration import (
        DEFAULT_TOLERANCE,
        DEFAULT_USED_SLACK,
        calibrate_threshold,
        write_model_threshold,
    )
    from ...evaluation.halting import evaluate_halting
    from ...model.loading import load_latent_model
    from ...training.checkpoint import quiet_hf_progress

    calibrate = bool(demo.get("calibrate_threshold", True)) and bool(data.val_records)
    difficulty = {sid: f["difficulty"] for sid, f in data.test_fields.items()
                  if isinstance(f.get("difficulty"), (int, float)) and not isinstance(f.get("difficulty"), bool)}
    timings = {} if timings is None else timings
    if not calibrate and not difficulty:
        return None, final_thr, None
    t0 = time.perf_counter()
    with quiet_hf_progress():
        model, processor = load_latent_model(runs["stage_c"].checkpoint / "model")
    collator, batch_size = LatentCollator(processor, model.config), int(demo["eval_batch_size"])
    calibration, threshold = None, final_thr
    if calibrate:
        calibration = calibrate_threshold(
            model, collator, data.val_records, batch_size=batch_size,
            tolerance=float(demo.get("calibration_tolerance", DEFAULT_TOLERANCE)),
            used_slack=float(demo.get("calibration_used_slack", DEFAULT_USED_SLACK)))
        threshold = calibration["threshold"]
        if getattr(runs["stage_c"], "final_model", None) is not None:
            write_model_threshold(runs["stage_c"].final_model, threshold)
        used = "-" if calibration["used_ratio"] is None else f"{calibration['used_ratio']:.3f}"
        log(f"stage C: stop threshold {threshold:g} chosen on {calibration['n']} val records (accuracy "
            f"{calibration['accuracy']:.3f}, used/budget {used}; best {calibration['best_accuracy']:.3f})")
    timings["calibrate"] = time.perf_counter() - t0
    halting = None
    if difficulty:
        t0 = time.perf_counter()
        halting = evaluate_halting(model, collator, data.test_records, difficulty, threshold=threshold,
                                   batch_size=batch_size)
        timings["evaluate_stage_c_halting"] = time.perf_counter() - t0
    return calibration, threshold, halting


def _evaluate_arms(settings: dict[str, Any], demo: dict[str, Any], data: _DemoData, runs: dict[str, Any],
                   c_thr: float, out: Path, log) -> dict[str, dict[str, Any]]:
    """Every arm on the test split with the instruments (stage C at stop threshold ``c_thr``)."""
    probe_records = data.train_records[: int(demo["probe_records"])]
    evals = {}
    for arm in ARMS:
        log(f"evaluating {arm}")
        evals[arm] = _evaluate(
            runs[arm].checkpoint / "model", data.test_records, settings, arm != "baseline_no_latents",
            c_thr if arm == "stage_c" else None, data.chance, out / "eval" / arm, data.test_fields, data.task,
            probe_records, data.train_fields,
        )
    return evals


def _assemble_report(settings: dict[str, Any], demo: dict[str, Any], data: _DemoData, runs: dict[str, Any],
                     evals: dict[str, dict[str, Any]], final_thr: float, out: Path, **stage_c: Any) -> DemoReport:
    """The report's JSON content, with the bars checked (``stage_c``: ``stage_c_threshold``, ``calibration``
    and ``stage_c_halting``, which the halting bars read)."""
    steps_a, steps_c = int(demo["steps_a"]), int(demo["steps_c"])
    diffs = sorted({d for ev in evals.values() for d in ev["accuracy_by_difficulty"]}, key=difficulty_key)
    report: DemoReport = {
        "task": data.task,
        "n_records": data.meta["n"],
        "splits": {k: v["size"] for k, v in data.meta["splits"].items()},
        "test_chance_accuracy": data.chance,
        "hardest_difficulty": diffs[-1] if diffs else None,
        "steps": {"stage_a": steps_a, "stage_c": steps_c,
                  **{arm: steps_a + steps_c for arm in ("baseline_no_latents", "pause", "latents_no_align")}},
        "schedule": [{"train_data": Path(f).name, "steps": n} for f, n in data.phases],
        "final_threshold": final_thr,
        "results": {arm: _summary(evals[arm]) for arm in ARMS},
        "bars": demo["bars"],
        "per_sample": {"stage_a": evals["stage_a"]["samples"], "stage_c": evals["stage_c"]["samples"]},
        "preflight": {arm: [r.to_dict() for r in runs[arm].checks] for arm in ARMS},
        "settings": settings,
        "out": str(out),
        "outputs": {arm: str(runs[arm].checkpoint) for arm in ARMS},
    }
    report.update(stage_c)
    report["bar_metrics"] = bar_metrics(report)
    report["checks"] = check_bars(report["bar_metrics"], report["bars"])
    report["all_bars_met"] = all(report["checks"].values())
    return report


def _summary(ev: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in ev.items() if k != "samples"}


