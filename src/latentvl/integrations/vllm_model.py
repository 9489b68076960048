"""The vLLM model class of :mod:`latentvl.integrations.vllm_plugin` (imported by vLLM, never by latentvl's core).

Subclasses of vLLM's Qwen2.5-VL model, processing info and multimodal processor; see the plugin module for
the item layout (``latent_skip``) and why the positions are exact.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from vllm.model_executor.models.qwen2_5_vl import (
    Qwen2_5_VLDummyInputsBuilder,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLMultiModalProcessor,
    Qwen2_5_VLProcessingInfo,
)
from vllm.model_executor.models.qwen2_vl import Qwen2VLMultiModalDataParser, _create_qwen2vl_field_factory
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.inputs import MultiModalFieldConfig
from vllm.multimodal.parse import DictEmbeddingItems

from ..inference.vllm_registry import LATENT_SKIP, PASS1_WEIGHTS

__all__ = ["LatentQwen2_5_VLForVLLM"]


def _latent_fields(spatial_merge_size: int):
    """Qwen2-VL's field configs plus ``latent_skip`` (one integer per image item)."""
    stock = _create_qwen2vl_field_factory(spatial_merge_size)

    def fields(hf_inputs: Mapping[str, torch.Tensor]) -> dict[str, MultiModalFieldConfig]:
        return {**stock(hf_inputs), LATENT_SKIP: MultiModalFieldConfig.batched("image", keep_on_cpu=True)}

    return fields


class LatentDataParser(Qwen2VLMultiModalDataParser):
    """Image items given as embeddings carry ``latent_skip`` beside ``image_grid_thw``."""

    embedding_fields = {
        **Qwen2VLMultiModalDataParser.embedding_fields,
        "image": {"image_embeds": "values", "image_grid_thw": "metadata", LATENT_SKIP: "metadata"},
    }

    def _parse_image_data(self, data):
        if isinstance(data, dict):
            required, optional = self.embedding_field_sets("image")
            return DictEmbeddingItems(data, modality="image", required_fields=required, optional_fields=optional,
                                      fields_factory=_latent_fields(self._spatial_merge_size))
        return super()._parse_image_data(data)


class LatentProcessingInfo(Qwen2_5_VLProcessingInfo):
    def get_data_parser(self):
        return LatentDataParser(
            self.get_hf_config().vision_config.spatial_merge_size, video_needs_metadata=True,
            expected_hidden_size=self._get_expected_hidden_size(),
            allow_missing_mm_embeddings=self.allow_missing_mm_embeddings,
        )


class LatentMultiModalProcessor(Qwen2_5_VLMultiModalProcessor):
    def _get_mm_fields_config(self, hf_inputs, hf_processor_mm_kwargs) -> Mapping[str, MultiModalFieldConfig]:
        return {**super()._get_mm_fields_config(hf_inputs, hf_processor_mm_kwargs),
                LATENT_SKIP: MultiModalFieldConfig.batched("image", keep_on_cpu=True)}


def _skip_of(feature: Any) -> int:
    """``latent_skip`` of an item: -1 for a question image (and for an image given as pixels)."""
    data = feature.data
    field = data.get(LATENT_SKIP) if data is not None and feature.modality == "image" else None
    return -1 if field is None else int(field.data)


@MULTIMODAL_REGISTRY.register_processor(
    LatentMultiModalProcessor, info=LatentProcessingInfo, dummy_inputs=Qwen2_5_VLDummyInputsBuilder)
class LatentQwen2_5_VLForVLLM(Qwen2_5_VLForConditionalGeneration):
    """Qwen2.5-VL for a latentvl checkpoint: skips pass 1's weights and places latent items at full-budget
    M-RoPE positions (see :mod:`latentvl.integrations.vllm_plugin`)."""

    def get_mrope_input_positions(self, input_tokens: list[int], mm_features: list) -> tuple[torch.Tensor, int]:
        # Latent items are text: the stock rule gives them (and everything else) the positions of the prompt
        # as sent; then every token after a segment moves on by the slots the segment did not use.
        images = [f for f in mm_features if _skip_of(f) < 0]
        positions, delta = super().get_mrope_input_positions(input_tokens, images)
        positions = positions.clone()
        shift = 0
        for f in sorted(mm_features, key=lambda f: f.mm_position.offset):
            skip = _skip_of(f)
            if skip > 0:
                positions[:, f.mm_position.offset + f.mm_position.length:] += skip
                shift += skip
        return positions, int(delta) + shift

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        return super().load_weights((name, w) for name, w in weights if not name.startswith(PASS1_WEIGHTS))
