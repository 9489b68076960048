"""Hand-computed cases for the stage losses (design §6, D4, D7)."""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from latentvl.model.losses import (
    alignment_loss,
    expected_length,
    pool_visual_tokens,
    stop_labels_for_length,
    stop_loss,
    stop_target_length,
)


@pytest.mark.parametrize(
    "budget, ratio, t, labels",
    [
        (1, 0.7, 1, [1]),
        (2, 0.7, 1, [1, 1]),  # round(1.4) = 1
        (4, 0.7, 3, [0, 0, 1, 1]),  # round(2.8) = 3
        (5, 0.7, 4, [0, 0, 0, 1, 1]),  # 3.5 rounds half up to 4
        (8, 0.7, 6, [0, 0, 0, 0, 0, 1, 1, 1]),  # round(5.6) = 6
        (8, 0.5, 4, [0, 0, 0, 1, 1, 1, 1, 1]),
        (3, 0.1, 1, [1, 1, 1]),  # max(1, round(0.3)) = 1
        (10, 1.0, 10, [0] * 9 + [1]),
    ],
)
def test_stop_labels(budget, ratio, t, labels):
    assert stop_target_length(budget, ratio) == t
    assert stop_labels_for_length(budget, t) == labels


def test_pool_divisible():
    feats = torch.arange(12, dtype=torch.float32).reshape(6, 2)  # rows [0,1],[2,3],...
    pooled = pool_visual_tokens(feats, 3)
    assert torch.equal(pooled, torch.tensor([[1.0, 2.0], [5.0, 6.0], [9.0, 10.0]]))


def test_pool_not_divisible():
    feats = torch.tensor([[0.0], [1.0], [2.0], [3.0], [4.0]])
    # 5 tokens into 2 groups: [floor(0), ceil(2.5)) = 0..2 and [floor(2.5), ceil(5)) = 2..4
    assert torch.allclose(pool_visual_tokens(feats, 2), torch.tensor([[1.0], [3.0]]))
    # 5 into 3: [0,2) [1,4) [3,5)
    assert torch.allclose(pool_visual_tokens(feats, 3), torch.tensor([[0.5], [2.0], [3.5]]))


def test_pool_more_groups_than_tokens():
    feats = torch.tensor([[0.0], [10.0]])
    assert torch.allclose(pool_visual_tokens(feats, 4), torch.tensor([[0.0], [0.0], [10.0], [10.0]]))


@given(st.integers(1, 40), st.integers(1, 12), st.integers(1, 5))
def test_pool_shape_and_mean(n, groups, h):
    feats = torch.randn(n, h)
    pooled = pool_visual_tokens(feats, groups)
    assert pooled.shape == (groups, h)
    if n % groups == 0:
        assert torch.allclose(pooled.mean(0), feats.mean(0), atol=1e-5)


def test_alignment_is_cosine_over_feature_axis():
    lat = torch.tensor([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0]])
    tgt = torch.tensor([[3.0, 0.0, 0.0], [0.0, 0.0, 5.0]])
    # row 0 parallel (cos 1), row 1 orthogonal (cos 0): mean(1 - cos) = 0.5
    assert alignment_loss(lat, tgt).item() == pytest.approx(0.5)
    # a cosine over the wrong axis (dim=0) would give a different value here
    wrong = (1 - torch.nn.functional.cosine_similarity(lat, tgt, dim=0)).mean().item()
    assert wrong != pytest.approx(0.5)


def test_alignment_shape_mismatch_raises():
    with pytest.raises(ValueError, match="must both be"):
        alignment_loss(torch.zeros(3, 4), torch.zeros(4, 3))


def test_alignment_targets_get_no_gradient():
    lat = torch.randn(4, 6, requires_grad=True)
    tgt = torch.randn(4, 6, requires_grad=True)
    alignment_loss(lat, tgt).backward()
    assert lat.grad is not None and tgt.grad is None


def test_stop_loss_averages_labelled_steps_only():
    logits = torch.tensor([0.0, 2.0, -1.0, 5.0])
    labels = torch.tensor([0.0, 1.0, 0.0, 1.0])
    weights = torch.tensor([1.0, 1.0, 0.0, 0.0])
    expected = (math.log(2.0) + math.log(1 + math.exp(-2.0))) / 2
    assert stop_loss(logits, labels, weights).item() == pytest.approx(expected, rel=1e-6)


def test_expected_length():
    assert expected_length(torch.tensor([0.9])).item() == pytest.approx(1.0)
    # p = [0.5, 0.5, 0.5]: 1 + 0.5 + 0.25
    assert expected_length(torch.tensor([0.5, 0.5, 0.5])).item() == pytest.approx(1.75)
    assert expected_length(torch.zeros(4)).item() == pytest.approx(4.0)
    p = torch.tensor([0.2, 0.3, 0.4], requires_grad=True)
    expected_length(p).backward()
    # raising an earlier stop probability shortens the expected length; the last step's cannot
    assert (p.grad[:2] < 0).all() and p.grad[2] == 0
