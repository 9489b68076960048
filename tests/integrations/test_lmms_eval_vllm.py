"""lmms-eval's latentvl model with ``engine=vllm``: generation in vLLM gives the answers of ``engine=hf``.
Needs both the ``lmms`` and the ``vllm`` extras (CI runs it in the vLLM environment)."""

import pytest
from helpers import require_extra, talking_tiny_model

require_extra("vllm", "vllm")  # skips this module, with the reason, without the extra
require_extra("lmms_eval", "lmms")

from lmms_eval.api.instance import Instance  # noqa: E402

from latentvl import set_latent_fields  # noqa: E402
from latentvl.data.records import load_records  # noqa: E402
from latentvl.data.tasks.writer import make_dataset  # noqa: E402
from latentvl.integrations import lmms_task  # noqa: E402
from latentvl.integrations.lmms_eval import LatentVLChat  # noqa: E402
from latentvl.model.loading import save_latent_checkpoint  # noqa: E402

TASK, SPLIT = "toy", "test"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    model, processor = talking_tiny_model()
    set_latent_fields(model.config, latent_budget_alpha=0.8, latent_mode_stage="C",
                      latent_stop_loss_weight=1.0, latent_cost_weight=1e-3)
    path = tmp_path_factory.mktemp("lmms_vllm") / "ckpt"
    save_latent_checkpoint(model, processor, path)
    data = tmp_path_factory.mktemp("maze")
    make_dataset("maze", 12, 3, data, val_fraction=0.0, test_fraction=0.5, max_size=140)
    records, _ = load_records(data / "test.jsonl")
    return path, lmms_task.task_rows(records)


def _request(doc, doc_id, gen_kwargs, system=None):
    def to_messages(d):
        content = [{"type": "image", "url": im} for im in lmms_task.doc_to_visual(d)]
        turn = [{"role": "user", "content": [*content, {"type": "text", "text": lmms_task.doc_to_text(d)}]}]
        return ([{"role": "system", "content": [{"type": "text", "text": system}]}] if system else []) + turn

    return Instance("generate_until", ("", to_messages, gen_kwargs, doc_id, TASK, SPLIT), 0,
                    metadata={"task": TASK, "doc_id": doc_id, "repeats": 1})


def test_generate_until_with_vllm_equals_hf(setup):
    path, docs = setup
    greedy = {"max_new_tokens": 6, "temperature": 0, "do_sample": False}
    answers = {}
    for engine in ("hf", "vllm"):
        lm = LatentVLChat(pretrained=str(path), batch_size=3, threshold=0.4, engine=engine)
        lm.task_dict = {TASK: {SPLIT: docs}}
        reqs = [_request(d, i, dict(greedy), system="Be brief." if i % 2 else None) for i, d in enumerate(docs)]
        answers[engine] = lm.generate_until(reqs)
        if engine == "vllm":  # two system prompts, one vLLM engine
            llms = {id(e.llm) for e in lm._engines.values()}
            assert len(lm._engines) == 2 and len(llms) == 1
    assert answers["vllm"] == answers["hf"]
    assert len(set(answers["hf"])) > 1
