"""The text model gates latent slots however the model is built or loaded (design §5, D3).

Every entry point is checked by what gating means: noise added to the embeddings of masked latent
slots moves no logit at any kept position (stock sdpa would take ``latent_kv_mask`` and ignore it).
"""

from __future__ import annotations

import pytest
import torch

from latentvl import LatentInputError, LatentQwen2_5_VLForConditionalGeneration, build_tiny_model
from latentvl.model.attention import latent_flash_attention_2
from latentvl.model.tiny import build_tiny_tokenizer, tiny_config

Model = LatentQwen2_5_VLForConditionalGeneration


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A latentvl checkpoint written by save_pretrained (config.json keeps no attention choice)."""
    model, _ = build_tiny_model(seed=0, num_layers=2)
    path = tmp_path_factory.mktemp("ckpt")
    model.save_pretrained(path)
    return path, model.config


def _fresh_config():
    config = tiny_config(build_tiny_tokenizer(), num_layers=2)
    assert config.text_config._attn_implementation is None  # transformers' default: sdpa
    return config


def _latent_batch(model):
    """Two text rows with a run of latent slots, the back half of it masked (inactive)."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(10, 60, (2, 22), generator=g)
    ids[:, 8:16] = model.config.latent_token_id
    kv_mask = torch.ones_like(ids, dtype=torch.bool)
    kv_mask[0, 12:16] = False
    kv_mask[1, 10:16] = False
    return ids, kv_mask


@torch.no_grad()
def _gating_drift(model) -> tuple[float, float]:
    """(largest logit change at kept positions, at masked ones) when masked slots get noise."""
    model.eval()
    ids, kv_mask = _latent_batch(model)
    embeds = model.get_input_embeddings()(ids)
    noise = torch.randn(embeds.shape[-1], generator=torch.Generator().manual_seed(1)) * 3
    noisy = torch.where(kv_mask[..., None], embeds, embeds + noise)
    logits = [model(input_ids=ids, inputs_embeds=e, attention_mask=torch.ones_like(ids), latent_kv_mask=kv_mask).logits
              for e in (embeds, noisy)]
    diff = (logits[0] - logits[1]).abs()
    return diff[kv_mask].max().item(), diff[~kv_mask].max().item()


def _assert_gates(model, text: str, vision: str = "sdpa"):
    assert model.text_attention == text
    assert model.config.vision_config._attn_implementation == vision
    kept, masked = _gating_drift(model)
    assert kept <= 1e-6, f"{text}: kept logits moved by {kept}"
    assert masked > 1e-4  # the noise did reach the masked slots


def test_direct_construction_gates():
    _assert_gates(Model(_fresh_config()), "latent_sdpa")


@pytest.mark.parametrize("request_, text, vision", [
    (None, "latent_sdpa", "sdpa"), ("sdpa", "latent_sdpa", "sdpa"), ("eager", "latent_eager", "eager"),
    ("latent_eager", "latent_eager", "eager"),
])
def test_from_config_gates(request_, text, vision):
    kwargs = {} if request_ is None else {"attn_implementation": request_}
    _assert_gates(Model._from_config(_fresh_config(), **kwargs), text, vision)


@pytest.mark.parametrize("request_, text, vision", [
    (None, "latent_sdpa", "sdpa"), ("sdpa", "latent_sdpa", "sdpa"), ("eager", "latent_eager", "eager"),
    ({"text_config": "eager", "vision_config": "sdpa"}, "latent_eager", "sdpa"),
])
def test_from_pretrained_gates(saved, request_, text, vision):
    path, _ = saved
    kwargs = {} if request_ is None else {"attn_implementation": request_}
    _assert_gates(Model.from_pretrained(path, **kwargs), text, vision)


def test_set_attn_implementation_later_gates(saved):
    path, _ = saved
    model = Model.from_pretrained(path)
    model.set_attn_implementation("eager")
    _assert_gates(model, "latent_eager", "eager")
    model.set_attn_implementation({"text_config": "sdpa"})
    _assert_gates(model, "latent_sdpa", "eager")
    model.set_attn_implementation("sdpa")
    _assert_gates(model, "latent_sdpa", "sdpa")


def test_flash_attention_2_request_maps_to_its_gated_version(saved, monkeypatch):
    """flash_attn needs a GPU: a registered stand-in takes the flash kernel's place."""
    import transformers.integrations.flash_attention as fa
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

    from latentvl.model.attention import gated_attention

    calls = []

    def stand_in(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
        calls.append(query.shape[-2])
        groups = query.shape[1] // key.shape[1]
        out = torch.nn.functional.scaled_dot_product_attention(
            query, key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1), is_causal=True,
            scale=scaling)
        return out.transpose(1, 2).contiguous(), None

    monkeypatch.setattr(fa, "flash_attention_forward", stand_in)
    AttentionInterface.register("latent_flash_attention_2", latent_flash_attention_2)
    AttentionMaskInterface.register("latent_flash_attention_2", flash_attention_mask)
    assert gated_attention("flash_attention_2") == "latent_flash_attention_2"
    path, _ = saved
    model = Model.from_pretrained(path)
    model.set_attn_implementation({"text_config": "flash_attention_2"})
    _assert_gates(model, "latent_flash_attention_2")


@pytest.mark.parametrize("request_", ["flex_attention", "paged|sdpa"])
def test_an_attention_that_cannot_gate_is_refused(saved, request_):
    path, _ = saved
    model = Model.from_pretrained(path)
    with pytest.raises(ValueError, match="cannot gate latent slots"):
        model.set_attn_implementation(request_)
    config = _fresh_config()
    config.text_config._attn_implementation = request_
    with pytest.raises(ValueError, match="cannot gate latent slots"):
        Model(config)


def test_gating_inputs_under_a_stock_attention_are_an_error(saved):
    """Only by reaching past the class (the text model's own setter) can a stock attention come back;
    then every call that carries gating inputs stops with what to do."""
    path, config = saved
    model = Model.from_pretrained(path)
    model.model.language_model.set_attn_implementation("sdpa")
    assert model.text_attention == "sdpa"
    ids, kv_mask = _latent_batch(model)
    with pytest.raises(LatentInputError, match=r"runs 'sdpa'.*set_attn_implementation\('sdpa'\)"):
        model(input_ids=ids, latent_kv_mask=kv_mask)
    segments = [[(8, 16, 0)], [(8, 16, 0)]]
    with pytest.raises(LatentInputError, match="latent_mode=True"):
        model(input_ids=ids, latent_mode=True, latent_segments=segments, latent_budgets=[[8], [8]])
    model(input_ids=ids)  # a plain forward needs no gating
    model.set_attn_implementation("sdpa")
    assert model.text_attention == "latent_sdpa"
    model(input_ids=ids, latent_kv_mask=kv_mask)

