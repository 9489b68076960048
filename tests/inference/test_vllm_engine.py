"""Step 2 in vLLM (``--engine vllm``): greedy answers equal latentvl's ``generate()`` on a stage-C model whose
stop head leaves slots unused, with any latent mask (the causal checks'), and on the command line."""

import copy
import json

import pytest
import torch
from helpers import require_extra, write_random_images

require_extra("vllm", "vllm")  # skips this module, with the reason, without the extra

from latentvl import set_latent_fields  # noqa: E402
from latentvl.cli import main as cli_main  # noqa: E402
from latentvl.evaluation.causal import mask_latents, truncate_latents  # noqa: E402
from latentvl.inference.generate import GenerationSettings, LatentInference, Patches  # noqa: E402
from latentvl.inference.vllm_engine import VLLMInference, build_requests  # noqa: E402
from latentvl.model.loading import load_latent_model, save_latent_checkpoint  # noqa: E402

SIZES = [(84, 84), (112, 56), (140, 112), (56, 140), (98, 98), (126, 70), (70, 126), (84, 112)]
QUESTIONS = ["Which way?", "What colour is the largest shape?", "Count.", "Go", "Is it red? Say yes.", "?",
             "Left or right?", "How many?"]
MAX_NEW = 10
TINY_SEED = 5
TINY_BACKBONES = ("qwen2_5_vl",)  # the vLLM engine runs Qwen2.5-VL; a Qwen3-VL model is refused (test below)
TINY_LATENT = {"latent_budget_alpha": 0.8}  # budgets of 3-4 for these image sizes


@pytest.fixture(scope="module")
def checkpoint(tiny, tmp_path_factory):
    """A stage-C checkpoint whose greedy answers depend on the input and whose stop head halts some segments
    before their budget; loaded back as the model step 1 runs on."""
    model, processor = copy.deepcopy(tiny[0]), tiny[1]
    with torch.no_grad():
        for name, w in model.model.language_model.named_parameters():
            if w.dim() == 2 and "embed" not in name:
                w.mul_(5.0)
        model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
        model.lm_head.weight[model.config.text_config.eos_token_id] *= 2.0
        head = model.latent_stop_head
        head.weight.copy_(torch.randn(head.weight.shape, generator=torch.Generator().manual_seed(0)) * 0.3)
        head.bias.zero_()
    set_latent_fields(model.config, latent_mode_stage="C", latent_stop_loss_weight=1.0, latent_cost_weight=1e-3)
    path = tmp_path_factory.mktemp("ckpt") / "stage_c"
    save_latent_checkpoint(model, processor, path)
    loaded, processor = load_latent_model(path)
    return path, loaded.eval(), processor


@pytest.fixture(scope="module")
def samples(tmp_path_factory):
    paths = write_random_images(tmp_path_factory.mktemp("imgs"), SIZES)
    return [{"id": f"s{i}", "question": q, "images": [paths[i]],
             "cot_images": [paths[(i + k + 1) % len(paths)] for k in range(1 + i % 3)], "answer": "yes"}
            for i, q in enumerate(QUESTIONS)]


@pytest.fixture(scope="module")
def engines(checkpoint):
    path, model, processor = checkpoint
    hf = LatentInference(model, processor)
    vl = VLLMInference(model, processor, path, max_model_len=1024)
    return hf, vl


def test_greedy_answers_equal_hf(engines, samples):
    hf, vl = engines
    want = hf.run(samples, batch_size=len(samples), max_new_tokens=MAX_NEW)
    got = vl.run(samples, batch_size=3, max_new_tokens=MAX_NEW)
    assert all(r.ok for r in want + got), [r.error for r in want + got]
    assert any(u < b for r in want for u, b in zip(r.used_lens, r.budgets))  # some slots go unused
    assert any(r.finished for r in want) and not all(r.finished for r in want)
    for w, g in zip(want, got):
        assert (g.id, g.token_ids, g.answer, g.finished) == (w.id, w.token_ids, w.answer, w.finished)
        assert (g.budgets, g.used_lens) == (w.budgets, w.used_lens)


def test_fixed_length_answers_equal_hf(engines, samples):
    """min_new_tokens (the serving benchmark's fixed lengths) holds the end of turn back in both engines alike."""
    hf, vl = engines
    want = hf.run(samples, batch_size=len(samples), max_new_tokens=MAX_NEW, min_new_tokens=MAX_NEW)
    got = vl.run(samples, batch_size=len(samples), max_new_tokens=MAX_NEW, min_new_tokens=MAX_NEW)
    assert [g.token_ids for g in got] == [w.token_ids for w in want]
    assert all(len(w.token_ids) == MAX_NEW and not w.finished for w in want)


def test_any_latent_mask_and_vectors_equal_hf(engines, samples):
    """The causal checks' patches: every slot gated out (a segment keeps only <|latent_start|>), only the
    first segment kept, and other vectors in the slots."""
    hf, vl = engines
    gen = GenerationSettings(max_new_tokens=MAX_NEW)
    [(outcome, _)] = list(hf.iter_batches(samples[:6], gen, batch_size=6))
    batch, p1 = outcome.batch, outcome.latent
    patches = Patches.from_pass(p1)
    noisy = Patches(patches.ce_patch_pos, patches.ce_patch_vec.flip(0), patches.latent_kv_mask)
    for variant in (mask_latents(patches, batch["input_ids"], hf.latent_token_id),
                    truncate_latents(patches, batch["input_ids"], batch["latent_segments"], 1), noisy):
        want = hf.decode(hf.generate(batch, outcome.embeds, variant, gen))
        got = vl.decode(vl.generate(batch, outcome.embeds, variant, gen))
        assert got == want


def test_bad_samples_are_named_and_the_batch_still_answers(engines, samples, tmp_path):
    """A prompt longer than vLLM takes and an unreadable image fail alone, each naming its sample; the rest of
    the batch gets hf's answers."""
    hf, vl = engines
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    bad = [{**samples[0], "id": "too_long", "question": "x" * (vl.max_length + 10)},
           {**samples[1], "id": "bad_image", "images": [broken]}]
    mixed = [samples[0], bad[0], samples[1], bad[1], samples[2]]
    got = vl.run(mixed, batch_size=len(mixed), max_new_tokens=MAX_NEW)
    want = hf.run([samples[0], samples[1], samples[2]], batch_size=3, max_new_tokens=MAX_NEW)
    assert [r.id for r in got] == [m["id"] for m in mixed]
    assert got[1].error_kind == "too_long" and "'too_long'" in got[1].error and "1024" in got[1].error
    assert not got[3].ok and "'bad_image'" in got[3].error
    assert [g.token_ids for g in (got[0], got[2], got[4])] == [w.token_ids for w in want]


def test_sampled_answers_repeat_with_a_seed(engines, samples):
    hf, vl = engines
    kw = dict(batch_size=4, max_new_tokens=MAX_NEW, do_sample=True, temperature=1.5, seed=3)
    first, again = vl.run(samples, **kw), vl.run(samples, **kw)
    greedy = vl.run(samples, batch_size=4, max_new_tokens=MAX_NEW)
    assert all(r.ok for r in first) and [r.token_ids for r in first] == [r.token_ids for r in again]
    assert [r.token_ids for r in first] != [r.token_ids for r in greedy]


def test_prompt_drops_unused_slots(engines, samples):
    hf, vl = engines
    gen = GenerationSettings(max_new_tokens=2)
    [(outcome, _)] = list(hf.iter_batches(samples[:6], gen, batch_size=6))
    requests = build_requests(outcome.batch, outcome.embeds, Patches.from_pass(outcome.latent), vl.image_token_id,
                              vl.latent_token_id, vl.spatial_merge_size)
    for b, (req, res) in enumerate(zip(requests, outcome.results)):
        n_real = int(outcome.batch["attention_mask"][b].sum())
        n_image = int((outcome.batch["input_ids"][b] == vl.image_token_id).sum())
        # the image run and each segment (with its <|latent_start|>) become one placeholder each
        assert len(req["prompt_token_ids"]) == n_real - n_image + 1 - sum(res.budgets)
        assert req["multi_modal_data"]["image"]["latent_skip"].tolist() == \
            [-1] + [b_ - u for b_, u in zip(res.budgets, res.used_lens)]


def test_soft_suppression_is_refused(checkpoint):
    path, model, processor = checkpoint
    soft = copy.deepcopy(model)
    set_latent_fields(soft.config, latent_null_scale=0.3)
    with pytest.raises(ValueError, match="latent_null_scale=0.3"):
        VLLMInference(soft, processor, path)


def test_cli_infer_engine_vllm(checkpoint, samples, tmp_path):
    path = checkpoint[0]
    data = tmp_path / "records.jsonl"
    data.write_text("".join(json.dumps({**s, "images": [str(p) for p in s["images"]],
                                        "cot_images": [str(p) for p in s["cot_images"]]}) + "\n"
                            for s in samples[:4]))
    rows = {}
    for engine in ("hf", "vllm"):
        out = tmp_path / f"{engine}.jsonl"
        assert cli_main(["infer", "--model", str(path), "--data", str(data), "--out", str(out), "--engine", engine,
                         "--max-new-tokens", str(MAX_NEW), "--batch-size", "4"]) == 0
        rows[engine] = [json.loads(line) for line in out.read_text().splitlines()]
    key = ("id", "answer", "token_ids", "used_lens", "budgets", "finished")
    assert [[r[k] for k in key] for r in rows["vllm"]] == [[r[k] for k in key] for r in rows["hf"]]


def test_cli_eval_engine_vllm(checkpoint, samples, tmp_path):
    """``latentvl eval --engine vllm``: the same predictions and causal checks as ``--engine hf``."""
    path = checkpoint[0]
    data = tmp_path / "records.jsonl"
    data.write_text("".join(json.dumps({**s, "images": [str(p) for p in s["images"]],
                                        "cot_images": [str(p) for p in s["cot_images"]]}) + "\n"
                            for s in samples[:4]))
    reports = {}
    for engine in ("hf", "vllm"):
        out = tmp_path / f"eval-{engine}"
        assert cli_main(["eval", "--model", str(path), "--data", str(data), "--out", str(out), "--engine", engine,
                         "--batch-size", "4"]) == 0
        reports[engine] = json.loads((out / "report.json").read_text())
        reports[engine]["rows"] = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    key = ("id", "prediction", "token_ids", "used_lens", "correct")
    hf, vl = reports["hf"], reports["vllm"]
    assert [[r[k] for k in key] for r in vl["rows"]] == [[r[k] for k in key] for r in hf["rows"]]
    for check in hf["causal"]:
        if isinstance(hf["causal"][check], dict) and "answer_change_rate" in hf["causal"][check]:
            assert vl["causal"][check]["answer_change_rate"] == hf["causal"][check]["answer_change_rate"], check


def test_a_deepstack_backbone_is_refused_before_vllm_starts():
    from latentvl import build_tiny_model

    model, processor = build_tiny_model(backbone="qwen3_vl", hidden_size=64, num_layers=2)
    with pytest.raises(ValueError, match="--engine vllm runs Qwen2.5-VL models; this one is 'qwen3_vl'"):
        VLLMInference(model, processor, "unused")
