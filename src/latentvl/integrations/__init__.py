"""Bridges to evaluation harnesses.

``lmms_eval_manifest`` is the target of latentvl's ``lmms_eval.models`` entry point: lmms-eval calls
it while building its model registry, so it imports nothing heavy (the model class itself lives in
:mod:`latentvl.integrations.lmms_eval` and is imported only when ``--model latentvl`` is used).
"""

from __future__ import annotations

from typing import Any

__all__ = ["LMMS_EVAL_MODEL_ID", "lmms_eval_manifest"]

LMMS_EVAL_MODEL_ID = "latentvl"


def lmms_eval_manifest() -> Any:
    """The ``ModelManifest`` that registers ``latentvl`` with lmms-eval: a chat model (the default) and
    a simple one (``--force_simple``, which also serves ``loglikelihood`` requests)."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(
        model_id=LMMS_EVAL_MODEL_ID,
        chat_class_path="latentvl.integrations.lmms_eval.LatentVLChat",
        simple_class_path="latentvl.integrations.lmms_eval.LatentVLSimple",
    )
