"""What latentvl's vLLM engine and latentvl's vLLM model agree on, and the model's registration with vLLM.

The engine (:mod:`latentvl.inference.vllm_engine`) builds the prompts, the model
(:mod:`latentvl.integrations.vllm_model`, registered here by its path, so nothing heavy is imported) reads
them; :mod:`latentvl.integrations.vllm_plugin` is the ``vllm.general_plugins`` entry point that calls
:func:`register_vllm_model` in every process vLLM starts.
"""

from __future__ import annotations

__all__ = ["LATENT_ARCHITECTURE", "LATENT_SKIP", "MODEL_CLASS", "PASS1_WEIGHTS", "register_vllm_model"]

#: the architecture name a latentvl Qwen2.5-VL checkpoint's config carries
LATENT_ARCHITECTURE = "LatentQwen2_5_VLForConditionalGeneration"
#: the image-item field that counts a latent segment's unused slots (-1: a question image)
LATENT_SKIP = "latent_skip"
#: the checkpoint's pass-1 weights, which pass 2 does not use
PASS1_WEIGHTS = ("latent_stop_head.", "latent_pause_embedding.", "latent_feedback_gain.")
#: where vLLM finds the model class (imported only when it loads such a checkpoint)
MODEL_CLASS = "latentvl.integrations.vllm_model:LatentQwen2_5_VLForVLLM"


def register_vllm_model() -> None:
    """Register latentvl's architecture with vLLM's model registry in this process (idempotent)."""
    from vllm import ModelRegistry

    if LATENT_ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(LATENT_ARCHITECTURE, MODEL_CLASS)
