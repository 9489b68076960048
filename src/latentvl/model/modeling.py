"""The latent model, whatever its backbone family: :class:`LatentModelMixin` over a transformers
Qwen-VL model (``LatentQwen2_5_VLForConditionalGeneration`` in :mod:`latentvl.model.families.qwen2_5_vl`,
``LatentQwen3VLForConditionalGeneration`` in :mod:`latentvl.model.families.qwen3_vl`).

What is family-specific is behind three methods a family class may override (the backbone boundary,
docs/model.md): `LatentModelMixin.image_features` (question images to merged features and, for a
family with DeepStack, the features added to the first decoder layers), :meth:`LatentModelMixin.text_visual_kwargs`
(how those extras reach the text model) and the parent class itself (its ``get_rope_index``, its decoder
layers' attention, which calls the registered gated attention). Positions come from the parent's
``get_rope_index`` over the full-budget sequence (D2) in both families.

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

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from transformers.modeling_outputs import CausalLMOutputWithPast

from ..config import LatentSettings, check_threshold
from ..errors import LatentInputError
from ..segments import build_layout
from .attention import STOCK_ATTENTION, gated_attention, stock_attention  # importing registers the functions
from .compat import CACHE_KWARG, output_cache, resolve_cache
from .objective import LatentLossOutput, latent_loss
from .pass1 import LatentPassOutput, pass_output, run_steps, shifted_frame
from .vision_cache import VisionFeatureCache
from .visual import VisualStack


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


def register_checkpoint_mapping(class_name: str, parent_name: str) -> None:
    """Let a latent subclass load stock checkpoints: transformers looks key renamings up by class name."""
    from transformers import conversion_mapping as cm

    parent = cm.get_checkpoint_conversion_mapping(parent_name)
    if parent is not None and cm.get_checkpoint_conversion_mapping(class_name) is None:
        cm.register_checkpoint_conversion_mapping(class_name, parent)


@dataclass
class LatentCausalLMOutput(CausalLMOutputWithPast):
    """The causal-LM output plus the latent fields of design §4.1."""

    latent_kv_mask: torch.BoolTensor | None = None
    latent_stop_probs: list[list[list[float]]] | None = None
    latent_used_lens: list[list[int]] | None = None


def _select_gated_attention(config) -> None:
    """Point the text sub-config at the gated version of its requested attention and the vision
    sub-config at a stock one (see :func:`latentvl.model.attention.gated_attention`)."""
    config.text_config._attn_implementation_internal = gated_attention(config.text_config._attn_implementation)
    vision = config.vision_config
    vision._attn_implementation_internal = stock_attention(vision._attn_implementation)
    config._attn_implementation_internal = stock_attention(config._attn_implementation)


class LatentModelMixin:
    """Latent visual thoughts over a transformers Qwen-VL model: a family class lists this mixin first,
    then its transformers parent (``class LatentQwen3VLForConditionalGeneration(LatentModelMixin,
    Qwen3VLForConditionalGeneration)``).

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
    #: The family's name (``latentvl.model.backbone.BACKBONES``); set by each family class.
    backbone: str = ""
    #: Whether question images also add DeepStack features inside the text model (a family sets it).
    has_deepstack: bool = False
    #: Per-image features of a frozen vision tower (:mod:`latentvl.model.vision_cache`); None = off.
    vision_cache: VisionFeatureCache | None = None

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

    def visual_features(self, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor
                        ) -> tuple[list[torch.Tensor], list[torch.Tensor] | None]:
        """The backbone's image features: one ``[N_i, H]`` merged-token tensor per image, and the DeepStack
        features (one ``[sum N_i, H]`` tensor per layer) of a family that has them, else None. With
        ``vision_cache`` set (a frozen tower, :mod:`latentvl.model.vision_cache`) they come from the cache."""
        if self.vision_cache is not None:
            return self.vision_cache.features(self.image_features, pixel_values, image_grid_thw)
        return self.image_features(pixel_values, image_grid_thw)

    def image_features(self, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor
                       ) -> tuple[list[torch.Tensor], list[torch.Tensor] | None]:
        """The family's vision tower on these images, as :meth:`visual_features` returns them (the hook a
        family with DeepStack overrides)."""
        return list(self.model.get_image_features(pixel_values, image_grid_thw).pooler_output), None

    def text_visual_kwargs(self, visual: VisualStack | None) -> dict[str, Any]:
        """The text model's keywords for ``visual`` (none for a family without DeepStack)."""
        return {}

    def embed_inputs(
        self, input_ids: torch.LongTensor, pixel_values: torch.Tensor | None, image_grid_thw: torch.Tensor | None,
        return_visual: bool = False,
    ) -> torch.FloatTensor | tuple[torch.FloatTensor, VisualStack | None]:
        """Token embeddings ``[B, S, H]`` with the question images' visual features placed at their image
        tokens; with ``return_visual=True`` also the :class:`~latentvl.model.visual.VisualStack` of a family
        with DeepStack (None otherwise, or without images), which every later call on these embeddings takes.
        Without it, a family with DeepStack remembers the stack of the batch it embedded last, and a later
        call that continues that batch uses it (:meth:`_visual_for`).

        A batch without question images runs the vision tower on :meth:`_dummy_image` when
        :meth:`_vision_everywhere` says so, and adds ``0 * sum(features)``: the embeddings are
        unchanged and every process makes one vision call per batch, images or not.
        """
        embeds = self.get_input_embeddings()(input_ids)
        visual = None
        if pixel_values is not None:
            feats, deepstack = self.visual_features(pixel_values, image_grid_thw)
            feats = torch.cat(feats, dim=0).to(embeds.device, embeds.dtype)
            mask = (input_ids == self.config.image_token_id)[..., None]
            if int(mask.sum()) != feats.shape[0]:
                raise LatentInputError(
                    f"{int(mask.sum())} image tokens in input_ids but {feats.shape[0]} visual features"
                )
            embeds = embeds.masked_scatter(mask, feats)
            if deepstack is not None:
                visual = VisualStack.from_mask(mask[..., 0], [f.to(embeds.device, embeds.dtype) for f in deepstack])
                if not return_visual:  # remembered for a later call on these embeddings (_visual_for)
                    self.__dict__["_latent_visual_memo"] = (input_ids, visual, feats)
        elif self._vision_everywhere():
            dummy, deepstack = self.visual_features(*self._dummy_image(embeds.device))
            extra = torch.cat(dummy, dim=0).sum() + sum(f.sum() for f in deepstack or [])
            embeds = embeds + 0.0 * extra.to(embeds.dtype)
        return (embeds, visual) if return_visual else embeds

    def _visual_for(self, input_ids: torch.Tensor | None, visual: VisualStack | None, what: str,
                    inputs_embeds: torch.Tensor | None = None) -> VisualStack | None:
        """The :class:`VisualStack` of a call on ready embeddings: ``visual`` when given; else, for a family with
        DeepStack, the one :meth:`embed_inputs` computed last, when this call continues that batch: its
        embeddings begin with that batch's columns and hold at its image positions exactly the features
        placed there then, and its ``input_ids`` (if given) begin with the ids embedded then (so
        ``embeds = model.embed_inputs(ids, ...)``, then ``model(input_ids=ids, inputs_embeds=embeds, ...)``,
        with latents patched in or tokens appended, needs no more). Otherwise an error where ``input_ids``
        hold image tokens (their DeepStack features would be missing)."""
        if visual is not None or not self.has_deepstack:
            return visual
        memo = self.__dict__.get("_latent_visual_memo")
        if memo is not None:
            ids, remembered, placed = memo
            B, S = ids.shape
            ref = inputs_embeds
            if ref is not None and ref.shape[0] == B and ref.shape[1] >= S and ref.device == ids.device:
                same = bool(torch.equal(ref[:, :S][remembered.mask], placed.to(ref.dtype)))
                if same and input_ids is not None:
                    same = input_ids.shape[1] == ref.shape[1] and bool(torch.equal(input_ids[:, :S], ids))
                if same:
                    return remembered.pad_right(ref.shape[1] - S) if ref.shape[1] > S else remembered
        if input_ids is not None and bool((input_ids == self.config.image_token_id).any()):
            raise LatentInputError(
                f"{what}: the embeddings hold image tokens but no latent_visual was given; this backbone "
                f"({self.backbone}) adds DeepStack features at them: take both from "
                f"model.embed_inputs(..., return_visual=True), or embed these input_ids last")
        return None

    def text_forward(
        self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None, position_ids: torch.Tensor,
        labels: torch.Tensor | None = None, visual: VisualStack | None = None, gating: dict[str, Any] | None = None,
        cache=None, use_cache: bool | None = None, logits_to_keep: int | torch.Tensor = 0, **kwargs,
    ) -> LatentCausalLMOutput:
        """The causal LM over ready embeddings ``[B, S, H]`` (question images placed, latents patched):
        the text model with ``visual``'s extras and the gating keywords, the LM head on the last
        ``logits_to_keep`` positions (all with 0) and, with ``labels``, the shifted CE loss."""
        out = self.model.language_model(
            inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids,
            use_cache=use_cache, **{CACHE_KWARG: cache}, **self.text_visual_kwargs(visual), **(gating or {}),
            **kwargs,
        )
        hidden = out.last_hidden_state
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden[:, keep, :])
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.text_config.vocab_size)
        return LatentCausalLMOutput(loss=loss, logits=logits, hidden_states=out.hidden_states,
                                    attentions=out.attentions, **{CACHE_KWARG: output_cache(out)})

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
        latent_visual: VisualStack | None = None,
        cache=None,
        **kwargs,
    ):
        """Pass 1 when ``latent_mode=True`` (returns :class:`LatentPassOutput`), else pass 2.

        Pass 2 patches ``ce_patch_vec`` at ``ce_patch_pos`` (only on a call that starts from an empty
        cache, i.e. the prefill of ``generate()``) and applies ``latent_kv_mask`` ``[B, S_kv]`` in every
        text attention layer. Without ``position_ids`` on an empty cache, positions are computed over
        the full-budget sequence (D2). ``latent_visual``: the :class:`~latentvl.model.visual.VisualStack` that
        ``embed_inputs(..., return_visual=True)`` returned with ``inputs_embeds`` (a family with DeepStack
        needs it wherever the embeddings hold image tokens). The KV cache may come as ``cache`` or
        ``past_key_values`` (transformers renamed it; :mod:`latentvl.model.compat`).
        """
        cache = resolve_cache(cache, past_key_values)
        if latent_mode:
            if input_ids is None:
                raise LatentInputError("latent_mode=True needs input_ids (they locate the latent segments)")
            visual = latent_visual
            if inputs_embeds is None:
                inputs_embeds, visual = self.embed_inputs(input_ids, pixel_values, image_grid_thw, return_visual=True)
            if position_ids is None:
                position_ids = self.compute_position_ids(input_ids, attention_mask, mm_token_type_ids,
                                                         image_grid_thw)
            return self.latent_pass(input_ids, attention_mask, inputs_embeds, position_ids, latent_segments,
                                    latent_budgets, threshold=latent_threshold, visual=visual)

        # The first call of pass 2 (a forward, or generate()'s prefill) with patches or ready embeddings runs the
        # text model on the embeddings itself (text_forward), with the question images' extras; any other call
        # (generate()'s decoding steps, a plain forward from input_ids) is the parent's forward. Only such a
        # call reads the cache's length: a static cache's is a tensor, and a compiled decoding step (input_ids,
        # positions, no patches: see _update_model_kwargs_for_generation) must not branch on it.
        ready = ce_patch_pos is not None or inputs_embeds is not None
        if ready and (cache is None or cache.get_seq_length() == 0):
            visual = latent_visual
            if inputs_embeds is None:
                inputs_embeds, visual = self.embed_inputs(input_ids, pixel_values, image_grid_thw, return_visual=True)
            else:
                visual = self._visual_for(input_ids, visual, "a forward from inputs_embeds", inputs_embeds)
            if ce_patch_pos is not None:
                inputs_embeds = inputs_embeds.index_put(
                    (ce_patch_pos[:, 0], ce_patch_pos[:, 1]), ce_patch_vec.to(inputs_embeds.dtype))
            if position_ids is None:
                if input_ids is None:
                    raise LatentInputError("a first forward from inputs_embeds needs position_ids or input_ids "
                                           "(the M-RoPE positions of the full-budget sequence, D2)")
                position_ids = self.compute_position_ids(input_ids, attention_mask, mm_token_type_ids,
                                                         image_grid_thw)
            out = self.text_forward(inputs_embeds, attention_mask, position_ids, labels=labels, visual=visual,
                                    gating=self._gating_kwargs(latent_kv_mask), cache=cache, use_cache=use_cache,
                                    logits_to_keep=logits_to_keep, **kwargs)
            out.latent_kv_mask = latent_kv_mask
            return out
        if position_ids is None and input_ids is not None and (cache is None or cache.get_seq_length() == 0):
            position_ids = self.compute_position_ids(input_ids, attention_mask, mm_token_type_ids,
                                                     image_grid_thw)
        out = super().forward(
            input_ids=input_ids if inputs_embeds is None else None,
            inputs_embeds=inputs_embeds,  # ready embeddings on a cache that is not empty (a continued prompt)
            attention_mask=attention_mask,
            position_ids=position_ids,
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
        """After each ``generate()`` step: drop the patches and the visual extras once the prefill has placed
        them, and grow
        ``latent_kv_mask`` with the generated tokens (always kept), except on a static cache, where the
        mask keeps its prompt length (keys past its end count as kept) so that every decoding step has the
        same shapes and a compiled step is reused."""
        model_kwargs = super()._update_model_kwargs_for_generation(
            outputs, model_kwargs, is_encoder_decoder=is_encoder_decoder, num_new_tokens=num_new_tokens)
        model_kwargs.pop("ce_patch_pos", None)
        model_kwargs.pop("ce_patch_vec", None)
        model_kwargs.pop("latent_visual", None)
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
        visual: VisualStack | None = None,
    ) -> LatentPassOutput:
        """Fill the latent slots of a batch (design §4, D8). See :class:`LatentPassOutput`.

        ``input_ids`` ``[B, S]``, ``inputs_embeds`` ``[B, S, H]`` (question images placed), ``position_ids``
        ``[3, B, S]`` (over the full-budget sequence, D2). ``full_budget=True`` steps every slot as active
        whatever the stage (no stop head, no halting): the latents a segment would have if it never stopped,
        as in stage A. ``forcing`` ``(forced [B, S] bool, inputs [B, S, H])``: teacher-forced slots and the
        inputs they take instead of the fed-back state (``latent_teacher_forcing``; see :meth:`latent_loss`).
        ``visual``: the question images' :class:`~latentvl.model.visual.VisualStack` (a family with DeepStack).

        All samples advance together (:mod:`latentvl.model.pass1`): each sample is shifted right so that its
        first latent slot falls on the same column (:func:`~latentvl.model.pass1.shifted_frame`), one prefix
        call covers everything before it, then one model call per column until the longest latent region
        ends (:func:`~latentvl.model.pass1.run_steps`, with the stop head's :class:`~latentvl.model.pass1.Halting`
        in stage C). Text between segments is fed as known tokens. The number of calls depends only on the
        batch's layout (and, in a distributed run, is the maximum over ranks), never on where samples halt;
        no host synchronisation happens inside the loop.
        """
        self._require_gated_attention("the latent pass (latent_mode=True)")
        visual = self._visual_for(input_ids, visual, "the latent pass", inputs_embeds)
        settings = self.latent_settings
        stage = "A" if full_budget else settings.latent_mode_stage
        thr = check_threshold(settings.latent_stop_threshold if threshold is None else threshold, "threshold")
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
        frame = shifted_frame(layout, steps, inputs_embeds, position_ids, attention_mask, forcing, visual)
        trace = run_steps(self, frame, settings, thr, stage_c=stage == "C")
        return pass_output(layout, frame, trace, (B, S), position_ids)

    # ------------------------------------------------------------------ training unit
    def latent_loss(self, batch: dict[str, Any], threshold: float | None = None) -> LatentLossOutput:
        """Both passes on a collated batch and the combined loss (design §6); see
        :func:`latentvl.model.objective.latent_loss`."""
        return latent_loss(self, batch, threshold)


__all__ = ["LatentCausalLMOutput", "LatentFeedbackGain", "LatentModelMixin", "register_checkpoint_mapping"]
