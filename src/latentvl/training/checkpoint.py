"""Atomic training checkpoints: write everything into a hidden temporary folder, then rename it.

Layout of ``<output_dir>/checkpoints/step-00000120/``:

- ``model/`` - a loadable latentvl model directory (``load_latent_model``; LoRA adapters merged in);
  this is what ``init_from`` reads, e.g. to start stage C from a stage-A checkpoint;
- ``lora_state.safetensors`` - LoRA runs only: the trainable tensors under their adapter names, which
  ``--resume`` loads on top of the rebuilt base model (``model/`` has the adapters merged in);
- ``optimizer.pt`` - optimiser and LR-scheduler state;
- ``rng/rank-<r>.pt`` - the random states (python, numpy, torch, CUDA) of every process;
- ``trainer_state.json`` - step, stage, data position (samples consumed), threshold, world size,
  the config, and the metrics of the last step;
- ``manifest.json`` - written last: the size and SHA-256 of every other file. :func:`verify_checkpoint`
  checks a checkpoint against it before a resume trusts it; :func:`choose_resume` falls back to the
  newest checkpoint that verifies.

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
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from ..fileio import write_atomic
from ..model.loading import save_latent_checkpoint

CHECKPOINT_DIRNAME = "checkpoints"
LATEST = "latest"
STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.pt"
LORA_FILE = "lora_state.safetensors"
MODEL_DIR = "model"


MANIFEST_FILE = "manifest.json"


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or read."""


class CorruptCheckpointError(CheckpointError):
    """A checkpoint fails verification; ``file`` is the first bad file, the message says why."""

    def __init__(self, file: Path, why: str):
        super().__init__(f"{file}: {why}")
        self.file = file
        self.why = why


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
    """The random states as tensors and plain data (no numpy objects), so that a checkpoint loads with
    ``torch.load(weights_only=True)``."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [str(kind), torch.from_numpy(np.asarray(keys, dtype=np.int64)), int(pos), int(has_gauss),
                  float(cached)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _numpy_state(saved: Any) -> tuple:
    kind, keys, pos, has_gauss, cached = saved
    if isinstance(keys, torch.Tensor):
        keys = keys.numpy()
    return (str(kind), np.asarray(keys, dtype=np.uint32), int(pos), int(has_gauss), float(cached))


def _python_state(saved: Any) -> tuple:
    version, internal, gauss = saved
    return (int(version), tuple(int(x) for x in internal), gauss if gauss is None else float(gauss))


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(_python_state(state["python"]))
    np.random.set_state(_numpy_state(state["numpy"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _check_rng_state(state: Any) -> None:
    """Raise unless ``state`` is a set of random states :func:`set_rng_state` takes (tried on scratch
    generators, so nothing global changes)."""
    if not isinstance(state, dict) or not {"python", "numpy", "torch"} <= set(state):
        raise ValueError("not a set of random states (needs 'python', 'numpy' and 'torch')")
    random.Random().setstate(_python_state(state["python"]))
    np.random.RandomState().set_state(_numpy_state(state["numpy"]))
    torch.Generator().set_state(state["torch"])
    cuda = state.get("cuda", [])
    if not isinstance(cuda, (list, tuple)) or not all(isinstance(t, torch.Tensor) for t in cuda):
        raise ValueError("'cuda' is not a list of generator states")


def _open_for_write(path: Path):
    return open(path, "wb")


def _torch_save(obj: Any, path: Path) -> None:
    """``torch.save`` through a Python file, so that a full disk raises ``OSError(ENOSPC)`` (torch's own
    writer reports it as "unexpected pos ...")."""
    with _open_for_write(path) as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


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
        _torch_save(rng_state(), tmp / "rng" / f"rank-{rank}.pt")
        if rank == 0:
            _write_model(tmp, export_model, processor, model_state_dict)
            if lora_state is not None:
                from safetensors.torch import save_file

                save_file({k: v.detach().cpu().contiguous() for k, v in lora_state.items()}, tmp / LORA_FILE)
            _torch_save({"optimizer": optimizer_state, "scheduler": scheduler_state}, tmp / OPTIMIZER_FILE)
            (tmp / STATE_FILE).write_text(json.dumps(trainer_state, indent=2, default=str) + "\n")
    except BaseException as err:  # noqa: BLE001 - every process must learn about the failure
        error = err
    if not _all_ok(error is None):
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        _barrier()
        if error is not None:
            raise CheckpointError(f"writing checkpoint {final} failed: {describe_os_error(error)}") from error
        raise CheckpointError(f"writing checkpoint {final} failed on another process")
    if rank == 0:
        try:  # last: a checkpoint without its manifest is never renamed into place
            write_atomic(tmp / MANIFEST_FILE, json.dumps(_manifest(tmp), indent=1) + "\n")
        except OSError as err:
            shutil.rmtree(tmp, ignore_errors=True)
            raise CheckpointError(f"writing checkpoint {final} failed: {describe_os_error(err)}") from err
        _fsync_dir(tmp)
        old = None
        if final.exists():  # saving the same step again (a resumed run): move the old one aside first
            old = ckpt_root / f".old-{step_dirname(step)}"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
        os.replace(tmp, final)
        _fsync_dir(ckpt_root)
        write_atomic(ckpt_root / LATEST, final.name + "\n")
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        if keep_last > 0:  # prune old checkpoints, never a pinned one (the end of stage A)
            for stale in list_checkpoints(root)[:-keep_last]:
                try:
                    pinned = read_trainer_state(stale).get("pinned")
                except CheckpointError:
                    pinned = False
                if not pinned:
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


def read_trainer_state(ckpt: str | Path) -> dict[str, Any]:
    """``trainer_state.json`` as a dict; :class:`CorruptCheckpointError` naming the file if unreadable."""
    path = Path(ckpt) / STATE_FILE
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CorruptCheckpointError(path, f"cannot be read ({err})") from err
    if not isinstance(state, dict) or not all(isinstance(state.get(k), int) for k in ("step", "samples_seen")):
        raise CorruptCheckpointError(path, "is not a trainer state (needs integer 'step' and 'samples_seen')")
    return state


def _load(path: Path, loader):
    try:
        return loader(path)
    except Exception as err:  # torch / pickle / safetensors raise many types for a damaged file
        first = (str(err).strip().splitlines() or [""])[0]  # one line: torch's messages run on
        raise CorruptCheckpointError(path, f"cannot be loaded ({type(err).__name__}: {first})") from err


def _numpy_safe_globals() -> list[Any]:
    """The numpy types a random state saved by an earlier latentvl (a numpy array) needs; nothing that
    runs code."""
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct
    return [_reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]


def torch_load_safe(path: str | Path) -> Any:
    """``torch.load`` with ``weights_only=True``: tensors and plain data only, never code. A pickle that
    asks for anything else (a crafted ``__reduce__``) raises ``pickle.UnpicklingError`` before it runs."""
    import pickle
    import re

    try:
        with torch.serialization.safe_globals(_numpy_safe_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
        what = f"asks for {found.group(1)}" if found else "holds more than tensors and plain data"
        raise ValueError(f"refused: the file {what}, which latentvl never loads (weights_only=True; "
                         "nothing in it was run)") from None


def load_optimizer_state(ckpt: str | Path) -> dict[str, Any]:
    path = Path(ckpt) / OPTIMIZER_FILE
    state = _load(path, torch_load_safe)
    if not isinstance(state, dict) or not {"optimizer", "scheduler"} <= set(state):
        raise CorruptCheckpointError(path, "is not an optimiser state (needs 'optimizer' and 'scheduler')")
    return state


def load_rng_state(ckpt: str | Path, rank: int) -> dict[str, Any] | None:
    path = Path(ckpt) / "rng" / f"rank-{rank}.pt"
    if not path.is_file():
        return None
    state = _load(path, torch_load_safe)
    try:
        _check_rng_state(state)
    except Exception as err:  # noqa: BLE001 - any malformed content is a damaged file
        raise CorruptCheckpointError(path, f"is not a set of random states ({type(err).__name__}: {err})") from err
    return state


def load_lora_state(ckpt: str | Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return _load(Path(ckpt) / LORA_FILE, lambda p: load_file(str(p)))


# ------------------------------------------------------------------------------------ verification
def describe_os_error(err: BaseException) -> str:
    """The error, with ENOSPC and EROFS spelled out (torch reports a full disk as "unexpected pos")."""
    import errno

    seen: set[int] = set()
    e: BaseException | None = err
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        code = getattr(e, "errno", None)
        text = str(e).lower()  # safetensors / torch report the OS error inside their own message
        if code in (errno.ENOSPC, errno.EDQUOT) or "no space left on device" in text or "storagefull" in text:
            return f"no space left on the device (ENOSPC): {err}"
        if code == errno.EROFS or "read-only file system" in text:
            return f"read-only file system (EROFS): {err}"
        e = e.__cause__ or e.__context__
    return str(err)


def _sha256(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _manifest(folder: Path) -> dict[str, Any]:
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST_FILE)
    return {
        "version": 1,
        "files": {
            p.relative_to(folder).as_posix(): {"size": p.stat().st_size, "sha256": _sha256(p)} for p in files
        },
    }


def verify_checkpoint(ckpt: str | Path) -> bool:
    """Check every file of a checkpoint against ``manifest.json`` (size, then SHA-256), and that
    ``trainer_state.json`` reads. Raises :class:`CorruptCheckpointError` naming the first bad file.

    Returns True when verified by checksums, False for a checkpoint without a manifest (written by an
    earlier version), of which only ``trainer_state.json`` is checked.
    """
    ckpt = Path(ckpt)
    manifest_path = ckpt / MANIFEST_FILE
    if not manifest_path.is_file():
        read_trainer_state(ckpt)
        return False
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        files = manifest["files"]
        entries = [(name, int(e["size"]), str(e["sha256"])) for name, e in files.items()]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as err:
        raise CorruptCheckpointError(manifest_path, f"cannot be read ({err})") from err
    for name, size, digest in entries:
        path = ckpt / name
        if not path.is_file():
            raise CorruptCheckpointError(path, "is missing")
        actual = path.stat().st_size
        if actual != size:
            raise CorruptCheckpointError(path, f"has {actual} bytes, {size} when saved (truncated or damaged)")
        if _sha256(path) != digest:
            raise CorruptCheckpointError(path, "does not match its SHA-256 checksum (damaged)")
    read_trainer_state(ckpt)
    return True


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
