"""An optional integration whose extra is missing skips its tests with the reason; the rest of the suite
still collects. With LATENTVL_REQUIRE_EXTRAS=1 (CI) the missing extra is an error instead."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parents[1]


def _pytest_without_lmms(tmp_path, *args, require=False):
    shim = tmp_path / "shim" / "lmms_eval"
    shim.mkdir(parents=True)
    (shim / "__init__.py").write_text('raise ImportError("lmms_eval is not installed (test shim)")\n')
    env = {k: v for k, v in os.environ.items() if k != "LATENTVL_REQUIRE_EXTRAS"}
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path / "shim"), env.get("PYTHONPATH", "")])
    if require:
        env["LATENTVL_REQUIRE_EXTRAS"] = "1"
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs", *args],
                          cwd=TESTS.parent, env=env, capture_output=True, text=True, timeout=300)


def test_missing_lmms_extra_skips_with_the_reason(tmp_path):
    proc = _pytest_without_lmms(tmp_path, str(TESTS / "integrations" / "test_lmms_eval.py"))
    assert proc.returncode in (0, 5), proc.stdout[-2000:] + proc.stderr[-2000:]  # 5: nothing left to run
    assert "1 skipped" in proc.stdout and "needs lmms_eval: pip install -e '.[lmms]'" in proc.stdout


@pytest.mark.slow
def test_the_whole_suite_collects_without_the_lmms_extra(tmp_path):
    proc = _pytest_without_lmms(tmp_path, "--collect-only", str(TESTS))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "error" not in proc.stdout.lower().splitlines()[-1]


def test_ci_turns_the_skip_into_an_error(tmp_path):
    proc = _pytest_without_lmms(tmp_path, str(TESTS / "integrations" / "test_lmms_eval.py"), require=True)
    assert proc.returncode != 0 and "LATENTVL_REQUIRE_EXTRAS=1" in proc.stdout
