"""The training loop (design §7), written to be read top to bottom.

:func:`train` does, in order:

1. settle the run: output folder, the checkpoint to resume from (if any), seeds;
2. build the model (tiny, a model directory, ``init_from`` weights, or the resumed checkpoint),
   write the stage's latent fields onto its config, freeze / LoRA / gradient checkpointing;
3. build the data stream (:mod:`latentvl.training.data`) and the collator;
4. build the optimiser and the LR schedule; hand model and optimiser to ``accelerate`` (DDP or FSDP
   under ``torchrun``/``accelerate launch``, bf16 autocast on a GPU);
5. restore optimiser, schedule, random states and data position when resuming;
6. loop over optimiser steps: switch stage A -> C at ``switch_step``, run the design §8 checks before
   the first step of each stage, anneal the stop threshold in stage C, accumulate gradients over
   micro-batches, stop on a non-finite loss, clip, step, log, evaluate, save;
7. save the last checkpoint and a final model directory.

The engine is ``accelerate``: it owns device placement, process-group setup, the DDP/FSDP wrapping and
mixed precision, and leaves the loop to us, which keeps the two-pass latent unit (a method, not
``forward``) and the stage switch in plain sight. See ``docs/training.md``.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..config import LatentSettings
from ..data.collator import LatentCollator, to_device
from ..data.image_cache import DecodedImageCache, ProcessedImageCache
from ..errors import TrainConfigError, TrainDataError
from ..evaluation.calibration import calibrate_threshold, write_model_threshold
from ..evaluation.teacher_forced import evaluate_records
from ..fileio import replace_dir_with_copy, write_atomic
from ..model.objective import LOSS_PARTS
from . import checkpoint as ckpt
from .checks import CheckReport, CheckResult, PreflightError, run_checks
from .config import TrainConfig
from .data import (
    SKIPPED_FILE,
    BatchTimeDataset,
    SkipReport,
    StreamBatchSampler,
    check_latent_data,
    collate_reporting,
    load_split,
    micro_batches,
)
from .distributed import (
    CollectiveError,
    CollectiveTimeoutError,
    all_gather_pair,
    all_sum,
    collective_failure,
    gather_objects,
    make_accelerator,
    mixed_precision,
    optimizer_state_dict,
    restore_optimizer,
    shard_fsdp2,
    through_root,
)
from .metrics import MetricsWriter
from .resume import check_resume_config, lock_output_dir, release_run_lock, resume_checkpoint
from .schedules import lr_factor, teacher_forcing_at, threshold_at
from .setup import (
    STOP_HEAD,
    LatentLossModule,
    build_model,
    export_copy,
    latent_model,
    make_optimizer,
    prepare_for_training,
    restore_lora_state,
    seed_everything,
    set_stage,
    trainable_lora_state,
)


class NonFiniteLossError(RuntimeError):
    """The loss (or the gradient norm) became NaN or infinite; training stopped before the update.

    ``step`` is the 1-based step that failed, ``sample_ids`` the ids of the micro-batches whose loss
    was not finite (all samples of the step when only the gradient norm was), ``checkpoint`` the last
    good checkpoint (kept untouched), or None if none was written yet.
    """

    def __init__(self, step: int, sample_ids: list[str], what: str, checkpoint: Path | None):
        shown = ", ".join(sample_ids[:20]) + (" ..." if len(sample_ids) > 20 else "")
        kept = f"last good checkpoint kept: {checkpoint}" if checkpoint else "no checkpoint written yet"
        super().__init__(f"non-finite {what} at step {step}; sample ids: [{shown}]; {kept}")
        self.step = step
        self.sample_ids = sample_ids
        self.what = what
        self.checkpoint = checkpoint


@dataclass
class TrainState:
    """What the loop needs to continue: saved in ``trainer_state.json``."""

    step: int = 0  # optimiser steps done
    samples_seen: int = 0  # data position in the stream
    stage: str = "A"


@dataclass
class TrainResult:
    output_dir: Path
    step: int
    stage: str
    history: list[dict[str, Any]] = field(default_factory=list)  # per-step metrics of this run
    evals: list[dict[str, Any]] = field(default_factory=list)
    checkpoint: Path | None = None  # the last checkpoint written
    final_model: Path | None = None
    checks: list[CheckReport] = field(default_factory=list)
    calibration: dict[str, Any] | None = None  # calibrate_stop_threshold: the grid and the chosen threshold


def current_threshold(cfg: TrainConfig, step: int) -> float | None:
    """The stop threshold used at 0-based step ``step`` (None in stage A)."""
    if cfg.stage_at(step) != "C":
        return None
    return threshold_at(
        step - cfg.stage_c_start(),
        cfg.threshold_start,
        cfg.final_threshold,
        cfg.threshold_anneal_steps,
        cfg.threshold_anneal_shape,
    )


# ------------------------------------------------------------------------------------------- train
def train(cfg: TrainConfig, callbacks: list[Any] | None = None) -> TrainResult:
    """Run training as configured and return a :class:`TrainResult`.

    ``callbacks``: objects with optional ``on_step_begin(step, model)`` (``step``: steps done so far)
    and ``on_step_end(step, record, model)`` (``step``: 1-based, including this one) methods; ``model``
    is the latent model being trained. Raising from a callback stops the run (tests use this to
    simulate a crash).
    """
    cfg = copy.deepcopy(cfg).validate()
    where = _Where()
    try:
        return _run_training(cfg, list(callbacks or []), where)
    except Exception as err:
        distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        ours = (NonFiniteLossError, PreflightError, ckpt.CheckpointError, TrainConfigError)
        kind = collective_failure(err) if distributed and not isinstance(err, ours) else None
        if kind == "timeout":
            raise CollectiveTimeoutError(where.phase, cfg.dist_timeout_s, dist.get_rank()) from err
        if kind == "peer":
            raise CollectiveError(where.phase, dist.get_rank()) from err
        raise


class _Where:
    """What the processes are doing together, named when a collective times out or fails."""

    phase = "start-up (process group, model wrapping, resume)"


@dataclass
class _Run:
    """Everything one training run holds, built by :func:`_start` and carried through the loop."""

    cfg: TrainConfig
    callbacks: list[Any]
    where: _Where
    accelerator: Any
    rank: int
    world: int
    device: torch.device
    main: bool
    out_dir: Path
    state: TrainState
    result: TrainResult
    resume_dir: Path | None = None
    last_ckpt: Path | None = None
    model: nn.Module | None = None  # what is trained (a PeftModel under LoRA)
    lm: nn.Module | None = None  # the latent model inside it
    processor: Any = None
    collator: LatentCollator | None = None
    sampler: StreamBatchSampler | None = None
    batches: Any = None  # the stream of collated micro-batches
    train_items: BatchTimeDataset | None = None
    eval_records: list | None = None
    skips: SkipReport | None = None
    fsdp: bool = False
    module: nn.Module | None = None  # the LatentLossModule, wrapped by DDP or sharded by FSDP2
    optimizer: Any = None
    scheduler: Any = None
    metrics: MetricsWriter | None = None
    checked: set[str] = field(default_factory=set)  # stages whose design §8 checks passed
    lock: Path | None = None  # output_dir/.lock, held by the main process

    @property
    def global_batch(self) -> int:
        return self.cfg.batch_size * self.cfg.grad_accum * self.world


def _run_training(cfg: TrainConfig, callbacks: list[Any], where: _Where) -> TrainResult:
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    run, warnings = _start(cfg, callbacks, where)  # 1. the run
    try:
        _setup_model(run)  # 2. the model
        data_warning = _setup_data(run)  # 3. the data
        _setup_engine(run)  # 4. optimiser, schedule, engine
        if run.resume_dir is not None:  # 5. resume
            _restore(run)
        _open_metrics(run, [data_warning, *warnings])
        try:
            while run.state.step < cfg.max_steps:  # 6. the loop
                _train_step(run)
            _finish(run)  # 7. the end
        finally:
            run.metrics.close()
    finally:
        release_run_lock(run.lock)
    run.result.step = run.state.step
    run.result.stage = run.state.stage
    if run.main:
        run.metrics.message(f"done: {run.state.step} steps; checkpoint {run.result.checkpoint}")
    return run.result


# 1. the run ---------------------------------------------------------------------------------------
def _start(cfg: TrainConfig, callbacks: list[Any], where: _Where) -> tuple[_Run, list[str]]:
    """The engine and the output folder; the checkpoint to resume from, its state, and seeds."""
    accelerator = make_accelerator(cfg)
    main = accelerator.is_main_process
    out_dir = Path(cfg.output_dir)
    lock = lock_output_dir(out_dir, main)
    try:
        return _start_locked(cfg, callbacks, where, accelerator, out_dir, lock)
    except BaseException:
        release_run_lock(lock)
        raise


def _start_locked(cfg: TrainConfig, callbacks: list[Any], where: _Where, accelerator, out_dir: Path,
                  lock: Path | None) -> tuple[_Run, list[str]]:
    main = accelerator.is_main_process
    resume_dir, resume_notes = resume_checkpoint(cfg, out_dir, main) if cfg.resume else (None, [])
    if main:
        for note in resume_notes:
            print(f"warning: {note}", flush=True)
    state = TrainState(stage=cfg.stage_at(0))
    warnings: list[str] = []
    if resume_dir is not None:
        saved = ckpt.read_trainer_state(resume_dir)
        if isinstance(saved.get("config"), dict):  # refuse changes the run could not honour
            warnings = check_resume_config(
                saved["config"],
                cfg,
                step=int(saved["step"]),
                saved_global_batch=saved.get("global_batch"),
                world_size=accelerator.num_processes,
            )
        state = TrainState(
            step=int(saved["step"]),
            samples_seen=int(saved["samples_seen"]),
            stage=cfg.stage_at(int(saved["step"])),
        )
    seed_everything(cfg.seed)
    run = _Run(
        cfg=cfg, callbacks=callbacks, where=where, accelerator=accelerator, rank=accelerator.process_index,
        world=accelerator.num_processes, device=accelerator.device, main=main, out_dir=out_dir, state=state,
        result=TrainResult(output_dir=out_dir, step=state.step, stage=state.stage),
        resume_dir=resume_dir, last_ckpt=resume_dir, lock=lock,
    )
    return run, warnings


# 2. the model -------------------------------------------------------------------------------------
def _setup_model(run: _Run) -> None:
    """The model of the current stage, prepared for training; LoRA adapters restored on resume."""
    base, run.processor = build_model(run.cfg, run.state.stage, run.resume_dir)
    run.model = prepare_for_training(base, run.cfg)
    if run.resume_dir is not None and run.cfg.lora:
        missing = restore_lora_state(run.model, ckpt.load_lora_state(run.resume_dir))
        if missing:
            raise ckpt.CheckpointError(f"{run.resume_dir}: LoRA state lacks {missing[:5]}")
    run.lm = latent_model(run.model)


# 3. the data --------------------------------------------------------------------------------------
def _setup_data(run: _Run) -> str | None:
    """Records, the collator and this process's stream of micro-batches; returns a data warning."""
    cfg = run.cfg
    run.skips = SkipReport(run.out_dir / SKIPPED_FILE if run.main else None,
                           keep_batch_entries=run.resume_dir is not None)
    train_records = load_split(cfg.train_data, cfg.skip_invalid, run.skips, "train")
    warning = check_latent_data(train_records, cfg.train_data, cfg.stage, cfg.use_latents)
    run.collator = LatentCollator(
        run.processor,
        run.lm.config,
        max_length=cfg.max_length,
        system_prompt=cfg.system_prompt,
        use_latents=cfg.use_latents,
        image_cache=ProcessedImageCache(cfg.image_cache_mb * 2**20) if cfg.image_cache_mb else None,
    )
    if cfg.eval_data:
        eval_records = load_split(cfg.eval_data, cfg.skip_invalid, run.skips, "eval")
        run.eval_records = _usable_eval_records(run, eval_records)
    run.sampler = StreamBatchSampler(
        len(train_records), cfg.batch_size, cfg.grad_accum, run.world, run.rank, cfg.seed,
        start=run.state.samples_seen,
    )
    decoded = DecodedImageCache(cfg.image_cache_mb * 2**20) if cfg.image_cache_mb else None
    run.batches = micro_batches(train_records, run.collator, run.sampler, cfg.num_workers, cfg.skip_invalid, decoded)
    run.train_items = BatchTimeDataset(train_records, cfg.skip_invalid)  # random access, for the checks' batch
    return warning


def _usable_eval_records(run: _Run, records: list) -> list:
    """The eval records the evaluation will use, each read and collated once now, so that a record the
    collator rejects or an image that cannot be decoded is found before training, not after it. With
    ``skip_invalid`` such a record is left out and reported (``skipped_records.json``, split ``eval``);
    without, the error names the record. Every process checks the same records, so all agree."""
    from ..data.records import RecordDataset
    from ..errors import CollatorInputError, InputError

    cfg = run.cfg
    limit = len(records) if cfg.eval_max_samples is None else cfg.eval_max_samples
    usable, skipped = [], []
    for rec in records:
        if len(usable) >= limit:
            break
        try:
            run.collator([RecordDataset([rec])[0]])
        except (InputError, OSError) as err:
            if not cfg.skip_invalid:
                raise CollatorInputError(f"eval_data {rec.source} (id {rec.id!r}): {err}") from err
            skipped.append({"source": rec.source, "id": rec.id, "reason": str(err)})
            continue
        usable.append(rec)
    for e in run.skips.add("eval", skipped, "load") if run.main else []:
        print(f"skipped {e['source']} (id {e['id']!r}): {e['reason']}", flush=True)
    if not usable:
        raise TrainDataError(f"{cfg.eval_data}: no eval record can be used ({len(skipped)} skipped)")
    return usable


# 4. optimiser, schedule, engine -------------------------------------------------------------------
def _setup_engine(run: _Run) -> None:
    """The loss module wrapped for DDP or sharded by FSDP2, its optimiser and the LR schedule."""
    cfg = run.cfg
    run.fsdp = cfg.distributed == "fsdp" and run.world > 1
    if run.fsdp:
        if cfg.lora:
            raise ValueError("lora with distributed=fsdp is not supported; use ddp for LoRA runs")
        run.module = shard_fsdp2(LatentLossModule(run.model).to(run.device), mixed_precision(cfg))
        run.optimizer = make_optimizer(cfg, run.model)  # after sharding: the parameters are DTensors now
    else:
        optimizer = make_optimizer(cfg, run.model)
        run.module, run.optimizer = run.accelerator.prepare(LatentLossModule(run.model), optimizer)
    run.scheduler = torch.optim.lr_scheduler.LambdaLR(
        run.optimizer,
        functools.partial(
            lr_factor,
            warmup_steps=cfg.warmup_steps,
            max_steps=cfg.max_steps,
            kind=cfg.lr_scheduler,
            min_ratio=cfg.min_lr_ratio,
        ),
    )


# 5. resume ----------------------------------------------------------------------------------------
def _restore(run: _Run) -> None:
    """Optimiser, schedule and this process's random states from the checkpoint resumed."""
    saved_opt = ckpt.load_optimizer_state(run.resume_dir)
    restore_optimizer(run.optimizer, run.module, saved_opt["optimizer"], run.fsdp)
    run.scheduler.load_state_dict(saved_opt["scheduler"])
    rng = ckpt.load_rng_state(run.resume_dir, run.rank)
    if rng is not None:
        ckpt.set_rng_state(rng)


def _open_metrics(run: _Run, warnings: list[str | None]) -> None:
    """The metrics writer; the warnings, the config and a line that says what this run does."""
    cfg = run.cfg
    run.metrics = MetricsWriter(
        run.out_dir,
        enabled=run.main,
        total_steps=cfg.max_steps,
        start_step=run.state.step,
        tensorboard=cfg.tensorboard,
        progress_bar=cfg.progress_bar,
    )
    if not run.main:
        return
    for text in warnings:
        if text:
            run.metrics.message(f"warning: {text}")
    (run.out_dir / "config.yaml").write_text(cfg.to_yaml())
    resumed_from = f" from {run.resume_dir} (step {run.state.step})" if run.resume_dir else ""
    run.metrics.message(
        f"training {cfg.max_steps} steps, stage {cfg.stage}, {run.world} process(es), "
        f"global batch {run.global_batch}{resumed_from}"
    )


# 6. the loop --------------------------------------------------------------------------------------
def _train_step(run: _Run) -> None:
    """One optimiser step: stage switch, the stage's checks, micro-batches, update, log, eval, save."""
    cfg, state = run.cfg, run.state
    step_no = state.step + 1
    for cb in run.callbacks:
        if hasattr(cb, "on_step_begin"):
            cb.on_step_begin(state.step, run.lm)
    stage = cfg.stage_at(state.step)
    if stage != run.lm.config.latent_mode_stage:
        set_stage(run.lm, cfg, stage)
        run.metrics.message(f"step {step_no}: switching to stage {stage}")
    state.stage = stage
    if cfg.teacher_forcing_decay_steps and stage == "A":  # a pure function of the step: resumes exactly
        p = teacher_forcing_at(state.step, cfg.latent["latent_teacher_forcing"], cfg.teacher_forcing_decay_steps)
        LatentSettings.from_config(run.lm.config).replace(latent_teacher_forcing=p).apply_to(run.lm.config)
    threshold = current_threshold(cfg, state.step)
    if cfg.run_checks and stage not in run.checked:
        _check_stage(run, step_no, stage, threshold)
    t0 = time.perf_counter()
    sums, step_ids = _accumulate(run, step_no, threshold)
    grad_norm, lr = _update(run, step_no, step_ids)
    record = _log_step(run, step_no, stage, threshold, sums, grad_norm, lr, time.perf_counter() - t0)
    for cb in run.callbacks:
        if hasattr(cb, "on_step_end"):
            cb.on_step_end(step_no, record, run.lm)
    _evaluate_and_save(run, step_no)


def _check_stage(run: _Run, step_no: int, stage: str, threshold: float | None) -> None:
    """The design §8 checks on this step's first micro-batch, before the stage's first update; every
    process must pass."""
    run.where.phase = f"step {step_no}: the design §8 checks (stage {stage})"
    first = collate_reporting(run.collator, run.train_items)(
        [run.train_items[i] for i in run.sampler.micro_batch(run.state.samples_seen, 0)]
    )
    check = functools.partial(
        run_checks,
        batch=to_device(first, run.device),
        stage=stage,
        threshold=threshold,
        tolerance=run.cfg.check_tolerance,
    )
    report = through_root(run.module, run.fsdp, check)
    ok_everywhere = all_sum([0.0 if report.ok else 1.0], run.device)[0] == 0
    run.result.checks.append(report)
    run.metrics.message(report.format())
    if not ok_everywhere:
        if report.ok:
            report.results.append(CheckResult("other processes", False, "a check failed on another process"))
        raise PreflightError(report)
    run.checked.add(stage)


def _accumulate(run: _Run, step_no: int, threshold: float | None) -> tuple[dict[str, float], list[str]]:
    """Forward and backward over the step's micro-batches; sums of the parts and slot counts, and the
    step's sample ids. Reports images skipped at batch time; stops on a non-finite loss before the
    update touches the weights."""
    cfg = run.cfg
    run.where.phase = f"step {step_no}: forward and backward (DDP gradient all-reduce, FSDP gathers)"
    sums = dict.fromkeys((*LOSS_PARTS, "used", "budget", "n"), 0.0)
    bad_ids: list[str] = []
    step_ids: list[str] = []
    step_skipped: list[dict[str, Any]] = []
    for micro in range(cfg.grad_accum):
        batch = to_device(next(run.batches), run.device)
        step_ids.extend(batch["ids"])
        step_skipped.extend(batch.get("skipped") or [])
        sync = micro == cfg.grad_accum - 1
        skip_sync = not sync and run.world > 1 and not run.fsdp  # FSDP2 reduces every micro-batch
        ctx = run.accelerator.no_sync(run.module) if skip_sync else contextlib.nullcontext()
        with ctx:
            out = run.module(batch, threshold)
            loss = out["loss"]
            if not torch.isfinite(loss.detach()).all():
                bad_ids.extend(batch["ids"])
            run.accelerator.backward(loss / cfg.grad_accum)
        for k in LOSS_PARTS:
            sums[k] += float(out[k].detach())
        sums["used"] += out["used"]
        sums["budget"] += out["budget"]
        sums["n"] += 1

    run.where.phase = f"step {step_no}: the all-reduce of the loss checks"
    n_bad, n_skipped = all_sum([1.0 if bad_ids else 0.0, float(len(step_skipped))], run.device)
    if n_skipped:  # images that failed to decode at batch time (skip_invalid): report, go on
        found = [e for part in gather_objects(step_skipped) for e in part]
        for e in run.skips.add("train", found, "batch") if run.main else []:
            run.metrics.message(
                f"step {step_no}: skipped {e['source']} (id {e['id']!r}): {e['reason']} "
                f"[{run.skips.total} skipped in all, listed in {run.skips.path}]"
            )
    if n_bad > 0:
        ids = [i for part in gather_objects(bad_ids) for i in part]
        raise NonFiniteLossError(step_no, ids, "loss", run.last_ckpt)
    return sums, step_ids


def _update(run: _Run, step_no: int, step_ids: list[str]) -> tuple[float | None, float]:
    """Clip (stopping on a non-finite norm), step the optimiser and the schedule, advance the state.
    Returns the gradient norm and the learning rate the step used."""
    run.where.phase = f"step {step_no}: gradient clipping and the optimiser step"
    if run.cfg.head_only_at(step_no - 1):  # stop_head_first_steps: only the stop head moves
        for name, p in run.module.named_parameters():
            if STOP_HEAD not in name:
                p.grad = None
    grad_norm = None
    if run.cfg.grad_clip is not None:
        norm = run.accelerator.clip_grad_norm_(run.module.parameters(), run.cfg.grad_clip)
        grad_norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
        if not math.isfinite(grad_norm):
            ids = [i for part in gather_objects(step_ids) for i in part]
            raise NonFiniteLossError(step_no, ids, "gradient norm", run.last_ckpt)
    lr = run.scheduler.get_last_lr()[0]
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.state.step = step_no
    run.state.samples_seen += run.global_batch
    return grad_norm, lr


def _log_step(run: _Run, step_no: int, stage: str, threshold: float | None, sums: dict[str, float],
              grad_norm: float | None, lr: float, step_time: float) -> dict[str, Any]:
    """The step's record: means over micro-batches and processes, latent slots used over the budget
    (a ratio of totals), and each process's ratio; appended to the history and logged."""
    run.where.phase = f"step {step_no}: the all-reduce of the step's metrics"
    keys = list(sums)
    total = dict(zip(keys, all_sum([sums[k] for k in keys], run.device), strict=True))
    per_rank = all_gather_pair(sums["used"], sums["budget"], run.device) if run.world > 1 else None
    n = max(total["n"], 1.0)
    record = {
        "step": step_no,
        "stage": stage,
        **{k: total[k] / n for k in LOSS_PARTS},
        "used": int(total["used"]),
        "budget": int(total["budget"]),
        "used_ratio": total["used"] / total["budget"] if total["budget"] else None,
        "threshold": threshold,
        "teacher_forcing": float(getattr(run.lm.config, "latent_teacher_forcing", 0.0)) if stage == "A" else 0.0,
        "lr": lr,
        "grad_norm": grad_norm,
        "step_time": step_time,
        "samples_seen": run.state.samples_seen,
    }
    if per_rank is not None:  # how each process's samples halted (they differ in stage C)
        record["rank_used_ratio"] = [u / b if b else None for u, b in per_rank]
    run.result.history.append(record)
    if step_no % run.cfg.log_every == 0 or step_no == run.cfg.max_steps:
        run.metrics.log_train(record)
    return record


def _evaluate_and_save(run: _Run, step_no: int) -> None:
    """Evaluate and save on schedule (the last step does both in :func:`_finish`); a stage-A model is
    complete at the switch, so a checkpoint of it is always kept."""
    cfg = run.cfg
    at_switch = cfg.stage == "AC" and step_no == cfg.switch_step
    if step_no == cfg.max_steps:
        return
    if run.eval_records is not None and cfg.eval_every and (step_no % cfg.eval_every == 0 or at_switch):
        run.where.phase = f"step {step_no}: evaluation"
        _evaluate(run, step_no)
    if cfg.save_every and step_no % cfg.save_every == 0 or at_switch:
        run.where.phase = f"step {step_no}: writing checkpoint {ckpt.step_dirname(step_no)}"
        run.last_ckpt = _save(run, step_no)
        run.result.checkpoint = run.last_ckpt


# 7. the end ---------------------------------------------------------------------------------------
def _finish(run: _Run) -> None:
    """The last checkpoint (unless the last step wrote it) and ``final/``, then the final evaluation and
    the calibration: a failure there never costs the trained model. A resumed run whose steps were all
    done comes straight here and finishes what is left."""
    step = run.state.step
    run.where.phase = f"the end of the run (checkpoint {ckpt.step_dirname(step)}, final evaluation, barrier)"
    if run.last_ckpt is None or ckpt.read_trainer_state(run.last_ckpt)["step"] != step:
        run.last_ckpt = _save(run, step)
    run.result.checkpoint = run.last_ckpt
    if run.cfg.save_final_model and run.main:
        final = run.out_dir / "final"
        replace_dir_with_copy(run.last_ckpt / ckpt.MODEL_DIR, final)
        run.result.final_model = final
    run.accelerator.wait_for_everyone()
    if run.eval_records is not None:
        _evaluate(run, step)
    if run.cfg.calibrate_stop_threshold:
        run.where.phase = "the end of the run (stop-threshold calibration on eval_data)"
        _calibrate(run)
    run.accelerator.wait_for_everyone()


def _calibrate(run: _Run) -> None:
    """Choose the stop threshold on the eval records (every process takes part) and, on the main process,
    write ``calibration.json`` and the threshold into ``final/`` (the checkpoint keeps the training's)."""
    cfg = run.cfg
    result = through_root(
        run.module,
        run.fsdp,
        lambda m: calibrate_threshold(
            m, run.collator, run.eval_records, tolerance=cfg.calibration_tolerance,
            used_slack=cfg.calibration_used_slack,
            batch_size=cfg.eval_batch_size or cfg.batch_size, max_samples=cfg.eval_max_samples,
            rank=run.rank, world_size=run.world,
        ),
    )
    run.result.calibration = result
    if run.main:
        write_atomic(run.out_dir / "calibration.json", json.dumps(result, indent=2) + "\n")
        if run.result.final_model is not None:
            write_model_threshold(run.result.final_model, result["threshold"])
        used = "-" if result["used_ratio"] is None else f"{result['used_ratio']:.3f}"
        print(f"stop threshold {result['threshold']:g} chosen on {result['n']} eval records (accuracy "
              f"{result['accuracy']:.3f}, used/budget {used}); see {run.out_dir / 'calibration.json'}", flush=True)


def _save(run: _Run, step: int) -> Path:
    """A checkpoint of ``step`` (every process writes its part; under FSDP the full state is gathered)."""
    cfg = run.cfg
    trainer_state = {
        "step": step,
        "pinned": cfg.stage == "AC" and step == cfg.switch_step,  # the finished stage A: never pruned
        "samples_seen": run.state.samples_seen,
        "stage": run.state.stage,
        "threshold": current_threshold(cfg, max(step - 1, 0)),
        "world_size": run.world,
        "global_batch": run.global_batch,
        "seed": cfg.seed,
        "config": cfg.to_dict(),
        "last_metrics": run.result.history[-1] if run.result.history else None,
    }
    model_sd = None
    if run.fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(run.module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        model_sd = {k[len("model.") :]: v for k, v in full.items()} if run.main else None
    return ckpt.save_checkpoint(
        run.out_dir,
        step,
        rank=run.rank,
        export_model=export_copy(run.model) if run.main else None,
        processor=run.processor,
        optimizer_state=optimizer_state_dict(run.optimizer, run.module, run.fsdp),
        scheduler_state=run.scheduler.state_dict(),
        trainer_state=trainer_state,
        lora_state=trainable_lora_state(run.model),
        model_state_dict=model_sd,
        keep_last=cfg.keep_last,
    )


def _evaluate(run: _Run, step: int) -> dict[str, Any]:
    """Teacher-forced evaluation on the eval records, split over the processes; logged and kept."""
    cfg = run.cfg
    thr = current_threshold(cfg, max(step - 1, 0))
    res = through_root(
        run.module,
        run.fsdp,
        lambda m: evaluate_records(
            m,
            run.collator,
            run.eval_records,
            batch_size=cfg.eval_batch_size or cfg.batch_size,
            threshold=thr,
            max_samples=cfg.eval_max_samples,
            rank=run.rank,
            world_size=run.world,
        ),
    )
    record = {"step": step, "stage": run.state.stage, **res}
    run.metrics.log_eval(record)
    run.result.evals.append(record)
    return record


# ------------------------------------------------------------------------------------ small pieces
