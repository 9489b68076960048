import dataclasses
import math
import types

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from latentvl import LatentSettings, build_tiny_model, set_latent_fields
from latentvl.budget import budgets_from_grids, compute_latent_budget, num_visual_tokens
from latentvl.errors import LatentConfigError

SPEC_FIELDS = [
    "latent_token_id", "latent_budget_alpha", "latent_budget_gamma", "latent_budget_min", "latent_budget_max",
    "latent_mode_stage", "latent_stop_loss_weight", "latent_cost_weight", "latent_stop_threshold",
    "latent_null_scale",
]


def test_spec_fields_and_defaults():
    s = LatentSettings()
    assert all(name in LatentSettings.field_names() for name in SPEC_FIELDS)
    assert (s.latent_budget_alpha, s.latent_budget_gamma, s.latent_budget_min, s.latent_budget_max) == (
        0.02, 0.5, 1, 32)
    assert (s.latent_mode_stage, s.latent_stop_threshold, s.latent_null_scale) == ("A", 0.5, 0.0)
    assert s.latent_stop_target_ratio == 0.7


@pytest.mark.parametrize(
    "changes, field",
    [
        ({"latent_mode_stage": "B"}, "latent_mode_stage"),
        ({"latent_budget_alpha": 0.0}, "latent_budget_alpha"),
        ({"latent_budget_gamma": -1.0}, "latent_budget_gamma"),
        ({"latent_budget_min": 0}, "latent_budget_min"),
        ({"latent_budget_min": 5, "latent_budget_max": 4}, "latent_budget_max"),
        ({"latent_stop_threshold": 1.5}, "latent_stop_threshold"),
        ({"latent_null_scale": -0.1}, "latent_null_scale"),
        ({"latent_mode_stage": "C", "latent_stop_loss_weight": -1.0}, "latent_stop_loss_weight"),
        ({"latent_prefix_grad": "no"}, "latent_prefix_grad"),
        ({"latent_detach_step_inputs": 1}, "latent_detach_step_inputs"),
    ],
)
def test_validation_names_field_and_value(changes, field):
    with pytest.raises(LatentConfigError, match=field) as err:
        LatentSettings().replace(**changes).validate()
    assert repr(changes.get(field, getattr(LatentSettings(), field))) in str(err.value)


def test_stage_c_weights_default_to_the_design_note_and_count_only_in_stage_c():
    s = LatentSettings()
    assert (s.latent_stop_loss_weight, s.latent_cost_weight) == (1.0, 1e-3)
    assert s.validate().loss_weights() == (0.0, 0.0)  # stage A trains both at 0, whatever they hold
    c = s.replace(latent_mode_stage="C").validate()
    assert c.loss_weights() == (1.0, 1e-3)


def test_stage_c_on_a_zero_stop_weight_must_be_asked_for():
    """A stage-A config that holds 0 (as older checkpoints saved it) does not silently enter stage C
    without a stop loss; stating the weight in the same call is the explicit choice."""
    a = LatentSettings(latent_stop_loss_weight=0.0, latent_cost_weight=0.0)
    with pytest.raises(LatentConfigError, match=r"latent_stop_loss_weight=0.0 with latent_mode_stage='C'"):
        a.replace(latent_mode_stage="C")
    config = types.SimpleNamespace(**dataclasses.asdict(a))
    with pytest.raises(LatentConfigError, match="latent_stop_loss_weight"):
        set_latent_fields(config, latent_mode_stage="C")
    assert config.latent_mode_stage == "A"  # nothing was written
    chosen = set_latent_fields(config, latent_mode_stage="C", latent_stop_loss_weight=0.0)
    assert chosen.loss_weights() == (0.0, 0.0) and config.latent_mode_stage == "C"
    assert set_latent_fields(config, latent_stop_threshold=0.4).latent_stop_threshold == 0.4  # already chosen
    assert a.replace(latent_mode_stage="C", latent_stop_loss_weight=2.0).loss_weights() == (2.0, 0.0)


def test_trainer_stage_settings_keep_the_rule():
    from latentvl.training.config import TrainConfig

    cfg = TrainConfig(stage="AC", switch_step=2)
    base = LatentSettings(latent_stop_loss_weight=0.0, latent_cost_weight=0.0)  # a stage-A checkpoint
    a, c = cfg.latent_settings("A", base), cfg.latent_settings("C", base)
    assert a.loss_weights() == (0.0, 0.0) and c.loss_weights() == (1.0, 1e-3)
    off = TrainConfig(stage="C", latent={"latent_stop_loss_weight": 0.0}).latent_settings("C", base)
    assert off.loss_weights() == (0.0, 1e-3)  # asked for in the YAML: allowed


def test_stage_c_accepts_weights():
    s = LatentSettings(latent_mode_stage="C", latent_stop_loss_weight=1.0, latent_cost_weight=1e-3).validate()
    assert s.latent_cost_weight == 1e-3


def test_unknown_field_rejected():
    with pytest.raises(LatentConfigError, match="latent_nope"):
        LatentSettings().replace(latent_nope=1)


def test_fields_live_on_model_config_and_round_trip(tmp_path):
    model, _ = build_tiny_model()
    set_latent_fields(model.config, latent_mode_stage="C", latent_stop_loss_weight=0.5, latent_cost_weight=2e-3,
                      latent_null_scale=0.25, latent_budget_alpha=0.3)
    model.save_pretrained(tmp_path)
    from latentvl import LatentQwen2_5_VLForConditionalGeneration

    loaded = LatentQwen2_5_VLForConditionalGeneration.from_pretrained(tmp_path)
    assert LatentSettings.from_config(loaded.config) == LatentSettings.from_config(model.config)
    assert loaded.config.latent_null_scale == 0.25


@pytest.mark.parametrize(
    "n, alpha, gamma, lo, hi, expected",
    [
        (256, 0.02, 0.5, 1, 32, 1),  # ceil(0.02*16)=ceil(0.32)=1
        (1296, 0.02, 0.5, 1, 32, 1),  # ceil(0.72)=1
        (10000, 0.02, 0.5, 1, 32, 2),  # ceil(2.0)=2
        (10001, 0.02, 0.5, 1, 32, 3),  # just above 2.0
        (64, 0.5, 0.5, 1, 32, 4),
        (49, 0.5, 0.5, 1, 32, 4),  # ceil(3.5)
        (100, 1.0, 1.0, 1, 32, 32),  # clipped at max
        (0, 0.5, 0.5, 2, 32, 2),  # clipped at min
        (16, 0.25, 1.0, 1, 8, 4),
    ],
)
def test_budget_hand_values(n, alpha, gamma, lo, hi, expected):
    assert compute_latent_budget(n, alpha, gamma, lo, hi) == expected


@given(
    st.integers(0, 100_000), st.integers(0, 100_000), st.floats(0.001, 3.0), st.floats(0.05, 1.5),
    st.integers(1, 8), st.integers(0, 40),
)
def test_budget_monotone_and_clipped(n1, n2, alpha, gamma, lo, extra):
    hi = lo + extra
    b1, b2 = (compute_latent_budget(n, alpha, gamma, lo, hi) for n in sorted((n1, n2)))
    assert lo <= b1 <= b2 <= hi
    assert b1 == min(max(math.ceil(alpha * min(n1, n2) ** gamma), lo), hi)


def test_budget_uses_model_split_sizes():
    model, processor = build_tiny_model()
    from PIL import Image

    images = [Image.new("RGB", size) for size in [(56, 56), (112, 84), (224, 168), (140, 252)]]
    grid = processor.image_processor(images=images, return_tensors="pt")["image_grid_thw"]
    merge = model.config.vision_config.spatial_merge_size
    split_sizes = (grid.prod(-1) // model.model.visual.spatial_merge_size**2).tolist()
    assert [num_visual_tokens(g, merge) for g in grid] == split_sizes
    pix = processor.image_processor(images=images, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        feats = model.model.get_image_features(pix, grid).pooler_output
    assert [f.shape[0] for f in feats] == split_sizes
    budgets = budgets_from_grids([grid[:2], grid[2:]], merge, 0.5, 0.5, 1, 32)
    assert budgets == [[compute_latent_budget(n, 0.5, 0.5, 1, 32) for n in split_sizes[:2]],
                       [compute_latent_budget(n, 0.5, 0.5, 1, 32) for n in split_sizes[2:]]]
    assert len(set(sum(budgets, []))) > 1  # these settings give budgets that differ between images
