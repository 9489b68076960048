"""Evaluation (``latentvl eval``) and the causal checks on the latent thoughts."""

import dataclasses
import json

import pytest
import torch
from PIL import Image

from latentvl import build_tiny_model, set_latent_fields
from latentvl.cli import main as cli_main
from latentvl.data.records import load_metadata, load_records
from latentvl.data.tasks.writer import make_dataset
from latentvl.evaluation.causal import DonorPool, effective_rank, mask_latents, noise_latents, swap_latents
from latentvl.evaluation.generated import chance_from_metadata
from latentvl.inference.generate import LatentInference, Patches, normalize_answer
from latentvl.model.loading import save_latent_checkpoint
from latentvl.reports.evaluation import evaluate

REPORT_KEYS = {
    "n_samples", "n_evaluated", "n_errors", "n_correct", "accuracy", "accuracy_errors_as_wrong",
    "chance_accuracy", "latents", "accuracy_by_latents_used", "timing", "errors", "use_latents", "stage",
    "threshold", "batch_size", "max_new_tokens", "causal", "alignment", "files",
}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model_c():
    """A stage-C tiny model whose answers depend on its input and whose stop head halts some segments."""
    model, processor = build_tiny_model(seed=5)
    set_latent_fields(model.config, latent_budget_alpha=0.8, latent_mode_stage="C",
                      latent_stop_loss_weight=1.0, latent_cost_weight=1e-3)
    head = model.latent_stop_head
    with torch.no_grad():
        for name, w in model.model.language_model.named_parameters():
            if w.dim() == 2 and "embed" not in name:
                w.mul_(5.0)
        head.weight.copy_(torch.randn(head.weight.shape, generator=torch.Generator().manual_seed(0)) * 0.3)
        head.bias.zero_()
    return model, processor


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("maze")
    make_dataset("maze", 16, 7, out, val_fraction=0.0, test_fraction=0.5, max_size=140)
    records, skipped = load_records(out / "test.jsonl")
    assert not skipped and len(records) == 8
    return out, records


# --------------------------------------------------------------------------------------------- causal
def _batch(model, processor, records, **kw):
    engine = LatentInference(model, processor, **kw)
    prepared = [engine.prepare(r, i, 4) for i, r in enumerate(records)]
    batch = engine.collate(prepared)
    return engine, batch, engine.latent_pass(batch, engine.encode(batch))


def _last_logits(model, batch, patches):
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                     pixel_values=batch["pixel_values"], image_grid_thw=batch["image_grid_thw"],
                     mm_token_type_ids=batch["mm_token_type_ids"], **patches.kwargs()).logits[:, -1]


def test_masking_all_latents_changes_logits_only_where_there_are_latents(model_c, dataset):
    model, processor = model_c
    _, records = dataset
    no_latents = dataclasses.replace(records[2], latent_budgets=[])  # same prompt, no segment
    engine, batch, p1 = _batch(model, processor, [records[0], records[1], no_latents])
    base = Patches.from_pass(p1)
    masked = mask_latents(base, batch["input_ids"], engine.latent_token_id)
    slots = batch["input_ids"] == engine.latent_token_id
    assert not masked.latent_kv_mask[slots].any()
    assert masked.latent_kv_mask[~slots].equal(base.latent_kv_mask[~slots])
    diff = (_last_logits(model, batch, base) - _last_logits(model, batch, masked)).abs().amax(-1)
    assert diff[0] > 1e-2 and diff[1] > 1e-2  # the latents matter to this model
    assert diff[2] < 1e-5  # nothing to mask


def test_masking_equals_leaving_the_slots_out_of_attention(model_c, dataset):
    """With latent_null_scale 0, masked latents are exactly absent: their content cannot matter."""
    model, processor = model_c
    engine, batch, p1 = _batch(model, processor, dataset[1][:2])
    masked = mask_latents(Patches.from_pass(p1), batch["input_ids"], engine.latent_token_id)
    junk = torch.randn_like(masked.ce_patch_vec) * 100
    scrambled = Patches(masked.ce_patch_pos, junk, masked.latent_kv_mask)
    torch.testing.assert_close(_last_logits(model, batch, masked), _last_logits(model, batch, scrambled),
                               atol=1e-4, rtol=1e-4)


def test_noise_keeps_each_norm(model_c, dataset):
    model, processor = model_c
    _, _, p1 = _batch(model, processor, dataset[1][:3])
    base = Patches.from_pass(p1)
    noisy = noise_latents(base, torch.Generator().manual_seed(3))
    again = noise_latents(base, torch.Generator().manual_seed(3))
    torch.testing.assert_close(noisy.ce_patch_vec.norm(dim=-1), base.ce_patch_vec.norm(dim=-1))
    assert torch.equal(noisy.ce_patch_vec, again.ce_patch_vec)
    cos = torch.nn.functional.cosine_similarity(noisy.ce_patch_vec, base.ce_patch_vec, dim=-1)
    assert cos.abs().max() < 0.6
    assert noisy.ce_patch_pos is base.ce_patch_pos and noisy.latent_kv_mask is base.latent_kv_mask


def test_swap_moves_whole_rows():
    pos = torch.tensor([[0, 5], [0, 6], [1, 5], [1, 6], [2, 7]])
    vec = torch.arange(5, dtype=torch.float32)[:, None].repeat(1, 3)
    out = swap_latents(Patches(pos, vec, None), [vec[2:4], vec[0:2], None])
    assert out.ce_patch_vec[:, 0].tolist() == [2, 3, 0, 1, 4]
    with pytest.raises(ValueError):
        swap_latents(Patches(pos, vec, None), [vec[:1], None, None])


def test_donor_rule():
    pool = DonorPool()
    lat = {k: torch.full((sum(k), 2), float(i)) for i, k in enumerate([(2,), (3,), (2, 1), (1, 1), (2, 2)])}
    # batch 1: (2,) and (2,) swap with each other; (3,) has no donor (nothing with one segment of >= 3)
    first = pool.donors([(2,), (3,), (2,)], [lat[(2,)], lat[(3,)], lat[(2,)] + 10])
    assert first[0][0, 0] == 10 and first[2][0, 0] == 0 and first[1] is None
    # batch 2: exact match from an earlier batch wins over a covering one in this batch
    second = pool.donors([(2,), (3,)], [lat[(2,)] + 20, lat[(3,)] + 20])
    assert second[0][0, 0] == 10  # the most recent (2,) of batch 1
    assert second[1][0, 0] == 1  # the (3,) of batch 1
    # no exact match anywhere: the first covering candidate gives the first vectors of each segment
    donor = torch.tensor([[1.0], [2.0], [3.0], [4.0]])  # segments of 2 and 2
    third = pool.donors([(1, 1), (2, 2), (0,)], [lat[(1, 1)], donor, torch.zeros(0, 1)])
    assert third[0].flatten().tolist() == [1.0, 3.0]
    assert third[1] is None and third[2] is None


def test_effective_rank():
    assert effective_rank(torch.randn(1, 8).repeat(20, 1) * torch.rand(20, 1)) == pytest.approx(1.0, abs=1e-6)
    assert effective_rank(torch.eye(6)[:4] * 3) == pytest.approx(4.0)
    r = effective_rank(torch.randn(200, 16, generator=torch.Generator().manual_seed(0)))
    assert 12 < r <= 16
    assert effective_rank(torch.zeros(0, 4)) != effective_rank(torch.zeros(0, 4))  # NaN


# ------------------------------------------------------------------------------------------- evaluate
def test_evaluate_report(model_c, dataset, tmp_path):
    model, processor = model_c
    data_dir, records = dataset
    preds = LatentInference(model, processor).run(records, batch_size=3, max_new_tokens=6)
    assert all(p.ok for p in preds)
    # the first half's gold answers are the model's own answers (with other case and spacing)
    records = [dataclasses.replace(r, answer=f" {p.answer.upper()} ") if i < 4 else r
               for i, (r, p) in enumerate(zip(records, preds))]
    expected = sum(normalize_answer(p.answer) == normalize_answer(r.answer) for r, p in zip(records, preds))
    assert expected >= 4 and len({normalize_answer(p.answer) for p in preds}) > 1
    chance = chance_from_metadata(data_dir / "test.jsonl")
    assert chance == load_metadata(data_dir / "test.jsonl")["splits"]["test"]["chance_accuracy"]

    out = tmp_path / "report"
    rep = evaluate(model, processor, records, out_dir=out, batch_size=3, max_new_tokens=6,
                   chance_accuracy=chance)
    assert REPORT_KEYS <= set(rep) and len(rep["predictions"]) == 8
    assert rep["n_correct"] == expected and rep["accuracy"] == pytest.approx(expected / 8)
    assert rep["chance_accuracy"] == chance and rep["stage"] == "C" and rep["n_errors"] == 0
    assert [p["prediction"] for p in rep["predictions"]] == [p.answer for p in preds]

    lat = rep["latents"]
    all_used = [u for p in preds for u in p.used_lens]
    all_budget = [b for p in preds for b in p.budgets]
    assert lat["num_images"] == len(all_used) == sum(v["count"] for v in lat["by_budget"].values())
    ratios = [u / b for u, b in zip(all_used, all_budget)]
    assert lat["mean_used_over_budget"] == pytest.approx(sum(ratios) / len(ratios))
    assert 0 < lat["mean_used_over_budget"] < 1  # some segments halted early
    assert sum(v["n"] for v in rep["accuracy_by_latents_used"].values()) == 8
    t = rep["timing"]
    assert t["latency_s_per_sample"] > 0 and t["throughput_samples_per_s"] > 0 and t["num_batches"] == 3

    causal = rep["causal"]
    for name in ("mask", "swap", "noise"):
        c = causal[name]
        assert 0 <= c["answer_change_rate"] <= 1 and 0 <= c["accuracy"] <= 1 and 1 <= c["n"] <= 8
    assert causal["mask"]["n"] == causal["noise"]["n"] == 8
    assert causal["mask"]["answer_change_rate"] > 0  # this model reads its latents
    changed = [p["prediction_mask"] != p["prediction"] for p in rep["predictions"]]
    assert causal["mask"]["answer_change_rate"] == pytest.approx(sum(changed) / 8)
    er = causal["effective_rank"]
    assert er["num_vectors"] == sum(all_used) and 1 <= er["value"] <= er["max_possible"]
    al = rep["alignment"]  # every maze record lists one CoT image per segment
    assert al["n_segments"] == len(all_used) == al["retrieval_set"] and al["n_latents"] == sum(all_used)
    assert -1 <= al["mean_cosine"] <= 1 and 0 <= al["retrieval_top1"] <= 1
    assert al["chance"] == pytest.approx(1 / len(all_used))

    files = json.loads((out / "report.json").read_text())
    assert REPORT_KEYS <= set(files) and "predictions" not in files
    assert files["files"] == rep["files"]
    assert len((out / "predictions.jsonl").read_text().splitlines()) == 8
    md = (out / "report.md").read_text()
    for text in ("# Evaluation report", "chance accuracy", "Causal checks", "Effective rank", "| swap |",
                 "Do the latents look like their CoT images?",
                 "used_latents_hist.png", "accuracy_vs_latents.png"):
        assert text in md
    for name in ("used_latents_hist.png", "accuracy_vs_latents.png"):
        with Image.open(out / name) as im:
            assert im.format == "PNG" and im.size[0] > 300 and im.size[1] > 200


def test_evaluate_without_latents_and_with_bad_samples(model_c, dataset, tmp_path):
    model, processor = model_c
    records = list(dataset[1][:4])
    records[1] = dataclasses.replace(records[1], images=[tmp_path / "gone.png"])
    rep = evaluate(model, processor, records, out_dir=tmp_path / "r", batch_size=4, max_new_tokens=4,
                   use_latents=False)
    assert rep["causal"] is None and rep["alignment"] is None and rep["use_latents"] is False
    assert rep["n_errors"] == 1 and rep["errors"][0]["kind"] == "missing_image" and rep["n_evaluated"] == 3
    assert rep["latents"]["num_images"] == 0
    assert rep["accuracy_errors_as_wrong"] == pytest.approx(rep["n_correct"] / 4)
    written = sorted(p.name for p in (tmp_path / "r").iterdir())
    assert written == ["predictions.jsonl", "report.json", "report.md"]  # no plots without latents
    assert "missing_image" in (tmp_path / "r" / "report.md").read_text()


def test_cli_eval(model_c, dataset, tmp_path, capsys):
    model, processor = model_c
    data_dir, _ = dataset
    ckpt = tmp_path / "ckpt"
    save_latent_checkpoint(model, processor, ckpt)
    data = tmp_path / "test.jsonl"  # beside its meta.json, with one broken line added
    rows = [json.loads(x) for x in (data_dir / "test.jsonl").read_text().splitlines()[:5]]
    for row in rows:
        for key in ("images", "cot_images"):
            row[key] = [str(data_dir / p) for p in row[key]]
    lines = [json.dumps(row) for row in rows]
    data.write_text("\n".join(lines + ['{"id": "broken"']) + "\n")
    (tmp_path / "meta.json").write_text((data_dir / "meta.json").read_text())
    out = tmp_path / "eval"
    rc = cli_main(["eval", "--model", str(ckpt), "--data", str(data), "--out", str(out), "--batch-size", "3",
                   "--max-new-tokens", "4"])
    assert rc == 0
    assert "report.md" in capsys.readouterr().out
    rep = json.loads((out / "report.json").read_text())
    assert rep["n_samples"] == 6 and rep["n_evaluated"] == 5 and rep["n_errors"] == 1
    assert rep["errors"][0]["kind"] == "invalid_record"
    assert rep["chance_accuracy"] == json.loads((data_dir / "meta.json").read_text())["splits"]["test"][
        "chance_accuracy"]
    assert rep["causal"]["mask"]["n"] == 5 and rep["stage"] == "C"
    assert (out / "used_latents_hist.png").is_file()


# ------------------------------------------------------------------------------------------ alignment
def test_alignment_probe_scores_latents_against_their_own_cot_images(model_c, dataset):
    """Latents equal to their pooled targets score cosine 1 and retrieve their own image; the same
    latents handed to the wrong samples do not; records without CoT images are skipped and counted."""
    from latentvl.data.collator import load_image
    from latentvl.evaluation.alignment import AlignmentProbe
    from latentvl.model.losses import pool_visual_tokens

    model, processor = model_c
    _, records = dataset
    engine = LatentInference(model, processor)
    results = engine.run(records[:6], batch_size=6, max_new_tokens=2, return_latents=True)
    assert all(r.ok and len(r.used_lens) == len(records[r.index].cot_images) for r in results)
    probe = AlignmentProbe(model, engine.collator.image_processor)
    feats = probe._features([load_image(v, r.id, "cot") for r in results for v in records[r.index].cot_images])
    perfect, k = [], 0
    for r in results:  # latents made equal to the pooled visual tokens of the sample's own CoT images
        parts = [pool_visual_tokens(feats[k + i], u) for i, u in enumerate(r.used_lens)]
        k += len(r.used_lens)
        perfect.append(torch.cat(parts))

    def score(latents, recs):
        p = AlignmentProbe(model, engine.collator.image_processor)
        p([dataclasses.replace(r, latents=x) for r, x in zip(results, latents)], recs)
        return p.summary()

    own = score(perfect, records)
    assert own["mean_cosine"] == pytest.approx(1.0, abs=1e-5) and own["retrieval_top1"] == 1.0
    assert own["n_segments"] == sum(len(r.used_lens) for r in results)
    assert own["mean_cosine_own"] == pytest.approx(1.0, abs=1e-5)
    assert own["mean_cosine_other"] < 0.999  # the CoT images differ
    # the same vectors read against the next sample's CoT images (cycled to this sample's segment count)
    rolled = {}
    for i, r in enumerate(results):
        other = records[results[(i + 1) % len(results)].index].cot_images
        rolled[r.index] = dataclasses.replace(
            records[r.index], cot_images=[other[t % len(other)] for t in range(len(r.used_lens))])
    wrong = score(perfect, rolled)
    assert wrong["n_segments"] == own["n_segments"]
    assert wrong["retrieval_top1"] < 0.5 and wrong["mean_cosine"] < own["mean_cosine"] - 1e-3
    assert wrong["mean_cosine_own"] < wrong["mean_cosine_other"] + 0.05  # no longer their own images
    no_cot = {r.index: dataclasses.replace(records[r.index], cot_images=[]) for r in results}
    skipped = score(perfect, no_cot)
    assert skipped["n_segments"] == 0 and skipped["skipped_samples"]["no_cot_images"] == len(results)
    assert skipped["retrieval_top1"] is None
