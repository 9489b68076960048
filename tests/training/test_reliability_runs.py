"""Reliability of whole runs (issue #27): nothing in a checkpoint runs code, a bad eval record costs no
trained model, one run per output folder, an interrupted end of training resumes, one rule for exits."""

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch

from latentvl.data.tasks.writer import make_dataset
from latentvl.training import checkpoint as ckpt_mod
from latentvl.training import resume as resume_mod
from latentvl.training.checkpoint import CorruptCheckpointError

TINY = ["tiny_hidden_size=64", "tiny_num_layers=2", "progress_bar=false", "tensorboard=false",
        "latent_budget_max=4", "num_threads=1", "seed=2"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("reliability_data")
    make_dataset("shapes", 6, 7, out, min_size=56, max_size=84, max_cot=2, val_fraction=0, test_fraction=0)
    rows = [json.loads(line) for line in (out / "train.jsonl").read_text().splitlines()]
    bad = [dict(r) for r in rows[:3]]
    bad[1]["question"] = "Which <|image_pad|> colour?"  # the collator rejects a reserved token
    (out / "bad_eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in bad))
    (out / "empty.jsonl").write_text("")
    return out


def _parse(module, argv):
    parser = argparse.ArgumentParser()
    module.add_arguments(parser)
    return parser.parse_args(argv)


def _train_cli(argv):
    from latentvl.commands import train as train_cli

    return train_cli.run(_parse(train_cli, argv))


def _args(data_dir, out, *extra, max_steps=2):
    sets = [a for kv in ["save_every=1", *TINY, *(e for e in extra if "=" in e)] for a in ("--set", kv)]
    return ["--train-data", str(data_dir / "train.jsonl"), "--output-dir", str(out), "--batch-size", "1",
            "--max-steps", str(max_steps), "--stage", "C", *sets, *(e for e in extra if "=" not in e)]


@pytest.fixture(scope="module")
def finished_run(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("finished")
    assert _train_cli(_args(data_dir, out)) == 0
    assert not (out / resume_mod.LOCK_FILE).exists()  # released at the end
    return out


# ------------------------------------------------------------------------------------ 1. no code from a checkpoint
class _Evil:
    """Unpickling this creates ``marker`` (builtins.open): code run from a checkpoint."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("name", ["rng/rank-0.pt", "optimizer.pt"])
@pytest.mark.parametrize("manifest", ["regenerated", "absent"])
def test_a_crafted_pickle_runs_nothing_and_is_refused(data_dir, finished_run, tmp_path, capsys, name, manifest):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    step = run / "checkpoints" / "step-00000002"
    marker = tmp_path / "pwned"
    torch.save({"python": _Evil(marker), "optimizer": _Evil(marker), "scheduler": {}}, step / name)
    if manifest == "regenerated":
        (step / "manifest.json").write_text(json.dumps(ckpt_mod._manifest(step)))
    else:
        (step / "manifest.json").unlink()
    capsys.readouterr()
    status = _train_cli([*_args(data_dir, run, max_steps=3), "--resume", str(step)])
    err = capsys.readouterr().err.strip()
    assert not marker.exists(), "a pickle in the checkpoint ran code"
    assert status == 5, err
    assert err.startswith("latentvl train: checkpoint error: ") and str(step / name) in err
    assert len(err.splitlines()) == 1, err
    assert not (run / resume_mod.LOCK_FILE).exists()


def test_rng_and_optimizer_files_load_with_weights_only(finished_run):
    step = finished_run / "checkpoints" / "step-00000002"
    for path in (step / "rng" / "rank-0.pt", step / "optimizer.pt"):
        torch.load(path, weights_only=True)  # plain data and tensors only
    state = ckpt_mod.load_rng_state(step, 0)
    ckpt_mod.set_rng_state(state)


def test_an_rng_state_of_an_earlier_version_still_loads(tmp_path):
    import random

    import numpy as np

    old = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    (tmp_path / "rng").mkdir()
    torch.save(old, tmp_path / "rng" / "rank-0.pt")  # numpy arrays, as latentvl wrote them before
    before = np.random.random()
    ckpt_mod.set_rng_state(ckpt_mod.load_rng_state(tmp_path, 0))
    assert np.random.random() == before


@pytest.mark.parametrize("content", [{"python": 1}, [1, 2, 3], {"python": (3, (1, 2), None), "numpy": "x",
                                                                "torch": torch.zeros(3)}])
def test_a_malformed_rng_file_is_a_corrupt_checkpoint(tmp_path, content):
    (tmp_path / "rng").mkdir()
    torch.save(content, tmp_path / "rng" / "rank-0.pt")
    with pytest.raises(CorruptCheckpointError) as err:
        ckpt_mod.load_rng_state(tmp_path, 0)
    assert err.value.file == tmp_path / "rng" / "rank-0.pt"


def test_a_malformed_optimizer_file_is_a_corrupt_checkpoint(tmp_path):
    torch.save({"something": 1}, tmp_path / "optimizer.pt")
    with pytest.raises(CorruptCheckpointError, match="optimizer.pt"):
        ckpt_mod.load_optimizer_state(tmp_path)


def test_a_pickled_model_directory_is_one_line_exit_2(finished_run, tmp_path, capsys):
    from latentvl.commands import infer

    model = tmp_path / "pickled"
    shutil.copytree(finished_run / "final", model)
    for f in model.glob("*.safetensors"):
        f.unlink()
    torch.save({"w": torch.zeros(1)}, model / "pytorch_model.bin")
    status = infer.run(_parse(infer, ["--model", str(model), "--question", "Which colour?"]))
    err = capsys.readouterr().err.strip()
    assert status == 2 and len(err.splitlines()) == 1, err
    assert err.startswith("infer: error: ") and "pytorch_model.bin" in err and "safetensors" in err


# ------------------------------------------------------------------------------------ 2. bad eval record
def test_a_bad_eval_record_is_skipped_and_the_run_keeps_its_model(data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    status = _train_cli(_args(data_dir, out, "--eval-data", str(data_dir / "bad_eval.jsonl"), "skip_invalid=true",
                              max_steps=1))
    text = capsys.readouterr()
    assert status == 0, text.err
    assert (out / "checkpoints" / "step-00000001").is_dir() and (out / "final" / "config.json").is_file()
    report = json.loads((out / "skipped_records.json").read_text())
    (entry,) = [e for e in report["records"] if e["split"] == "eval"]
    assert "reserved" in entry["reason"]


def test_without_skip_invalid_a_bad_eval_record_is_named_before_training(data_dir, tmp_path, capsys):
    bad_id = json.loads((data_dir / "bad_eval.jsonl").read_text().splitlines()[1])["id"]
    out = tmp_path / "run"
    status = _train_cli(_args(data_dir, out, "--eval-data", str(data_dir / "bad_eval.jsonl"), max_steps=1))
    err = capsys.readouterr().err.strip()
    assert status == 2 and len(err.splitlines()) == 1, err
    assert err.startswith("latentvl train: data error: ") and repr(bad_id) in err
    assert not (out / "checkpoints").exists()  # refused before step 1, not after the run


def test_the_final_checkpoint_is_written_before_the_final_evaluation(data_dir, tmp_path, monkeypatch):
    from latentvl.training import trainer

    seen = {}

    def failing_eval(run, step):
        seen["final"] = (run.out_dir / "final" / "config.json").is_file()
        seen["ckpt"] = (run.out_dir / "checkpoints" / ckpt_mod.step_dirname(step)).is_dir()
        raise RuntimeError("evaluation failed")

    monkeypatch.setattr(trainer, "_evaluate", failing_eval)
    with pytest.raises(RuntimeError, match="evaluation failed"):
        _train_cli(_args(data_dir, tmp_path / "run", "--eval-data", str(data_dir / "train.jsonl"), "eval_every=0",
                         max_steps=1))
    assert seen == {"final": True, "ckpt": True}


# ------------------------------------------------------------------------------------ 3. the output-folder lock
def test_a_second_run_on_a_live_output_dir_is_refused(data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock = {"pid": holder.pid, "host": socket.gethostname(), "started": "2026-01-01T00:00:00"}
        (out / resume_mod.LOCK_FILE).write_text(json.dumps(lock))
        status = _train_cli(_args(data_dir, out, max_steps=1))
    finally:
        holder.kill()
        holder.wait()
    err = capsys.readouterr().err.strip()
    assert status == 2 and len(err.splitlines()) == 1, err
    assert f"pid {holder.pid}" in err and "in use" in err
    assert not (out / "checkpoints").exists()
    assert json.loads((out / resume_mod.LOCK_FILE).read_text())["pid"] == holder.pid  # not taken


def test_the_lock_is_exclusive_and_a_stale_one_is_taken_over(tmp_path):
    path = resume_mod.acquire_run_lock(tmp_path)
    assert json.loads(path.read_text())["pid"] == os.getpid()
    with pytest.raises(resume_mod.RunLockedError, match=f"pid {os.getpid()}"):
        resume_mod.acquire_run_lock(tmp_path)
    resume_mod.release_run_lock(path)
    assert not path.exists()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    path.write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(), "started": "x"}))
    said = []
    assert resume_mod.acquire_run_lock(tmp_path, warn=said.append) == path
    assert json.loads(path.read_text())["pid"] == os.getpid()
    assert said and "stale" in said[0] and str(dead.pid) in said[0]
    resume_mod.release_run_lock(path)


def test_the_lock_is_never_visible_without_its_holder(tmp_path, monkeypatch):
    """A run started at the same moment must never read an empty lock (it would take it over as stale and
    both runs would go on): when the lock's content is written, no lock file exists yet."""
    path = tmp_path / resume_mod.LOCK_FILE
    seen = []
    real_dumps = resume_mod.json.dumps

    def dumps(obj, *args, **kwargs):
        seen.append(path.exists())
        return real_dumps(obj, *args, **kwargs)

    monkeypatch.setattr(resume_mod.json, "dumps", dumps)
    assert resume_mod.acquire_run_lock(tmp_path) == path
    assert seen == [False]
    assert json.loads(path.read_text())["pid"] == os.getpid() and not list(tmp_path.glob("*.tmp"))
    resume_mod.release_run_lock(path)


# ------------------------------------------------------------------------------------ 5. resume of a finished run
def test_a_run_killed_during_calibration_resumes_and_finishes(data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    args = _args(data_dir, out, "--eval-data", str(data_dir / "train.jsonl"), "calibrate_stop_threshold=true",
                 "eval_every=0")
    assert _train_cli(args) == 0
    # killed after final/config.json appeared, before calibration.json: what is left on disk
    (out / "calibration.json").unlink()
    # a stale lock of the killed process
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (out / resume_mod.LOCK_FILE).write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname()}))
    capsys.readouterr()
    status = _train_cli([*args, "--resume"])
    text = capsys.readouterr()
    assert status == 0, text.err
    assert "cannot change on resume" not in text.err
    assert "stale lock" in text.out
    assert json.loads((out / "calibration.json").read_text())["threshold"] is not None
    assert (out / "final" / "config.json").is_file()
    assert not (out / resume_mod.LOCK_FILE).exists()


# ------------------------------------------------------------------------------------ 7. one rule for exits
@pytest.mark.parametrize("flag, value", [("--batch-size", "0"), ("--max-new-tokens", "-5")])
def test_eval_refuses_bad_numbers_cleanly(finished_run, data_dir, tmp_path, capsys, flag, value):
    from latentvl.commands import eval as eval_cli

    status = eval_cli.run(_parse(eval_cli, ["--model", str(finished_run / "final"), "--data",
                                            str(data_dir / "train.jsonl"), "--out", str(tmp_path / "e"),
                                            flag, value]))
    err = capsys.readouterr().err.strip()
    assert status == 2 and err == f"eval: error: {flag} {value}: must be >= 1"


@pytest.mark.parametrize("command", ["eval", "infer"])
def test_an_empty_jsonl_is_the_same_exit_in_every_command(finished_run, data_dir, tmp_path, capsys, command):
    import importlib

    module = importlib.import_module(f"latentvl.commands.{command}")
    empty = data_dir / "empty.jsonl"
    status = module.run(_parse(module, ["--model", str(finished_run / "final"), "--data", str(empty),
                                        "--out", str(tmp_path / "o")]))
    err = capsys.readouterr().err.strip()
    assert status == 2 and err == f"{command}: error: {empty}: no valid records"
    assert not (tmp_path / "o").exists()


def test_calibrate_on_a_reserved_token_is_one_line(finished_run, data_dir, capsys):
    from latentvl.commands import calibrate

    status = calibrate.run(_parse(calibrate, ["--model", str(finished_run / "final"), "--data",
                                              str(data_dir / "bad_eval.jsonl"), "--grid", "0.5"]))
    lines = capsys.readouterr().err.replace("\r", "\n").splitlines()
    err = "\n".join(line for line in lines if line.strip() and not line.startswith("Loading weights"))
    assert status == 2 and len(err.splitlines()) == 1, err
    assert err.startswith("calibrate: error: ") and "reserved" in err
