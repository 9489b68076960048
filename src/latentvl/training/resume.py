"""A run's folder across runs: the lock that keeps one run to a folder, the checkpoint a resumed run
continues from (verified), and what a resumed run may change. Restoring the optimiser, schedule and random
states is the loop's step 5 (:mod:`latentvl.training.trainer`); the checkpoint format is
:mod:`latentvl.training.checkpoint`.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from pathlib import Path
from typing import Any

import torch.distributed as dist

from ..errors import TrainConfigError
from . import checkpoint as ckpt
from .checkpoint import (
    CHECKPOINT_DIRNAME,
    STATE_FILE,
    CheckpointError,
    CorruptCheckpointError,
    list_checkpoints,
    verify_checkpoint,
)
from .config import TrainConfig

LOCK_FILE = ".lock"


class RunLockedError(RuntimeError):
    """Another live run holds ``output_dir``; the message names its pid, host and start time."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        return True
    except (OverflowError, ValueError):
        return False
    return True


def acquire_run_lock(output_dir: str | Path, warn=print) -> Path:
    """Take ``output_dir/.lock`` (pid, host, start time), so that two runs never share an output folder.

    The lock appears whole or not at all: it is written beside the folder's lock name, then hard-linked to
    it (``os.link`` fails if the name exists), so a run started at the same moment never reads a half-written
    lock. A lock whose process is gone (same host, pid not alive) or that cannot be read is taken over with
    a warning; a live one raises :class:`RunLockedError` naming its holder."""

    path = Path(output_dir) / LOCK_FILE
    me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    mine = path.with_name(f"{LOCK_FILE}.{me['pid']}.tmp")
    mine.write_text(json.dumps(me) + "\n", encoding="utf-8")
    try:
        return _link_lock(path, mine, output_dir, warn)
    finally:
        mine.unlink(missing_ok=True)


def _link_lock(path: Path, mine: Path, output_dir: str | Path, warn) -> Path:
    for _attempt in range(3):
        try:
            os.link(mine, path)
        except FileExistsError:
            try:
                holder = json.loads(path.read_text(encoding="utf-8"))
                pid, host = int(holder["pid"]), str(holder["host"])
            except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError):
                holder = None
            if holder is not None and (host != socket.gethostname() or _pid_alive(pid)):
                raise RunLockedError(
                    f"output_dir={str(output_dir)!r} is in use by another run (pid {pid} on {host}, started "
                    f"{holder.get('started', '?')}; lock file {path}). Wait for it, use another output_dir, "
                    f"or delete {path} if that run is gone"
                ) from None
            what = "unreadable" if holder is None else f"left by pid {pid}, which is no longer running"
            warn(f"warning: taking over the stale lock {path} ({what})")
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            continue
        return path
    raise RunLockedError(f"output_dir={str(output_dir)!r}: could not take the lock {path}")


def release_run_lock(path: Path | None) -> None:
    """Remove the lock if it is still this process's."""
    if path is None:
        return
    try:
        if int(json.loads(path.read_text(encoding="utf-8"))["pid"]) == os.getpid():
            path.unlink()
    except (OSError, ValueError, KeyError, TypeError):
        pass


def choose_resume(resume: str, output_dir: str | Path) -> tuple[Path, list[str]]:
    """The checkpoint to resume from, verified, and what was said about it (sentences).

    ``"latest"`` (or an output folder): the newest checkpoint that verifies; newer ones that do not are
    named in the notes and skipped. An explicit checkpoint folder that fails verification raises
    :class:`CorruptCheckpointError`, which names the file and the newest checkpoint that does verify.
    """
    path = Path(resume)
    explicit = resume != "latest" and (path / STATE_FILE).is_file()
    root = path.parent.parent if explicit else (Path(output_dir) if resume == "latest" else path)
    if explicit:
        try:
            verify_checkpoint(path)
        except CorruptCheckpointError as err:
            good = _newest_verified(root, exclude=path)
            hint = f"; the newest checkpoint that verifies is {good[0]} (resume={good[0]})" if good else ""
            raise CorruptCheckpointError(err.file, err.why + hint) from err
        return path, []
    candidates = list_checkpoints(root)
    if not candidates:
        if resume == "latest":
            raise CheckpointError(f"resume=latest: no checkpoint under {Path(root) / CHECKPOINT_DIRNAME}")
        raise CheckpointError(f"resume={resume!r}: not a checkpoint directory (no {STATE_FILE})")
    notes: list[str] = []
    for candidate in reversed(candidates):
        try:
            verify_checkpoint(candidate)
        except CorruptCheckpointError as err:
            notes.append(f"checkpoint {candidate.name} is damaged, skipped: {err}")
            continue
        if notes:
            notes.append(f"resuming from {candidate}, the newest checkpoint that verifies")
        return candidate, notes
    raise CheckpointError(
        f"resume={resume!r}: no checkpoint under {Path(root) / CHECKPOINT_DIRNAME} verifies: " + "; ".join(notes)
    )


def _newest_verified(root: Path, exclude: Path) -> tuple[Path] | None:
    for candidate in reversed(list_checkpoints(root)):
        if candidate.resolve() == exclude.resolve():
            continue
        try:
            verify_checkpoint(candidate)
        except CheckpointError:
            continue
        return (candidate,)
    return None



# What a resumed run may change (docs/training.md, "What may change on resume"). Every other option is
# fixed by the checkpoint: data, model, latent fields, stages and thresholds, optimiser, learning-rate
# schedule, seed, LoRA and freezing. The schedule's base values live in the saved scheduler state, the
# data order in the seed and the stream position: changing them would run something else than the
# config says.
RESUME_FREE = frozenset(
    {
        "resume",
        "output_dir",
        "eval_data",
        "eval_every",
        "eval_max_samples",
        "eval_batch_size",
        "calibrate_stop_threshold",
        "calibration_tolerance",
        "calibration_used_slack",
        "save_every",
        "keep_last",
        "save_final_model",
        "log_every",
        "tensorboard",
        "progress_bar",
        "num_workers",
        "num_threads",
        "image_cache_mb",
        "run_checks",
        "check_tolerance",
        "dist_timeout_s",
        "distributed",
        "ddp_find_unused_parameters",
        "gradient_checkpointing",
    }
)


# allowed with a warning: the run continues under other numerics
RESUME_WARN = frozenset({"mixed_precision", "attn_implementation"})


# allowed under a condition, checked in check_resume_config
RESUME_CONDITIONAL = frozenset({"max_steps", "batch_size", "grad_accum"})


def check_resume_config(
    saved: dict[str, Any], cfg: TrainConfig, *, step: int, saved_global_batch: int | None, world_size: int
) -> list[str]:
    """Compare ``cfg`` with the config a checkpoint was written with (``saved``) before resuming.

    Raises :class:`TrainConfigError` naming every option that may not change (with both values);
    returns warnings (sentences) for the changes that are allowed but alter the run. ``step`` is the
    checkpoint's step, ``saved_global_batch`` its samples per step, ``world_size`` the processes now.
    """
    now = cfg.to_dict()
    refused: list[str] = []
    warnings: list[str] = []
    for name, value in now.items():
        if name not in saved or name in RESUME_FREE or saved[name] == value:
            continue
        old = saved[name]
        if name in RESUME_WARN:
            warnings.append(f"{name} changed from {old!r} to {value!r} on resume")
        elif name not in RESUME_CONDITIONAL:
            refused.append(f"{name}={value!r} (checkpoint: {old!r})")
    global_batch = cfg.batch_size * cfg.grad_accum * world_size
    if saved_global_batch is not None and global_batch != saved_global_batch:
        refused.append(
            f"batch_size={cfg.batch_size} x grad_accum={cfg.grad_accum} x {world_size} process(es) = "
            f"{global_batch} samples per step (checkpoint: {saved_global_batch}; batch_size and grad_accum "
            "may change only when the global batch stays the same)"
        )
    if cfg.max_steps < step:
        refused.append(f"max_steps={cfg.max_steps} (the checkpoint is at step {step} already)")
    # max_steps == step: every step is done; the resumed run only finishes what is left (final/,
    # evaluation, calibration), so nothing about the steps changes
    elif "max_steps" in saved and saved["max_steps"] != cfg.max_steps and cfg.lr_scheduler != "constant":
        from .schedules import lr_factor

        def lr_at(max_steps: int) -> float:
            return cfg.lr * lr_factor(step, cfg.warmup_steps, max_steps, cfg.lr_scheduler, cfg.min_lr_ratio)

        warnings.append(
            f"max_steps changed from {saved['max_steps']} to {cfg.max_steps}: the {cfg.lr_scheduler} schedule "
            f"now runs to step {cfg.max_steps} (lr at step {step + 1}: {lr_at(cfg.max_steps):.4g} instead of "
            f"{lr_at(saved['max_steps']):.4g})"
        )
    if refused:
        raise TrainConfigError(
            "resume: these options differ from the checkpoint's and cannot change on resume: "
            + "; ".join(refused)
            + ". Put them back, or start a new run from the checkpoint's weights with init_from"
        )
    return warnings



def resume_checkpoint(cfg: TrainConfig, out_dir: Path, main: bool) -> tuple[Path, list[str]]:
    """The verified checkpoint to resume from (rank 0 verifies, every process learns the answer)."""
    answer: list[Any] = [None]
    if main:
        try:
            path, notes = choose_resume(cfg.resume, out_dir)
            answer = [("ok", str(path), notes)]
        except ckpt.CheckpointError as err:
            answer = [("error", err)]
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(answer, src=0)
    if answer[0][0] == "error":
        raise answer[0][1]
    return Path(answer[0][1]), answer[0][2]


def lock_output_dir(out_dir: Path, main: bool) -> Path | None:
    """Create ``out_dir`` and take its lock (the main process; every process learns the outcome)."""
    answer: list[Any] = [("ok", None)]
    if main:
        try:
            prepare_output_dir(out_dir)
            answer = [("ok", acquire_run_lock(out_dir, warn=lambda text: print(text, flush=True)))]
        except (TrainConfigError, RunLockedError) as err:
            answer = [("error", err)]
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(answer, src=0)
    if answer[0][0] == "error":
        raise answer[0][1]
    return answer[0][1] if main else None


def prepare_output_dir(out_dir: Path) -> None:
    """Create ``out_dir`` and make sure it takes files; a :class:`TrainConfigError` naming it if not."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        why = ckpt.describe_os_error(err)
        raise TrainConfigError(f"output_dir={str(out_dir)!r}: cannot write there ({why})") from err

