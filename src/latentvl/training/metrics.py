"""Where training progress goes: a JSONL log, TensorBoard scalars and a tqdm progress bar.

Only the main process writes. Every record is one JSON object per line in ``metrics.jsonl``:
``{"kind": "train", "step": 12, "stage": "C", "loss": ..., "ce": ..., "align": ..., "stop": ...,
"cost": ..., "used": ..., "budget": ..., "used_ratio": ..., "threshold": ..., "lr": ...,
"grad_norm": ..., "step_time": ..., "samples_seen": ...}``; evaluations have ``"kind": "eval"``.
A resumed run first drops the lines of steps after its checkpoint, so the log reads like one run.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from ..model.objective import LOSS_PARTS

METRICS_FILE = "metrics.jsonl"
TB_DIR = "tensorboard"
SCALARS = (*LOSS_PARTS, "used_ratio", "threshold", "lr", "grad_norm", "step_time")


def read_metrics(path: str | Path, kind: str | None = None) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl`` file (optionally only one ``kind``)."""
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_FILE
    if not path.is_file():
        return []
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [r for r in rows if kind is None or r.get("kind") == kind]


def _truncate_after(path: Path, step: int) -> None:
    rows = read_metrics(path)
    kept = [r for r in rows if int(r.get("step", 0)) <= step]
    if len(kept) == len(rows):
        return
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")
    os.replace(tmp, path)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return f"{value:.3g}" if abs(value) < 1e-2 or abs(value) >= 1e3 else f"{value:.3f}"
    return str(value)


class MetricsWriter:
    """JSONL + TensorBoard + progress bar; a no-op on processes other than the main one."""

    def __init__(
        self,
        output_dir: str | Path,
        *,
        enabled: bool,
        total_steps: int,
        start_step: int = 0,
        tensorboard: bool = True,
        progress_bar: bool = True,
    ):
        self.enabled = enabled
        self.path = Path(output_dir) / METRICS_FILE
        self.tb = None
        self.bar = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if start_step > 0 and self.path.is_file():
            _truncate_after(self.path, start_step)
        elif start_step == 0 and self.path.is_file():
            self.path.unlink()  # a fresh run in an old output directory starts a fresh log
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(Path(output_dir) / TB_DIR), purge_step=start_step or None)
            except ImportError:  # tensorboard not installed: JSONL and the bar still work
                self.tb = None
        if progress_bar:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, desc="train", dynamic_ncols=True)

    def _write(self, record: dict[str, Any]) -> None:
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def log_train(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self._write({"kind": "train", **record})
        step = int(record["step"])
        if self.tb is not None:
            for key in SCALARS:
                value = record.get(key)
                if isinstance(value, (int, float)) and value is not None and math.isfinite(value):
                    self.tb.add_scalar(f"train/{key}", value, step)
        if self.bar is not None:
            post = {"stage": record.get("stage")}
            for key in LOSS_PARTS:
                if key not in ("ce_full", "align_full") or record.get(key):  # shown where stage C trains it
                    post[key] = _fmt(record.get(key))
            if record.get("budget"):
                post["used/budget"] = _fmt(record.get("used_ratio"))
            if record.get("threshold") is not None:
                post["thr"] = _fmt(record["threshold"])
            post["s/step"] = _fmt(record.get("step_time"))
            self.bar.set_postfix(post, refresh=False)
            self.bar.update(step - self.bar.n)

    def log_eval(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self._write({"kind": "eval", **record})
        if self.tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                    self.tb.add_scalar(f"eval/{key}", value, int(record["step"]))
        self.message(" ".join(f"{k}={_fmt(v)}" for k, v in record.items()))

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.flush()
            self.tb.close()
            self.tb = None
        if self.bar is not None:
            self.bar.close()
            self.bar = None
