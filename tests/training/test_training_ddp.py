"""Multi-process training on CPU (gloo) under torchrun: DDP and FSDP2 match one process with the
same global batch, through stage A and stage C, with ranks halting at different latent steps."""

import json
import os
import socket
import subprocess
import sys

import pytest
import torch

from latentvl import build_tiny_model
from latentvl.data.tasks.writer import make_dataset
from latentvl.model.loading import save_latent_checkpoint
from latentvl.training.config import TrainConfig
from latentvl.training.metrics import read_metrics
from latentvl.training.trainer import train

pytestmark = pytest.mark.slow

HANG_GUARD_S = 900  # a deadlocked collective would otherwise block CI forever
STEPS, SWITCH = 5, 2
COMPARED = ("loss", "ce", "align", "stop", "grad_norm")


TINY_BACKBONES = ("qwen2_5_vl", "qwen3_vl")  # DDP and FSDP2 (its units: each family's blocks) on both


@pytest.fixture(scope="module")
def setup(tmp_path_factory, backbone):
    root = tmp_path_factory.mktemp("ddp")
    # images of 84..168 px: budgets 3..6, so the ranks' latent regions have different lengths
    make_dataset("shapes", 30, 11, root / "data", min_size=84, max_size=168, max_cot=3)
    model, processor = build_tiny_model(0, hidden_size=64, num_layers=2, backbone=backbone)
    with torch.no_grad():  # a stop head that fires early on some slots and late on others
        model.latent_stop_head.weight.normal_(0.0, 0.3, generator=torch.Generator().manual_seed(0))
        model.latent_stop_head.bias.fill_(0.0)
    save_latent_checkpoint(model, processor, root / "init")
    options = {
        "train_data": str(root / "data" / "train.jsonl"),
        "init_from": str(root / "init"),
        "stage": "AC",
        "switch_step": SWITCH,
        "max_steps": STEPS,
        "lr": 2e-3,
        "warmup_steps": 1,
        "threshold_start": 0.6,
        "threshold_anneal_steps": 2,
        "progress_bar": False,
        "tensorboard": False,
        "seed": 3,
        "latent": {"latent_budget_alpha": 1.0, "latent_budget_max": 8, "latent_stop_threshold": 0.5},
    }
    single = train(
        TrainConfig.from_dict(
            {
                **options,
                "batch_size": 2,
                "grad_accum": 2,
                "num_threads": 1,
                "output_dir": str(root / "single"),
            }
        )
    )
    return root, options, single.history


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(root, options, name, **extra):
    cfg = {**options, "batch_size": 2, "grad_accum": 1, "output_dir": str(root / name), **extra}
    path = root / f"{name}.yaml"
    path.write_text(json.dumps(cfg))  # JSON is YAML
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(_free_port()),
        "-m",
        "latentvl.cli",
        "train",
        "--config",
        str(path),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=HANG_GUARD_S, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return read_metrics(root / name, kind="train")


def _compare(rows, reference):
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert [r["stage"] for r in rows] == ["A"] * SWITCH + ["C"] * (STEPS - SWITCH)
    for row, ref in zip(rows, reference, strict=True):
        assert (row["used"], row["budget"], row["samples_seen"]) == (
            ref["used"],
            ref["budget"],
            ref["samples_seen"],
        )
        for key in COMPARED:
            assert row[key] == pytest.approx(ref[key], rel=1e-4, abs=1e-5), (row["step"], key)


def test_ddp_two_processes_match_one(setup):
    root, options, reference = setup
    rows = _torchrun(root, options, "ddp")
    _compare(rows, reference)
    c_rows = [r for r in rows if r["stage"] == "C"]
    # halting happened, and differently on the two ranks (their pass-1 loops still ran in lockstep)
    assert any(r["used"] < r["budget"] for r in c_rows)
    assert any(len(set(r["rank_used_ratio"])) == 2 for r in c_rows), [r["rank_used_ratio"] for r in c_rows]


def test_fsdp2_two_processes_match_one(setup):
    root, options, reference = setup
    eval_data = root / "data" / "val.jsonl"  # 3 records: one process evaluates 2, the other 1 and a dummy
    rows = _torchrun(root, options, "fsdp", distributed="fsdp", save_every=3, eval_data=str(eval_data),
                     calibrate_stop_threshold=True)
    _compare(rows, reference)
    state = json.loads((root / "fsdp" / "checkpoints" / "step-00000005" / "trainer_state.json").read_text())
    assert state["world_size"] == 2 and state["stage"] == "C"
    from latentvl import LatentCollator
    from latentvl.data.records import load_records
    from latentvl.evaluation.calibration import calibrate_threshold
    from latentvl.model.loading import load_latent_model

    model, processor = load_latent_model(root / "fsdp" / "final")  # the gathered weights form a loadable model
    assert model.config.latent_mode_stage == "C"
    # the threshold calibrated by both processes is the one a single process finds on the same weights
    sharded = json.loads((root / "fsdp" / "calibration.json").read_text())
    records, _ = load_records(eval_data)
    single = calibrate_threshold(model, LatentCollator(processor, model.config), records, batch_size=2)
    assert sharded["n"] == single["n"] == len(records) == 3
    for got, ref in zip(sharded["rows"], single["rows"], strict=True):
        assert got["threshold"] == ref["threshold"] and got["accuracy"] == pytest.approx(ref["accuracy"])
        assert got["used_ratio"] == pytest.approx(ref["used_ratio"])
    assert sharded["threshold"] == single["threshold"] == model.config.latent_stop_threshold


# ------------------------------------------------------------- text-only batches on some processes
# Per step (batch 1 per process): which process holds a record with images ("img") or a text-only one
# (no question image, no CoT image). Stage AC, C from step 3; step 4 has no latent anywhere.
MIXED_PLAN = [("img", "txt"), ("txt", "img"), ("img", "txt"), ("txt", "txt")]


@pytest.fixture(scope="module")
def mixed_setup(tmp_path_factory):
    from latentvl.training.data import StreamBatchSampler

    root = tmp_path_factory.mktemp("mixed")
    make_dataset("shapes", 8, 5, root / "data", min_size=56, max_size=84, max_cot=2, val_fraction=0, test_fraction=0)
    rows = [json.loads(line) for line in (root / "data" / "train.jsonl").read_text().splitlines()]
    seed = 3
    samplers = [StreamBatchSampler(len(rows), 1, 1, 2, r, seed) for r in range(2)]
    for step, kinds in enumerate(MIXED_PLAN):
        for rank, kind in enumerate(kinds):
            (i,) = samplers[rank].micro_batch(step * 2, 0)
            if kind == "txt":
                rows[i]["images"], rows[i]["cot_images"] = [], []
    (root / "data" / "mixed.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    options = {
        "train_data": str(root / "data" / "mixed.jsonl"),
        "stage": "AC",
        "switch_step": 2,
        "max_steps": len(MIXED_PLAN),
        "tiny_hidden_size": 64,
        "tiny_num_layers": 2,
        "lr": 2e-3,
        "threshold_start": 0.6,
        "threshold_anneal_steps": 2,
        "progress_bar": False,
        "tensorboard": False,
        "seed": seed,
        "dist_timeout_s": 120,  # a rank that skips a collective fails the test instead of hanging it
        "latent": {"latent_budget_alpha": 1.0, "latent_budget_max": 4},
    }
    single = train(
        TrainConfig.from_dict(
            {**options, "batch_size": 1, "grad_accum": 2, "num_threads": 1, "output_dir": str(root / "single")}
        )
    )
    return root, options, single.history


@pytest.mark.parametrize("engine", ["ddp", "fsdp"])
def test_text_only_batches_on_some_processes(mixed_setup, engine):
    root, options, reference = mixed_setup
    rows = _torchrun(root, options, f"mixed-{engine}", batch_size=1, distributed=engine)
    assert [r["step"] for r in rows] == list(range(1, len(MIXED_PLAN) + 1))
    assert rows[-1]["budget"] == 0 and rows[0]["budget"] > 0  # the plan holds: step 4 has no latent
    for row, ref in zip(rows, reference, strict=True):
        assert (row["used"], row["budget"]) == (ref["used"], ref["budget"])
        for key in ("loss", "ce", "align", "stop", "grad_norm"):
            assert row[key] == pytest.approx(ref[key], rel=1e-4, abs=1e-5), (row["step"], key)


_STALL_SCRIPT = """
import sys, time
import torch.distributed as dist
from latentvl.training.config import TrainConfig
from latentvl.training.distributed import CollectiveTimeoutError
from latentvl.training.trainer import train

class Stall:  # process 1 stops answering before step 2 (as under SIGSTOP)
    def on_step_begin(self, step, model):
        if step == 1 and dist.get_rank() == 1:
            time.sleep(60)

cfg = TrainConfig(train_data=sys.argv[1], output_dir=sys.argv[2], batch_size=1, max_steps=3, tiny_hidden_size=32,
                  tiny_num_layers=1, progress_bar=False, tensorboard=False, run_checks=False, dist_timeout_s=10,
                  latent={"latent_budget_max": 2}).validate()
try:
    train(cfg, callbacks=[Stall()])
except CollectiveTimeoutError as err:
    print(f"rank {dist.get_rank()}: {type(err).__name__}: {err}", flush=True)
    sys.exit(6)
"""


def test_a_stalled_process_fails_the_others_after_dist_timeout_s(mixed_setup):
    root = mixed_setup[0]
    script = root / "stall.py"
    script.write_text(_STALL_SCRIPT)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), str(script), str(root / "data" / "train.jsonl"), str(root / "stall")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=HANG_GUARD_S, env=env)
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert "rank 0: CollectiveTimeoutError: process 0 waited more than dist_timeout_s=10 s" in out, out[-4000:]
    assert "during step 2: forward and backward" in out
