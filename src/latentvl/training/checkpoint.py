"""Atomic training checkpoints: write everything into a hidden temporary folder, then rename it.

Layout of ``<output_dir>/checkpoints/step-00000120/``:

- ``model/`` - a loadable latentvl model directory (``load_latent_model``; LoRA adapters merged in);
  this is what ``init_from`` reads, e.g. to start stage C from a stage-A checkpoint;
- ``lora_state.safetensors`` - LoRA runs only: the trainable tensors under their adapter names, which
  ``--resume`` loads on top of the rebuilt base model (``model/`` has the adapters merged in);
- ``optimizer.pt`` - optimiser and LR-scheduler state;
- ``rng/rank-<r>.pt`` - the random states (python, numpy, torch, CUDA) of every process;
- ``trainer_state.json`` - step, stage, data position (samples consumed), threshold, world size,
  the config, and the metrics of the last step.

A checkpoint is first written to ``checkpoints/.tmp-step-00000120`` and renamed to its final name only
when every file (of every process) is on disk; then ``checkpoints/latest`` (a one-line text file) is
replaced. A crash at any point leaves either the previous checkpoints or the new complete one, never a
partial ``step-*`` folder.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from ..model.loading import save_latent_checkpoint

CHECKPOINT_DIRNAME = "checkpoints"
LATEST = "latest"
STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.pt"
LORA_FILE = "lora_state.safetensors"
MODEL_DIR = "model"


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or read."""


def _dist() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _barrier() -> None:
    if _dist():
        dist.barrier()


def _all_ok(ok: bool) -> bool:
    """True when ``ok`` holds on every process."""
    if not _dist():
        return ok
    t = torch.tensor([0 if ok else 1], dtype=torch.long)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item()) == 0


def step_dirname(step: int) -> str:
    return f"step-{step:08d}"


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _write_text_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def quiet_hf_progress():
    """No transformers progress bars ("Writing model shards", "Loading weights") inside the block."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def _write_model(tmp: Path, export_model, processor, model_state_dict) -> None:
    with quiet_hf_progress():
        if model_state_dict is not None:  # gathered weights (FSDP)
            (tmp / MODEL_DIR).mkdir()
            export_model.save_pretrained(tmp / MODEL_DIR, state_dict=model_state_dict)
            processor.save_pretrained(tmp / MODEL_DIR)
        else:
            save_latent_checkpoint(export_model, processor, tmp / MODEL_DIR)


def save_checkpoint(
    root: str | Path,
    step: int,
    *,
    rank: int,
    export_model,
    processor,
    optimizer_state: dict[str, Any] | None,
    scheduler_state: dict[str, Any] | None,
    trainer_state: dict[str, Any],
    lora_state: dict[str, torch.Tensor] | None = None,
    model_state_dict: dict[str, torch.Tensor] | None = None,
    keep_last: int = 0,
) -> Path:
    """Write checkpoint ``step`` under ``root/checkpoints`` atomically; every process must call it.

    ``export_model`` is the plain (unwrapped, LoRA-merged) model that rank 0 saves as ``model/``, with
    ``model_state_dict`` when the weights had to be gathered (FSDP). Returns the final path.
    """
    ckpt_root = Path(root) / CHECKPOINT_DIRNAME
    final = ckpt_root / step_dirname(step)
    tmp = ckpt_root / f".tmp-{step_dirname(step)}"
    if rank == 0:
        ckpt_root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / "rng").mkdir(parents=True)
    _barrier()
    error: BaseException | None = None
    try:
        torch.save(rng_state(), tmp / "rng" / f"rank-{rank}.pt")
        if rank == 0:
            _write_model(tmp, export_model, processor, model_state_dict)
            if lora_state is not None:
                from safetensors.torch import save_file

                save_file({k: v.detach().cpu().contiguous() for k, v in lora_state.items()}, tmp / LORA_FILE)
            torch.save({"optimizer": optimizer_state, "scheduler": scheduler_state}, tmp / OPTIMIZER_FILE)
            (tmp / STATE_FILE).write_text(json.dumps(trainer_state, indent=2, default=str) + "\n")
    except BaseException as err:  # noqa: BLE001 - every process must learn about the failure
        error = err
    if not _all_ok(error is None):
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        _barrier()
        if error is not None:
            raise CheckpointError(f"writing checkpoint {final} failed: {error}") from error
        raise CheckpointError(f"writing checkpoint {final} failed on another process")
    if rank == 0:
        _fsync_dir(tmp)
        old = None
        if final.exists():  # saving the same step again (a resumed run): move the old one aside first
            old = ckpt_root / f".old-{step_dirname(step)}"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
        os.replace(tmp, final)
        _fsync_dir(ckpt_root)
        _write_text_atomic(ckpt_root / LATEST, final.name + "\n")
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        if keep_last > 0:  # prune old checkpoints, never a pinned one (the end of stage A)
            for stale in list_checkpoints(root)[:-keep_last]:
                if not read_trainer_state(stale).get("pinned"):
                    shutil.rmtree(stale, ignore_errors=True)
    _barrier()
    return final


def list_checkpoints(root: str | Path) -> list[Path]:
    """Complete checkpoints under ``root/checkpoints``, oldest first."""
    ckpt_root = Path(root) / CHECKPOINT_DIRNAME
    if not ckpt_root.is_dir():
        return []
    found = [
        p
        for p in ckpt_root.iterdir()
        if p.is_dir() and p.name.startswith("step-") and (p / STATE_FILE).is_file()
    ]
    return sorted(found, key=lambda p: p.name)


def latest_checkpoint(root: str | Path) -> Path | None:
    """The newest complete checkpoint (``checkpoints/latest`` if valid, else the highest step)."""
    ckpt_root = Path(root) / CHECKPOINT_DIRNAME
    pointer = ckpt_root / LATEST
    if pointer.is_file():
        candidate = ckpt_root / pointer.read_text().strip()
        if (candidate / STATE_FILE).is_file():
            return candidate
    found = list_checkpoints(root)
    return found[-1] if found else None


def resolve_resume(resume: str, output_dir: str | Path) -> Path:
    """``"latest"`` -> the newest checkpoint of ``output_dir``; else the given checkpoint directory."""
    if resume == "latest":
        found = latest_checkpoint(output_dir)
        if found is None:
            raise CheckpointError(
                f"resume=latest: no checkpoint under {Path(output_dir) / CHECKPOINT_DIRNAME}"
            )
        return found
    path = Path(resume)
    if (path / STATE_FILE).is_file():
        return path
    found = latest_checkpoint(path)  # an output_dir was given
    if found is not None:
        return found
    raise CheckpointError(f"resume={resume!r}: not a checkpoint directory (no {STATE_FILE})")


def read_trainer_state(ckpt: str | Path) -> dict[str, Any]:
    return json.loads((Path(ckpt) / STATE_FILE).read_text())


def load_optimizer_state(ckpt: str | Path) -> dict[str, Any]:
    return torch.load(Path(ckpt) / OPTIMIZER_FILE, map_location="cpu", weights_only=False)


def load_rng_state(ckpt: str | Path, rank: int) -> dict[str, Any] | None:
    path = Path(ckpt) / "rng" / f"rank-{rank}.pt"
    if not path.is_file():
        return None
    return torch.load(path, map_location="cpu", weights_only=False)


def load_lora_state(ckpt: str | Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(Path(ckpt) / LORA_FILE))


def model_dir_of(path: str | Path) -> Path:
    """The model directory inside a checkpoint (``model/``), or ``path`` itself if it is one."""
    path = Path(path)
    if (path / MODEL_DIR / "config.json").is_file():
        return path / MODEL_DIR
    if (path / "config.json").is_file():
        return path
    found = latest_checkpoint(path)
    if found is not None:
        return found / MODEL_DIR
    raise CheckpointError(f"{path} is neither a model directory nor a checkpoint (no config.json)")
