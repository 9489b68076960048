"""The backbone boundary: each family's latent model runs its transformers parent's computation, DeepStack
included (Qwen3-VL), wherever latentvl hands the text model ready embeddings."""

from __future__ import annotations

import pytest
import torch
from helpers import MIXED, collate_samples, make_sample
from hypothesis import given, settings
from hypothesis import strategies as st

import latentvl
from latentvl.errors import LatentInputError
from latentvl.model.backbone import BACKBONES, backbone_for_model_type, family, latent_model_class
from latentvl.model.modeling import LatentModelMixin
from latentvl.model.visual import VisualStack


def _stock_logits(model, batch, positions):
    """The parent transformers model's own forward from pixels (its own image placement, DeepStack and all)."""
    return super(LatentModelMixin, model).forward(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], position_ids=positions,
        pixel_values=batch["pixel_values"], image_grid_thw=batch["image_grid_thw"],
        mm_token_type_ids=batch["mm_token_type_ids"]).logits


@torch.no_grad()
def test_a_forward_from_ready_embeddings_is_the_stock_forward(tiny, backbone):
    """Pass 2's route (embeddings + the visual extras, no gating) gives the stock model's logits; without the
    extras a DeepStack family would differ, so the check can fail."""
    model, processor = tiny
    batch = collate_samples(model, processor, [make_sample(i, m) for i, m in MIXED[:4]], "left")
    pos = model.compute_position_ids(batch["input_ids"], batch["attention_mask"], batch["mm_token_type_ids"],
                                     batch["image_grid_thw"])
    ref = _stock_logits(model, batch, pos)
    embeds, visual = model.embed_inputs(batch["input_ids"], batch["pixel_values"], batch["image_grid_thw"],
                                        return_visual=True)
    assert (visual is not None) == model.has_deepstack
    got = model(input_ids=batch["input_ids"], inputs_embeds=embeds, latent_visual=visual,
                attention_mask=batch["attention_mask"], position_ids=pos).logits
    keep = batch["attention_mask"].bool()
    assert (got - ref)[keep].abs().max().item() <= 1e-5
    without = model.text_forward(embeds, batch["attention_mask"], pos, visual=None).logits
    assert ((without - ref)[keep].abs().max().item() > 1e-3) == model.has_deepstack


@torch.no_grad()
def test_embeddings_of_the_same_input_ids_find_their_deepstack(tiny, backbone):
    """``embeds = embed_inputs(ids, ...)`` then ``model(input_ids=ids, inputs_embeds=embeds)`` needs no extras;
    ready embeddings of other input ids with image tokens are refused on a DeepStack family, naming it."""
    model, processor = tiny
    a = collate_samples(model, processor, [make_sample(i, 1) for i in range(2)])
    b = collate_samples(model, processor, [make_sample(i, 1) for i in range(5, 7)])
    embeds_a, visual_a = model.embed_inputs(a["input_ids"], a["pixel_values"], a["image_grid_thw"], return_visual=True)
    grid = {"image_grid_thw": a["image_grid_thw"], "mm_token_type_ids": a["mm_token_type_ids"]}
    explicit = model(input_ids=a["input_ids"], inputs_embeds=embeds_a, latent_visual=visual_a,
                     attention_mask=a["attention_mask"], **grid).logits
    model.embed_inputs(a["input_ids"], a["pixel_values"], a["image_grid_thw"])
    implicit = model(input_ids=a["input_ids"].clone(), inputs_embeds=embeds_a, attention_mask=a["attention_mask"],
                     **grid).logits
    torch.testing.assert_close(implicit, explicit, rtol=0, atol=0)
    model.embed_inputs(a["input_ids"], a["pixel_values"], a["image_grid_thw"])
    call = lambda: model(input_ids=b["input_ids"], inputs_embeds=model.get_input_embeddings()(b["input_ids"]),  # noqa: E731
                         attention_mask=b["attention_mask"], image_grid_thw=b["image_grid_thw"],
                         mm_token_type_ids=b["mm_token_type_ids"])
    if model.has_deepstack:
        with pytest.raises(LatentInputError, match="DeepStack"):
            call()
    else:
        call()


def test_every_family_is_one_module_with_its_parts():
    for name, (_module, model_type, cls_name) in BACKBONES.items():
        mod = family(name)
        cls = latent_model_class(name)
        assert cls.__name__ == cls_name and cls.backbone == name == mod.NAME
        assert issubclass(cls, LatentModelMixin) and cls.__mro__[1] is LatentModelMixin
        assert backbone_for_model_type(model_type) == name
        assert getattr(latentvl, cls_name) is cls  # the front door names it
        assert mod.PATCH_SIZE in (14, 16) and len(mod.BLOCKS) == 2
    with pytest.raises(ValueError, match="not supported"):
        family("llava")
    with pytest.raises(ValueError, match="model_type 'llava'"):
        backbone_for_model_type("llava")


def test_tiny_models_of_each_family_build_as_asked():
    for name in BACKBONES:
        model, processor = latentvl.build_tiny_model(backbone=name, hidden_size=64, num_layers=2)
        assert model.backbone == name and model.config.model_type == BACKBONES[name][1]
        assert processor.image_processor.patch_size == family(name).PATCH_SIZE
        assert model.text_attention == "latent_sdpa"
    default, _ = latentvl.build_tiny_model(hidden_size=64, num_layers=2)
    assert default.backbone == "qwen2_5_vl"


# ------------------------------------------------------------------------------------------- VisualStack
@settings(max_examples=30, deadline=None)
@given(data=st.data())
def test_visual_stack_follows_rows_and_columns(data):
    """Selecting rows and columns of a batch gives the DeepStack inputs of the selected positions, in the
    selected batch's row-major order, whatever the selection."""
    B = data.draw(st.integers(1, 4))
    S = data.draw(st.integers(1, 6))
    mask = torch.tensor(data.draw(st.lists(st.lists(st.booleans(), min_size=S, max_size=S), min_size=B, max_size=B)))
    n = int(mask.sum())
    feats = [torch.arange(n * 2, dtype=torch.float32).view(n, 2) + 100 * layer for layer in range(2)]
    stack = VisualStack.from_mask(mask, feats)
    R = data.draw(st.integers(1, 4))
    W = data.draw(st.integers(1, 6))
    rows = torch.tensor(data.draw(st.lists(st.integers(0, B - 1), min_size=R, max_size=R)))
    cols = torch.tensor(data.draw(st.lists(st.lists(st.integers(0, S - 1), min_size=W, max_size=W),
                                           min_size=R, max_size=R)))
    valid = torch.tensor(data.draw(st.lists(st.lists(st.booleans(), min_size=W, max_size=W), min_size=R, max_size=R)))
    taken = stack.take(rows, cols, valid).pad_right(2)
    got_mask, got = taken.text_model_inputs()
    dense = [torch.zeros(B, S, 2) for _ in feats]
    for layer, f in enumerate(feats):
        dense[layer][mask] = f
    want_mask = torch.zeros(R, W + 2, dtype=torch.bool)
    want_mask[:, :W] = mask[rows[:, None], cols] & valid
    assert torch.equal(got_mask, want_mask)
    for layer in range(2):
        want = dense[layer][rows[:, None], cols][want_mask[:, :W]]
        assert torch.equal(got[layer], want)
    assert torch.equal(taken.columns(0, W).mask, want_mask[:, :W])


@torch.no_grad()
def test_remembered_deepstack_is_used_only_for_the_embeddings_it_came_with(tiny, backbone):
    """Embeddings without ``input_ids`` that continue the last embedded batch (tokens appended) find its
    DeepStack features; embeddings of other pixels under the same ``input_ids`` do not (a DeepStack family
    refuses them)."""
    model, processor = tiny
    a = collate_samples(model, processor, [make_sample(i, 1) for i in range(2)])
    ids, grid = a["input_ids"], {"image_grid_thw": a["image_grid_thw"], "mm_token_type_ids": a["mm_token_type_ids"]}
    pos = model.compute_position_ids(ids, a["attention_mask"], a["mm_token_type_ids"], a["image_grid_thw"])
    embeds, visual = model.embed_inputs(ids, a["pixel_values"], a["image_grid_thw"], return_visual=True)
    tail = model.get_input_embeddings()(ids[:, -3:])
    longer = torch.cat([embeds, tail], dim=1)
    longer_pos = torch.cat([pos, pos[:, :, -1:] + torch.arange(1, 4)], dim=2)
    explicit = model(inputs_embeds=longer, latent_visual=None if visual is None else visual.pad_right(3),
                     position_ids=longer_pos).logits
    model.embed_inputs(ids, a["pixel_values"], a["image_grid_thw"])
    implicit = model(inputs_embeds=longer, position_ids=longer_pos).logits
    torch.testing.assert_close(implicit, explicit, rtol=0, atol=0)
    model.embed_inputs(ids, a["pixel_values"].flip(0), a["image_grid_thw"])  # other pixels, same ids
    call = lambda: model(input_ids=ids, inputs_embeds=embeds, attention_mask=a["attention_mask"], **grid)  # noqa: E731
    if model.has_deepstack:
        with pytest.raises(LatentInputError, match="DeepStack"):
            call()
    else:
        call()


@torch.no_grad()
def test_embeddings_continue_a_filled_cache_like_tokens(tiny, backbone):
    """A call with ready embeddings on a cache that is not empty (a continued prompt) is the parent's forward
    of those embeddings: the same logits as continuing with the tokens themselves."""
    from transformers.cache_utils import DynamicCache

    from latentvl.model.compat import CACHE_KWARG

    model, processor = tiny
    a = collate_samples(model, processor, [make_sample(i, 1) for i in range(2)])
    head = {"input_ids": a["input_ids"][:, :-2], "attention_mask": a["attention_mask"][:, :-2],
            "pixel_values": a["pixel_values"], "image_grid_thw": a["image_grid_thw"],
            "mm_token_type_ids": a["mm_token_type_ids"][:, :-2]}
    nxt = a["input_ids"][:, -2:-1]
    out = []
    for as_embeds in (False, True):
        cache = DynamicCache(config=model.config.text_config)
        model(**head, use_cache=True, **{CACHE_KWARG: cache})
        step = {"inputs_embeds": model.get_input_embeddings()(nxt)} if as_embeds else {"input_ids": nxt}
        out.append(model(**step, attention_mask=a["attention_mask"][:, :-1], use_cache=True,
                         **{CACHE_KWARG: cache}).logits)
    torch.testing.assert_close(out[1], out[0], rtol=0, atol=1e-6)
