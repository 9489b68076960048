"""latentvl as an lmms-eval model: entry point, requests, exact loglikelihood, and the command line."""

import importlib.util
import json
import os
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest
import torch
from helpers import require_extra, talking_tiny_model
from hypothesis import given
from hypothesis import strategies as st

require_extra("lmms_eval", "lmms")  # skips this module, with the reason, without the extra

from lmms_eval.api.instance import Instance, unwrap_generation_output  # noqa: E402

import latentvl  # noqa: E402
from latentvl import set_latent_fields  # noqa: E402
from latentvl.cli import main as cli_main  # noqa: E402
from latentvl.data.records import load_records  # noqa: E402
from latentvl.data.tasks.writer import make_dataset  # noqa: E402
from latentvl.images import open_rgb  # noqa: E402
from latentvl.inference.generate import GenerationSettings, LatentInference, Patches  # noqa: E402
from latentvl.integrations import lmms_task  # noqa: E402
from latentvl.integrations.lmms_eval import (  # noqa: E402
    LatentVLChat,
    LatentVLSimple,
    LoglikelihoodResult,
    parse_budgets,
    parse_sizes,
)
from latentvl.model.loading import save_latent_checkpoint  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

TASK, SPLIT = "toy", "test"
THRESHOLD = 0.4


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A stage-C tiny checkpoint whose answers depend on the input and whose stop head halts some segments."""
    model, processor = talking_tiny_model()
    set_latent_fields(model.config, latent_budget_alpha=0.8, latent_mode_stage="C",
                      latent_stop_loss_weight=1.0, latent_cost_weight=1e-3)
    path = tmp_path_factory.mktemp("lmms") / "ckpt"
    save_latent_checkpoint(model, processor, path)
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("maze")
    make_dataset("maze", 12, 3, out, val_fraction=0.0, test_fraction=0.5, max_size=140)
    return out


@pytest.fixture(scope="module")
def lm(ckpt):
    model = LatentVLChat(pretrained=str(ckpt), batch_size=3, threshold=THRESHOLD)
    return model


def _docs(data):
    records, _ = load_records(data / "test.jsonl")
    return lmms_task.task_rows(records)


def _chat_request(doc_id, gen_kwargs):
    def to_messages(doc):
        content = [{"type": "image", "url": im} for im in lmms_task.doc_to_visual(doc)]
        return [{"role": "user", "content": [*content, {"type": "text", "text": lmms_task.doc_to_text(doc)}]}]

    return Instance("generate_until", ("", to_messages, gen_kwargs, doc_id, TASK, SPLIT), 0,
                    metadata={"task": TASK, "doc_id": doc_id, "repeats": 1})


def _simple_request(doc, doc_id, gen_kwargs):
    return Instance("generate_until", (lmms_task.doc_to_text(doc), gen_kwargs, lmms_task.doc_to_visual, doc_id,
                                       TASK, SPLIT), 0, metadata={"task": TASK, "doc_id": doc_id, "repeats": 1})


def _ll_request(doc, doc_id, continuation):
    return Instance("loglikelihood", (lmms_task.doc_to_text(doc), continuation, lmms_task.doc_to_visual, doc_id,
                                      TASK, SPLIT), 0, metadata={"task": TASK, "doc_id": doc_id, "repeats": 1})


def _reference_answers(lm, docs, max_new_tokens):
    """latentvl's own inference on the documents (their images, their planned CoT sizes) with ``lm``'s model."""
    samples = [{"id": d["id"], "question": d["question"], "images": [open_rgb(p) for p in d["images"]],
                "cot_image_sizes": d["cot_image_sizes"]} for d in docs]
    return LatentInference(lm.model, lm.processor, threshold=THRESHOLD).run(samples, batch_size=3,
                                                                            max_new_tokens=max_new_tokens)


# ------------------------------------------------------------------------------ registration and arguments
def test_entry_point_registers_both_classes():
    import lmms_eval.models as registry

    [ep] = [ep for ep in entry_points(group="lmms_eval.models") if ep.name == "latentvl"]
    assert ep.value == "latentvl.integrations:lmms_eval_manifest"
    assert registry.get_model("latentvl") is LatentVLChat
    assert registry.get_model("latentvl", force_simple=True) is LatentVLSimple
    assert not LatentVLChat.is_simple and LatentVLSimple.is_simple


def test_list_arguments_parse_and_bad_ones_are_named():
    assert parse_budgets("4:2") == [4, 2] and parse_budgets(3) == [3] and parse_budgets("none") == []
    assert parse_budgets(None) is None and parse_budgets("") == []
    assert parse_sizes("84x84:168X112") == [(84, 84), (168, 112)]
    for bad in ("4,4", "0", "a:b", True):
        with pytest.raises(ValueError, match="budgets"):
            parse_budgets(bad)
    for bad in ("84", "0x5", "axb"):
        with pytest.raises(ValueError, match="cot_image_sizes"):
            parse_sizes(bad)


@given(st.lists(st.integers(1, 10_000), min_size=1, max_size=8),
       st.lists(st.tuples(st.integers(1, 5000), st.integers(1, 5000)), min_size=1, max_size=8))
def test_list_arguments_round_trip(budgets, sizes):
    assert parse_budgets(":".join(map(str, budgets))) == budgets
    assert parse_sizes(":".join(f"{w}x{h}" for w, h in sizes)) == sizes


def test_loglikelihood_result_is_a_pair_that_lmms_eval_keeps():
    res = LoglikelihoodResult(1.5, True)
    nll, greedy = res
    assert (nll, greedy) == (1.5, True) and res[0] == 1.5 and len(res) == 2
    # lmms-eval 0.7.3 stores unwrap_generation_output(x)[0] as the response; a plain tuple becomes a string
    assert unwrap_generation_output(res)[0] == (1.5, True)
    assert isinstance(unwrap_generation_output((1.5, True))[0], str)


def test_bad_model_arguments_raise_before_loading(tmp_path):
    with pytest.raises(ValueError, match="pretrained"):
        LatentVLChat()
    with pytest.raises(TypeError, match="unknown model arguments.*'beams'"):
        LatentVLChat(pretrained=str(tmp_path), beams=2)
    with pytest.raises(ValueError, match="not both"):
        LatentVLChat(pretrained=str(tmp_path), budgets="4", cot_image_sizes="84x84")
    with pytest.raises(ValueError, match="batch_size"):
        LatentVLChat(pretrained=str(tmp_path), batch_size=0)
    with pytest.raises(ValueError, match="engine='trt'; choose hf or vllm"):
        LatentVLChat(pretrained=str(tmp_path), engine="trt")
    for bad in ("high", 1.5):
        with pytest.raises(ValueError, match="threshold"):
            LatentVLChat(pretrained=str(tmp_path), threshold=bad)
    with pytest.raises(FileNotFoundError, match="config.json"):
        LatentVLChat(pretrained=str(tmp_path))


def test_data_parallel_launch_is_refused_with_a_reason(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RuntimeError, match="WORLD_SIZE=2.*one process"):
        LatentVLChat(pretrained=str(tmp_path))


def test_segment_plan_model_arguments_win_then_the_document(ckpt):
    doc = {"cot_image_sizes": [[84, 84], [112, 112]], "latent_budgets": None}
    lm = LatentVLSimple(pretrained=str(ckpt))
    assert lm._plan(doc) == {"cot_image_sizes": [[84, 84], [112, 112]]}
    assert lm._plan({"latent_budgets": [2], "cot_image_sizes": [[84, 84]]}) == {"latent_budgets": [2]}
    assert lm._plan({"question": "q"}) == {}  # default: num_segments segments
    lm.budgets = [5, 5]
    assert lm._plan(doc) == {"latent_budgets": [5, 5]}
    lm.budgets, lm.cot_image_sizes = None, [(56, 56)]
    assert lm._plan(doc) == {"cot_image_sizes": [(56, 56)]}
    lm.cot_image_sizes, lm.doc_plan = None, False
    assert lm._plan(doc) == {}


# ------------------------------------------------------------------------------ generate_until
def test_generate_until_equals_latent_inference_in_both_request_forms(lm, ckpt, data):
    docs = _docs(data)
    lm.task_dict = {TASK: {SPLIT: docs}}
    greedy = {"max_new_tokens": 4, "temperature": 0, "do_sample": False}
    chat = lm.generate_until([_chat_request(i, dict(greedy)) for i in range(len(docs))])
    ref = _reference_answers(lm, docs, 4)
    assert [r.error for r in ref] == [None] * len(docs)
    assert chat == [r.answer for r in ref]
    assert len(set(chat)) > 1  # answers depend on the input
    assert any(r.used_lens != r.budgets for r in ref)  # the stop head halted some segments

    simple = LatentVLSimple(pretrained=str(ckpt), batch_size=2, threshold=THRESHOLD)
    simple.task_dict = lm.task_dict
    # two decoding settings interleaved: grouped, run, and put back in request order; `until` cuts answers
    ref3 = _reference_answers(lm, docs, 3)
    cut = [r.answer[-1:] for r in ref3]
    assert any(cut)
    reqs = [_simple_request(d, i, dict(greedy) if i % 2 else {"max_new_tokens": 3, "until": [cut[i]]})
            for i, d in enumerate(docs)]
    out = simple.generate_until(reqs)
    assert out == [r.answer if i % 2 else ref3[i].answer.split(cut[i], 1)[0] if cut[i] else ""
                   for i, r in enumerate(ref)]


def test_a_qwen3_vl_checkpoint_answers_as_latent_inference(data, tmp_path):
    model, processor = talking_tiny_model(backbone="qwen3_vl")
    set_latent_fields(model.config, latent_budget_alpha=0.8, latent_mode_stage="C",
                      latent_stop_loss_weight=1.0, latent_cost_weight=1e-3)
    save_latent_checkpoint(model, processor, tmp_path / "q3")
    lm3 = LatentVLChat(pretrained=str(tmp_path / "q3"), batch_size=3, threshold=THRESHOLD)
    assert lm3.model.backbone == "qwen3_vl"
    docs = _docs(data)
    lm3.task_dict = {TASK: {SPLIT: docs}}
    greedy = {"max_new_tokens": 4, "temperature": 0, "do_sample": False}
    got = lm3.generate_until([_chat_request(i, dict(greedy)) for i in range(len(docs))])
    ref = _reference_answers(lm3, docs, 4)
    assert got == [r.answer for r in ref] and all(r.ok for r in ref)


def test_generate_until_failed_sample_is_empty_and_named(lm, data):
    docs = _docs(data)[:2]
    lm.task_dict = {TASK: {SPLIT: docs}}
    missing = str(data / "missing.png")  # an image path (lmms-eval passes paths through) that does not exist
    bad = Instance("generate_until", ("", lambda doc: [{"role": "user", "content": [
        {"type": "image", "url": missing}, {"type": "text", "text": "q"}]}], {"max_new_tokens": 2}, 1, TASK, SPLIT),
        0, metadata={"task": TASK, "doc_id": 1, "repeats": 1})
    with pytest.warns(UserWarning, match=rf"{TASK}/{SPLIT}/1 failed \(missing_image\)"):
        out = lm.generate_until([_chat_request(0, {"max_new_tokens": 2}), bad])
    assert out[0] != "" and out[1] == ""
    with pytest.raises(ValueError, match="beam search"):
        lm.generate_until([_chat_request(0, {"num_beams": 2})])


# ------------------------------------------------------------------------------ loglikelihood
def _reference_scores(lm, docs, steps):
    """Per sample: the greedy tokens of generate() and the log-softmax of its logits at every step."""
    engine = LatentInference(lm.model, lm.processor, threshold=THRESHOLD)
    samples = [{"id": d["id"], "question": d["question"], "images": [open_rgb(p) for p in d["images"]],
                "cot_image_sizes": d["cot_image_sizes"]} for d in docs]
    prepared = [engine.prepare(s, i, steps) for i, s in enumerate(samples)]
    batch = engine.collate(prepared)
    embeds = engine.encode(batch)
    patches = Patches.from_pass(engine.latent_pass(batch, embeds))
    gen = GenerationSettings(max_new_tokens=steps).generation_config(engine.pad_id, engine.stop_ids)
    with torch.no_grad():
        out = lm.model.generate(
            input_ids=batch["input_ids"], inputs_embeds=embeds, attention_mask=batch["attention_mask"],
            image_grid_thw=batch["image_grid_thw"], mm_token_type_ids=batch["mm_token_type_ids"],
            generation_config=gen, output_logits=True, return_dict_in_generate=True, **patches.kwargs())
    logp = torch.log_softmax(torch.stack(out.logits, dim=1).float(), dim=-1)  # [B, T, V]
    return out.sequences[:, batch["input_ids"].shape[1]:], logp, patches


def test_loglikelihood_is_exact_against_generate(lm, data):
    docs = _docs(data)[:3]
    lm.task_dict = {TASK: {SPLIT: docs}}
    steps = 3
    tokens, logp, patches = _reference_scores(lm, docs, steps)
    assert patches.latent_kv_mask is not None and not bool(patches.latent_kv_mask.all())  # halted slots masked
    tok = lm.processor.tokenizer
    reqs, expected = [], []
    for b, doc in enumerate(docs):
        n = 1 + b % steps  # continuations of different lengths in one batch
        greedy = tokens[b, :n].tolist()
        other = greedy[:-1] + [int(logp[b, n - 1].argsort()[-2])]  # runner-up at the last step
        for cont, is_greedy in ((greedy, True), (other, False)):
            text = tok.decode(cont)
            assert tok(text, add_special_tokens=False).input_ids == cont  # the text tokenizes back
            ref = sum(float(logp[b, t, c]) for t, c in enumerate(cont))
            reqs.append(_ll_request(doc, b, text))
            expected.append((ref, is_greedy))
    got = lm.loglikelihood(reqs)
    for (nll, greedy), (ref, ref_greedy) in zip(got, expected, strict=True):
        assert greedy == ref_greedy
        assert -nll == pytest.approx(ref, abs=1e-4)


def test_loglikelihood_takes_a_target_function_and_rejects_bad_samples(lm, data):
    docs = _docs(data)[:1]
    lm.task_dict = {TASK: {SPLIT: docs}}
    [(a, _)] = lm.loglikelihood([_ll_request(docs[0], 0, "D")])
    [(b, _)] = lm.loglikelihood([_ll_request(docs[0], 0, lambda doc: "D")])
    assert a == b and a > 0  # a negative log-likelihood
    missing = Instance("loglikelihood", ("q", "D", lambda doc: [str(data / "missing.png")], 0, TASK, SPLIT), 0,
                       metadata={"task": TASK, "doc_id": 0, "repeats": 1})
    with pytest.raises(ValueError, match=rf"loglikelihood request {TASK}/{SPLIT}/0: .*does not exist"):
        lm.loglikelihood([missing])


# ------------------------------------------------------------------------------ the task writer
def test_lmms_task_writes_yaml_and_rows(data, tmp_path, capsys):
    out = tmp_path / "task"
    assert cli_main(["lmms-task", "--data", str(data / "test.jsonl"), "--out", str(out), "--task", "maze_t"]) == 0
    assert "--include_path" in capsys.readouterr().out
    rows = [json.loads(x) for x in (out / "maze_t.jsonl").read_text().splitlines()]
    records, _ = load_records(data / "test.jsonl")
    assert [r["id"] for r in rows] == [r.id for r in records]
    assert all(Path(p).is_absolute() and Path(p).is_file() for r in rows for p in r["images"])
    assert [len(r["cot_image_sizes"]) for r in rows] == [len(r.cot_images) for r in records]
    text = (out / "maze_t.yaml").read_text()
    assert "task: maze_t" in text and "test: maze_t.jsonl" in text
    assert cli_main(["lmms-task", "--data", str(data / "test.jsonl"), "--out", str(out), "--task", "maze_t"]) == 2
    assert "already holds" in capsys.readouterr().err
    assert cli_main(["lmms-task", "--data", str(data / "test.jsonl"), "--out", str(out), "--task", "../x"]) == 2
    assert cli_main(["lmms-task", "--data", str(data / "test.jsonl"), "--out", str(out), "--choices", "U,D"]) == 2
    assert "is not one of the choices" in capsys.readouterr().err
    assert lmms_task.process_results({"answer": "Left."}, [" left "]) == {"exact_match": 1.0}
    assert lmms_task.process_results({"answer": "L"}, ["R"]) == {"exact_match": 0.0}


# ------------------------------------------------------------------------------ the lmms-eval command line
@pytest.mark.slow
def test_lmms_eval_command_line_matches_latentvl_eval(ckpt, data, tmp_path):
    """`lmms-eval eval --model latentvl` on a local task made from the records gives `latentvl eval`'s
    answers and accuracy (greedy, same threshold, same batches)."""
    # golds: half of them are the model's own greedy answers, so the accuracy is neither 0 nor 1
    records, _ = load_records(data / "test.jsonl")
    lm = LatentVLSimple(pretrained=str(ckpt), threshold=THRESHOLD)
    answers = [r.answer for r in LatentInference(lm.model, lm.processor, threshold=THRESHOLD).run(
        records, batch_size=3, max_new_tokens=4)]
    relabelled = tmp_path / "test.jsonl"
    rows = [json.loads(x) for x in (data / "test.jsonl").read_text().splitlines()]
    for i, row in enumerate(rows):
        row["images"] = [str(data / p) for p in row["images"]]
        row["cot_images"] = [str(data / p) for p in row["cot_images"]]
        if i % 2 == 0:
            row["answer"] = answers[i]
    relabelled.write_text("".join(json.dumps(r) + "\n" for r in rows))

    assert cli_main(["eval", "--model", str(ckpt), "--data", str(relabelled), "--out", str(tmp_path / "eval"),
                     "--batch-size", "3", "--max-new-tokens", "4", "--threshold", str(THRESHOLD), "--no-causal",
                     "--chance", "0.25"]) == 0
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    predictions = [json.loads(x) for x in (tmp_path / "eval" / "predictions.jsonl").read_text().splitlines()]
    assert 0 < report["accuracy"] < 1 and report["n_errors"] == 0

    assert cli_main(["lmms-task", "--data", str(relabelled), "--out", str(tmp_path / "task"), "--task", "latentvl_toy",
                     "--max-new-tokens", "4"]) == 0
    out_dir = _lmms_eval(tmp_path, ["--model_args", f"pretrained={ckpt},threshold={THRESHOLD},dtype=float32",
                                    "--tasks", "latentvl_toy", "--include_path", str(tmp_path / "task"),
                                    "--batch_size", "3"])
    [results] = list(out_dir.rglob("*_results.json"))
    [samples] = list(out_dir.rglob("*_samples_latentvl_toy.jsonl"))
    lmms_acc = json.loads(results.read_text())["results"]["latentvl_toy"]["exact_match,none"]
    logged = sorted((json.loads(x) for x in samples.read_text().splitlines()), key=lambda s: s["doc_id"])
    assert [s["filtered_resps"] for s in logged] == [p["prediction"] for p in predictions]
    assert lmms_acc == pytest.approx(report["accuracy"])


def _lmms_eval(tmp_path, args):
    """Run the `lmms-eval eval --model latentvl` command line offline; return its output directory."""
    # `python -m lmms_eval` is the `lmms-eval` console script's dispatcher, run by this interpreter (so it
    # works in an environment that sees lmms-eval through another one's site-packages, as CI's high end does)
    assert importlib.util.find_spec("lmms_eval") is not None, "lmms-eval is missing: install it (docs/lmms-eval.md)"
    src = str(Path(latentvl.__file__).resolve().parents[1])
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"),
           "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    out_dir = tmp_path / "lmms"
    proc = subprocess.run([sys.executable, "-m", "lmms_eval", "eval", "--model", "latentvl", *args,
                           "--output_path", str(out_dir), "--log_samples", "--verbosity", "WARNING"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out_dir


@pytest.mark.slow
def test_lmms_eval_multiple_choice_scores_by_latent_loglikelihood(ckpt, data, tmp_path):
    """A multiple_choice task (`latentvl lmms-task --choices`, `--force_simple`): lmms-eval picks, for every
    record, the choice with the lowest negative log-likelihood that the model computes in process."""
    choices = ["U", "D", "L", "R"]
    assert cli_main(["lmms-task", "--data", str(data / "test.jsonl"), "--out", str(tmp_path / "task"),
                     "--task", "latentvl_mc", "--choices", ",".join(choices)]) == 0
    docs = [json.loads(x) for x in (tmp_path / "task" / "latentvl_mc.jsonl").read_text().splitlines()]
    lm = LatentVLSimple(pretrained=str(ckpt), batch_size=4)
    lm.task_dict = {TASK: {SPLIT: docs}}
    nll = [n for n, _ in lm.loglikelihood([_ll_request(d, i, c) for i, d in enumerate(docs) for c in choices])]
    picks = [min(range(4), key=lambda k, i=i: nll[4 * i + k]) for i in range(len(docs))]
    expected_acc = sum(choices[p] == d["answer"] for p, d in zip(picks, docs)) / len(docs)

    out_dir = _lmms_eval(tmp_path, ["--force_simple", "--model_args", f"pretrained={ckpt}", "--tasks", "latentvl_mc",
                                    "--include_path", str(tmp_path / "task"), "--batch_size", "4"])
    [results] = list(out_dir.rglob("*_results.json"))
    [samples] = list(out_dir.rglob("*_samples_latentvl_mc.jsonl"))
    logged = sorted((json.loads(x) for x in samples.read_text().splitlines()), key=lambda s: s["doc_id"])
    got = [float(r[0]) for s in logged for r in s["filtered_resps"]]
    assert got == pytest.approx(nll, abs=1e-4)
    assert json.loads(results.read_text())["results"]["latentvl_mc"]["acc,none"] == pytest.approx(expected_acc)
