"""Shared test fixtures and the property-test profile."""

import os

import pytest
import torch
from hypothesis import settings

from latentvl import build_tiny_model, set_latent_fields

# Property tests draw the same examples on every run (a red CI is a real failure, never a new random
# draw); HYPOTHESIS_PROFILE=explore searches fresh examples on every run instead.
settings.register_profile("latentvl", derandomize=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "latentvl"))


@pytest.fixture(scope="module")
def one_thread():
    """Many tiny ops: one intra-op thread avoids stalls when the other core is busy."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# The tiny model every model test uses, built in one place. A test module chooses its latent fields with a
# module-level TINY_LATENT dict (set_latent_fields keywords) and its size with TINY_SIZE (build_tiny_model
# keywords); TINY_SEED (default 0) only where a test needs a particular random model (test_inference: greedy
# answers of which some stop at the end of turn and some run to the token limit).
TINY_SEED = 0


def _build_tiny(module):
    seed = getattr(module, "TINY_SEED", TINY_SEED)
    model, processor = build_tiny_model(seed=seed, **getattr(module, "TINY_SIZE", {}))
    latent = getattr(module, "TINY_LATENT", None)
    if latent:
        set_latent_fields(model.config, **latent)
    return model, processor


@pytest.fixture(scope="module")
def tiny(request):
    """``(model, processor)``: the tiny model, built once per test module (tests may change its latent fields
    and restore them)."""
    return _build_tiny(request.module)


@pytest.fixture()
def fresh_tiny(request):
    """``(model, processor)``: the same tiny model, built anew for each test (for tests that train it)."""
    return _build_tiny(request.module)
