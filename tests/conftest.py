"""Shared test fixtures and the property-test profile."""

import os

import pytest
import torch
from hypothesis import settings

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
