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


# The backbone families. The model-level tests (tests/model, tests/inference) run on every family; other
# folders on the default one. A test module may choose with a module-level TINY_BACKBONES tuple.
ALL_BACKBONES = ("qwen2_5_vl", "qwen3_vl")
MODEL_LEVEL = ("model", "inference")


def pytest_generate_tests(metafunc):
    if "backbone" in metafunc.fixturenames:
        path = str(metafunc.definition.path)
        model_level = any(f"/tests/{d}/" in path for d in MODEL_LEVEL)
        default = ALL_BACKBONES if model_level else ALL_BACKBONES[:1]
        metafunc.parametrize("backbone", getattr(metafunc.module, "TINY_BACKBONES", default), indirect=True,
                             scope="module")


@pytest.fixture(scope="module")
def backbone(request):
    """The backbone family of this module's tiny model (parametrised: see pytest_generate_tests)."""
    return request.param


# The tiny model every model test uses, built in one place. A test module chooses its latent fields with a
# module-level TINY_LATENT dict (set_latent_fields keywords) and its size with TINY_SIZE (build_tiny_model
# keywords); TINY_SEED (default 0) only where a test needs a particular random model (test_inference: greedy
# answers of which some stop at the end of turn and some run to the token limit).
TINY_SEED = 0


def _build_tiny(module, backbone):
    seed = getattr(module, "TINY_SEED", TINY_SEED)
    seed = seed[backbone] if isinstance(seed, dict) else seed  # a seed per backbone where a test needs one
    model, processor = build_tiny_model(seed=seed, backbone=backbone, **getattr(module, "TINY_SIZE", {}))
    latent = getattr(module, "TINY_LATENT", None)
    if latent:
        set_latent_fields(model.config, **latent)
    return model, processor


@pytest.fixture(scope="module")
def tiny(request, backbone):
    """``(model, processor)``: the tiny model of ``backbone``, built once per test module and backbone (tests may
    change its latent fields and restore them)."""
    return _build_tiny(request.module, backbone)


@pytest.fixture()
def fresh_tiny(request, backbone):
    """``(model, processor)``: the same tiny model, built anew for each test (for tests that train it)."""
    return _build_tiny(request.module, backbone)
