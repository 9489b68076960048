"""Checkpoints: exact resume, stage A -> C, the NaN guard, atomic writes; stage C's head-only first steps."""

import json

import pytest
import torch
from safetensors.torch import load_file

from latentvl.data.records import load_records
from latentvl.data.tasks.writer import make_dataset
from latentvl.model.loading import load_latent_model
from latentvl.training import checkpoint as ckpt_mod
from latentvl.training.checkpoint import CheckpointError, latest_checkpoint, list_checkpoints, save_checkpoint
from latentvl.training.config import TrainConfig
from latentvl.training.data import StreamBatchSampler
from latentvl.training.metrics import read_metrics
from latentvl.training.setup import STOP_HEAD
from latentvl.training.trainer import NonFiniteLossError, train

LATENT = {"latent_budget_alpha": 1.0, "latent_budget_max": 8}
KEYS = ("loss", "ce", "align", "stop", "cost", "used", "budget", "grad_norm", "lr", "threshold")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("resume_data")
    make_dataset("shapes", 24, 5, out, min_size=84, max_size=112, max_cot=2)
    return out


# exact resume and LoRA run on both backbone families (the tests that take the `backbone` fixture)
TINY_BACKBONES = ("qwen2_5_vl", "qwen3_vl")


def _cfg(data_dir, out, **kw):
    base = dict(
        train_data=str(data_dir / "train.jsonl"),
        output_dir=str(out),
        batch_size=2,
        grad_accum=2,
        tiny_hidden_size=64,
        tiny_num_layers=2,
        lr=2e-3,
        warmup_steps=2,
        latent=dict(LATENT),
        threshold_anneal_steps=2,
        progress_bar=False,
        tensorboard=False,
        seed=1,
    )
    base.update(kw)
    return TrainConfig(**base).validate()


class Crash(RuntimeError):
    pass


class CrashAfter:
    def __init__(self, step):
        self.step = step

    def on_step_end(self, step, record, model):
        if step == self.step:
            raise Crash(f"simulated crash after step {step}")


def _by_step(rows):
    return {r["step"]: r for r in rows}


def test_resume_gives_the_same_losses(data_dir, tmp_path, backbone):
    # stage A for 3 steps, then stage C with a stop head that fires, so halting and annealing are covered
    kw = dict(
        backbone=backbone,
        stage="AC",
        switch_step=3,
        max_steps=7,
        save_every=2,
        threshold_start=0.6,
        latent={**LATENT, "latent_stop_threshold": 0.3},
        lora_dropout=0.0,
    )
    full = train(_cfg(data_dir, tmp_path / "full", **kw))
    assert [r["stage"] for r in full.history] == ["A"] * 3 + ["C"] * 4
    # keep_last=2 pruned old checkpoints, but not the pinned end of stage A (step 3)
    kept = [p.name for p in list_checkpoints(tmp_path / "full")]
    assert kept == ["step-00000003", "step-00000006", "step-00000007"]
    assert (
        json.loads((tmp_path / "full/checkpoints/step-00000003/trainer_state.json").read_text())["stage"]
        == "A"
    )

    with pytest.raises(Crash):
        train(_cfg(data_dir, tmp_path / "cut", **kw), callbacks=[CrashAfter(5)])
    latest = latest_checkpoint(tmp_path / "cut")
    assert latest.name == "step-00000004"  # save_every 2 (and the switch at 3): the crash lost step 5
    state = json.loads((latest / "trainer_state.json").read_text())
    assert state["step"] == 4 and state["stage"] == "C" and state["samples_seen"] == 16
    resumed = train(_cfg(data_dir, tmp_path / "cut", resume="latest", **kw))
    assert [r["step"] for r in resumed.history] == [5, 6, 7]

    ref = _by_step(full.history)
    for row in resumed.history:
        for key in KEYS:
            a, b = row[key], ref[row["step"]][key]
            if a is None or b is None:
                assert a == b, key
            else:
                assert abs(a - b) <= 1e-6 * max(1.0, abs(b)), (row["step"], key, a, b)
    # the metrics log of the resumed run reads like the uninterrupted one
    cut_log = read_metrics(tmp_path / "cut", kind="train")
    assert [r["step"] for r in cut_log] == list(range(1, 8))
    for a, b in zip(cut_log, read_metrics(tmp_path / "full", kind="train"), strict=True):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-6)
    # and the final weights agree
    wa = load_file(str(tmp_path / "full" / "final" / "model.safetensors"))
    wb = load_file(str(tmp_path / "cut" / "final" / "model.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=1e-6)


def test_stage_a_checkpoint_starts_stage_c(data_dir, tmp_path, capsys):
    res_a = train(_cfg(data_dir, tmp_path / "a", stage="A", max_steps=2))
    ckpt_a = res_a.checkpoint
    assert json.loads((ckpt_a / "trainer_state.json").read_text())["stage"] == "A"
    model_a, _ = load_latent_model(ckpt_a / "model")
    assert model_a.config.latent_mode_stage == "A"
    seen = {}

    class Grab:
        def on_step_begin(self, step, model):
            if step == 0:
                seen["config_stage"] = model.config.latent_mode_stage
                seen["equal"] = all(
                    torch.equal(p, model_a.state_dict()[n]) for n, p in model.state_dict().items()
                )

    capsys.readouterr()
    res_c = train(
        _cfg(
            data_dir,
            tmp_path / "c",
            stage="C",
            max_steps=2,
            init_from=str(ckpt_a),
            tensorboard=True,
            progress_bar=True,
            latent={**LATENT, "latent_full_budget_ce_weight": 0.5, "latent_full_budget_align_weight": 0.25},
        ),
        callbacks=[Grab()],
    )
    assert seen == {"config_stage": "C", "equal": True}
    assert [r["stage"] for r in res_c.history] == ["C", "C"]
    assert all(r["stop"] > 0 and r["threshold"] is not None and r["ce_full"] > 0 and r["align_full"] > 0
               for r in res_c.history)
    assert all(r["loss"] == pytest.approx(r["ce"] + 0.5 * r["ce_full"] + r["align"] + 0.25 * r["align_full"]
                                          + r["stop"] + 1e-3 * r["cost"], rel=1e-5) for r in res_c.history)
    assert res_c.checks[0].stage == "C" and res_c.checks[0].ok
    # logs: the progress bar shows the loss parts, used/budget, threshold and step time; JSONL; TensorBoard
    bar = capsys.readouterr().err
    for part in ("ce=", "ce_full=", "align=", "align_full=", "stop=", "cost=", "used/budget=", "thr=", "s/step="):
        assert part in bar, part
    rows = read_metrics(tmp_path / "c", kind="train")
    assert [r["step"] for r in rows] == [1, 2] and all(r["stage"] == "C" for r in rows)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "c" / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/ce", "train/ce_full", "train/align_full", "train/stop", "train/used_ratio",
            "train/threshold"} <= tags
    assert [e.value for e in events.Scalars("train/threshold")] == pytest.approx(
        [r["threshold"] for r in rows]
    )
    model_c, _ = load_latent_model(res_c.final_model)
    assert model_c.config.latent_mode_stage == "C" and model_c.config.latent_stop_loss_weight == 1.0


def test_nan_loss_stops_naming_step_and_samples(data_dir, tmp_path):
    cfg = _cfg(data_dir, tmp_path / "nan", max_steps=6, save_every=1)

    class Poison:
        def on_step_begin(self, step, model):
            if step == 2:  # the third step
                with torch.no_grad():
                    model.get_input_embeddings().weight.fill_(float("nan"))

    with pytest.raises(NonFiniteLossError) as err:
        train(cfg, callbacks=[Poison()])
    e = err.value
    records, _ = load_records(data_dir / "train.jsonl")
    sampler = StreamBatchSampler(len(records), 2, 2, 1, 0, cfg.seed)
    expected = [records[i].id for m in range(2) for i in sampler.micro_batch(2 * 4, m)]
    assert e.step == 3 and e.sample_ids == expected
    assert "step 3" in str(e) and expected[0] in str(e)
    # the last good checkpoint is kept, complete and loadable; nothing of step 3 was written
    assert e.checkpoint is not None and e.checkpoint.name == "step-00000002"
    assert [p.name for p in list_checkpoints(tmp_path / "nan")][-1] == "step-00000002"
    assert latest_checkpoint(tmp_path / "nan") == e.checkpoint
    model, _ = load_latent_model(e.checkpoint / "model")
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert not (tmp_path / "nan" / "final").exists()


def test_checkpoint_write_is_atomic(data_dir, tmp_path, monkeypatch):
    from latentvl import build_tiny_model

    model, processor = build_tiny_model(0, hidden_size=64, num_layers=2)
    kwargs = dict(
        rank=0,
        export_model=model,
        processor=processor,
        optimizer_state={},
        scheduler_state={},
        trainer_state={"step": 1, "samples_seen": 4, "stage": "A"},
    )
    first = save_checkpoint(tmp_path, 1, **kwargs)
    assert first.name == "step-00000001" and (first / "model" / "config.json").is_file()

    def broken(model, processor, path):
        path.mkdir(parents=True)
        (path / "config.json").write_text("{")  # a half-written file ...
        raise OSError("disk full")  # ... then the failure

    monkeypatch.setattr(ckpt_mod, "save_latent_checkpoint", broken)
    with pytest.raises(CheckpointError, match="disk full"):
        save_checkpoint(
            tmp_path, 2, **{**kwargs, "trainer_state": {"step": 2, "samples_seen": 8, "stage": "A"}}
        )
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["latest", "step-00000001"]  # no step-2 folder, no temporary left behind
    assert latest_checkpoint(tmp_path) == first
    monkeypatch.undo()
    # saving the same step again replaces it completely
    again = save_checkpoint(
        tmp_path, 1, **{**kwargs, "trainer_state": {"step": 1, "samples_seen": 4, "stage": "C"}}
    )
    assert json.loads((again / "trainer_state.json").read_text())["stage"] == "C"
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest", "step-00000001"]


def test_lora_frozen_vision_and_checkpointing_resume_exactly(data_dir, tmp_path, backbone):
    from latentvl import build_tiny_model

    kw = dict(
        backbone=backbone,
        stage="AC",
        switch_step=2,
        max_steps=4,
        save_every=2,
        lora=True,
        lora_r=4,
        lora_dropout=0.1,
        freeze_vision=True,
        gradient_checkpointing=True,
        batch_size=2,
        grad_accum=1,
    )
    full = train(_cfg(data_dir, tmp_path / "full", **kw))
    with pytest.raises(Crash):
        train(_cfg(data_dir, tmp_path / "cut", **kw), callbacks=[CrashAfter(3)])
    assert (latest_checkpoint(tmp_path / "cut") / "lora_state.safetensors").is_file()
    resumed = train(_cfg(data_dir, tmp_path / "cut", resume="latest", **kw))
    ref = _by_step(full.history)
    assert [r["step"] for r in resumed.history] == [3, 4]
    for row in resumed.history:
        for key in ("loss", "ce", "align", "stop", "grad_norm"):
            assert row[key] == pytest.approx(ref[row["step"]][key], rel=1e-6, abs=1e-6), (row["step"], key)
    # the exported model is the merged one: vision tower untouched, language model changed, head trained
    start, _ = build_tiny_model(1, hidden_size=64, num_layers=2, backbone=backbone)
    final, _ = load_latent_model(tmp_path / "full" / "final")
    s0, s1 = start.state_dict(), final.state_dict()
    assert all(torch.equal(s0[k], s1[k]) for k in s0 if k.startswith("model.visual."))
    assert not torch.equal(
        s0["model.language_model.layers.0.self_attn.q_proj.weight"],
        s1["model.language_model.layers.0.self_attn.q_proj.weight"],
    )
    assert not torch.equal(s0["latent_stop_head.weight"], s1["latent_stop_head.weight"])
    assert torch.equal(
        s0["model.language_model.embed_tokens.weight"], s1["model.language_model.embed_tokens.weight"]
    )


def test_teacher_forcing_decays_by_step_and_resumes_exactly(data_dir, tmp_path):
    """latent_teacher_forcing falls linearly over teacher_forcing_decay_steps in stage A, is 0 in stage C,
    and a run killed mid-decay resumes with the same probabilities and losses."""
    kw = dict(stage="AC", switch_step=5, max_steps=6, save_every=2, teacher_forcing_decay_steps=4,
              latent={**LATENT, "latent_teacher_forcing": 1.0})
    full = train(_cfg(data_dir, tmp_path / "full", **kw))
    assert [r["teacher_forcing"] for r in full.history] == pytest.approx([1.0, 0.75, 0.5, 0.25, 0.0, 0.0])
    with pytest.raises(Crash):
        train(_cfg(data_dir, tmp_path / "cut", **kw), callbacks=[CrashAfter(3)])
    resumed = train(_cfg(data_dir, tmp_path / "cut", resume="latest", **kw))
    assert [r["step"] for r in resumed.history] == [3, 4, 5, 6]
    ref = _by_step(full.history)
    for row in resumed.history:
        assert row["teacher_forcing"] == pytest.approx(ref[row["step"]]["teacher_forcing"])
        assert row["loss"] == pytest.approx(ref[row["step"]]["loss"], abs=1e-6)


def test_teacher_forcing_decay_needs_a_probability(data_dir, tmp_path):
    from latentvl.errors import TrainConfigError

    with pytest.raises(TrainConfigError, match="teacher_forcing_decay_steps"):
        _cfg(data_dir, tmp_path, teacher_forcing_decay_steps=4)
    with pytest.raises(TrainConfigError, match="teacher_forcing_decay_steps"):
        _cfg(data_dir, tmp_path, teacher_forcing_decay_steps=-1, latent={**LATENT, "latent_teacher_forcing": 0.5})


def test_vision_cache_resumes_exactly_and_follows_the_uncached_run(data_dir, tmp_path, backbone):
    """vision_cache_mb: a resumed run (its cache empty) repeats the uninterrupted one; both follow the run without
    the cache to float rounding (each image encoded alone rather than in its batch)."""
    kw = dict(backbone=backbone, stage="AC", switch_step=2, max_steps=5, save_every=2, freeze_vision=True,
              threshold_start=0.6, latent={**LATENT, "latent_stop_threshold": 0.3})
    plain = train(_cfg(data_dir, tmp_path / "plain", **kw))
    full = train(_cfg(data_dir, tmp_path / "full", vision_cache_mb=16, **kw))
    with pytest.raises(Crash):
        train(_cfg(data_dir, tmp_path / "cut", vision_cache_mb=16, **kw), callbacks=[CrashAfter(3)])
    resumed = train(_cfg(data_dir, tmp_path / "cut", vision_cache_mb=16, resume="latest", **kw))
    ref, base = _by_step(full.history), _by_step(plain.history)
    assert [r["step"] for r in resumed.history] == [3, 4, 5]
    for row in resumed.history:
        for key in ("loss", "ce", "align", "stop", "grad_norm"):
            assert row[key] == pytest.approx(ref[row["step"]][key], rel=1e-6, abs=1e-6), (row["step"], key)
    for step, row in ref.items():
        assert row["loss"] == pytest.approx(base[step]["loss"], rel=1e-4, abs=1e-4), step
        assert row["used"] == base[step]["used"], step


def test_vision_cache_needs_a_frozen_tower(data_dir, tmp_path):
    from latentvl.errors import TrainConfigError

    with pytest.raises(TrainConfigError, match="vision_cache_mb=8: .*freeze_vision"):
        _cfg(data_dir, tmp_path, vision_cache_mb=8)
    with pytest.raises(TrainConfigError, match="vision_cache_mb=8: .*freeze_vision_merger"):
        _cfg(data_dir, tmp_path, vision_cache_mb=8, freeze_vision=True, freeze_vision_merger=False)


def test_image_cache_run_equals_the_uncached_run_and_may_change_on_resume(data_dir, tmp_path):
    """image_cache_mb: the same batches, so the same losses bit for bit; a run cut without the cache resumes
    with it (it is not part of the trajectory)."""
    from latentvl.errors import TrainConfigError

    kw = dict(stage="A", max_steps=4, save_every=2)
    plain = train(_cfg(data_dir, tmp_path / "plain", **kw))
    cached = train(_cfg(data_dir, tmp_path / "cached", image_cache_mb=4, **kw))
    assert [r["loss"] for r in cached.history] == [r["loss"] for r in plain.history]
    with pytest.raises(Crash):
        train(_cfg(data_dir, tmp_path / "cut", **kw), callbacks=[CrashAfter(3)])
    resumed = train(_cfg(data_dir, tmp_path / "cut", image_cache_mb=4, resume="latest", **kw))
    assert [r["step"] for r in resumed.history] == [3, 4]
    assert [r["loss"] for r in resumed.history] == [r["loss"] for r in plain.history][2:]
    with pytest.raises(TrainConfigError, match="image_cache_mb"):
        _cfg(data_dir, tmp_path, image_cache_mb=-1)


@pytest.mark.parametrize("lora", [False, True])
def test_stop_head_first_steps_move_the_stop_head_alone(data_dir, tmp_path, lora):
    """stop_head_first_steps = 2: stage C's first two steps change the stop head and nothing else; the third
    changes the model (or its adapters) too."""
    snapshots = []

    class Snapshot:
        def on_step_begin(self, step, lm):
            snapshots.append({n: p.detach().clone() for n, p in lm.named_parameters() if p.requires_grad})

    cfg = _cfg(data_dir, tmp_path / "run", stage="C", max_steps=4, save_every=0, stop_head_first_steps=2,
               lora=lora, warmup_steps=0, lr=1e-2)
    train(cfg, callbacks=[Snapshot()])
    assert len(snapshots) == 4

    def moved(i):
        return {n for n in snapshots[i] if not torch.equal(snapshots[i][n], snapshots[i + 1][n])}

    head = {n for n in snapshots[0] if STOP_HEAD in n}
    assert head and len(head) < len(snapshots[0])
    assert moved(0) == head and moved(1) == head
    assert moved(2) > head  # from the third step on, the rest trains as well

