"""Pass 2 in vLLM (``--engine vllm``): latentvl's latent pass, then vLLM's generation with the latents.

:class:`VLLMInference` is :class:`~latentvl.inference.generate.LatentInference` with step 2 replaced: step 1
(the latent pass, batched) runs in latentvl as before; step 2 hands vLLM, per sample, a prompt from which
the unused latent slots are removed, with

- each question image as an image item given by the visual features step 1 already computed, and
- each latent segment as an image item that covers ``<|latent_start|>`` and the segment's used slots: the
  token's embedding and the latent vectors, plus ``latent_skip`` = budget - used.

latentvl's vLLM model (:mod:`latentvl.integrations.vllm_plugin`, registered through the
``vllm.general_plugins`` entry point) places those vectors at their slots and gives every token the M-RoPE
position it has in the full-budget sequence (design D2). Removing an unused slot from the prompt is what
latentvl's exact gate (D3, ``latent_null_scale == 0``) does to it, so greedy answers equal
:meth:`LatentInference.generate`'s; a model with ``latent_null_scale > 0`` (soft suppression, D11) keeps its
unused slots in attention and is refused.

Decoding: greedy is exact. Sampling uses vLLM's sampler (seeded per request with ``seed``): the same
distribution as ``generate()``, not the same draws.

Needs the ``vllm`` extra (``pip install -e '.[vllm]'``; on a CPU-only machine see docs/inference.md).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from ..errors import LatentInputError
from .generate import GenerationSettings, LatentInference, Patches
from .vllm_registry import LATENT_SKIP, register_vllm_model

__all__ = ["VLLM_EXTRA_HINT", "VLLMInference", "build_requests", "import_vllm"]

VLLM_EXTRA_HINT = ("--engine vllm needs vLLM: pip install -e '.[vllm]' (a GPU machine), or on a CPU-only "
                   "machine the recipe in docs/inference.md")


def import_vllm() -> Any:
    """The ``vllm`` module, or an ``ImportError`` that names latentvl's ``vllm`` extra."""
    try:
        import vllm
    except ImportError as err:
        raise ImportError(f"{VLLM_EXTRA_HINT} ({err})") from err
    return vllm


def _runs(mask: list[bool]) -> list[tuple[int, int]]:
    """``(start, end)`` of every maximal run of True."""
    out, start = [], None
    for i, m in enumerate([*mask, False]):
        if m and start is None:
            start = i
        elif not m and start is not None:
            out.append((start, i))
            start = None
    return out


def build_requests(batch: dict[str, Any], embeds: torch.Tensor, patches: Patches, image_token_id: int,
                   latent_token_id: int, spatial_merge_size: int) -> list[dict[str, Any]]:
    """One vLLM prompt per row of a collated (left-padded) batch: token ids without padding and without
    unused latent slots, and its image items (question images, then latent segments, in prompt order).

    ``embeds`` ``[B, S, H]``: step 1's input embeddings (question images' features placed); ``patches``:
    step 1's vectors and mask (any mask: the causal checks gate out every slot of a segment, which leaves
    ``<|latent_start|>`` alone in its item).
    """
    ids_all = batch["input_ids"].tolist()
    att = batch["attention_mask"].bool().cpu()
    B, S = batch["input_ids"].shape
    keep = att.clone()
    if patches.latent_kv_mask is not None:
        keep &= patches.latent_kv_mask.bool().cpu()
    rows = embeds.detach().clone()
    if patches.ce_patch_pos is not None and len(patches.ce_patch_pos):
        pos = patches.ce_patch_pos
        rows = rows.index_put((pos[:, 0], pos[:, 1]), patches.ce_patch_vec.to(rows.dtype))
    rows = rows.float().cpu()
    grids = batch.get("image_grid_thw")
    grids = [] if grids is None else grids.cpu().tolist()
    grid_i = 0
    m = int(spatial_merge_size)
    segments = batch.get("latent_segments") or [[] for _ in range(B)]
    requests = []
    for b in range(B):
        ids = ids_all[b]
        seg_at = {start: (start, end) for start, end, _ in segments[b]}
        for start, end, _ in segments[b]:
            if start < 1 or any(t != latent_token_id for t in ids[start:end]) or not keep[b, start - 1]:
                raise LatentInputError(f"row {b}: segment ({start}, {end}) is not a run of latent slots "
                                       f"after <|latent_start|>")
        image_runs = {s: e for s, e in _runs([t == image_token_id and bool(att[b, i]) for i, t in enumerate(ids)])}
        tokens: list[int] = []
        vectors: list[torch.Tensor] = []
        item_grids: list[list[int]] = []
        skips: list[int] = []
        c = 0
        while c < S:
            if not att[b, c]:
                c += 1
            elif c in image_runs:  # a question image: one placeholder, its features, stock positions
                e = image_runs[c]
                if grid_i >= len(grids) or grids[grid_i][0] * grids[grid_i][1] * grids[grid_i][2] // m // m != e - c:
                    raise LatentInputError(f"row {b}: image tokens at {c}:{e} do not match image_grid_thw")
                tokens.append(image_token_id)
                vectors.append(rows[b, c:e])
                item_grids.append(grids[grid_i])
                skips.append(-1)
                grid_i += 1
                c = e
            elif c + 1 in seg_at:  # <|latent_start|> and its segment: one item of 1 + used vectors
                start, end = seg_at[c + 1]
                used = [k for k in range(start, end) if keep[b, k]]
                if used != list(range(start, start + len(used))):
                    raise LatentInputError(f"row {b}: segment ({start}, {end}) keeps slots {used}: only a "
                                           f"prefix of a segment can be used")
                tokens.append(image_token_id)
                vectors.append(rows[b, [c, *used]])
                item_grids.append([1, m, m * (1 + len(used))])
                skips.append(end - start - len(used))
                c = end
            else:
                if keep[b, c]:
                    tokens.append(ids[c])
                elif ids[c] != latent_token_id:
                    raise LatentInputError(f"row {b}: token {ids[c]} at {c} is gated out but is no latent slot")
                c += 1
        request: dict[str, Any] = {"prompt_token_ids": tokens}
        if vectors:
            request["multi_modal_data"] = {"image": {
                "image_embeds": torch.cat(vectors), "image_grid_thw": torch.tensor(item_grids),
                LATENT_SKIP: torch.tensor(skips)}}
        requests.append(request)
    return requests


class VLLMInference(LatentInference):
    """:class:`LatentInference` whose step 2 runs in vLLM (see the module docstring).

    Args:
        model, processor: as for :class:`LatentInference` (step 1 runs on ``model``).
        checkpoint: the checkpoint directory ``model`` was loaded from (vLLM loads its own copy).
        dtype: vLLM's weights dtype (default: ``model``'s).
        max_model_len: vLLM's longest sequence (default: ``max_length``, the model's limit).
        llm_kwargs: more keywords for ``vllm.LLM`` (e.g. ``gpu_memory_utilization``, ``enforce_eager``).
        llm: a running ``vllm.LLM`` of the same checkpoint to share (another engine's ``.llm``: e.g. engines
            that differ only in their system prompt); then ``dtype``, ``max_model_len`` and ``llm_kwargs`` are
            not used.
        Other keywords: as for :class:`LatentInference`.
    """

    def __init__(self, model: Any, processor: Any, checkpoint: str | Path, *, dtype: str | torch.dtype | None = None,
                 max_model_len: int | None = None, llm_kwargs: dict[str, Any] | None = None, llm: Any = None,
                 **kwargs: Any):
        if getattr(model, "has_deepstack", False):
            raise ValueError(
                f"--engine vllm runs Qwen2.5-VL models; this one is {model.backbone!r}, whose question images also "
                f"add DeepStack features inside the text model, which latentvl's vLLM model does not place yet. "
                f"Use --engine hf for this model.")
        null_scale = float(getattr(model.config, "latent_null_scale", 0.0))
        if null_scale > 0 and kwargs.get("use_latents", True):
            raise ValueError(
                f"--engine vllm: the model has latent_null_scale={null_scale} (soft suppression, design D11), "
                f"which keeps unused latent slots in attention; vLLM's pass 2 removes them, which is exact only "
                f"with latent_null_scale == 0. Use --engine hf for this model.")
        super().__init__(model, processor, **kwargs)
        vllm = import_vllm()
        register_vllm_model()  # this process; vLLM's workers register through the vllm.general_plugins entry point
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        if dtype is None:
            dtype = next(model.parameters()).dtype
        if isinstance(dtype, torch.dtype):
            dtype = str(dtype).removeprefix("torch.")
        self.image_token_id = int(model.config.image_token_id)
        self.spatial_merge_size = int(model.config.vision_config.spatial_merge_size)
        options: dict[str, Any] = dict(
            model=str(checkpoint), dtype=dtype, max_model_len=int(max_model_len or self.max_length),
            enable_mm_embeds=True, generation_config="vllm", seed=0, async_scheduling=True,
            limit_mm_per_prompt={"image": {"count": 64, "width": 56, "height": 56}},
        )
        options.update(llm_kwargs or {})
        self.llm = llm if llm is not None else vllm.LLM(**options)
        # a prompt longer than vLLM takes is then refused by prepare(), as that sample's error alone
        self.max_length = min(self.max_length, int(self.llm.model_config.max_model_len))
        self._sampling_params = vllm.SamplingParams

    def sampling_params(self, gen: GenerationSettings) -> Any:
        kw: dict[str, Any] = dict(max_tokens=gen.max_new_tokens, min_tokens=gen.min_new_tokens,
                                  stop_token_ids=list(self.stop_ids), skip_special_tokens=False, detokenize=False)
        if gen.do_sample:
            kw.update(temperature=gen.temperature, top_p=gen.top_p, top_k=gen.top_k or -1, seed=gen.seed)
        else:
            kw.update(temperature=0.0)
        return self._sampling_params(**kw)

    @torch.no_grad()
    def generate(self, batch: dict[str, Any], embeds: torch.Tensor, patches: Patches,
                 gen: GenerationSettings, visual: Any = None) -> torch.Tensor:
        """Step 2 in vLLM: the new tokens ``[B, T]`` (padded with the pad token after a row's end of turn).
        ``visual`` is None for the families this engine runs (no DeepStack)."""
        if gen.compile is not False:
            raise ValueError("compile applies to --engine hf; vLLM compiles on its own")
        requests = build_requests(batch, embeds, patches, self.image_token_id, self.latent_token_id,
                                  self.spatial_merge_size)
        outputs = self.llm.generate(requests, self.sampling_params(gen), use_tqdm=False)
        rows = []
        for out in outputs:
            completion = out.outputs[0]
            ids = list(completion.token_ids)
            if completion.finish_reason == "stop" and (not ids or ids[-1] not in self.stop_ids):
                ids.append(self.eot_id)
            rows.append(ids)
        width = max(1, max(len(r) for r in rows))
        return torch.tensor([r + [self.pad_id] * (width - len(r)) for r in rows], dtype=torch.long)
