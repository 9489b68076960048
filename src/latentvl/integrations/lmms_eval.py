"""latentvl as an lmms-eval model: ``lmms-eval eval --model latentvl --model_args pretrained=DIR,...``.

latentvl registers the model through the ``lmms_eval.models`` entry point
(:func:`latentvl.integrations.lmms_eval_manifest`). Every request runs latentvl's two inference steps
(design §9) through :class:`~latentvl.inference.generate.LatentInference`: the latent pass on the
prompt, then generation with the latent vectors patched in and unused slots gated out. Requests are
answered in batches of ``--batch_size`` in the order lmms-eval hands them over.

Two classes share one implementation: :class:`LatentVLChat` (the default; lmms-eval hands it chat
messages) and :class:`LatentVLSimple` (``--force_simple``; context string plus ``doc_to_visual``).
``loglikelihood`` is exact (pass 1 on the prompt, then one pass-2 forward over prompt + continuation
with the same patches and mask, positions of the full-budget sequence) and returns the negative
log-likelihood, as lmms-eval's own models do (its ``multiple_choice`` scoring takes the argmin); lmms-eval 0.7.3 sends
loglikelihood requests (``multiple_choice`` tasks) to simple models only, so such tasks need
``--force_simple``.

Model arguments (``--model_args key=value,...``): see :class:`LatentVLChat` and docs/lmms-eval.md.
Lists inside an argument are separated by ``:`` (``budgets=4:4``, ``cot_image_sizes=84x84:168x168``)
because ``,`` separates the arguments.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from lmms_eval.api.instance import GenerationResult, Instance
from lmms_eval.api.model import lmms
from PIL import Image

from ..config import check_threshold
from ..errors import SampleError
from ..inference.generate import GenerationSettings, LatentInference, Patches
from ..model.loading import DTYPES

__all__ = ["TESTED_LMMS_EVAL", "LatentVLChat", "LatentVLSimple", "LoglikelihoodResult", "parse_budgets", "parse_sizes"]

TESTED_LMMS_EVAL = "0.7.3"
_ATTN = ("sdpa", "eager", "flash_attention_2")


class LoglikelihoodResult(GenerationResult):
    """One loglikelihood answer: the pair ``(nll, greedy)``; unpacks and indexes like a 2-tuple.

    ``nll`` is ``-log p(continuation | context)`` (summed over the continuation's tokens), the loss
    that lmms-eval's own models return and that its ``multiple_choice`` scoring minimises. lmms-eval
    0.7.3's evaluator keeps the ``text`` of a :class:`GenerationResult` as the response and turns a
    plain tuple into a string, so the pair travels as ``text``.
    """

    def __init__(self, nll: float, greedy: bool) -> None:
        super().__init__(text=(float(nll), bool(greedy)))  # type: ignore[arg-type]

    def __iter__(self):
        return iter(self.text)

    def __len__(self) -> int:
        return 2

    def __getitem__(self, i: int) -> Any:
        return self.text[i]

    def __repr__(self) -> str:
        return f"LoglikelihoodResult(nll={self.text[0]!r}, greedy={self.text[1]!r})"


def parse_budgets(value: Any) -> list[int] | None:
    """``budgets`` model argument: ``"4:4"`` -> ``[4, 4]``, ``4`` -> ``[4]``, ``""`` / ``"none"`` -> ``[]``
    (no segments); ``None`` -> None (not given)."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise ValueError(f"budgets={value!r}: expected integers separated by ':', e.g. budgets=4:4")
    if isinstance(value, int):
        items = [value]
    else:
        text = str(value).strip()
        if text.lower() in ("", "none"):
            return []
        try:
            items = [int(x) for x in text.split(":")]
        except ValueError as err:
            raise ValueError(f"budgets={value!r}: expected integers separated by ':', e.g. budgets=4:4") from err
    if any(b < 1 for b in items):
        raise ValueError(f"budgets={value!r}: every budget must be >= 1")
    return items


def parse_sizes(value: Any) -> list[tuple[int, int]] | None:
    """``cot_image_sizes`` model argument: ``"84x84:168x112"`` -> ``[(84, 84), (168, 112)]`` (width x height)."""
    if value is None:
        return None
    out = []
    for part in str(value).strip().split(":"):
        try:
            w, h = (int(x) for x in part.lower().split("x"))
        except ValueError as err:
            raise ValueError(f"cot_image_sizes={value!r}: expected WIDTHxHEIGHT items separated by ':', "
                             "e.g. cot_image_sizes=224x224:224x224") from err
        if w < 1 or h < 1:
            raise ValueError(f"cot_image_sizes={value!r}: sizes must be positive")
        out.append((w, h))
    return out


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError(f"{name}={value!r} must be a positive integer")
    try:
        n = int(value)
    except ValueError as err:
        raise ValueError(f"{name}={value!r} must be a positive integer") from err
    if n < 1 or (isinstance(value, float) and n != value):
        raise ValueError(f"{name}={value!r} must be a positive integer")
    return n


def _flag(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false", "1", "0"):
        return value.lower() in ("true", "1")
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise ValueError(f"{name}={value!r} must be true or false")


class _LatentVLBase(lmms):
    """Shared implementation; lmms-eval instantiates :class:`LatentVLChat` or :class:`LatentVLSimple`.

    Args (model arguments):
        pretrained: latentvl checkpoint directory (required; loaded locally, never from a hub).
        device: torch device (lmms-eval's ``--device``; default cuda if available, else cpu).
        dtype: ``auto`` (as saved), ``float32``, ``bfloat16`` or ``float16``.
        attn: text attention, latent-gated: ``sdpa`` (default), ``eager``, ``flash_attention_2``.
        batch_size: requests per batch (lmms-eval's ``--batch_size``).
        threshold: stage-C stop threshold of the latent pass (default: the model's).
        budgets: explicit budgets for every sample, ``4:4`` (``none`` = no segments).
        cot_image_sizes: planned CoT image sizes for every sample, ``WxH:WxH``; one segment each.
        num_segments: segments when no plan is given (default 1), each with the budget of the
            first question image (design D9).
        doc_plan: read a per-document plan (``latent_budgets``, ``cot_image_sizes`` or
            ``cot_images``) from the task's documents when the model arguments give none (default true).
        use_latents: false runs prompts without latent segments (a model trained without latents).
        system_prompt: system turn for every prompt, as in training (default none); a system turn in
            a chat request replaces it for that request.
        max_length: longest prompt + answer, in tokens (default: the model's limit).
        max_new_tokens: answer length when the task's ``generation_kwargs`` give none (default 32).
        engine: ``hf`` (default) or ``vllm``: the generation step of ``generate_until`` in vLLM
            (:class:`~latentvl.inference.vllm_engine.VLLMInference`, one vLLM engine shared by every system
            prompt; needs the ``vllm`` extra). The latent pass and ``loglikelihood`` (exact scores from one
            forward) run in latentvl with either.
    """

    def __init__(
        self,
        pretrained: str | None = None,
        device: str | None = None,
        dtype: str = "auto",
        attn: str = "sdpa",
        batch_size: int | str = 1,
        threshold: float | None = None,
        budgets: Any = None,
        cot_image_sizes: Any = None,
        num_segments: int = 1,
        doc_plan: Any = True,
        use_latents: Any = True,
        system_prompt: str | None = None,
        max_length: int | None = None,
        max_new_tokens: int = 32,
        max_batch_size: Any = None,
        engine: str = "hf",
        **unknown: Any,
    ) -> None:
        super().__init__()
        if unknown:
            raise TypeError(f"latentvl: unknown model arguments {sorted(unknown)}; known: pretrained, device, "
                            "dtype, attn, batch_size, threshold, budgets, cot_image_sizes, num_segments, doc_plan, "
                            "use_latents, system_prompt, max_length, max_new_tokens, engine")
        if not pretrained:
            raise ValueError("latentvl: the model argument pretrained=DIR (a latentvl checkpoint) is required")
        if str(dtype) not in DTYPES:
            raise ValueError(f"latentvl: dtype={dtype!r}; choose from {sorted(DTYPES)}")
        if attn not in _ATTN:
            raise ValueError(f"latentvl: attn={attn!r}; choose from {list(_ATTN)}")
        if threshold is not None:
            threshold = check_threshold(threshold, "latentvl: threshold")
        if engine not in ("hf", "vllm"):
            raise ValueError(f"latentvl: engine={engine!r}; choose hf or vllm")
        self.engine_kind = engine
        self.pretrained = str(pretrained)
        self.batch_size = _positive_int("batch_size", batch_size)
        self.max_new_tokens = _positive_int("max_new_tokens", max_new_tokens)
        self.budgets = parse_budgets(budgets)
        self.cot_image_sizes = parse_sizes(cot_image_sizes)
        if self.budgets is not None and self.cot_image_sizes is not None:
            raise ValueError("latentvl: give budgets or cot_image_sizes, not both")
        self.doc_plan = _flag("doc_plan", doc_plan)
        self.use_latents = _flag("use_latents", use_latents)
        self.system_prompt = system_prompt or None
        world = os.environ.get("WORLD_SIZE", "1")
        if world.isdigit() and int(world) > 1:
            raise RuntimeError(
                f"latentvl: lmms-eval runs with WORLD_SIZE={world}, but the latentvl model runs in one process: "
                "the latent pass agrees on its step count across processes (design D8), which can deadlock when "
                "processes answer different numbers of batches. Run one process per device, each on a shard "
                "of the task (--limit/--offset), or one process.")
        self._check_version()

        from ..model.attention import LATENT_ATTENTION
        from ..model.loading import load_latent_model

        self._device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        model, processor = load_latent_model(pretrained, dtype=DTYPES[str(dtype)],
                                             attn_implementation=LATENT_ATTENTION[attn])
        self.model = model.to(self._device).eval()
        self.processor = processor
        self._engine_args = dict(threshold=threshold, use_latents=self.use_latents,
                                 default_num_segments=_positive_int("num_segments", num_segments),
                                 max_length=None if max_length is None else _positive_int("max_length", max_length))
        self._engines: dict[str | None, LatentInference] = {}
        self.engine = self._engine(self.system_prompt)  # validates threshold and num_segments now

    @staticmethod
    def _check_version() -> None:
        from importlib.metadata import PackageNotFoundError, version

        try:
            found = version("lmms_eval")
        except PackageNotFoundError:
            return
        if found != TESTED_LMMS_EVAL:
            warnings.warn(f"latentvl's lmms-eval model is tested with lmms-eval {TESTED_LMMS_EVAL}; "
                          f"{found} is installed", stacklevel=3)

    @property
    def device(self) -> torch.device:
        return self._device

    def _engine(self, system_prompt: str | None) -> LatentInference:
        if system_prompt not in self._engines:
            if self.engine_kind == "vllm":
                from ..inference.vllm_engine import VLLMInference

                running = next(iter(self._engines.values()), None)
                self._engines[system_prompt] = VLLMInference(
                    self.model, self.processor, self.pretrained, system_prompt=system_prompt,
                    llm=None if running is None else running.llm, **self._engine_args)
            else:
                self._engines[system_prompt] = LatentInference(self.model, self.processor,
                                                               system_prompt=system_prompt, **self._engine_args)
        return self._engines[system_prompt]

    # ------------------------------------------------------------------ requests -> samples
    def _doc(self, task: str, split: str, doc_id: Any) -> Mapping[str, Any]:
        try:
            return self.task_dict[task][split][doc_id]
        except (KeyError, IndexError, TypeError) as err:
            raise ValueError(f"latentvl: no document {doc_id!r} in split {split!r} of task {task!r}") from err

    def _plan(self, doc: Mapping[str, Any] | None) -> dict[str, Any]:
        """The segment plan (design D9) of one sample: model arguments first, then the document's own."""
        if self.budgets is not None:
            return {"latent_budgets": list(self.budgets)}
        if self.cot_image_sizes is not None:
            return {"cot_image_sizes": list(self.cot_image_sizes)}
        if self.doc_plan and isinstance(doc, Mapping):
            for key in ("latent_budgets", "cot_image_sizes", "cot_images"):
                if doc.get(key) is not None:
                    return {key: list(doc[key])}
        return {}

    def _sample(self, sid: str, question: str, images: Sequence[Any], doc: Mapping[str, Any] | None
                ) -> dict[str, Any]:
        for i, im in enumerate(images):
            if not isinstance(im, (Image.Image, str)):
                raise ValueError(f"latentvl: request {sid}: visual #{i} is a {type(im).__name__}; only images "
                                 "(PIL images or image paths) are supported")
        return {"id": sid, "question": question, "images": list(images), **self._plan(doc)}

    def _request(self, req: Instance) -> tuple[dict[str, Any], dict[str, Any], str | None]:
        """``(sample, generation kwargs, system prompt)`` of one ``generate_until`` request."""
        raise NotImplementedError

    def _loglikelihood_request(self, req: Instance) -> tuple[dict[str, Any], str]:
        """``(sample, continuation)`` of one ``loglikelihood`` request (the simple form, which lmms-eval
        builds for every model type)."""
        args = req.args
        if len(args) == 2:  # unconditional request (acc_mutual_info): empty context, no visuals
            ctx, cont = args
            return {"id": f"#{req.idx}", "question": ctx, "images": []}, str(cont)
        ctx, cont, doc_to_visual, doc_id, task, split = args[:6]
        sid = f"{task}/{split}/{doc_id}"
        doc = self._doc(task, split, doc_id)
        if callable(cont):
            cont = cont(doc)
        if isinstance(cont, list):
            if len(cont) != 1:
                raise ValueError(f"latentvl: request {sid}: expected one continuation, got {len(cont)}")
            cont = cont[0]
        visuals = (doc_to_visual(doc) if callable(doc_to_visual) else doc_to_visual) or []
        return self._sample(sid, ctx, visuals, doc), str(cont)

    # ------------------------------------------------------------------ generation
    def _settings(self, gen_kwargs: Mapping[str, Any] | None, sid: str) -> tuple[GenerationSettings, list[str]]:
        kw = dict(gen_kwargs or {})
        if int(kw.get("num_beams", 1) or 1) != 1:
            raise ValueError(f"latentvl: request {sid}: beam search (num_beams={kw['num_beams']}) is not supported")
        until = kw.get("until") or []
        until = [until] if isinstance(until, str) else list(until)
        temperature = float(kw.get("temperature", 0.0) or 0.0)
        do_sample = bool(kw.get("do_sample", False)) or temperature > 0
        gen = GenerationSettings(
            max_new_tokens=int(kw.get("max_new_tokens") or self.max_new_tokens),
            do_sample=do_sample,
            temperature=temperature if do_sample else 1.0,
            top_p=float(kw.get("top_p") or 1.0) if do_sample else 1.0,
            top_k=int(kw.get("top_k") or 0) if do_sample else 0,
        )
        return gen, [u for u in until if u]

    def generate_until(self, requests: list[Instance]) -> list[str]:
        """Answer every request with the two inference steps; one string per request, in order.

        Requests are grouped by decoding settings and system prompt (order kept inside a group) and run
        in batches of ``batch_size``. An answer is cut at the first of the task's ``until`` strings. A
        sample that cannot run (missing image, prompt too long, ...) gets an empty answer and a warning
        naming it (it scores as wrong); malformed requests raise.
        """
        answers: list[str | None] = [None] * len(requests)
        groups: dict[tuple, list[tuple[int, dict[str, Any], list[str]]]] = {}
        for i, req in enumerate(requests):
            sample, gen_kwargs, system = self._request(req)
            gen, until = self._settings(gen_kwargs, sample["id"])
            key = (tuple(sorted(vars(gen).items())), system)
            groups.setdefault(key, []).append((i, sample, until))
        for (gen_items, system), items in groups.items():
            gen = dict(gen_items)
            engine = self._engine(system)
            results = engine.run([s for _, s, _ in items], batch_size=self.batch_size, **gen)
            for (i, sample, until), res in zip(items, results, strict=True):
                if not res.ok:
                    warnings.warn(f"latentvl: request {sample['id']} failed ({res.error_kind}): {res.error}",
                                  stacklevel=2)
                    answers[i] = ""
                    continue
                text = res.answer or ""
                for stop in until:
                    text = text.split(stop, 1)[0]
                answers[i] = text
        return [a if a is not None else "" for a in answers]

    def generate_until_multi_round(self, requests: list[Instance]) -> list[str]:
        raise NotImplementedError("latentvl: multi-round generation is not supported (one question, one answer)")

    # ------------------------------------------------------------------ loglikelihood
    def loglikelihood(self, requests: list[Instance]) -> list[LoglikelihoodResult]:
        """``(nll, greedy)`` per request (a :class:`LoglikelihoodResult`), through the latent pass.

        ``nll = -log p(continuation | context)``, summed over the continuation's tokens: lmms-eval's
        models return a loss here and its ``multiple_choice`` scoring picks the choice with the lowest.
        Exact: pass 1 runs on the prompt exactly as for generation (same segments, threshold and
        latents); then one pass-2 forward runs over prompt + continuation tokens with the latent
        patches and the latent mask (kept for the continuation), so every continuation token is
        scored as ``generate()`` would score it. ``greedy`` is True when each continuation token is
        the argmax. The continuation is tokenized on its own, as an answer is in training. A sample
        that cannot run raises (a missing score would bias a multiple-choice pick).
        """
        out: list[LoglikelihoodResult] = []
        items = [self._loglikelihood_request(r) for r in requests]
        for start in range(0, len(items), self.batch_size):
            out.extend(self._loglikelihood_batch(items[start:start + self.batch_size], start))
        return out

    @torch.no_grad()
    def _loglikelihood_batch(self, items: list[tuple[dict[str, Any], str]], offset: int
                             ) -> list[LoglikelihoodResult]:
        engine = self.engine
        conts: list[list[int]] = []
        prepared = []
        for j, (sample, cont) in enumerate(items):
            try:
                ids = engine.collator._checked_text(cont, sample["id"], "continuation") if cont else []
                prepared.append(engine.prepare(sample, offset + j, max(1, len(ids))))
            except (SampleError, ValueError) as err:
                raise ValueError(f"latentvl: loglikelihood request {sample['id']}: {err}") from err
            conts.append(ids)
        batch = engine.collate(prepared)
        embeds, visual = engine.encode(batch, return_visual=True)
        p1 = engine.latent_pass(batch, embeds, visual)
        patches = Patches.from_pass(p1)
        B, S = batch["input_ids"].shape
        T = max(1, max(len(c) for c in conts))
        dev = batch["input_ids"].device
        cont_ids = torch.full((B, T), engine.pad_id, dtype=torch.long, device=dev)
        cont_mask = torch.zeros((B, T), dtype=batch["attention_mask"].dtype, device=dev)
        for b, c in enumerate(conts):
            cont_ids[b, :len(c)] = torch.tensor(c, dtype=torch.long, device=dev)
            cont_mask[b, :len(c)] = 1
        input_ids = torch.cat([batch["input_ids"], cont_ids], dim=1)
        kw = patches.kwargs()
        if "latent_kv_mask" in kw:
            kw["latent_kv_mask"] = torch.cat([kw["latent_kv_mask"], kw["latent_kv_mask"].new_ones(B, T)], dim=1)
        mm = batch["mm_token_type_ids"]
        logits = self.model(
            input_ids=input_ids,
            inputs_embeds=torch.cat([embeds, self.model.get_input_embeddings()(cont_ids)], dim=1),
            attention_mask=torch.cat([batch["attention_mask"], cont_mask], dim=1),
            mm_token_type_ids=torch.cat([mm, mm.new_zeros(B, T)], dim=1),
            image_grid_thw=batch["image_grid_thw"], use_cache=False, **kw,
            latent_visual=None if visual is None else visual.pad_right(T),
        ).logits
        logp = torch.log_softmax(logits[:, S - 1:S - 1 + T].float(), dim=-1)
        results = []
        for b, c in enumerate(conts):
            if not c:
                results.append(LoglikelihoodResult(0.0, True))
                continue
            target = cont_ids[b, :len(c)]
            rows = logp[b, :len(c)]
            nll = -float(rows.gather(-1, target[:, None]).sum())
            results.append(LoglikelihoodResult(nll, bool((rows.argmax(-1) == target).all())))
        return results


class LatentVLChat(_LatentVLBase):
    """The default lmms-eval model ``latentvl`` (chat requests: messages built by the task).

    A request's user turns give the question (their text parts joined by newlines) and the question
    images (in order; latentvl's prompt places every image before the question text); a system turn
    replaces ``system_prompt``. Assistant turns (multi-turn few-shot chats) are rejected.
    """

    is_simple = False

    def _request(self, req: Instance) -> tuple[dict[str, Any], dict[str, Any], str | None]:
        from lmms_eval.protocol import ChatMessages

        ctx, doc_to_messages, gen_kwargs, doc_id, task, split = req.args[:6]
        sid = f"{task}/{split}/{doc_id}"
        doc = self._doc(task, split, doc_id)
        messages = doc_to_messages(doc) if callable(doc_to_messages) else doc_to_messages
        chat = ChatMessages(messages=messages)
        texts: list[str] = []
        images: list[Any] = []
        system: list[str] = []
        for message in chat.messages:
            if message.role == "assistant":
                raise ValueError(f"latentvl: request {sid}: multi-turn chats (assistant turns) are not supported")
            for part in message.content:
                if part.type == "text":
                    (system if message.role == "system" else texts).append(part.text)
                elif part.type == "image" and message.role == "user":
                    images.append(part.url)
                else:
                    raise ValueError(f"latentvl: request {sid}: {part.type} content in a {message.role} turn is "
                                     "not supported (images and text only)")
        system_prompt = "\n".join(system) if system else self.system_prompt
        return self._sample(sid, "\n".join(texts), images, doc), gen_kwargs, system_prompt


class LatentVLSimple(_LatentVLBase):
    """``latentvl`` under ``--force_simple``: the context string is the question, ``doc_to_visual``
    gives the question images. Needed for loglikelihood (``multiple_choice``) tasks."""

    is_simple = True

    def _request(self, req: Instance) -> tuple[dict[str, Any], dict[str, Any], str | None]:
        ctx, gen_kwargs, doc_to_visual, doc_id, task, split = req.args[:6]
        sid = f"{task}/{split}/{doc_id}"
        doc = self._doc(task, split, doc_id)
        visuals: Callable[..., Any] | list[Any] = doc_to_visual(doc) if callable(doc_to_visual) else doc_to_visual
        return self._sample(sid, ctx, visuals or [], doc), gen_kwargs, self.system_prompt
