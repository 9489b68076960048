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


def test_engine_vllm_without_vllm_is_one_clear_error(tmp_path, monkeypatch, capsys):
    """Without vLLM, ``--engine vllm`` fails with one line that names the extra; latentvl imports without it."""
    import latentvl.inference.vllm_engine as vllm_engine
    from latentvl.cli import main as cli_main
    from latentvl.model.loading import save_latent_checkpoint
    from latentvl.model.tiny import build_tiny_model

    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm raises ImportError
    with pytest.raises(ImportError, match=r"pip install -e '\.\[vllm\]'"):
        vllm_engine.import_vllm()
    model, processor = build_tiny_model()
    save_latent_checkpoint(model, processor, tmp_path / "ckpt")
    code = cli_main(["infer", "--model", str(tmp_path / "ckpt"), "--question", "Which way?", "--engine", "vllm"])
    err = capsys.readouterr().err
    assert code == 2 and "infer: error: --engine vllm needs vLLM: pip install -e '.[vllm]'" in err


def test_engine_vllm_refuses_soft_suppression():
    from latentvl import set_latent_fields
    from latentvl.inference.vllm_engine import VLLMInference
    from latentvl.model.tiny import build_tiny_model

    model, processor = build_tiny_model()
    set_latent_fields(model.config, latent_null_scale=0.3)
    with pytest.raises(ValueError, match=r"latent_null_scale=0.3 .*--engine hf"):
        VLLMInference(model, processor, "unused")
