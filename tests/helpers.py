"""Helpers shared by several test files (imported as ``helpers``; pytest puts this folder on sys.path)."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from latentvl import LatentCollator, build_tiny_model, set_latent_fields


def require_extra(module: str, extra: str):
    """Import ``module`` of an optional integration, or skip the calling test module with the reason when
    latentvl's ``extra`` is not installed. With ``LATENTVL_REQUIRE_EXTRAS=1`` (set by ``.ci/run``) a
    missing module is an error instead: CI runs every integration's tests, never skips them."""
    import importlib
    import os

    import pytest

    try:
        return importlib.import_module(module)
    except ImportError as err:
        if os.environ.get("LATENTVL_REQUIRE_EXTRAS") == "1":
            raise ImportError(f"{module} (latentvl's '{extra}' extra) is required here "
                              f"(LATENTVL_REQUIRE_EXTRAS=1): {err}") from err
        pytest.skip(f"needs {module}: pip install -e '.[{extra}]' (see docs)", allow_module_level=True)


def legacy_key(key: str) -> str:
    """The public checkpoints' layout: ``model.layers.*``, ``visual.*``, ``lm_head.*``."""
    if key.startswith("model.language_model."):
        return "model." + key[len("model.language_model."):]
    if key.startswith("model.visual."):
        return key[len("model."):]
    return key


def fire_at(model, schedule: dict[int, list[int]]):
    """Make the stop head return +20 at the given pass-1 steps for the given rows, else -20.

    Returns the hook handle; ``schedule`` maps a stop-head call index to the rows that fire there.
    """
    calls = {"n": 0}

    def hook(module, args, output):
        out = torch.full_like(output, -20.0)
        for row in schedule.get(calls["n"], []):
            out[row] = 20.0
        calls["n"] += 1
        return out

    return model.latent_stop_head.register_forward_hook(hook)


def write_random_images(folder, sizes) -> list:
    """One random RGB PNG per ``(w, h)`` in ``sizes`` under ``folder`` (seeded: the same pixels every run)."""
    rs = np.random.RandomState(0)
    paths = []
    for i, (w, h) in enumerate(sizes):
        p = folder / f"img{i}.png"
        Image.fromarray(rs.randint(0, 255, (h, w, 3), dtype=np.uint8)).save(p)
        paths.append(p)
    return paths


# ------------------------------------------------------------------ batches for the model tests
def rand_image(w: int, h: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((h, w, 3)) * 255).astype("uint8"))


def make_sample(i: int, m: int, size=(84, 56), cot_sizes=None) -> dict:
    cot_sizes = cot_sizes or [(56 + 28 * ((i + k) % 4), 56 + 28 * (k % 3)) for k in range(m)]
    return {
        "id": f"s{i}",
        "question": f"Q{i}?" + "x" * (i % 3),
        "images": [rand_image(*size, seed=100 + i)],
        "cot_images": [rand_image(w, h, seed=200 + 10 * i + k) for k, (w, h) in enumerate(cot_sizes)],
        "answer": "ABCD"[: 1 + i % 4],
    }


def collate_samples(model, processor, samples, side="right"):
    return LatentCollator(processor, model.config, padding_side=side)(samples)


def set_stage(model, stage: str, **extra):
    if stage == "A":
        set_latent_fields(model.config, latent_mode_stage="A", latent_stop_loss_weight=0.0, latent_cost_weight=0.0,
                          **extra)
    else:
        set_latent_fields(model.config, latent_mode_stage="C", latent_stop_loss_weight=1.0, latent_cost_weight=1e-3,
                          **extra)


def run_pass1(model, batch, threshold=None):
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                 pixel_values=batch["pixel_values"], image_grid_thw=batch["image_grid_thw"],
                 mm_token_type_ids=batch["mm_token_type_ids"], latent_mode=True,
                 latent_segments=batch["latent_segments"], latent_budgets=batch["latent_budgets"],
                 latent_threshold=threshold)


def talking_tiny_model(seed: int = 5, backbone: str = "qwen2_5_vl"):
    """``(model, processor)``: a tiny model whose greedy answers depend on the input (text weights scaled up)
    and whose stop head halts some segments early in stage C (a fixed random head, bias 0)."""
    model, processor = build_tiny_model(seed=seed, backbone=backbone)
    with torch.no_grad():
        for name, w in model.model.language_model.named_parameters():
            if w.dim() == 2 and "embed" not in name:
                w.mul_(5.0)
        head = model.latent_stop_head
        head.weight.copy_(torch.randn(head.weight.shape, generator=torch.Generator().manual_seed(0)) * 0.3)
        head.bias.zero_()
    return model, processor


def patched_embeds(model, batch, p1, return_visual=False):
    """``[B, S, H]`` input embeddings of ``batch`` with pass 1's vectors placed at its latent slots (pass 2's
    input); with ``return_visual`` also the question images' DeepStack extras (None without DeepStack)."""
    embeds, visual = model.embed_inputs(batch["input_ids"], batch["pixel_values"], batch["image_grid_thw"],
                                        return_visual=True)
    embeds = embeds.index_put((p1.ce_patch_pos[:, 0], p1.ce_patch_pos[:, 1]), p1.ce_patch_vec.to(embeds.dtype))
    return (embeds, visual) if return_visual else embeds


def hidden_before_slots(model, batch, p1):
    """``[P, H]`` pass 2's last hidden state at the position before each active latent slot (what pass 1
    feeds into that slot when nothing replaces it)."""
    embeds, visual = patched_embeds(model, batch, p1, return_visual=True)
    hidden = model.model.language_model(inputs_embeds=embeds, attention_mask=batch["attention_mask"],
                                        position_ids=p1.position_ids,
                                        **model.text_visual_kwargs(visual)).last_hidden_state
    return hidden[p1.ce_patch_pos[:, 0], p1.ce_patch_pos[:, 1] - 1]


def save_and_load(model, processor, path):
    """``model`` saved to ``path`` and loaded back with :func:`latentvl.model.loading.load_latent_model`."""
    from latentvl.model.loading import load_latent_model

    model.save_pretrained(path)
    processor.save_pretrained(path)
    loaded, _ = load_latent_model(path)
    return loaded


def lora_trained_copies(model, batch, name: str) -> list:
    """Wrap ``model`` with LoRA (q/v projections, r 4), backpropagate ``latent_loss(batch)`` and return the
    trainable parameters whose name contains ``name`` (the copies LoRA trains of a module saved in full)."""
    from latentvl.training.config import TrainConfig
    from latentvl.training.setup import latent_model, prepare_for_training

    peft_model = prepare_for_training(model, TrainConfig(train_data="x.jsonl", lora=True, lora_r=4,
                                                         lora_target_modules=["q_proj", "v_proj"]))
    latent_model(peft_model).latent_loss(batch).loss.backward()
    return [p for n, p in peft_model.named_parameters() if name in n and p.requires_grad]


MIXED = [(0, 1), (1, 3), (2, 0), (3, 3), (4, 1)]  # (index, M)

