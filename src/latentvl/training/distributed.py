"""Distributed plumbing of the training loop: the ``accelerate`` engine, FSDP2 sharding, the collectives
the loop uses (sums, gathers), FSDP-aware optimiser state, and the errors a failed collective raises.

Everything here works in one process too (the collectives then return their input), so the loop calls
the same functions whatever the world size.
"""

from __future__ import annotations

import datetime
import os
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..model.backbone import BACKBONES, family
from .config import TrainConfig
from .setup import latent_model


class CollectiveError(RuntimeError):
    """A collective failed because another process stopped (its connection closed).

    ``phase`` names what this process was doing (and so which collective it was in).
    """

    def __init__(self, phase: str, rank: int, message: str | None = None):
        super().__init__(
            message
            or f"process {rank}: a collective failed during {phase}: another process stopped (see its log)"
        )
        self.phase = phase
        self.rank = rank


class CollectiveTimeoutError(CollectiveError):
    """A collective waited longer than ``dist_timeout_s``: another process stalled or died."""

    def __init__(self, phase: str, timeout_s: float, rank: int):
        super().__init__(
            phase,
            rank,
            f"process {rank} waited more than dist_timeout_s={timeout_s:g} s in a collective during {phase}; "
            "another process stalled or died there (see its log)",
        )


def collective_failure(err: BaseException) -> str | None:
    """"timeout" or "peer" when ``err`` (or its cause) is a collective timing out or losing its peer."""
    seen: set[int] = set()
    e: BaseException | None = err
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        text = str(e).lower()
        if "timed out" in text or "timeout" in text:
            return "timeout"
        if "connection closed by peer" in text or "connection reset by peer" in text:
            return "peer"
        e = e.__cause__ or e.__context__
    return None


def mixed_precision(cfg: TrainConfig) -> str:
    if cfg.mixed_precision != "auto":
        return cfg.mixed_precision
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"


def make_accelerator(cfg: TrainConfig):
    """The ``accelerate`` engine: process group from the launcher's environment, DDP or FSDP, precision."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs

    on_gpu = torch.cuda.is_available()
    handlers = [DistributedDataParallelKwargs(find_unused_parameters=cfg.ddp_find_unused_parameters)]
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # launched by torchrun / accelerate launch
        timeout = datetime.timedelta(seconds=cfg.dist_timeout_s)
        handlers.append(InitProcessGroupKwargs(backend="nccl" if on_gpu else "gloo", timeout=timeout))
    else:
        # accelerate keeps its state per process; a second run in the same process (the demo, tests)
        # may ask for another precision, so start from a clean state
        from accelerate.state import AcceleratorState, GradientState

        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
    # FSDP is applied by shard_fsdp2() below, not by accelerate: accelerate 1.15 enables FSDP on
    # accelerators only, and the same code path then runs (and is tested) on CPU with gloo.
    mixed = "no" if cfg.distributed == "fsdp" else mixed_precision(cfg)  # FSDP2 has its own policy
    return Accelerator(cpu=not on_gpu, mixed_precision=mixed, kwargs_handlers=handlers)


def fsdp_blocks() -> set[str]:
    """The class names FSDP2 wraps one unit each: every backbone family's decoder layers and vision blocks."""
    return {block for name in BACKBONES for block in family(name).BLOCKS}


def shard_fsdp2(module: nn.Module, precision: str) -> nn.Module:
    """FSDP2 (``torch.distributed.fsdp.fully_shard``): one unit per decoder layer and vision block,
    then the :class:`LatentLossModule` root, so one root call gathers the embeddings, the final norm
    and the stop head for the whole two-pass step (pass 1 calls the language model many times)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy()
    if precision == "fp16":
        raise ValueError("mixed_precision=fp16 with distributed=fsdp is not supported; use bf16")
    if precision == "bf16":
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    blocks = fsdp_blocks()
    for sub in module.modules():
        if type(sub).__name__ in blocks:
            fully_shard(sub, mp_policy=policy)
    fully_shard(module, mp_policy=policy)
    return module


def through_root(module: nn.Module, fsdp: bool, fn):
    """Run ``fn(latent_model)`` (checks, evaluation). Under FSDP it runs inside the root's forward, so
    the root's parameters are gathered and the sharded units initialise in the right order."""
    if fsdp:
        return module(None, call=lambda m: fn(latent_model(m)))
    inner = module.module if isinstance(module, nn.parallel.DistributedDataParallel) else module
    return fn(latent_model(inner.model))


def all_sum(values: list[float], device: torch.device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t.tolist()


def all_gather_pair(a: float, b: float, device: torch.device) -> list[tuple[float, float]]:
    t = torch.tensor([a, b], dtype=torch.float64, device=device)
    out = [torch.zeros_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(out, t)
    return [(float(x[0]), float(x[1])) for x in out]


def gather_objects(obj: Any) -> list[Any]:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        out: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(out, obj)
        return out
    return [obj]


def optimizer_state_dict(optimizer, module, fsdp: bool) -> dict[str, Any]:
    if fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(
            module,
            optimizer.optimizer if hasattr(optimizer, "optimizer") else optimizer,
            options=StateDictOptions(full_state_dict=True, cpu_offload=True),
        )
    return optimizer.state_dict()


def restore_optimizer(optimizer, module, state: dict[str, Any], fsdp: bool) -> None:
    if fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(
            module,
            optimizer.optimizer if hasattr(optimizer, "optimizer") else optimizer,
            state,
            options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True),
        )
        return
    optimizer.load_state_dict(state)
