"""Loading and saving: stock Qwen2.5-VL checkpoints in, self-contained latentvl checkpoints out."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..config import LatentSettings
from ..errors import ModelFormatError
from ..processor import LatentProcessor
from ..tokens import LATENT_END, LATENT_PAD, LATENT_START
from ..tokens import resize_embeddings_for_latents as _resize
from .backbone import backbone_for_model_type, latent_model_class
from .modeling import LatentModelMixin

# dtype names that load_latent_model takes ("auto": as saved)
DTYPES = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_latent_model(
    path: str | Path,
    dtype: torch.dtype | str | None = None,
    attn_implementation: str = "latent_sdpa",
    device_map: str | dict | None = None,
) -> tuple[LatentModelMixin, LatentProcessor]:
    """Load ``(model, processor)`` from a local directory, never from a hub.

    The directory may be a latentvl checkpoint or a stock Qwen2.5-VL or Qwen3-VL one (``config.json`` with
    its ``model_type``, safetensors shards with an index, tokenizer and ``preprocessor_config.json``); the
    family's latent class is chosen from the saved config's ``model_type``
    (:func:`latentvl.model.backbone.backbone_for_model_type`). For a stock one the latent tokens are added,
    the embeddings grow (new rows = mean embedding), the latent ids are written to the config and the stop head is
    freshly initialised; ``save_latent_checkpoint`` then makes it self-contained.
    """
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} is not a model directory: config.json is missing")
    if not any(path.glob("*.safetensors")) and any(path.glob("*.bin")):
        raise ModelFormatError(
            f"{path}: holds only pickled weights ({', '.join(sorted(p.name for p in path.glob('*.bin')))}), "
            "which latentvl does not load (a pickle can run code); convert them to safetensors first"
        )
    try:
        model_type = json.loads((path / "config.json").read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError) as e:
        raise ModelFormatError(f"{path / 'config.json'}: not readable JSON ({e})") from e
    try:
        backbone = backbone_for_model_type(model_type, where=str(path / "config.json"))
    except ValueError as e:
        raise ModelFormatError(str(e)) from e
    processor = LatentProcessor.from_pretrained(path)
    model = latent_model_class(backbone).from_pretrained(
        path,
        dtype=dtype if dtype is not None else "auto",
        attn_implementation={"text_config": attn_implementation, "vision_config": "sdpa"},
        device_map=device_map,
        local_files_only=True,
    )
    ids = {tok: processor.token_id(tok) for tok in (LATENT_START, LATENT_PAD, LATENT_END)}
    settings = LatentSettings.from_config(model.config)
    if settings.latent_token_id != ids[LATENT_PAD] or model.get_input_embeddings().weight.shape[0] < len(
        processor.tokenizer
    ):
        _resize(model, processor.tokenizer, list(ids.values()))
        settings.replace(
            latent_token_id=ids[LATENT_PAD],
            latent_start_token_id=ids[LATENT_START],
            latent_end_token_id=ids[LATENT_END],
        ).apply_to(model.config)
    return model, processor


def save_latent_checkpoint(
    model: LatentModelMixin, processor: LatentProcessor, path: str | Path
) -> None:
    """Write model (safetensors), config with every latent field, tokenizer and image processor."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    processor.save_pretrained(path)
