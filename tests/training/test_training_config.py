"""TrainConfig: YAML + overrides, validation naming the field, schedules, the train CLI's config path."""

import argparse

import pytest

from latentvl.commands import train as train_cli
from latentvl.errors import TrainConfigError
from latentvl.training.config import TOKEN_FIELDS, TrainConfig, load_config
from latentvl.training.schedules import lr_factor, teacher_forcing_at, threshold_at
from latentvl.training.trainer import current_threshold


@pytest.fixture
def yaml_file(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(
        "train_data: data/train.jsonl\n"
        "stage: AC\n"
        "switch_step: 30\n"
        "max_steps: 100\n"
        "lr: 1e-3\n"  # YAML 1.1 reads this as a string: it must still become a float
        "lora: true\n"
        "lora_target_modules: [q_proj, v_proj]\n"
        "latent:\n"
        "  latent_budget_alpha: 0.5\n"
        "  latent_budget_max: 8\n"
        "  latent_null_scale: 0\n"
    )
    return path


def test_yaml_then_overrides(yaml_file):
    cfg = load_config(
        yaml_file,
        [
            "lr=5e-4",
            "latent.latent_budget_gamma=0.75",
            "latent_stop_threshold=0.4",
            "eval_data=null",
            "batch_size=4",
        ],
        {"seed": 7},
    )
    assert cfg.stage == "AC" and cfg.switch_step == 30 and cfg.max_steps == 100
    assert cfg.lr == pytest.approx(5e-4) and isinstance(cfg.lr, float)
    assert cfg.lora is True and cfg.lora_target_modules == ["q_proj", "v_proj"]
    assert cfg.batch_size == 4 and cfg.seed == 7 and cfg.eval_data is None
    assert cfg.latent == {
        "latent_budget_alpha": 0.5,
        "latent_budget_max": 8,
        "latent_null_scale": 0.0,
        "latent_budget_gamma": 0.75,
        "latent_stop_threshold": 0.4,
    }
    assert isinstance(cfg.latent["latent_null_scale"], float)
    # D12: both stages carry the configured (default) weights; the loss applies them in stage C only
    a, c = cfg.latent_settings("A"), cfg.latent_settings("C")
    assert (a.latent_mode_stage, a.latent_stop_loss_weight, a.latent_cost_weight) == ("A", 1.0, 1e-3)
    assert a.loss_weights() == (0.0, 0.0) and c.loss_weights() == (1.0, 1e-3)
    assert (c.latent_mode_stage, c.latent_stop_loss_weight, c.latent_cost_weight) == ("C", 1.0, 1e-3)
    assert c.latent_budget_alpha == 0.5 and c.latent_stop_threshold == 0.4
    assert cfg.final_threshold == 0.4
    # the YAML dump reads back to the same config
    again = TrainConfig.from_dict(__import__("yaml").safe_load(cfg.to_yaml()))
    assert again == cfg


def test_every_latent_field_can_be_set():
    from latentvl.config import LatentSettings

    settable = [n for n in LatentSettings.field_names() if n not in ("latent_mode_stage", *TOKEN_FIELDS)]
    values = {
        "latent_budget_alpha": 0.3,
        "latent_budget_gamma": 0.6,
        "latent_budget_min": 2,
        "latent_budget_max": 9,
        "latent_stop_loss_weight": 0.5,
        "latent_cost_weight": 0.01,
        "latent_stop_threshold": 0.3,
        "latent_null_scale": 0.1,
        "latent_align_weight": 0.2,
        "latent_stop_target_ratio": 0.6,
        "latent_stop_target_mode": "answer",
        "latent_stop_target_tolerance": 0.05,
        "latent_stop_target_points": 4,
        "latent_cost_mode": "expected",
        "latent_detach_step_inputs": True,
        "latent_prefix_grad": False,
        "latent_compile": "aot_eager",
        "latent_feedback": False,
        "latent_feedback_norm": True,
        "latent_teacher_forcing": 0.0,  # > 0 needs latent_feedback (set below)
        "latent_tail_dropout": 0.25,
        "latent_tail_dropout_mode": "repeat",
        "latent_full_budget_ce_weight": 0.5,
        "latent_full_budget_align_weight": 0.4,
        "latent_min_used": 3,
    }
    assert set(values) == set(settable)
    cfg = load_config(None, ["train_data=x.jsonl", *[f"latent.{k}={v}" for k, v in values.items()]])
    settings = cfg.latent_settings("C")
    for k, v in values.items():
        assert getattr(settings, k) == v, k
    # the stage field may be repeated when it agrees; token ids may be given (checked against the tokenizer)
    forced = load_config(None, ["train_data=x.jsonl", "latent.latent_teacher_forcing=0.4"])
    assert forced.latent_settings("A").latent_teacher_forcing == 0.4
    same = load_config(
        None, ["train_data=x.jsonl", "stage=C", "latent.latent_mode_stage=C", "latent_token_id=7"]
    )
    assert same.latent_settings("C").latent_token_id == 7


def test_token_ids_must_match_the_tokenizer():
    from latentvl import build_tiny_model
    from latentvl.training.setup import set_stage

    model, _ = build_tiny_model(0, hidden_size=64, num_layers=2)
    good = load_config(None, ["train_data=x.jsonl", f"latent_token_id={model.config.latent_token_id}"])
    assert set_stage(model, good, "A").latent_token_id == model.config.latent_token_id
    bad = load_config(None, ["train_data=x.jsonl", f"latent_token_id={model.config.latent_token_id + 1}"])
    with pytest.raises(TrainConfigError, match=r"^latent.latent_token_id="):
        set_stage(model, bad, "A")


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ("lr=-1", "lr="),
        ("lr=abc", "lr="),
        ("stage=B", "stage="),
        ("batch_size=0", "batch_size="),
        ("grad_accum=1.5", "grad_accum="),
        ("lora=maybe", "lora="),
        ("grad_clip=-2", "grad_clip="),
        ("threshold_start=1.5", "threshold_start="),
        ("lr_scheduler=step", "lr_scheduler="),
        ("optimizer=lion", "optimizer="),
        ("mixed_precision=fp8", "mixed_precision="),
        ("no_such_option=1", "no_such_option: unknown option"),
        ("latent.latent_budget_alpha=0", "latent.latent_budget_alpha="),
        ("latent.latent_stop_threshold=2", "latent.latent_stop_threshold="),
        ("latent_budget_max=0", "latent.latent_budget_max="),
        ("latent.latent_mode_stage=C", "latent.latent_mode_stage="),  # stage is A here
        ("latent.latent_nonsense=1", "latent.latent_nonsense: unknown latent field"),
        ("latent.latent_budget_min=1.5", "latent.latent_budget_min="),
        ("stop_head_lr_scale=0", "stop_head_lr_scale="),
        ("stop_head_first_steps=-1", "stop_head_first_steps="),
    ],
)
def test_validation_errors_name_the_field(override, field):
    with pytest.raises(TrainConfigError) as err:
        load_config(None, ["train_data=x.jsonl", override])
    assert str(err.value).startswith(field), str(err.value)


def test_cross_field_validation():
    with pytest.raises(TrainConfigError, match=r"^switch_step=None"):
        load_config(None, ["train_data=x.jsonl", "stage=AC"])
    with pytest.raises(TrainConfigError, match=r"^switch_step=100"):
        load_config(None, ["train_data=x.jsonl", "stage=AC", "switch_step=100", "max_steps=100"])
    with pytest.raises(TrainConfigError, match=r"^train_data=None"):
        load_config(None, [])
    with pytest.raises(TrainConfigError, match=r"^use_latents="):
        load_config(None, ["train_data=x.jsonl", "stage=C", "use_latents=false"])
    with pytest.raises(TrainConfigError, match="key=value"):
        load_config(None, ["train_data"])


def test_bad_yaml_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("- a list\n- not a mapping\n")
    with pytest.raises(TrainConfigError, match="mapping"):
        load_config(path)
    path.write_text("lr: [1\n")
    with pytest.raises(TrainConfigError, match="not valid YAML"):
        load_config(path)


def test_teacher_forcing_schedule():
    assert [teacher_forcing_at(k, 0.8, 4) for k in range(6)] == pytest.approx([0.8, 0.6, 0.4, 0.2, 0.0, 0.0])
    assert teacher_forcing_at(7, 0.5, 0) == 0.5  # no decay
    with pytest.raises(ValueError, match="step"):
        teacher_forcing_at(-1, 0.5, 4)


def test_threshold_annealing_values():
    assert [threshold_at(k, 0.9, 0.5, 4) for k in range(6)] == pytest.approx([0.9, 0.8, 0.7, 0.6, 0.5, 0.5])
    assert threshold_at(0, 0.9, 0.5, 0) == 0.5  # no annealing
    assert threshold_at(2, 0.9, 0.5, 4, "cosine") == pytest.approx(0.7)
    assert threshold_at(1, 0.9, 0.5, 4, "cosine") == pytest.approx(0.9 - 0.4 * (1 - 2**-0.5) / 2)
    with pytest.raises(ValueError):
        threshold_at(-1, 0.9, 0.5, 4)
    # inside a run: None in stage A, the annealed value from the switch on
    cfg = load_config(
        None,
        [
            "train_data=x.jsonl",
            "stage=AC",
            "switch_step=3",
            "max_steps=10",
            "threshold_start=0.9",
            "threshold_anneal_steps=2",
            "latent_stop_threshold=0.3",
        ],
    )
    assert [current_threshold(cfg, s) for s in range(7)] == pytest.approx(
        [None, None, None, 0.9, 0.6, 0.3, 0.3]
    )
    cfg_c = load_config(None, ["train_data=x.jsonl", "stage=C", "threshold_anneal_steps=0"])
    assert current_threshold(cfg_c, 0) == 0.5


def test_lr_schedule_values():
    assert [lr_factor(s, 4, 10, "constant") for s in range(6)] == pytest.approx([0.25, 0.5, 0.75, 1, 1, 1])
    assert lr_factor(4, 4, 10, "linear") == 1.0 and lr_factor(10, 4, 10, "linear") == 0.0
    assert lr_factor(7, 4, 10, "linear", 0.1) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_factor(7, 4, 10, "cosine") == pytest.approx(0.5)
    assert lr_factor(10, 0, 10, "cosine", 0.2) == pytest.approx(0.2)


def _parse(argv):
    parser = argparse.ArgumentParser()
    train_cli.add_arguments(parser)
    return parser.parse_args(argv)


def test_cli_flags_and_overrides(yaml_file, capsys):
    args = _parse(
        [
            "--config",
            str(yaml_file),
            "--stage",
            "C",
            "--lr",
            "0.01",
            "--init-from",
            "ckpt/yes",
            "max_steps=7",
            "--set",
            "latent_budget_alpha=2",
            "--print-config",
        ]
    )
    assert train_cli.run(args) == 0
    printed = __import__("yaml").safe_load(capsys.readouterr().out)
    assert printed["stage"] == "C"
    assert printed["lr"] == 0.01 and printed["max_steps"] == 7 and printed["init_from"] == "ckpt/yes"
    assert printed["latent"]["latent_budget_alpha"] == 2.0


def test_cli_config_error_exit_code(capsys):
    args = _parse(["--train-data", "x.jsonl", "lr=-3"])
    assert train_cli.run(args) == 2
    assert "lr=-3" in capsys.readouterr().err


@pytest.mark.parametrize("scale", [1.0, 10.0])
def test_stop_head_learning_rate_scale(scale):
    import torch

    from latentvl import build_tiny_model
    from latentvl.training.setup import STOP_HEAD, make_optimizer

    model, _ = build_tiny_model(seed=0, hidden_size=64, num_layers=1)
    cfg = TrainConfig(train_data="x.jsonl", lr=1e-3, weight_decay=0.1, stop_head_lr_scale=scale, warmup_steps=2,
                      max_steps=10).validate()
    opt = make_optimizer(cfg, model)
    head = {id(p) for n, p in model.named_parameters() if STOP_HEAD in n}
    assert len(head) == 2  # weight and bias
    trainable = sum(1 for p in model.parameters() if p.requires_grad)
    assert sum(len(g["params"]) for g in opt.param_groups) == trainable  # every parameter exactly once
    head_groups = [g for g in opt.param_groups if any(id(p) in head for p in g["params"])]
    if scale == 1.0:  # the plain two groups: a checkpoint written before the option existed resumes unchanged
        assert len(opt.param_groups) == 2 and all(g["lr"] == 1e-3 for g in opt.param_groups)
    else:
        assert len(head_groups) == 1 and {id(p) for p in head_groups[0]["params"]} == head
        assert head_groups[0]["lr"] == pytest.approx(1e-2) and head_groups[0]["weight_decay"] == 0.0
        assert opt.param_groups[0]["lr"] == 1e-3
        # the schedule scales every group alike
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: lr_factor(step, 2, 10, "cosine", 0.1))
        for _ in range(5):
            opt.step()
            sched.step()
            assert head_groups[0]["lr"] == pytest.approx(10 * opt.param_groups[0]["lr"])


def test_head_only_steps_are_the_first_of_stage_c():
    ac = TrainConfig(train_data="x.jsonl", stage="AC", switch_step=5, max_steps=10, stop_head_first_steps=2).validate()
    assert [s for s in range(10) if ac.head_only_at(s)] == [5, 6]
    c = TrainConfig(train_data="x.jsonl", stage="C", max_steps=10, stop_head_first_steps=3).validate()
    assert [s for s in range(10) if c.head_only_at(s)] == [0, 1, 2]
    a = TrainConfig(train_data="x.jsonl", stage="A", max_steps=10, stop_head_first_steps=3).validate()
    assert not any(a.head_only_at(s) for s in range(10))  # stage A has no stop head to train
    assert not any(TrainConfig(train_data="x.jsonl", stage="C").validate().head_only_at(s) for s in range(5))


def test_backbone_is_checked_and_must_match_a_model_directory(tmp_path):
    from latentvl import build_tiny_model, save_latent_checkpoint
    from latentvl.training.setup import build_model

    with pytest.raises(TrainConfigError, match="backbone"):
        TrainConfig(train_data="x.jsonl", backbone="llava").validate()
    tiny3 = TrainConfig(train_data="x.jsonl", backbone="qwen3_vl", tiny_hidden_size=64, tiny_num_layers=2).validate()
    assert build_model(tiny3, "A")[0].backbone == "qwen3_vl"
    model, processor = build_tiny_model(0, hidden_size=64, num_layers=2)
    save_latent_checkpoint(model, processor, tmp_path / "q25")
    own = TrainConfig(train_data="x.jsonl", model=str(tmp_path / "q25")).validate()
    assert build_model(own, "A")[0].backbone == "qwen2_5_vl"  # null takes the directory's own
    wrong = TrainConfig(train_data="x.jsonl", model=str(tmp_path / "q25"), backbone="qwen3_vl").validate()
    with pytest.raises(TrainConfigError, match="'qwen3_vl' was asked for, but .* holds a 'qwen2_5_vl' model"):
        build_model(wrong, "A")
