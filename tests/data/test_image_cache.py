"""Tests for ``latentvl.data.image_cache`` (both caches, their bound) and the collator's ``image_cache``."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from latentvl.config import LatentSettings
from latentvl.data.collator import LatentCollator
from latentvl.data.image_cache import DecodedImageCache, ProcessedImageCache, _BytesLRU


@pytest.fixture(scope="module")
def processor(tiny):
    return tiny[1]


@pytest.fixture(scope="module")
def latent_settings(tiny):
    return LatentSettings.from_config(tiny[0].config).replace(latent_budget_alpha=0.5, latent_budget_max=8)


def _image(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((height, width, 3)) * 255).astype("uint8"))


def _record(i: int, q: Image.Image, cots: list[Image.Image]) -> dict:
    return {"id": f"r{i}", "question": f"Q{i}?", "images": [q], "cot_images": cots, "answer": "A"}


SIZE = st.sampled_from([(56, 56), (84, 56), (56, 112), (140, 28)])


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(SIZE, st.integers(0, 3)), min_size=1, max_size=5),
       st.lists(st.tuples(SIZE, st.integers(0, 3)), min_size=1, max_size=5), st.integers(1, 3))
def test_cached_batches_equal_uncached(processor, latent_settings, qs, cots, rounds):
    """Whatever the images, repeats and sizes, a collator with the cache returns the same tensors as one
    without, call after call (the second and later calls served from the cache)."""
    q_images = [_image(w, h, s) for (w, h), s in qs]
    cot_images = [_image(w, h, 10 + s) for (w, h), s in cots]
    samples = [_record(i, q_images[i % len(q_images)], cot_images[i % len(cot_images):][:2])
               for i in range(max(len(qs), len(cots)))]
    plain = LatentCollator(processor, latent_settings)
    cache = ProcessedImageCache(2**24)
    cached = LatentCollator(processor, latent_settings, image_cache=cache)
    want = plain(samples)
    for _ in range(rounds):
        got = cached(samples)
        for key in ("pixel_values", "image_grid_thw", "cot_pixel_values", "cot_image_grid_thw", "input_ids",
                    "labels", "attention_mask"):
            assert torch.equal(got[key], want[key]), key
        assert got["latent_segments"] == want["latent_segments"]
    distinct = {ProcessedImageCache.key(im) for s in samples for im in s["images"] + s["cot_images"]}
    assert len(cache) == len(distinct) and cache.misses == len(distinct)


def test_cache_returns_copies(processor, latent_settings):
    """Writing into a batch's pixels leaves the cached rows as they were."""
    cached = LatentCollator(processor, latent_settings, image_cache=ProcessedImageCache(2**24))
    samples = [_record(0, _image(56, 56, 0), [_image(84, 56, 1)])]
    first = cached(samples)
    expect = first["pixel_values"].clone()
    first["pixel_values"].fill_(7.0)
    assert torch.equal(cached(samples)["pixel_values"], expect)


def test_cache_is_bounded_least_recently_used_first(processor):
    rows = lambda n: (torch.zeros(n, 4), torch.tensor([1, 2, 2]))  # noqa: E731  n rows of 16 bytes
    cache = ProcessedImageCache(100)
    a, b, c = _image(28, 28, 1), _image(28, 28, 2), _image(28, 28, 3)
    cache.process([a], lambda im: rows(2))  # 32 bytes
    cache.process([b], lambda im: rows(2))  # 64
    cache.process([a], lambda im: pytest.fail("a is cached"))  # a is now the most recent
    cache.process([c], lambda im: rows(3))  # 112 > 100: b, the least recently used, goes
    assert cache.bytes == 80 and len(cache) == 2
    cache.process([a, c], lambda im: pytest.fail("a and c are cached"))
    seen = []
    cache.process([b], lambda im: seen.append(im) or rows(2))
    assert seen == [b]
    cache.process([_image(28, 28, 4)], lambda im: rows(10))  # 160 bytes: larger than the cache, not kept
    assert cache.bytes <= 100
    with pytest.raises(ValueError, match="max_bytes"):
        ProcessedImageCache(0)


def test_key_tells_pixels_sizes_and_modes_apart():
    a = _image(56, 28, 0)
    assert ProcessedImageCache.key(a) == ProcessedImageCache.key(a.copy())
    assert ProcessedImageCache.key(a) != ProcessedImageCache.key(_image(56, 28, 1))
    assert ProcessedImageCache.key(a) != ProcessedImageCache.key(a.resize((28, 56)))
    grey = Image.new("L", (2, 6)), Image.new("L", (6, 2))
    assert ProcessedImageCache.key(grey[0]) != ProcessedImageCache.key(grey[1])  # same bytes, other size
    assert ProcessedImageCache.key(Image.new("RGB", (2, 2))) != ProcessedImageCache.key(Image.new("L", (2, 6)))


@given(st.lists(st.tuples(st.integers(0, 5), st.integers(1, 40)), max_size=60), st.integers(1, 100))
def test_bytes_lru_keeps_its_count_and_bound(keeps, bound):
    """Whatever is kept (the same key again included): ``bytes`` is the sum of the entries' sizes, within the
    bound; each entry holds its key's latest value, in the order the keys were last kept; the latest keep is
    the newest entry when it fits the bound and absent when it does not."""
    lru = _BytesLRU(bound)
    last: dict[int, int] = {}
    for step, (key, size) in enumerate(keeps):
        lru._keep(key, f"{key}:{size}:{step}", size)
        last[key] = step
        sizes = [entry[1] for entry in lru._entries.values()]
        assert lru.bytes == sum(sizes) <= bound
        assert (list(lru._entries)[-1:] == [key]) if size <= bound else key not in lru._entries
        assert [last[k] for k in lru._entries] == sorted(last[k] for k in lru._entries)
        for k, (value, _) in lru._entries.items():
            assert value.endswith(f":{last[k]}")


def test_decoded_cache_decodes_each_file_once_and_hands_out_copies(tmp_path):
    from latentvl.images import open_rgb

    path = tmp_path / "a.png"
    _image(56, 28, 0).save(path)
    calls = []

    def decode(p):
        calls.append(p)
        return open_rgb(p)

    cache = DecodedImageCache(2**20)
    first = cache.open(path, decode)
    first.paste((0, 0, 0), (0, 0, 56, 28))  # a caller drawing on its copy ...
    second = cache.open(path, decode)
    assert len(calls) == 1 and cache.hits == 1
    assert second.tobytes() == open_rgb(path).tobytes()  # ... leaves the cached pixels alone
    _image(56, 28, 1).save(path)  # the file changes: decoded again
    os.utime(path, ns=(1, 1))
    assert cache.open(path, decode).tobytes() == open_rgb(path).tobytes() and len(calls) == 2


def test_decoded_cache_is_bounded(tmp_path):
    from latentvl.images import open_rgb

    paths = []
    for i in range(3):
        paths.append(tmp_path / f"{i}.png")
        _image(10, 10, i).save(paths[-1])  # 300 bytes decoded
    cache = DecodedImageCache(700)
    for p in paths:
        cache.open(p, open_rgb)
    assert len(cache) == 2 and cache.bytes == 600  # the first file went
    cache.open(paths[0], open_rgb)
    assert cache.misses == 4


def test_record_dataset_with_a_decoded_cache_gives_the_same_items(tmp_path):
    from latentvl.data.records import RecordDataset, load_records
    from latentvl.data.tasks.writer import make_dataset

    make_dataset("a5", 40, 0, tmp_path / "d", min_hops=2, max_hops=4)
    records, _ = load_records(tmp_path / "d" / "train.jsonl")
    plain, cached = RecordDataset(records), RecordDataset(records, DecodedImageCache(2**22))
    for _ in range(2):
        for i in range(len(records)):
            a, b = plain[i], cached[i]
            assert [im.tobytes() for im in a["images"] + a["cot_images"]] == \
                [im.tobytes() for im in b["images"] + b["cot_images"]]
    assert cached.decoded_cache.hits == cached.decoded_cache.misses > 0


def test_text_memo_keeps_refusing_reserved_tokens(processor, latent_settings):
    from latentvl.errors import CollatorInputError

    collator = LatentCollator(processor, latent_settings)
    bad = _record(0, _image(56, 56, 0), [_image(56, 56, 1)]) | {"question": "look <|image_pad|> here"}
    for _ in range(2):
        with pytest.raises(CollatorInputError, match="reserved tokens"):
            collator([bad])
