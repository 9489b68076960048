"""Two-step inference (design §9): the latent pass on the prompt, then ``generate()`` with the patches.

1. The prompt (question images, question, assistant header and one latent segment per planned CoT
   image, up to the last ``<|latent_end|>``) goes through ``latent_mode=True``. It returns the latent
   vectors (``ce_patch_vec`` at ``ce_patch_pos``) and ``latent_kv_mask`` (False at unused slots, stage C).
2. ``generate()`` runs on the same prompt with those patches and that mask. The model places the
   patches at the prefill and grows the mask with every generated token.

Segments (design D9), per sample, in this order: explicit ``latent_budgets``; else the sizes of the CoT
images the sample lists (``cot_image_sizes`` as ``(width, height)`` pairs, or ``cot_images`` paths, of
which only the header is read, never the pixels); else ``default_num_segments`` segments, each with
the budget of the first question image.

Every sample is loaded and checked on its own before its batch is collated: a missing or unreadable
image, a question that does not fit the model, or reserved tokens in the text give that sample an
``error`` in its :class:`InferenceResult`, and the rest of the batch still runs.

Example::

    engine = LatentInference(model, processor)
    [res] = engine.run([{"question": "First move from start?", "images": ["maze.png"]}])
    res.answer, res.budgets, res.used_lens, res.stop_probs, res.timings
"""

from __future__ import annotations

import time
import unicodedata
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch
from transformers import GenerationConfig
from transformers.generation.configuration_utils import CompileConfig

from ..config import COMPILE_BACKENDS, LatentSettings, check_threshold
from ..data.collator import LatentCollator, grid_from_size, image_list, load_image, sample_id_of, to_device
from ..data.records import Record
from ..errors import CollatorInputError, ImageReadError, SampleError
from ..model.pass1 import LatentPassOutput
from ..model.visual import VisualStack

__all__ = [
    "END_OF_TURN",
    "BatchOutcome",
    "GenerationSettings",
    "InferenceResult",
    "LatentInference",
    "Patches",
    "PreparedSample",
    "infer",
    "normalize_answer",
]

END_OF_TURN = "<|im_end|>"


@dataclass
class GenerationSettings:
    """How step 2 decodes. Sampling options are used only with ``do_sample=True``.

    ``seed`` seeds torch's global generator once at the start of :meth:`LatentInference.run`.
    ``compile`` (False): True or a ``torch.compile`` backend (:data:`~latentvl.config.COMPILE_BACKENDS`;
    True means "inductor") decodes on transformers' static cache with the one-token step compiled
    (CUDA graphs on a GPU, mode "reduce-overhead"); the prefill runs eagerly. Tokens equal the default
    (dynamic cache, eager) decoding's. One graph per batch size and prompt-plus-new-tokens length.
    ``min_new_tokens`` (0): the end of turn cannot come before this many new tokens (a fixed answer length
    when it equals ``max_new_tokens``, as throughput benchmarks decode).
    """

    max_new_tokens: int = 32
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    compile: bool | str = False
    min_new_tokens: int = 0

    def __post_init__(self) -> None:
        if not (isinstance(self.compile, bool) or self.compile in COMPILE_BACKENDS):
            raise ValueError(f"compile={self.compile!r} must be true, false or a torch.compile backend in "
                             f"{COMPILE_BACKENDS}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={self.max_new_tokens} must be >= 1")
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise ValueError(f"min_new_tokens={self.min_new_tokens} must be in [0, max_new_tokens]")
        if self.do_sample and not self.temperature > 0:
            raise ValueError(f"temperature={self.temperature} must be > 0 when sampling")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p} must be in (0, 1]")
        if self.top_k < 0:
            raise ValueError(f"top_k={self.top_k} must be >= 0 (0 = off)")

    def generation_config(self, pad_token_id: int, eos_token_ids: list[int],
                          device: torch.device | None = None) -> GenerationConfig:
        """transformers' ``GenerationConfig`` for these settings (``device``: where the model runs, which
        decides the compile mode)."""
        kw: dict[str, Any] = {}
        if self.do_sample:
            kw.update(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k or None)
        if self.compile is not False:
            kw.update(cache_implementation="static", compile_config=static_compile_config(self.compile, device))
        if self.min_new_tokens:
            kw.update(min_new_tokens=self.min_new_tokens)
        return GenerationConfig(max_new_tokens=self.max_new_tokens, do_sample=self.do_sample,
                                pad_token_id=pad_token_id, eos_token_id=eos_token_ids, **kw)


def static_compile_config(backend: bool | str = True, device: torch.device | None = None) -> CompileConfig:
    """transformers' ``CompileConfig`` for a compiled decoding step on the static cache: the whole step one
    graph (``fullgraph``), static shapes, CUDA graphs on a GPU; ``backend`` True means "inductor". It also
    lets ``generate()`` compile off CUDA (a CPU run, as in the tests and benchmarks)."""
    cuda = device is not None and torch.device(device).type == "cuda"
    config = CompileConfig(backend="inductor" if backend is True else backend, fullgraph=True, dynamic=False,
                           mode="reduce-overhead" if cuda else None)
    config._compile_all_devices = True
    return config


@dataclass
class InferenceResult:
    """What one sample produced (or why it could not run: ``error`` and ``error_kind``).

    ``budgets``, ``used_lens`` ``[M]`` and ``stop_probs`` ``[M][used]`` are per CoT segment (stop
    probabilities only in stage C). ``budget_source`` says where the budgets came from (D9):
    ``explicit``, ``cot_images``, ``default`` or ``none`` (no latents). ``timings`` holds the wall
    time in seconds of the sample's batch: ``encode_s`` (embeddings and question-image features),
    ``latent_pass_s`` (step 1), ``generation_s`` (step 2), and ``batch_size``.
    ``latents`` (``[sum(used_lens), H]``, CPU) only when asked for.
    """

    id: str
    index: int
    answer: str | None = None
    error: str | None = None
    error_kind: str | None = None
    budgets: list[int] = field(default_factory=list)
    budget_source: str | None = None
    used_lens: list[int] = field(default_factory=list)
    stop_probs: list[list[float]] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    token_ids: list[int] = field(default_factory=list)
    finished: bool = False
    latents: torch.Tensor | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: every field except ``latents``."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "latents"}


@dataclass
class PreparedSample:
    """A sample that passed its checks: what the collator receives, plus what the result reports."""

    index: int
    id: str
    item: dict[str, Any]
    budgets: list[int]
    budget_source: str
    prompt_len: int


@dataclass
class Patches:
    """The inputs of step 2 that come from step 1 (``None`` everywhere = no latents)."""

    ce_patch_pos: torch.Tensor | None = None
    ce_patch_vec: torch.Tensor | None = None
    latent_kv_mask: torch.Tensor | None = None

    @classmethod
    def from_pass(cls, p1: LatentPassOutput | None) -> Patches:
        if p1 is None:
            return cls()
        return cls(p1.ce_patch_pos, p1.ce_patch_vec, p1.latent_kv_mask)

    def kwargs(self) -> dict[str, Any]:
        if self.ce_patch_pos is None:
            return {}
        kw = {"ce_patch_pos": self.ce_patch_pos, "ce_patch_vec": self.ce_patch_vec}
        if self.latent_kv_mask is not None and not bool(self.latent_kv_mask.all()):
            kw["latent_kv_mask"] = self.latent_kv_mask  # all True (stage A) is the stock attention path
        return kw


@dataclass
class BatchOutcome:
    """One collated batch that ran: its samples, inputs, embeddings, step-1 output and results."""

    samples: list[PreparedSample]
    batch: dict[str, Any]
    embeds: torch.Tensor
    latent: LatentPassOutput | None
    results: list[InferenceResult]
    visual: VisualStack | None = None


def normalize_answer(text: str | None) -> str:
    """Exact-match form: NFKC, lower case, whitespace collapsed, outer quotes and end punctuation removed."""
    if text is None:
        return ""
    s = " ".join(unicodedata.normalize("NFKC", text).lower().split())
    s = s.strip("\"'`")
    return s.rstrip(".,;:!?").strip()


def _sample_fields(sample: Any, index: int) -> dict[str, Any]:
    if isinstance(sample, Record):
        d = asdict(sample)
    elif isinstance(sample, Mapping):
        d = dict(sample)
    else:
        raise SampleError("invalid_input",
                          f"sample #{index}: expected a Record or a dict, got {type(sample).__name__}")
    d["id"] = sample_id_of(sample, index)
    return d


def _sample_error(err: CollatorInputError) -> SampleError:
    """A collator error as a per-sample error; an image that cannot be read keeps its kind."""
    cause = err.__cause__
    return SampleError(cause.kind if isinstance(cause, ImageReadError) else "invalid_input", str(err))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class LatentInference:
    """Runs the two steps on batches of samples (left padding). See the module docstring.

    Args:
        model: a :class:`~latentvl.LatentQwen2_5_VLForConditionalGeneration` (put it on its device first).
        processor: its :class:`~latentvl.LatentProcessor`.
        threshold: stage-C stop threshold for step 1 (default: the config's ``latent_stop_threshold``).
        use_latents: False builds prompts without latent segments and skips step 1 (a no-latent model).
        default_num_segments: segments planned for a sample with no budgets and no CoT images (D9).
        system_prompt: optional system turn, as at training.
        max_length: longest sequence (prompt + new tokens) a sample may need; default the model's
            ``max_position_embeddings``. A longer sample gets a ``too_long`` error.
    """

    def __init__(
        self,
        model: Any,
        processor: Any,
        threshold: float | None = None,
        use_latents: bool = True,
        default_num_segments: int = 1,
        system_prompt: str | None = None,
        max_length: int | None = None,
    ):
        if threshold is not None:
            threshold = check_threshold(threshold, "threshold")
        self.model = model
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.threshold = threshold
        self.use_latents = use_latents
        self.collator = LatentCollator(
            processor, model.config, padding_side="left", system_prompt=system_prompt, for_generation=True,
            use_latents=use_latents, default_num_segments=default_num_segments,
        )
        text_cfg = getattr(model.config, "text_config", model.config)
        self.max_length = int(max_length or text_cfg.max_position_embeddings)
        self.eot_id = processor.token_id(END_OF_TURN)
        self.stop_ids = sorted({self.eot_id} | ({self.tokenizer.eos_token_id} - {None}))
        self.pad_id = int(self.tokenizer.pad_token_id)
        self.latent_token_id = LatentSettings.from_config(model.config).latent_token_id

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # ------------------------------------------------------------------ per-sample checks
    def prepare(self, sample: Any, index: int, max_new_tokens: int) -> PreparedSample:
        """Load and check one sample; raise :class:`SampleError` naming what is wrong with it."""
        d = _sample_fields(sample, index)
        sid = d["id"]
        question = d.get("question")
        if not isinstance(question, str) or not question.strip():
            raise SampleError("invalid_input", f"sample {sid!r}: 'question' must be a non-empty string")
        try:
            images = [load_image(v, sid, f"images[{i}]") for i, v in enumerate(image_list(d, "images", sid))]
            q_grids = [grid_from_size(self.processor.image_processor, *im.size) for im in images]
            budgets, source = self.collator.plan_budgets(d, q_grids, sid) if self.use_latents else ([], "none")
            encoded = self.collator.encode_sample(sid, question, q_grids, budgets, None)
        except CollatorInputError as err:
            raise _sample_error(err) from err
        except ValueError as err:
            raise SampleError("invalid_input", str(err)) from err
        item: dict[str, Any] = {"id": sid, "question": question, "images": images}
        if self.use_latents:
            item["latent_budgets"] = budgets
        need = len(encoded) + max_new_tokens
        if need > self.max_length:
            raise SampleError(
                "too_long",
                f"sample {sid!r}: prompt of {len(encoded)} tokens + max_new_tokens {max_new_tokens} = {need} "
                f"exceeds the model's limit of {self.max_length} tokens")
        return PreparedSample(index, sid, item, budgets, source, len(encoded))

    # ------------------------------------------------------------------ the two steps
    def collate(self, prepared: list[PreparedSample]) -> dict[str, Any]:
        batch = self.collator([p.item for p in prepared])
        return to_device(batch, self.device)

    @torch.no_grad()
    def encode(self, batch: dict[str, Any], return_visual: bool = False
               ) -> torch.Tensor | tuple[torch.Tensor, VisualStack | None]:
        """Input embeddings ``[B, S, H]`` with the question images' features: computed once, used by both
        steps (so the vision tower runs once per batch). With ``return_visual`` also their DeepStack extras
        (a family with DeepStack; else None), which both steps then take; without, the model finds them
        from ``batch["input_ids"]`` (``embed_inputs``)."""
        return self.model.embed_inputs(batch["input_ids"], batch["pixel_values"], batch["image_grid_thw"],
                                       return_visual=return_visual)

    @torch.no_grad()
    def latent_pass(self, batch: dict[str, Any], embeds: torch.Tensor,
                    visual: VisualStack | None = None) -> LatentPassOutput | None:
        """Step 1 (the model's ``latent_mode=True`` pass); None when the engine runs without latents."""
        if not self.use_latents:
            return None
        positions = self.model.compute_position_ids(batch["input_ids"], batch["attention_mask"],
                                                    batch["mm_token_type_ids"], batch["image_grid_thw"])
        return self.model.latent_pass(batch["input_ids"], batch["attention_mask"], embeds, positions,
                                      batch["latent_segments"], batch["latent_budgets"],
                                      threshold=self.threshold, sample_ids=batch["ids"], visual=visual)

    @torch.no_grad()
    def generate(
        self, batch: dict[str, Any], embeds: torch.Tensor, patches: Patches, gen: GenerationSettings,
        visual: VisualStack | None = None,
    ) -> torch.Tensor:
        """Step 2: ``generate()`` from ``embeds`` with the patches and mask; the new tokens ``[B, T]``.

        The patches are placed at the prefill by the model; ``input_ids`` still drive the M-RoPE
        positions (with ``mm_token_type_ids`` and ``image_grid_thw``), computed over the full-budget
        sequence as in step 1. With ``gen.compile`` the decoding runs on a static cache, compiled; the text
        model must then run ``latent_sdpa`` or ``latent_eager`` (flash attention takes no static-cache graph).
        """
        if gen.compile is not False and self.model.text_attention not in ("latent_sdpa", "latent_eager"):
            raise ValueError(f"compiled generation runs with latent_sdpa or latent_eager text attention, not "
                             f"{self.model.text_attention!r}")
        # generate() fills every option left unset from model.generation_config (a checkpoint's
        # generation_config.json, e.g. a repetition penalty); a blank one there keeps decoding as asked.
        saved = self.model.generation_config
        self.model.generation_config = GenerationConfig()
        try:
            out = self.model.generate(
                input_ids=batch["input_ids"], inputs_embeds=embeds, attention_mask=batch["attention_mask"],
                image_grid_thw=batch["image_grid_thw"], mm_token_type_ids=batch["mm_token_type_ids"],
                generation_config=gen.generation_config(self.pad_id, self.stop_ids, self.device), **patches.kwargs(),
                latent_visual=visual,
            )
        finally:
            self.model.generation_config = saved
        return out[:, batch["input_ids"].shape[1]:]

    def decode(self, new_tokens: torch.Tensor) -> list[tuple[str, list[int], bool]]:
        """Per row: (answer text, tokens up to the end of turn, whether the end of turn was reached)."""
        decoded = []
        for row in new_tokens.tolist():
            cut = next((i for i, t in enumerate(row) if t in self.stop_ids), None)
            ids = row if cut is None else row[:cut]
            text = self.tokenizer.decode(ids, skip_special_tokens=True).strip()
            decoded.append((text, ids, cut is not None))
        return decoded

    def _timed(self, fn, *args):
        dev = self.device
        _sync(dev)
        t0 = time.perf_counter()
        out = fn(*args)
        _sync(dev)
        return out, time.perf_counter() - t0

    def run_batch(
        self, prepared: list[PreparedSample], gen: GenerationSettings, return_latents: bool = False
    ) -> BatchOutcome:
        """Collate, step 1, step 2, decode. Raises if anything in the batch fails."""
        batch = self.collate(prepared)
        (embeds, visual), t_encode = self._timed(self.encode, batch, True)
        p1, t_latent = self._timed(self.latent_pass, batch, embeds, visual)
        new_tokens, t_gen = self._timed(self.generate, batch, embeds, Patches.from_pass(p1), gen, visual)
        timings = {"encode_s": t_encode, "latent_pass_s": t_latent, "generation_s": t_gen,
                   "batch_size": len(prepared)}
        per_row = split_latents(p1, len(prepared)) if return_latents and p1 is not None else None
        results = []
        for b, (p, (text, ids, finished)) in enumerate(zip(prepared, self.decode(new_tokens), strict=True)):
            results.append(InferenceResult(
                id=p.id, index=p.index, answer=text, budgets=list(p.budgets), budget_source=p.budget_source,
                used_lens=list(p1.latent_used_lens[b]) if p1 is not None else [],
                stop_probs=[list(s) for s in p1.latent_stop_probs[b]] if p1 is not None else [],
                timings=dict(timings), token_ids=ids, finished=finished,
                latents=per_row[b] if per_row is not None else None,
            ))
        return BatchOutcome(prepared, batch, embeds, p1, results, visual)

    def iter_batches(
        self, samples: Sequence[Any], gen: GenerationSettings, batch_size: int = 8,
        return_latents: bool = False,
    ) -> Iterator[tuple[BatchOutcome | None, list[InferenceResult]]]:
        """Yield ``(outcome, error_results)`` per chunk of ``batch_size`` samples.

        Samples that fail their checks become error results and the others run together. If the
        batch itself fails, each of its samples runs alone, so one bad sample cannot take the others down.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1")
        for start in range(0, len(samples), batch_size):
            good: list[PreparedSample] = []
            errors: list[InferenceResult] = []
            for i in range(start, min(start + batch_size, len(samples))):
                try:
                    good.append(self.prepare(samples[i], i, gen.max_new_tokens))
                except SampleError as err:
                    errors.append(_error_result(sample_id_of(samples[i], i), i, err.kind, str(err)))
            if not good:
                yield None, errors
                continue
            outcome, failure = self._try_batch(good, gen, return_latents)
            if outcome is not None:
                yield outcome, errors
            elif len(good) == 1:
                yield None, errors + [_error_result(good[0].id, good[0].index, "runtime", failure)]
            else:
                yield None, errors
                for p in good:
                    outcome, failure = self._try_batch([p], gen, return_latents)
                    yield outcome, [] if outcome else [_error_result(p.id, p.index, "runtime", failure)]

    def _try_batch(self, prepared, gen, return_latents) -> tuple[BatchOutcome | None, str | None]:
        try:
            return self.run_batch(prepared, gen, return_latents), None
        except Exception as err:  # reported in the sample's result, never hidden
            return None, f"{type(err).__name__}: {err}"

    def run(
        self,
        samples: Sequence[Any],
        batch_size: int = 8,
        max_new_tokens: int = 32,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        seed: int | None = None,
        return_latents: bool = False,
        compile: bool | str = False,
        min_new_tokens: int = 0,
    ) -> list[InferenceResult]:
        """Answer every sample; results come back in input order, one per sample (errors included).

        A sample is a :class:`~latentvl.data.records.Record` or a dict with ``question``, ``images``
        (paths or PIL images) and optionally ``id``, ``latent_budgets``, ``cot_image_sizes``,
        ``cot_images``. ``return_latents`` keeps each sample's active latent vectors on the CPU. ``compile``
        decodes on a static cache, compiled; ``min_new_tokens`` holds the end of turn back
        (:class:`GenerationSettings`).
        """
        gen = GenerationSettings(max_new_tokens, do_sample, temperature, top_p, top_k, seed, compile, min_new_tokens)
        if seed is not None:
            torch.manual_seed(seed)
        results: list[InferenceResult] = []
        for outcome, errors in self.iter_batches(samples, gen, batch_size, return_latents):
            results.extend(errors)
            if outcome is not None:
                results.extend(outcome.results)
        return sorted(results, key=lambda r: r.index)


def _error_result(sid: str, index: int, kind: str, message: str) -> InferenceResult:
    return InferenceResult(id=sid, index=index, error=message, error_kind=kind)


def split_latents(p1: LatentPassOutput, batch_size: int) -> list[torch.Tensor]:
    """``ce_patch_vec`` split into per-row ``[n_b, H]`` CPU tensors (rows are ordered by row, then column)."""
    rows = p1.ce_patch_pos[:, 0]
    counts = torch.bincount(rows, minlength=batch_size).tolist()
    return [t.detach().float().cpu() for t in torch.split(p1.ce_patch_vec, counts)]


def infer(
    model: Any, processor: Any, samples: Sequence[Any], threshold: float | None = None,
    use_latents: bool = True, default_num_segments: int = 1, engine: str = "hf",
    checkpoint: str | None = None, **run_kwargs: Any,
) -> list[InferenceResult]:
    """One-call form of :class:`LatentInference` (``run_kwargs`` go to :meth:`LatentInference.run`).

    ``engine="vllm"`` runs step 2 in vLLM (:class:`~latentvl.inference.vllm_engine.VLLMInference`, which
    loads ``checkpoint``, the directory ``model`` came from)."""
    kw = dict(threshold=threshold, use_latents=use_latents, default_num_segments=default_num_segments)
    if engine == "vllm":
        if checkpoint is None:
            raise ValueError("engine='vllm' needs checkpoint= (the directory the model was loaded from)")
        from .vllm_engine import VLLMInference

        runner: LatentInference = VLLMInference(model, processor, checkpoint, **kw)
    elif engine == "hf":
        runner = LatentInference(model, processor, **kw)
    else:
        raise ValueError(f"engine={engine!r} must be 'hf' or 'vllm'")
    return runner.run(samples, **run_kwargs)
