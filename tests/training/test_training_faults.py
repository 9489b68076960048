"""Faults: valid data that must train, bad numbers that must be refused, NaN that must fail checks."""

import json

import pytest
import torch

from latentvl import build_tiny_model, set_latent_fields
from latentvl.data.collator import LatentCollator
from latentvl.data.records import RecordDataset, load_records
from latentvl.data.tasks.writer import make_dataset
from latentvl.errors import TrainConfigError, TrainDataError
from latentvl.training.checks import check_no_think, run_checks
from latentvl.training.config import TrainConfig, load_config
from latentvl.training.trainer import train

LATENT = {"latent_budget_alpha": 1.0, "latent_budget_max": 4}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("faults_data")
    make_dataset("shapes", 8, 7, out, min_size=56, max_size=84, max_cot=2, val_fraction=0, test_fraction=0)
    rows = [json.loads(line) for line in (out / "train.jsonl").read_text().splitlines()]
    no_cot = [{**r, "cot_images": []} for r in rows]
    (out / "no_cot.jsonl").write_text("".join(json.dumps(r) + "\n" for r in no_cot))
    # every other record without CoT images, one of them without a question image either
    mixed = [no_cot[i] if i % 2 else r for i, r in enumerate(rows)]
    mixed[1] = {**mixed[1], "images": []}
    (out / "mixed.jsonl").write_text("".join(json.dumps(r) + "\n" for r in mixed))
    return out


def _cfg(data_dir, out, data="mixed.jsonl", **kw):
    base = dict(
        train_data=str(data_dir / data),
        output_dir=str(out),
        batch_size=1,
        tiny_hidden_size=64,
        tiny_num_layers=2,
        max_steps=4,
        latent=dict(LATENT),
        progress_bar=False,
        tensorboard=False,
        num_threads=1,
        seed=2,
    )
    base.update(kw)
    return TrainConfig(**base).validate()


# ------------------------------------------------------------------------------------ batches
@pytest.mark.parametrize("stage", ["C", "A"])
def test_batches_without_cot_images_train(data_dir, tmp_path, stage):
    res = train(_cfg(data_dir, tmp_path / "run", stage=stage, max_steps=8))
    budgets = [r["budget"] for r in res.history]
    assert 0 in budgets and any(budgets), budgets  # both kinds of batch came up
    for r in res.history:
        assert r["stage"] == stage and torch.isfinite(torch.tensor(r["loss"]))
        if r["budget"] == 0:
            assert r["stop"] == 0.0 and r["cost"] == 0.0 and r["align"] == 0.0


def test_data_without_any_cot_image(data_dir, tmp_path, capsys):
    with pytest.raises(TrainDataError, match=r"no_cot.jsonl: no record has CoT images.*stage C"):
        train(_cfg(data_dir, tmp_path / "c", data="no_cot.jsonl", stage="C"))
    assert not (tmp_path / "c" / "checkpoints").exists()  # refused before step 1
    with pytest.raises(TrainDataError, match="stage AC"):
        train(_cfg(data_dir, tmp_path / "ac", data="no_cot.jsonl", stage="AC", switch_step=2))
    capsys.readouterr()
    res = train(_cfg(data_dir, tmp_path / "a", data="no_cot.jsonl", stage="A", max_steps=1))
    assert res.step == 1
    assert "warning: " in capsys.readouterr().out
    # the baseline said as such: no warning
    train(_cfg(data_dir, tmp_path / "b", data="no_cot.jsonl", stage="A", max_steps=1, use_latents=False))
    assert "warning" not in capsys.readouterr().out


# ------------------------------------------------------------------------------------ NaN
def test_check_4_fails_on_nan_weights(data_dir):
    model, processor = build_tiny_model(0, hidden_size=64, num_layers=2)
    set_latent_fields(model.config, **LATENT)
    records, _ = load_records(data_dir / "train.jsonl")
    ds = RecordDataset(records)
    batch = LatentCollator(processor, model.config)([ds[0], ds[2]])
    assert check_no_think(model, batch, 1e-4).passed
    with torch.no_grad():  # garbled bytes: one NaN in one weight makes every logit NaN
        model.model.language_model.layers[0].mlp.down_proj.weight[0, 0] = float("nan")
    res = check_no_think(model, batch, 1e-4)
    assert res.passed is False and "nan" in res.detail.lower(), res.detail
    report = run_checks(model, batch, "A")
    assert not report.ok


# ------------------------------------------------------------------------------------ config numbers
@pytest.mark.parametrize(
    "override, field",
    [
        ("lr=.inf", "lr"),
        ("adam_eps=.inf", "adam_eps"),
        ("weight_decay=.nan", "weight_decay"),
        ("momentum=.nan", "momentum"),
        ("grad_clip=.inf", "grad_clip"),
        ("latent_budget_alpha=.inf", "latent.latent_budget_alpha"),
        ("latent.latent_stop_threshold=.nan", "latent.latent_stop_threshold"),
        ("check_tolerance=-.inf", "check_tolerance"),
        ("lr=nan", "lr"),
    ],
)
def test_non_finite_numbers_are_refused(override, field):
    with pytest.raises(TrainConfigError, match="must be a finite number") as err:
        load_config(None, ["train_data=x.jsonl", override])
    assert str(err.value).startswith(field + "=")


def test_non_finite_numbers_are_refused_in_a_built_config():
    with pytest.raises(TrainConfigError, match=r"^lr=inf: must be a finite number"):
        TrainConfig(train_data="x.jsonl", lr=float("inf")).validate()
    with pytest.raises(TrainConfigError, match=r"^latent.latent_cost_weight=nan"):
        TrainConfig(train_data="x.jsonl", latent={"latent_cost_weight": float("nan")}).validate()


# ------------------------------------------------------------------------------------ resume changes
@pytest.fixture(scope="module")
def stopped_run(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("stopped")
    kw = dict(batch_size=2, grad_accum=1, max_steps=2, save_every=1, lr_scheduler="cosine", lr=2e-3)
    train(_cfg(data_dir, out, **kw))
    return out, kw


@pytest.mark.parametrize(
    "change",
    [
        {"lr": 5e-2},
        {"seed": 9},
        {"latent": {**LATENT, "latent_budget_max": 6}},
        {"batch_size": 4},
        {"train_data": "other.jsonl"},
        {"max_steps": 1},  # below the checkpoint's step (equal to it: the run only finishes)
    ],
)
def test_resume_refuses_changes_it_cannot_honour(data_dir, stopped_run, change):
    out, kw = stopped_run
    before = (out / "config.yaml").read_text()
    cfg = _cfg(data_dir, out, **{**kw, "resume": "latest", **change})
    name = next(iter(change))
    with pytest.raises(TrainConfigError, match=r"^resume: .*" + name) as err:
        train(cfg)
    assert "checkpoint" in str(err.value)
    assert (out / "config.yaml").read_text() == before  # nothing written that would not run


def test_resume_applies_allowed_changes_and_writes_what_runs(data_dir, stopped_run, tmp_path, capsys):
    import shutil

    import yaml

    out, kw = stopped_run
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    capsys.readouterr()
    # same global batch (2 x 1 -> 1 x 2), one more step, another logging cadence
    cfg = _cfg(
        data_dir, copy, **{**kw, "resume": "latest", "batch_size": 1, "grad_accum": 2, "max_steps": 3, "log_every": 3}
    )
    res = train(cfg)
    assert [r["step"] for r in res.history] == [3]
    text = capsys.readouterr().out
    assert "warning: max_steps changed from 2 to 3" in text and "cosine" in text
    written = yaml.safe_load((copy / "config.yaml").read_text())
    assert (written["max_steps"], written["batch_size"], written["grad_accum"], written["log_every"]) == (3, 1, 2, 3)
    assert written["lr"] == kw["lr"]


# ------------------------------------------------------------------------------------ damaged checkpoints
def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize(
    "name, damage",
    [
        ("model/model.safetensors", _truncate),
        ("optimizer.pt", _truncate),
        ("rng/rank-0.pt", _truncate),
        ("trainer_state.json", lambda p: p.write_text("{not json")),
        ("optimizer.pt", lambda p: p.write_bytes(b"x" * p.stat().st_size)),  # same size, other bytes
    ],
)
def test_a_damaged_file_is_named(stopped_run, tmp_path, name, damage):
    import shutil

    from latentvl.training.checkpoint import CorruptCheckpointError, verify_checkpoint

    out, _ = stopped_run
    ckpt = tmp_path / "step"
    shutil.copytree(out / "checkpoints" / "step-00000002", ckpt)
    assert verify_checkpoint(ckpt) is True
    manifest = json.loads((ckpt / "manifest.json").read_text())["files"]
    assert {"trainer_state.json", "optimizer.pt", "rng/rank-0.pt", "model/model.safetensors"} <= set(manifest)
    damage(ckpt / name)
    with pytest.raises(CorruptCheckpointError) as err:
        verify_checkpoint(ckpt)
    assert err.value.file == ckpt / name and str(ckpt / name) in str(err.value)


def test_resume_falls_back_to_the_newest_checkpoint_that_verifies(data_dir, stopped_run, tmp_path, capsys):
    import shutil

    from latentvl.training.checkpoint import CorruptCheckpointError

    out, kw = stopped_run
    run = tmp_path / "run"
    shutil.copytree(out, run)
    _truncate(run / "checkpoints" / "step-00000002" / "optimizer.pt")
    # named explicitly: refused, naming the file and the checkpoint that verifies
    cfg = _cfg(data_dir, run, **{**kw, "resume": str(run / "checkpoints" / "step-00000002")})
    with pytest.raises(CorruptCheckpointError, match=r"optimizer.pt: has \d+ bytes.*step-00000001"):
        train(cfg)
    # latest: skipped with a word, the run continues from step 1
    capsys.readouterr()
    res = train(_cfg(data_dir, run, **{**kw, "resume": "latest", "max_steps": 3}))
    text = capsys.readouterr().out
    assert "step-00000002 is damaged" in text and "optimizer.pt" in text
    assert "resuming from" in text and "step-00000001" in text
    assert [r["step"] for r in res.history] == [2, 3]


# ------------------------------------------------------------------------------------ bad images, presentation
def _cli(argv):
    import argparse

    from latentvl.commands import train as train_cli

    parser = argparse.ArgumentParser()
    train_cli.add_arguments(parser)
    return train_cli.run(parser.parse_args(argv))


def _garble_pixels(path):
    """Replace a PNG's pixel data with junk but keep every chunk checksum valid (the header check passes)."""
    import struct
    import zlib

    data = bytearray(path.read_bytes())
    pos = 8
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind = bytes(data[pos + 4 : pos + 8])
        if kind == b"IDAT":
            body = bytes((i * 37 + 11) % 256 for i in range(length))
            data[pos + 8 : pos + 8 + length] = body
            data[pos + 8 + length : pos + 12 + length] = struct.pack(">I", zlib.crc32(kind + body))
        pos += 12 + length
    path.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def bad_image_data(data_dir, tmp_path_factory):
    import shutil

    from PIL import Image

    out = tmp_path_factory.mktemp("bad_image")
    shutil.copytree(data_dir / "images", out / "images")
    rows = [json.loads(line) for line in (data_dir / "train.jsonl").read_text().splitlines()]
    victim = rows[3]
    _garble_pixels(out / victim["cot_images"][0])
    with Image.open(out / victim["cot_images"][0]) as im:
        im.verify()  # passes the load-time check ...
    with pytest.raises(OSError), Image.open(out / victim["cot_images"][0]) as im:
        im.load()  # ... and fails to decode
    (out / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out, victim


def test_an_image_that_fails_to_decode_at_batch_time_is_skipped(bad_image_data, tmp_path, capsys):
    data, victim = bad_image_data
    capsys.readouterr()
    # batch 2 x 4 steps: every record of the epoch comes up, the damaged one included
    res = train(_cfg(data, tmp_path / "run", data="train.jsonl", skip_invalid=True, batch_size=2, max_steps=4))
    assert res.step == 4
    report = json.loads((tmp_path / "run" / "skipped_records.json").read_text())
    assert report["total"] == 1
    (entry,) = report["records"]
    assert entry["id"] == victim["id"] and entry["when"] == "batch" and entry["split"] == "train"
    assert victim["cot_images"][0].split("/")[-1] in entry["reason"]
    assert f"skipped {entry['source']} (id {victim['id']!r})" in capsys.readouterr().out


def test_without_skip_invalid_a_bad_image_names_the_record(bad_image_data, tmp_path, capsys):
    data, victim = bad_image_data
    status = _cli(
        ["--train-data", str(data / "train.jsonl"), "--output-dir", str(tmp_path / "run"), "--batch-size", "2",
         "--max-steps", "4", "tiny_hidden_size=64", "tiny_num_layers=2", "progress_bar=false", "tensorboard=false",
         "latent_budget_max=4"]
    )
    err = capsys.readouterr().err.strip()
    assert status == 2
    assert err.startswith("latentvl train: data error: ") and len(err.splitlines()) == 1, err
    assert repr(victim["id"]) in err and victim["cot_images"][0].split("/")[-1] in err


def test_no_valid_records_is_one_line_and_a_report(data_dir, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "a"}\nnot json\n')
    status = _cli(["--train-data", str(bad), "--output-dir", str(tmp_path / "run"), "skip_invalid=true"])
    err = capsys.readouterr().err.strip()
    assert status == 2 and len(err.splitlines()) == 1, err
    assert err == f"latentvl train: data error: {bad}: no valid records (2 skipped)"
    report = json.loads((tmp_path / "run" / "skipped_records.json").read_text())
    assert report["total"] == 2 and [r["when"] for r in report["records"]] == ["load", "load"]


def test_an_output_dir_that_takes_no_files_is_one_line(data_dir, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    status = _cli(["--train-data", str(data_dir / "train.jsonl"), "--output-dir", str(blocker / "run")])
    err = capsys.readouterr().err.strip()
    assert status == 2 and len(err.splitlines()) == 1, err
    assert err.startswith(f"latentvl train: config error: output_dir={str(blocker / 'run')!r}: cannot write there")


def test_os_errors_spell_out_full_and_read_only_disks():
    import errno

    from latentvl.training.checkpoint import describe_os_error

    assert "(EROFS)" in describe_os_error(OSError(errno.EROFS, "Read-only file system"))
    wrapped = RuntimeError("unexpected pos 64 vs 0")
    wrapped.__cause__ = OSError(errno.ENOSPC, "No space left on device")
    assert "(ENOSPC)" in describe_os_error(wrapped)
    rust = RuntimeError(
        'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })'
    )
    assert "(ENOSPC)" in describe_os_error(rust)


def test_a_full_disk_during_the_optimizer_save_says_enospc(tmp_path, monkeypatch):
    from latentvl.training import checkpoint as ckpt_mod

    model, processor = build_tiny_model(0, hidden_size=64, num_layers=2)
    real_open = ckpt_mod._open_for_write

    def full_disk(path):  # the kernel's own ENOSPC, from /dev/full
        return open("/dev/full", "wb") if path.name == ckpt_mod.OPTIMIZER_FILE else real_open(path)

    monkeypatch.setattr(ckpt_mod, "_open_for_write", full_disk)
    opt = torch.optim.AdamW(model.parameters())
    with pytest.raises(ckpt_mod.CheckpointError, match=r"no space left on the device \(ENOSPC\)"):
        ckpt_mod.save_checkpoint(
            tmp_path, 1, rank=0, export_model=model, processor=processor, optimizer_state=opt.state_dict(),
            scheduler_state={}, trainer_state={"step": 1, "samples_seen": 1},
        )
    assert not (tmp_path / "checkpoints" / "step-00000001").exists()


def test_resume_followed_by_an_override():
    import argparse

    from latentvl.commands import train as train_cli

    parser = argparse.ArgumentParser()
    train_cli.add_arguments(parser)
    cfg = train_cli.config_from_args(parser.parse_args(["--train-data", "x.jsonl", "--resume", "lr=5e-2"]))
    assert cfg.resume == "latest" and cfg.lr == 0.05
    cfg = train_cli.config_from_args(parser.parse_args(["--train-data", "x.jsonl", "--resume", "runs/a", "lr=5e-2"]))
    assert cfg.resume == "runs/a" and cfg.lr == 0.05


def test_collective_failures_are_told_apart():
    from latentvl.training.distributed import collective_failure as _collective_failure

    gloo_timeout = RuntimeError("[gloo/transport/tcp/unbound_buffer.cc:81] Timed out waiting 3000ms for recv operation")
    assert _collective_failure(gloo_timeout) == "timeout"
    peer = RuntimeError("[gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:13749")
    wrapped = ValueError("while reducing")
    wrapped.__cause__ = peer
    assert _collective_failure(wrapped) == "peer"
    assert _collective_failure(RuntimeError("shape mismatch")) is None


def test_a_sequence_over_max_length_is_a_data_error_line(data_dir, tmp_path, capsys):
    status = _cli(
        ["--train-data", str(data_dir / "train.jsonl"), "--output-dir", str(tmp_path / "run"), "max_length=10",
         "tiny_hidden_size=64", "tiny_num_layers=2", "progress_bar=false", "tensorboard=false"]
    )
    err = capsys.readouterr().err.strip()
    assert status == 2 and len(err.splitlines()) == 1, err
    assert err.startswith("latentvl train: data error: sample ") and "exceeds max_length 10" in err


def test_with_skip_invalid_a_record_the_collator_rejects_is_skipped(data_dir, tmp_path):
    rows = [json.loads(line) for line in (data_dir / "train.jsonl").read_text().splitlines()]
    rows = [{**r, "images": [str(data_dir / p) for p in r["images"]],
             "cot_images": [str(data_dir / p) for p in r["cot_images"]]} for r in rows]
    rows[5]["question"] = "Which colour? " * 40  # far over max_length; every other record fits
    (tmp_path / "long.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    res = train(_cfg(tmp_path, tmp_path / "run", data="long.jsonl", skip_invalid=True, batch_size=2, max_steps=4,
                     max_length=200))
    assert res.step == 4
    report = json.loads((tmp_path / "run" / "skipped_records.json").read_text())
    assert report["total"] == 1 and report["records"][0]["id"] == rows[5]["id"]
    assert "exceeds max_length 200" in report["records"][0]["reason"]
