"""A tokenizer and a Qwen2-VL image processor travelling together, saved and loaded as one.

transformers' ``Qwen2_5_VLProcessor`` insists on a video processor (which needs torchvision);
latentvl handles images only, so it keeps the two parts it needs side by side.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import AutoTokenizer
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from .tokens import add_latent_tokens


@dataclass
class LatentProcessor:
    """``tokenizer`` (with the latent tokens) and ``image_processor`` (Qwen2-VL, PIL backend)."""

    tokenizer: Any
    image_processor: Any

    @property
    def merge_size(self) -> int:
        return int(self.image_processor.merge_size)

    def token_id(self, token: str) -> int:
        tid = self.tokenizer.convert_tokens_to_ids(token)
        if tid is None or tid == self.tokenizer.unk_token_id:
            raise KeyError(f"token {token!r} is not in the tokenizer's vocabulary")
        return int(tid)

    def save_pretrained(self, path: str | Path) -> None:
        self.tokenizer.save_pretrained(path)
        self.image_processor.save_pretrained(path)

    @classmethod
    def from_pretrained(cls, path: str | Path) -> LatentProcessor:
        """Load from a local directory (a latentvl checkpoint or a stock Qwen2.5-VL one)."""
        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"model directory {path} does not exist")
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        add_latent_tokens(tokenizer)
        pre = path / "preprocessor_config.json"
        if not pre.exists():
            raise FileNotFoundError(f"{pre} is missing: the checkpoint has no image processor config")
        cfg = json.loads(pre.read_text())
        kwargs = {
            k: cfg[k]
            for k in ("patch_size", "merge_size", "temporal_patch_size", "image_mean", "image_std")
            if k in cfg
        }
        size = dict(cfg.get("size") or {})
        if "min_pixels" in cfg and "shortest_edge" not in size:
            size["shortest_edge"] = cfg["min_pixels"]
        if "max_pixels" in cfg and "longest_edge" not in size:
            size["longest_edge"] = cfg["max_pixels"]
        if size:
            # A fresh dict: on transformers 5.17 min_pixels/max_pixels kwargs change the class default.
            kwargs["size"] = {"shortest_edge": size["shortest_edge"], "longest_edge": size["longest_edge"]}
        return cls(tokenizer=tokenizer, image_processor=Qwen2VLImageProcessorPil(**kwargs))
