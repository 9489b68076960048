"""latentvl's model for vLLM: pass 2 (generation) of a latentvl checkpoint, with the latents at their slots.

:func:`register` is the target of latentvl's ``vllm.general_plugins`` entry point: vLLM calls it in every
process it starts, and it registers :class:`LatentQwen2_5_VLForVLLM` under the architecture name a latentvl
checkpoint's config carries (``LatentQwen2_5_VLForConditionalGeneration``). It imports nothing heavy: the
model class lives in :mod:`latentvl.integrations.vllm_model`, which vLLM imports only when such a checkpoint
is loaded.

What the model adds to vLLM's Qwen2.5-VL (subclasses of its model, processing info and multimodal processor):

- **Weights.** The checkpoint's ``latent_stop_head.*``, ``latent_pause_embedding.*`` and
  ``latent_feedback_gain.*`` belong to pass 1 (latentvl); pass 2 does not use them, so they are skipped.
- **Latent items.** The prompt (built by :mod:`latentvl.inference.vllm_engine`) carries every question image
  and every latent segment as an ``image`` item given by its embeddings (``enable_mm_embeds``):
  ``{"image_embeds": [N, H], "image_grid_thw": [n, 3], "latent_skip": [n]}``. A question image has
  ``latent_skip = -1``. A latent segment covers ``<|latent_start|>`` and its used slots (``1 + used``
  tokens, grid ``(1, m, m * (1 + used))``; its embeddings are the token's embedding and the latent vectors)
  and ``latent_skip = budget - used``: the unused slots that are not in the prompt at all. Removing an
  unused slot from the prompt is what latentvl's exact gate (design D3, ``latent_null_scale == 0``) does
  to it in every attention layer.
- **Positions (D2).** :meth:`LatentQwen2_5_VLForVLLM.get_mrope_input_positions` gives the question images
  their stock M-RoPE positions, the latent items text positions, and shifts every token after a segment by
  its ``latent_skip``: the kept tokens keep the positions of the full-budget sequence, and generated tokens
  continue after its last position, as in latentvl's ``generate()``.
"""

from __future__ import annotations

from ..inference.vllm_registry import register_vllm_model

__all__ = ["register"]


def register() -> None:
    """Register latentvl's architecture with vLLM (the ``vllm.general_plugins`` entry point)."""
    register_vllm_model()
