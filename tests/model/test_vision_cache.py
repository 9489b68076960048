"""The frozen vision tower's feature cache: the same features as the tower, each distinct image encoded once
and alone, bounded, and refused for a tower that trains."""

import copy

import pytest
import torch
from helpers import collate_samples, make_sample

from latentvl.model.vision_cache import VisionFeatureCache


@pytest.fixture()
def frozen(tiny):
    model = copy.deepcopy(tiny[0])
    model.model.visual.requires_grad_(False)
    return model, tiny[1]


def _batch(model, processor, ids):
    return collate_samples(model, processor, [make_sample(i, 2) for i in ids])


def test_features_equal_the_tower_each_image_alone(frozen):
    model, processor = frozen
    batch = _batch(model, processor, [0, 1, 2])
    pix, grid = batch["pixel_values"], batch["image_grid_thw"]
    want, want_stack = model.image_features(pix, grid)
    cache = VisionFeatureCache(model.model.visual, 2**24)
    model.vision_cache = cache
    got, got_stack = model.visual_features(pix, grid)
    assert (cache.misses, cache.hits, len(cache)) == (3, 0, 3)
    assert len(got) == len(want) == 3
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
    assert (got_stack is None) == (want_stack is None) == (not model.has_deepstack)
    for g, w in zip(got_stack or [], want_stack or [], strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
    # each image encoded alone: exactly what the tower gives for that image by itself
    start = 0
    for i, g in enumerate(grid.tolist()):
        n = g[0] * g[1] * g[2]
        alone, _ = model.image_features(pix[start:start + n], grid[i:i + 1])
        assert torch.equal(got[i], alone[0])
        start += n
    # the same images again, in another batch and order: all hits, the same tensors
    again, again_stack = model.visual_features(*_reordered(pix, grid, [2, 0, 1]))
    assert (cache.misses, cache.hits) == (3, 3)
    assert all(torch.equal(a, got[j]) for a, j in zip(again, [2, 0, 1], strict=True))
    if got_stack is not None:
        n = [len(t) for t in got]
        for layer_again, layer in zip(again_stack, got_stack, strict=True):
            parts = list(torch.split(layer, n))
            assert torch.equal(layer_again, torch.cat([parts[2], parts[0], parts[1]]))


def _reordered(pix, grid, order):
    sizes = [g[0] * g[1] * g[2] for g in grid.tolist()]
    rows = list(torch.split(pix, sizes))
    return torch.cat([rows[j] for j in order]), grid[order]


def test_embeddings_and_loss_through_the_cache(frozen):
    """The latent loss with the cache (question and CoT images) equals the loss without it."""
    model, processor = frozen
    batch = _batch(model, processor, [3, 4])
    torch.manual_seed(0)
    want = model.latent_loss(batch).loss
    model.vision_cache = VisionFeatureCache(model.model.visual, 2**24)
    torch.manual_seed(0)
    got = model.latent_loss(batch).loss
    assert model.vision_cache.misses == 2 + 4  # two question images, four CoT images
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_bounded_least_recently_used_out(frozen):
    model, processor = frozen
    batch = _batch(model, processor, [0, 1, 2])
    pix, grid = batch["pixel_values"], batch["image_grid_thw"]
    probe = VisionFeatureCache(model.model.visual, 2**24)
    probe.features(model.image_features, pix, grid)
    one = probe.bytes // 3  # the three question images have the same size
    cache = VisionFeatureCache(model.model.visual, 2 * one)
    cache.features(model.image_features, pix, grid)
    assert len(cache) == 2 and cache.bytes <= 2 * one
    cache.features(model.image_features, *_reordered(pix, grid, [1]))  # image 1 is kept ...
    assert cache.hits == 1
    cache.features(model.image_features, *_reordered(pix, grid, [0]))  # ... image 0 was dropped first
    assert (cache.hits, cache.misses) == (1, 4)


def test_a_tower_that_trains_is_refused(tiny):
    model, processor = tiny
    batch = _batch(model, processor, [0])
    cache = VisionFeatureCache(model.model.visual, 2**20)
    with pytest.raises(RuntimeError, match="frozen vision tower.*vision_cache_mb: 0"):
        cache.features(model.image_features, batch["pixel_values"], batch["image_grid_thw"])
    with pytest.raises(ValueError, match="rows"):
        frozen = copy.deepcopy(model.model.visual).requires_grad_(False)
        VisionFeatureCache(frozen, 2**20).features(model.image_features, batch["pixel_values"][:-4],
                                                   batch["image_grid_thw"])


def test_keys_by_content_in_any_dtype():
    """bf16 pixel rows hash too; equal pixels share one entry, and a changed pixel is another image."""
    tower = torch.nn.Linear(4, 4).requires_grad_(False)
    calls = []

    def encode(rows, grid):
        calls.append(rows.clone())
        return [rows.float().sum(dim=1, keepdim=True)], None

    cache = VisionFeatureCache(tower, 2**20)
    grid = torch.tensor([[1, 2, 2], [1, 2, 2]])
    pix = torch.arange(32, dtype=torch.float32).reshape(8, 4).bfloat16()
    same = torch.cat([pix[:4], pix[:4]])
    feats, _ = cache.features(encode, same, grid)
    assert len(calls) == 1 and torch.equal(feats[0], feats[1])
    changed = same.clone()
    changed[5, 0] += 1
    cache.features(encode, changed, grid)
    assert len(calls) == 2 and (cache.hits, cache.misses) == (2, 2)
