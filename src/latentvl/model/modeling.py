"""``LatentQwen2_5_VLForConditionalGeneration``: Qwen2.5-VL that thinks in latent visual tokens.

Two passes (design §4–§6):

- **pass 1** (``latent_mode=True``) fills the latent slots: every slot's input embedding is the
  model's own last hidden state at the previous position. All samples advance together, one
  column per model call, each step attending over pass 1's K/V store (D8; :mod:`latentvl.model.pass1`).
  In stage C a stop head decides after each slot whether the segment stops; the unused tail of the
  segment is gated out (``latent_kv_mask``).
- **pass 2** (``latent_mode=False``) is a normal forward (or ``generate()``) with the active
  latent vectors patched in at their slots and ``latent_kv_mask`` applied in every attention layer.

Gradient (D5): pass 1 runs with autograd and without gradient checkpointing, so CE and alignment
gradients reach the weights through the latent vectors (and, through the chain of steps, through
every earlier latent). ``latent_detach_step_inputs=True`` cuts the chain between steps (each
latent then carries gradient only from its own last step) and ``latent_prefix_grad=False`` runs the
prefix of pass 1 without autograd (the question's activations are not kept): cheaper, never the default.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F
from transformers import Qwen2_5_VLForConditionalGeneration
from transformers.modeling_outputs import CausalLMOutputWithPast

from ..config import LatentSettings
from ..segments import LatentInputError, Layout, build_layout
from .attention import STOCK_ATTENTION, gated_attention, stock_attention  # importing registers the functions
from .compat import CACHE_KWARG, output_cache, resolve_cache
from .losses import (
    alignment_loss,
    answer_stop_target,
    answer_target_candidates,
    expected_length,
    pool_visual_tokens,
    stop_labels,
    stop_labels_for_length,
    stop_loss,
)
from .pass1 import LatentPassOutput, pass_output, run_steps, shifted_frame


class LatentFeedbackGain(nn.Module):
    """``latent_feedback_norm``: ``h`` ``[..., H]`` scaled to unit RMS over its features, times a learned
    gain ``[H]``. The last hidden state leaves the final norm far larger than a token embedding (about 50x
    in the tiny model, norm 11.3 against 0.22); fed back raw, it swamps what a step's attention adds to
    it. Computed in float32, returned in ``h``'s dtype."""

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        x = h.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return (x * self.weight.float()).to(h.dtype)


def _register_checkpoint_mapping(class_name: str) -> None:
    """Let the subclass load stock checkpoints: transformers looks key renamings up by class name."""
    from transformers import conversion_mapping as cm

    parent = cm.get_checkpoint_conversion_mapping("Qwen2_5_VLForConditionalGeneration")
    if parent is not None and cm.get_checkpoint_conversion_mapping(class_name) is None:
        cm.register_checkpoint_conversion_mapping(class_name, parent)


def _pass2_forward(model, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                   labels: torch.Tensor, gating: dict[str, Any]):
    """Pass 2 in training: the full-sequence forward of ``inputs_embeds`` ``[B, S, H]`` (latents patched in)
    with ``labels`` ``[B, S]`` (its CE loss) and the gating keywords (stage C's ``latent_kv_mask``)."""
    return Qwen2_5_VLForConditionalGeneration.forward(
        model, inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids,
        labels=labels, use_cache=False, **gating)


@functools.cache
def compiled_pass2(backend: str = "inductor"):
    """:func:`_pass2_forward` through ``torch.compile`` with ``backend`` (``latent_compile`` in training).
    ``dynamic=None``: a batch of a new shape compiles once more, then one graph with dynamic sizes serves
    every later shape, so recompiles stay bounded as batch lengths vary."""
    return torch.compile(_pass2_forward, backend=backend, dynamic=None)


@dataclass
class LatentCausalLMOutput(CausalLMOutputWithPast):
    """The causal-LM output plus the latent fields of design §4.1."""

    latent_kv_mask: torch.BoolTensor | None = None
    latent_stop_probs: list[list[list[float]]] | None = None
    latent_used_lens: list[list[int]] | None = None


@dataclass
class LatentLossOutput:
    """The training unit's result: the total loss, each part (for logging) and latent statistics."""

    loss: torch.FloatTensor | None = None
    ce: torch.FloatTensor | None = None
    align: torch.FloatTensor | None = None
    stop: torch.FloatTensor | None = None
    cost: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    latent: LatentPassOutput | None = None
    stop_targets: list[list[int]] | None = None
    target_model_calls: int = 0


def _select_gated_attention(config) -> None:
    """Point the text sub-config at the gated version of its requested attention and the vision
    sub-config at a stock one (see :func:`latentvl.model.attention.gated_attention`)."""
    config.text_config._attn_implementation_internal = gated_attention(config.text_config._attn_implementation)
    vision = config.vision_config
    vision._attn_implementation_internal = stock_attention(vision._attn_implementation)
    config._attn_implementation_internal = stock_attention(config._attn_implementation)


class LatentQwen2_5_VLForConditionalGeneration(Qwen2_5_VLForConditionalGeneration):
    """Qwen2.5-VL with latent visual thoughts. A transformers ``PreTrainedModel`` subclass.

    Adds ``latent_stop_head`` (``Linear(hidden, 1)``), the latent config fields (design §1) and the two
    passes. The text model always runs a gated attention (``latent_sdpa``, ``latent_eager`` or
    ``latent_flash_attention_2``), however the model is built or loaded: direct construction,
    ``from_config``, ``from_pretrained`` and ``set_attn_implementation`` map a requested ``"sdpa"``
    (or none), ``"eager"`` or ``"flash_attention_2"`` to its gated version for the text model and keep
    the stock one for the vision tower; any other request raises ``ValueError``.
    """

    # Interventions only (never set in training): ``f(x [R, H], sample [R], column [R]) -> [R, H]`` may
    # replace the input of pass 1's step at each row's original column; later steps see the result.
    latent_step_override = None

    def __init__(self, config):
        LatentSettings.from_config(config).apply_to(config)
        _select_gated_attention(config)
        super().__init__(config)
        self.latent_stop_head = nn.Linear(config.text_config.hidden_size, 1, bias=True)
        # latent_feedback=False (pause tokens): every latent slot's input is this learned vector.
        self.latent_pause_embedding = nn.Embedding(1, config.text_config.hidden_size)
        # latent_feedback_norm=True: a fed-back hidden state enters its slot at the embeddings' scale.
        self.latent_feedback_gain = LatentFeedbackGain(config.text_config.hidden_size,
                                                       eps=config.text_config.rms_norm_eps)
        self.post_init()

    def _init_weights(self, module):
        super()._init_weights(module)
        if module is getattr(self, "latent_stop_head", None):
            # Small weights and a negative bias: a fresh head says "continue" (p ~ 0.05) everywhere.
            nn.init.normal_(module.weight, std=1e-3)
            nn.init.constant_(module.bias, -3.0)
        if module is getattr(self, "latent_feedback_gain", None):
            # The init std of a token embedding: a normalised latent starts at a fresh embedding's scale.
            nn.init.constant_(module.weight, getattr(self.config.text_config, "initializer_range", 0.02))

    # ------------------------------------------------------------------ helpers
    @property
    def latent_settings(self) -> LatentSettings:
        return LatentSettings.from_config(self.config)

    def set_attn_implementation(self, attn_implementation: str | dict, allow_all_kernels: bool = False):
        """transformers' ``set_attn_implementation``, with the text model's request mapped to its gated
        version (``"sdpa"`` -> ``latent_sdpa``, ...) and the vision tower's to the stock one. A string
        applies to both; a dict (``{"text_config": ..., "vision_config": ...}``) to the parts it names."""
        if isinstance(attn_implementation, str):
            request = {"": attn_implementation, "text_config": attn_implementation,
                       "vision_config": attn_implementation}
        else:
            request = dict(attn_implementation)
        if "text_config" in request:
            request["text_config"] = gated_attention(request["text_config"])
        for part in ("", "vision_config"):
            if part in request:
                request[part] = stock_attention(request[part])
        return super().set_attn_implementation(request, allow_all_kernels=allow_all_kernels)

    def set_latent_attention(self, kind: str = "latent_sdpa") -> None:
        """Choose the text attention ("latent_sdpa" or "sdpa", "latent_eager" or "eager", ...); the vision
        tower keeps stock sdpa."""
        self.set_attn_implementation({"text_config": kind, "vision_config": "sdpa"})

    @property
    def text_attention(self) -> str:
        """The attention implementation the text model runs (a gated one unless changed by hand)."""
        return self.config.text_config._attn_implementation

    def _require_gated_attention(self, what: str) -> None:
        impl = self.text_attention
        if impl not in STOCK_ATTENTION:
            raise LatentInputError(
                f"{what} needs a text attention that gates latent slots, but the text model runs {impl!r}, "
                f"which would ignore latent_kv_mask. Call model.set_attn_implementation('sdpa') (or 'eager', "
                f"'flash_attention_2': the text model then runs latent_sdpa / latent_eager / "
                f"latent_flash_attention_2), or load with latentvl.model.loading.load_latent_model.")

    def compute_position_ids(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None,
        mm_token_type_ids: torch.Tensor | None,
        image_grid_thw: torch.LongTensor | None,
    ) -> torch.LongTensor:
        """``[3, B, S]`` M-RoPE positions over the full-budget sequence (D2); padding gets 0.

        Latent slots are text tokens here, active or not: positions never depend on halting.
        """
        if mm_token_type_ids is None:
            mm_token_type_ids = (input_ids == self.config.image_token_id).int()
        positions, deltas = self.model.get_rope_index(
            input_ids, mm_token_type_ids=mm_token_type_ids, image_grid_thw=image_grid_thw,
            attention_mask=attention_mask,
        )
        return positions

    def _dummy_image(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The smallest image the vision tower takes: one merged token of zero pixels.

        ``(pixel_values [m*m, C*T*P*P], image_grid_thw [[1, m, m]])`` with ``m = spatial_merge_size``.
        """
        v = self.config.vision_config
        m = int(v.spatial_merge_size)
        width = int(v.in_channels) * int(v.temporal_patch_size) * int(v.patch_size) ** 2
        dtype = self.model.visual.patch_embed.proj.weight.dtype
        pixels = torch.zeros(m * m, width, dtype=dtype, device=device)
        return pixels, torch.tensor([[1, m, m]], dtype=torch.long, device=device)

    def _vision_everywhere(self) -> bool:
        """Whether a batch without images still runs the vision tower (on :meth:`_dummy_image`).

        True with autograd on (training: the tower's parameters get a zero gradient instead of none,
        so one process and several agree, and DDP sees every parameter used) and in a distributed run
        (every process makes the same vision calls: FSDP gathers the tower's blocks in lockstep).
        """
        distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        return distributed or torch.is_grad_enabled()

    def embed_inputs(
        self, input_ids: torch.LongTensor, pixel_values: torch.Tensor | None, image_grid_thw: torch.Tensor | None
    ) -> torch.FloatTensor:
        """Token embeddings with the question images' visual features placed at their image tokens.

        A batch without question images runs the vision tower on :meth:`_dummy_image` when
        :meth:`_vision_everywhere` says so, and adds ``0 * sum(features)``: the embeddings are
        unchanged and every process makes one vision call per batch, images or not.
        """
        embeds = self.get_input_embeddings()(input_ids)
        if pixel_values is not None:
            feats = self.model.get_image_features(pixel_values, image_grid_thw).pooler_output
            feats = torch.cat(feats, dim=0).to(embeds.device, embeds.dtype)
            mask = (input_ids == self.config.image_token_id)[..., None]
            if int(mask.sum()) != feats.shape[0]:
                raise LatentInputError(
                    f"{int(mask.sum())} image tokens in input_ids but {feats.shape[0]} visual features"
                )
            embeds = embeds.masked_scatter(mask, feats)
        elif self._vision_everywhere():
            dummy = self.model.get_image_features(*self._dummy_image(embeds.device)).pooler_output
            embeds = embeds + 0.0 * torch.cat(dummy, dim=0).sum().to(embeds.dtype)
        return embeds

    def _gating_kwargs(self, latent_kv_mask: torch.Tensor | None) -> dict[str, Any]:
        if latent_kv_mask is None:
            return {}
        self._require_gated_attention("a forward with latent_kv_mask")
        return {"latent_kv_mask": latent_kv_mask, "latent_null_scale": float(self.config.latent_null_scale)}

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values=None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        pixel_values: torch.Tensor | None = None,
        pixel_values_videos: torch.FloatTensor | None = None,
        image_grid_thw: torch.LongTensor | None = None,
        video_grid_thw: torch.LongTensor | None = None,
        mm_token_type_ids: torch.IntTensor | None = None,
        second_per_grid_ts: torch.Tensor | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        latent_mode: bool = False,
        latent_segments: list[list[tuple[int, int, int]]] | None = None,
        latent_budgets: list[list[int]] | None = None,
        ce_patch_pos: torch.LongTensor | None = None,
        ce_patch_vec: torch.FloatTensor | None = None,
        latent_kv_mask: torch.BoolTensor | None = None,
        latent_threshold: float | None = None,
        cache=None,
        **kwargs,
    ):
        """Pass 1 when ``latent_mode=True`` (returns :class:`LatentPassOutput`), else pass 2.

        Pass 2 patches ``ce_patch_vec`` at ``ce_patch_pos`` (only on a call that starts from an empty
        cache, i.e. the prefill of ``generate()``) and applies ``latent_kv_mask`` ``[B, S_kv]`` in every
        text attention layer. Without ``position_ids`` on an empty cache, positions are computed over
        the full-budget sequence (D2). The KV cache may come as ``cache`` or ``past_key_values``
        (transformers renamed it; :mod:`latentvl.model.compat`).
        """
        cache = resolve_cache(cache, past_key_values)
        if latent_mode:
            if input_ids is None:
                raise LatentInputError("latent_mode=True needs input_ids (they locate the latent segments)")
            embeds = inputs_embeds if inputs_embeds is not None else self.embed_inputs(
                input_ids, pixel_values, image_grid_thw)
            if position_ids is None:
                position_ids = self.compute_position_ids(input_ids, attention_mask, mm_token_type_ids,
                                                         image_grid_thw)
            return self.latent_pass(input_ids, attention_mask, embeds, position_ids, latent_segments,
                                    latent_budgets, threshold=latent_threshold)

        # Only a call that may be the first one reads the cache's length: a static cache's is a tensor, and a
        # compiled decoding step (which has positions, and no patches: see _update_model_kwargs_for_generation)
        # must not branch on it.
        maybe_first = ce_patch_pos is not None or (position_ids is None and input_ids is not None)
        past_len = cache.get_seq_length() if cache is not None and maybe_first else 0
        if ce_patch_pos is not None and past_len == 0:
            if inputs_embeds is None:
                inputs_embeds = self.embed_inputs(input_ids, pixel_values, image_grid_thw)
                pixel_values = None
            inputs_embeds = inputs_embeds.index_put(
                (ce_patch_pos[:, 0], ce_patch_pos[:, 1]), ce_patch_vec.to(inputs_embeds.dtype))
        if position_ids is None and past_len == 0 and input_ids is not None:
            position_ids = self.compute_position_ids(input_ids, attention_mask, mm_token_type_ids,
                                                     image_grid_thw)
        out = super().forward(
            input_ids=input_ids if inputs_embeds is None or pixel_values is not None else None,
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            labels=labels,
            use_cache=use_cache,
            pixel_values=pixel_values,
            image_grid_thw=image_grid_thw,
            mm_token_type_ids=mm_token_type_ids,
            logits_to_keep=logits_to_keep,
            **{CACHE_KWARG: cache},
            **self._gating_kwargs(latent_kv_mask),
            **kwargs,
        )
        return LatentCausalLMOutput(
            loss=out.loss, logits=out.logits, hidden_states=out.hidden_states, attentions=out.attentions,
            latent_kv_mask=latent_kv_mask, **{CACHE_KWARG: output_cache(out)},
        )

    def _update_model_kwargs_for_generation(self, outputs, model_kwargs, is_encoder_decoder=False,
                                            num_new_tokens=1):
        """After each ``generate()`` step: drop the patches once the prefill has placed them, and grow
        ``latent_kv_mask`` with the generated tokens (always kept), except on a static cache, where the
        mask keeps its prompt length (keys past its end count as kept) so that every decoding step has the
        same shapes and a compiled step is reused."""
        model_kwargs = super()._update_model_kwargs_for_generation(
            outputs, model_kwargs, is_encoder_decoder=is_encoder_decoder, num_new_tokens=num_new_tokens)
        model_kwargs.pop("ce_patch_pos", None)
        model_kwargs.pop("ce_patch_vec", None)
        mask = model_kwargs.get("latent_kv_mask")
        cache = resolve_cache(model_kwargs.get("cache"), model_kwargs.get("past_key_values"))
        if mask is not None and not getattr(cache, "is_compileable", False):
            model_kwargs["latent_kv_mask"] = torch.cat(
                [mask, mask.new_ones(mask.shape[0], num_new_tokens)], dim=-1)
        return model_kwargs

    # ------------------------------------------------------------------ pass 1
    def latent_pass(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None,
        inputs_embeds: torch.FloatTensor,
        position_ids: torch.LongTensor,
        latent_segments: list[list[tuple[int, int, int]]] | None,
        latent_budgets: list[list[int]] | None,
        threshold: float | None = None,
        sample_ids: list[str] | None = None,
        full_budget: bool = False,
        forcing: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> LatentPassOutput:
        """Fill the latent slots of a batch (design §4, D8). See :class:`LatentPassOutput`.

        ``input_ids`` ``[B, S]``, ``inputs_embeds`` ``[B, S, H]`` (question images placed), ``position_ids``
        ``[3, B, S]`` (over the full-budget sequence, D2). ``full_budget=True`` steps every slot as active
        whatever the stage (no stop head, no halting): the latents a segment would have if it never stopped,
        as in stage A. ``forcing`` ``(forced [B, S] bool, inputs [B, S, H])``: teacher-forced slots and the
        inputs they take instead of the fed-back state (``latent_teacher_forcing``; see :meth:`latent_loss`).

        All samples advance together (:mod:`latentvl.model.pass1`): each sample is shifted right so that its
        first latent slot falls on the same column (:func:`~latentvl.model.pass1.shifted_frame`), one prefix
        call covers everything before it, then one model call per column until the longest latent region
        ends (:func:`~latentvl.model.pass1.run_steps`, with the stop head's :class:`~latentvl.model.pass1.Halting`
        in stage C). Text between segments is fed as known tokens. The number of calls depends only on the
        batch's layout (and, in a distributed run, is the maximum over ranks), never on where samples halt;
        no host synchronisation happens inside the loop.
        """
        self._require_gated_attention("the latent pass (latent_mode=True)")
        settings = self.latent_settings
        stage = "A" if full_budget else settings.latent_mode_stage
        thr = settings.latent_stop_threshold if threshold is None else float(threshold)
        if not 0.0 <= thr <= 1.0:
            raise LatentInputError(f"latent stop threshold {thr} must be in [0, 1]")
        B, S = input_ids.shape
        device = input_ids.device
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        layout = build_layout(input_ids, latent_segments, latent_budgets, settings.latent_token_id, stage,
                              sample_ids=sample_ids)
        steps = layout.num_steps
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            t = torch.tensor([steps], device=device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            steps = int(t[0])
        if steps == 0 and not any(layout.real_rows):
            empty = [[] for _ in range(B)]
            return LatentPassOutput(
                ce_patch_pos=torch.zeros(0, 2, dtype=torch.long, device=device),
                ce_patch_vec=inputs_embeds.new_zeros(0, inputs_embeds.shape[-1]),
                latent_kv_mask=torch.ones(B, S, dtype=torch.bool, device=device), latent_used_lens=empty,
                latent_stop_probs=empty, position_ids=position_ids,
                align_vec=inputs_embeds.new_zeros(0, inputs_embeds.shape[-1]),
                used_lens=torch.zeros(B, layout.max_segments, dtype=torch.long, device=device),
            )
        frame = shifted_frame(layout, steps, inputs_embeds, position_ids, attention_mask, forcing)
        trace = run_steps(self, frame, settings, thr, stage_c=stage == "C")
        return pass_output(layout, frame, trace, (B, S), position_ids)

    # ------------------------------------------------------------------ training unit
    def latent_loss(self, batch: dict[str, Any], threshold: float | None = None) -> LatentLossOutput:
        """Both passes on a collated batch and the combined loss (design §6):
        ``L = ce + w_align * align + w_stop * stop + w_cost * cost``; ``w_stop`` and ``w_cost`` count
        only in stage C (:meth:`LatentSettings.loss_weights`).

        ``batch`` holds the collator's keys. Visual features of the question images are computed
        once and shared by both passes; CoT images are encoded without gradient (alignment targets).
        """
        s = self.latent_settings
        input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]
        embeds = self.embed_inputs(input_ids, batch.get("pixel_values"), batch.get("image_grid_thw"))
        position_ids = self.compute_position_ids(input_ids, attention_mask, batch.get("mm_token_type_ids"),
                                                 batch.get("image_grid_thw"))
        cot_feats, forcing = None, None
        if self.training and s.latent_teacher_forcing > 0 and s.latent_mode_stage == "A":
            cot_feats = self._cot_features(batch)
            forcing = self._teacher_forcing(batch, embeds, cot_feats)
        p1 = self.latent_pass(input_ids, attention_mask, embeds, position_ids, batch["latent_segments"],
                              batch["latent_budgets"], threshold=threshold, sample_ids=batch.get("ids"),
                              forcing=forcing)
        embeds2 = embeds.index_put((p1.ce_patch_pos[:, 0], p1.ce_patch_pos[:, 1]),
                                   p1.ce_patch_vec.to(embeds.dtype))
        stage_c = s.latent_mode_stage == "C"
        pass2 = _pass2_forward if s.latent_compile is False else compiled_pass2(
            "inductor" if s.latent_compile is True else s.latent_compile)
        kv_mask = p1.latent_kv_mask if stage_c else None
        if self.training and not stage_c and s.latent_tail_dropout > 0:
            kv_mask = self._tail_dropout(batch, input_ids)
        out = pass2(self, embeds2, attention_mask, position_ids, batch["labels"], self._gating_kwargs(kv_mask))
        ce = out.loss
        zero = ce.new_zeros(())

        align = zero
        if s.latent_align_weight > 0:  # on every process (the CoT features are a vision call)
            targets = self._alignment_targets(batch, p1, cot_feats)
            if p1.ce_patch_pos.shape[0] > 0:
                align = alignment_loss(p1.align_vec, targets)

        stop = cost = zero
        targets, target_calls = None, 0
        if stage_c and p1.stop_logits is None:
            # no latent anywhere in the batch (on any process): nothing to halt, the head stays in the graph
            stop = cost = 0.0 * sum(p.sum() for p in self.latent_stop_head.parameters()).float()
        elif stage_c:
            if s.latent_stop_target_mode == "answer":
                targets, target_calls = self._answer_stop_targets(batch, embeds, position_ids)
            labels, weights = self._stop_label_tensors(batch, p1, targets)
            stop = stop_loss(p1.stop_logits, labels, weights)
            if s.latent_cost_mode == "count":
                cost = p1.used_lens.sum(dim=1).float().mean()  # D7: no gradient, logged
            else:
                cost = self._expected_cost(batch, p1)
        w_stop, w_cost = s.loss_weights()  # (0, 0) in stage A
        loss = ce + s.latent_align_weight * align + w_stop * stop + w_cost * cost
        return LatentLossOutput(loss=loss, ce=ce.detach(), align=align.detach(), stop=stop.detach(),
                                cost=cost.detach(), logits=out.logits, latent=p1, stop_targets=targets,
                                target_model_calls=target_calls)

    @torch.no_grad()
    def _cot_features(self, batch: dict[str, Any]) -> list[torch.Tensor]:
        """The CoT images' visual features (one ``[N_i, H]`` tensor per image), without gradient.

        A batch without CoT images returns ``[]``; in a distributed run it still makes the vision call
        (on :meth:`_dummy_image`, result dropped) so that every process makes the same calls.
        """
        pix, grid = batch.get("cot_pixel_values"), batch.get("cot_image_grid_thw")
        if pix is None or grid is None or grid.shape[0] == 0:
            if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
                self.model.get_image_features(*self._dummy_image(batch["input_ids"].device))
            return []
        return list(self.model.get_image_features(pix, grid).pooler_output)

    def _tail_dropout(self, batch: dict[str, Any], input_ids: torch.Tensor) -> torch.Tensor:
        """``[B, S]`` bool ``latent_kv_mask`` for stage-A pass 2 with ``latent_tail_dropout = q``: each segment,
        with probability ``q``, keeps its first ``L`` latents (``L`` uniform in ``1..B``), the rest False.
        Draws from the global torch RNG, one pair per segment in ``latent_segments`` order."""
        keep = torch.ones_like(input_ids, dtype=torch.bool)
        q = self.latent_settings.latent_tail_dropout
        for b, segs in enumerate(batch["latent_segments"]):
            for start, end, _img in sorted(segs):
                hit, draw = torch.rand(()).item() < q, torch.rand(()).item()
                if hit:
                    keep[b, start + 1 + int(draw * (end - start)):end] = False
        return keep

    def _teacher_forcing(self, batch: dict[str, Any], embeds: torch.Tensor, feats: list[torch.Tensor]
                         ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(forced [B, S] bool, inputs [B, S, H])`` for stage-A training with ``latent_teacher_forcing = p``:
        every latent slot is forced with probability ``p`` (the global torch RNG), and its input is its
        alignment target (the CoT features pooled into the segment's budget, D4). Slots of a batch without
        CoT images are never forced."""
        B, S, H = embeds.shape
        forced = torch.zeros(B, S, dtype=torch.bool, device=embeds.device)
        inputs = embeds.new_zeros(B, S, H)
        if not feats:
            return forced, inputs
        k = 0
        for b, (segs, budgets) in enumerate(zip(batch["latent_segments"], batch["latent_budgets"])):
            for start, end, img in sorted(segs):
                inputs[b, start:end] = pool_visual_tokens(feats[k + img], end - start).to(embeds)
                forced[b, start:end] = True
            k += len(budgets)
        draw = torch.rand(B, S, device=embeds.device) < self.latent_settings.latent_teacher_forcing
        return forced & draw, inputs

    def _alignment_targets(self, batch: dict[str, Any], p1: LatentPassOutput,
                           feats: list[torch.Tensor] | None = None) -> torch.Tensor:
        """Pooled CoT visual features, one row per active latent, in ``ce_patch_pos`` order (D4); ``feats``:
        the CoT features when already computed (:meth:`_cot_features`)."""
        feats = self._cot_features(batch) if feats is None else feats
        counts = [len(b) for b in batch["latent_budgets"]]
        if len(feats) != sum(counts):
            raise LatentInputError(
                f"batch has {sum(counts)} CoT images in latent_budgets but {len(feats)} in cot_image_grid_thw")
        targets, k = [], 0
        for b, segs in enumerate(batch["latent_segments"]):
            for (_s, _e, img), used in zip(sorted(segs), p1.latent_used_lens[b]):
                targets.append(pool_visual_tokens(feats[k + img], used))
            k += counts[b]
        if not targets:
            return p1.ce_patch_vec.new_zeros(0, p1.ce_patch_vec.shape[-1])
        return torch.cat(targets).to(p1.ce_patch_vec.device)

    def _stop_label_tensors(
        self, batch, p1: LatentPassOutput, targets: list[list[int]] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``[B, S]`` stop labels and weights: every slot of every segment is labelled (weight 1).

        Pass 1 steps every slot of a segment, the slots after a stop as well (their logits are
        computed), so the design note's per-step labels apply to all of them, not only to the steps up
        to ``used_len``. The target length of segment ``i`` of sample ``b`` is ``targets[b][i]`` (in
        ``latent_segments`` order) when given, else the ratio target ``max(1, round(rho * B))``.
        """
        B, S = batch["input_ids"].shape
        labels = torch.zeros(B, S)
        weights = torch.zeros(B, S)
        ratio = self.config.latent_stop_target_ratio
        for b, segs in enumerate(batch["latent_segments"]):
            for i, (start, end, _img) in enumerate(segs):
                if targets is None:
                    row = stop_labels(end - start, ratio)
                else:
                    row = stop_labels_for_length(end - start, targets[b][i])
                labels[b, start:end] = torch.tensor(row)
                weights[b, start:end] = 1.0
        device = p1.stop_logits.device
        return labels.to(device), weights.to(device)

    def _answer_ce_per_sample(
        self, embeds: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
        kv_mask: torch.Tensor, labels: torch.Tensor,
    ) -> torch.Tensor:
        """``[R]`` mean answer CE of each row (0 for a row without labels); one language-model call.

        The LM head runs on the labelled positions only (a real vocabulary is large).
        """
        hidden = self.model.language_model(
            inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids, use_cache=False,
            **self._gating_kwargs(kv_mask),
        ).last_hidden_state
        target = labels[:, 1:]
        r, c = (target != -100).nonzero(as_tuple=True)
        logits = self.lm_head(hidden[r, c]).float()
        tok = F.cross_entropy(logits, target[r, c], reduction="none")
        rows = embeds.shape[0]
        total = tok.new_zeros(rows).index_add_(0, r, tok)
        count = tok.new_zeros(rows).index_add_(0, r, torch.ones_like(tok))
        return total / count.clamp_min(1.0)

    @torch.no_grad()
    def _answer_stop_targets(
        self, batch: dict[str, Any], embeds: torch.Tensor, position_ids: torch.Tensor
    ) -> tuple[list[list[int]], int]:
        """Content-aware stop targets (``latent_stop_target_mode="answer"``) and the model calls spent.

        1. Pass 1 at full budget, without gradient (every slot active): the latents a segment has if
           it never stops. A segment truncated to ``L`` keeps the first ``L`` of them, exactly what a
           pass that halts at ``L`` produces for that segment (pass 1 is causal).
        2. The answer CE of every sample with all slots active (the reference), one call.
        3. For each segment index ``i`` (the maximum over processes), one call on ``K`` copies of the
           samples that have a segment ``i``: copy ``j`` masks slots ``[start + L_j, end)`` of segment ``i``
           only (:func:`answer_target_candidates`), every other segment at full budget.
           ``K = min(latent_stop_target_points, largest budget - 1)`` (at least 1).
        4. Target of a segment: the shortest length from which every tried length is within
           ``latent_stop_target_tolerance`` of the reference CE (:func:`answer_stop_target`).

        The number of calls is ``(1 + pass-1 steps) + 1 + max segments``: it depends on the batch's
        layout only (maxima over processes), never on where samples halt.
        """
        s = self.latent_settings
        input_ids, attention_mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
        segments = batch["latent_segments"]
        B, S = input_ids.shape
        device = input_ids.device
        full = self.latent_pass(input_ids, attention_mask, embeds, position_ids, segments,
                                batch["latent_budgets"], sample_ids=batch.get("ids"), full_budget=True)
        calls = full.num_model_calls
        patched = embeds.index_put((full.ce_patch_pos[:, 0], full.ce_patch_pos[:, 1]),
                                   full.ce_patch_vec.to(embeds.dtype))
        keep = torch.ones(B, S, dtype=torch.bool, device=device)
        ref = self._answer_ce_per_sample(patched, attention_mask, position_ids, keep, labels).tolist()
        calls += 1
        M = max((len(segs) for segs in segments), default=0)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            t = torch.tensor([M], device=device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            M = int(t[0])
        P = s.latent_stop_target_points
        targets = [[0] * len(segs) for segs in segments]
        for i in range(M):
            rows = [b for b, segs in enumerate(segments) if i < len(segs)]
            # P copies, or fewer when every budget here is small (then every length is tried anyway). A
            # process with no segment i still makes the call, on one untruncated row.
            K = max(1, min(P, max([segments[b][i][1] - segments[b][i][0] - 1 for b in rows], default=1)))
            pick = torch.tensor(rows or [0], device=device)
            masks = keep[pick].repeat_interleave(K, dim=0)  # row r * K + j
            lengths: dict[int, list[int]] = {}
            for r, b in enumerate(rows):
                start, end, _img = segments[b][i]
                lengths[b] = answer_target_candidates(end - start, K)
                for j, length in enumerate(lengths[b]):
                    masks[r * K + j, start + length:end] = False
            ce = self._answer_ce_per_sample(
                patched[pick].repeat_interleave(K, dim=0), attention_mask[pick].repeat_interleave(K, dim=0),
                position_ids[:, pick].repeat_interleave(K, dim=1), masks, labels[pick].repeat_interleave(K, dim=0),
            ).view(len(pick), K).tolist()
            calls += 1
            for r, b in enumerate(rows):
                start, end, _img = segments[b][i]
                targets[b][i] = answer_stop_target(lengths[b], ce[r], ref[b], end - start,
                                                   s.latent_stop_target_tolerance)
        return targets, calls

    def _expected_cost(self, batch, p1: LatentPassOutput) -> torch.Tensor:
        probs = torch.sigmoid(p1.stop_logits)
        per_sample = []
        for b, segs in enumerate(batch["latent_segments"]):
            total = probs.new_zeros(())
            for start, end, _img in segs:
                total = total + expected_length(probs[b, start:end])
            per_sample.append(total)
        return torch.stack(per_sample).mean()


_register_checkpoint_mapping(LatentQwen2_5_VLForConditionalGeneration.__name__)

__all__ = [
    "LatentCausalLMOutput",
    "LatentInputError",
    "LatentLossOutput",
    "LatentPassOutput",
    "LatentQwen2_5_VLForConditionalGeneration",
    "Layout",
]
