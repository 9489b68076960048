"""Turn dataset records into model batches with latent segments (design §2, §3, D1, D9).

A record is a dict::

    {"id": str, "question": str, "images": [PIL.Image | path], "cot_images": [PIL.Image | path],
     "answer": str}

optionally with ``"latent_budgets": [int]`` or ``"cot_image_sizes": [(width, height)]`` (used for
generation only, design D9). Each sequence is assembled from token ids piece by piece, so every
position (image tokens, latent slots, answer) is known by construction; the latent segments are then
checked against the padded ``input_ids`` before the batch is returned.

Layout of one sample (D1)::

    [<|im_start|>system\\n{system_prompt}<|im_end|>\\n]
    <|im_start|>user\\n
      per question image: <|vision_start|> + N x <|image_pad|> + <|vision_end|>
    {question}<|im_end|>\\n
    <|im_start|>assistant\\n
      per CoT image i: <|latent_start|> + B_i x <|latent_pad|> + <|latent_end|>
    {answer}<|im_end|>\\n                                   (training only)
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

from ..budget import compute_latent_budget, num_visual_tokens
from ..config import LatentSettings
from ..errors import CollatorInputError, ImageReadError
from ..images import read_image
from ..processor import LatentProcessor
from ..segments import verify_segments
from ..tokens import LATENT_END, LATENT_PAD, LATENT_START
from .image_cache import ProcessedImageCache

IGNORE_INDEX = -100
_TEXT_MEMO = 1 << 16  # texts whose checked token ids a collator keeps (then it starts over)

Grid = tuple[int, int, int]
Segment = tuple[int, int, int]


@dataclass
class EncodedSample:
    """One unpadded sequence. All lists have the sequence length L; segments are in [0, L) coordinates."""

    id: str
    input_ids: list[int]
    labels: list[int]
    mm_token_type_ids: list[int]
    budgets: list[int] = field(default_factory=list)
    segments: list[Segment] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.input_ids)


# --------------------------------------------------------------------------- small helpers
# Special tokens that may appear in text: Qwen's grounding markers (boxes, object references, quads).
TEXT_SPECIAL_TOKENS = frozenset({
    "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>", "<|box_end|>",
    "<|quad_start|>", "<|quad_end|>",
})


def reserved_token_ids(tokenizer: Any) -> set[int]:
    """Ids that text (question, answer, system prompt) must not contain: every special token of the
    tokenizer (its pad, eos and bos tokens and each added token marked special: chat, vision, video and
    latent tokens), except the unknown token (what unknown text becomes) and the grounding markers of
    :data:`TEXT_SPECIAL_TOKENS`. The collator appends the closing ``<|im_end|>`` itself."""
    ids = {int(i) for i in getattr(tokenizer, "all_special_ids", []) or [] if i is not None}
    for tid, added in (getattr(tokenizer, "added_tokens_decoder", None) or {}).items():
        if getattr(added, "special", False) and getattr(added, "content", str(added)) not in TEXT_SPECIAL_TOKENS:
            ids.add(int(tid))
    for name in ("pad_token_id", "eos_token_id", "bos_token_id"):
        tid = getattr(tokenizer, name, None)
        if isinstance(tid, int):
            ids.add(tid)
    unk = getattr(tokenizer, "unk_token_id", None)
    ids.discard(unk)
    allowed = tokenizer.convert_tokens_to_ids(sorted(TEXT_SPECIAL_TOKENS))
    return ids - {a for a in allowed if a is not None and a != unk}


def load_image(value: Any, sample_id: str, where: str) -> Image.Image:
    """A PIL image (RGB) from a PIL image or a path (:func:`latentvl.images.read_image`); ``where`` names
    the field, e.g. ``images[0]``."""
    return _read(value, sample_id, where, header_only=False)


def image_size(value: Any, sample_id: str, where: str) -> tuple[int, int]:
    """``(width, height)`` of a PIL image or an image file; for a file only the header is read."""
    return _read(value, sample_id, where, header_only=True)


def sample_id_of(sample: Any, index: int) -> str:
    """A sample's id as errors name it: its ``id`` (a mapping's key or an attribute), else ``#index``."""
    sid = sample.get("id") if isinstance(sample, Mapping) else getattr(sample, "id", None)
    return str(sid) if sid is not None and sid != "" else f"#{index}"


def image_list(sample: Mapping[str, Any], key: str, sid: str) -> list[Any]:
    """The list of images or paths under ``key`` (none: ``[]``); anything else is a
    :class:`CollatorInputError` naming the sample and field."""
    value = sample.get(key)
    if value is None:
        return []
    if isinstance(value, (str, os.PathLike, Image.Image)) or not isinstance(value, Sequence):
        raise CollatorInputError(f"sample {sid!r}: field {key!r} must be a list of images or paths")
    return list(value)


def _read(value: Any, sample_id: str, where: str, header_only: bool) -> Any:
    try:
        return read_image(value, header_only=header_only)
    except ImageReadError as err:
        raise CollatorInputError(f"sample {sample_id!r}: {where}: {err}") from err


def _size_limits(image_processor: Any) -> tuple[int, int]:
    """``(min_pixels, max_pixels)`` the image processor resizes to."""
    size = getattr(image_processor, "size", None) or {}
    lo = size.get("shortest_edge") if hasattr(size, "get") else None
    hi = size.get("longest_edge") if hasattr(size, "get") else None
    lo = lo if lo is not None else getattr(image_processor, "min_pixels", None)
    hi = hi if hi is not None else getattr(image_processor, "max_pixels", None)
    if lo is None or hi is None:
        raise ValueError(f"image processor size {size!r} has no shortest_edge/longest_edge (min/max pixels)")
    return int(lo), int(hi)


def grid_from_size(image_processor: Any, width: int, height: int) -> Grid:
    """The ``(t, h, w)`` grid the image processor gives an image of ``width x height`` pixels.

    Uses the processor's own resizing rule (``smart_resize`` with factor ``patch_size * merge_size``
    and its min/max pixels); no pixels are read. A still image has ``t = 1``.
    """
    patch = int(image_processor.patch_size)
    factor = patch * int(image_processor.merge_size)
    min_pixels, max_pixels = _size_limits(image_processor)
    h, w = smart_resize(int(height), int(width), factor=factor, min_pixels=min_pixels, max_pixels=max_pixels)
    return (1, h // patch, w // patch)


# --------------------------------------------------------------------------- the collator
class LatentCollator:
    """Collate records into a batch for the latent model (training) or for generation.

    Output (``B`` samples, padded length ``S``):

    - ``input_ids`` ``[B, S]`` long, ``attention_mask`` ``[B, S]`` long (0 on padding);
    - ``labels`` ``[B, S]`` long: -100 except the answer tokens and the ``<|im_end|>`` closing the
      answer; ``None`` when ``for_generation``;
    - ``pixel_values`` ``[sum_q patches, C*T*P*P]`` and ``image_grid_thw`` ``[Q, 3]`` for the batch's
      question images (sample-major), or ``None`` if there are none;
    - ``mm_token_type_ids`` ``[B, S]`` int32: 1 at ``<|image_pad|>``, 0 elsewhere;
    - ``cot_pixel_values`` / ``cot_image_grid_thw`` ``[K, 3]``: every CoT image of the batch,
      sample-major then image order (training with latents only; else ``None``);
    - design §2 lists: ``latent_image_counts`` [B], ``latent_budgets`` [B][M], ``latent_segments``
      [B][M] of ``(start, end, img_idx)`` in padded coordinates, ``latent_budget_total`` [B];
    - ``ids``: the sample ids.

    Training budgets always come from the CoT images' grids (design §3). With ``for_generation=True``
    budgets follow D9: the record's ``latent_budgets`` (an empty list means no segments); else its
    ``cot_image_sizes`` (``(width, height)`` pairs), else the sizes of its non-empty ``cot_images``;
    else ``default_num_segments`` segments, each with the budget of the first question image (none
    without a question image). ``use_latents=False`` builds the no-latent baseline layout.

    ``padding_side`` defaults to "right" for training and "left" for generation. ``max_length``
    rejects (never truncates) a longer sequence. ``image_cache``: a
    :class:`~latentvl.data.image_cache.ProcessedImageCache` that keeps each distinct image's patch rows (the
    same tensors, processed once).
    """

    def __init__(
        self,
        processor: LatentProcessor,
        settings: LatentSettings | Any,
        max_length: int | None = None,
        padding_side: str | None = None,
        system_prompt: str | None = None,
        for_generation: bool = False,
        use_latents: bool = True,
        default_num_segments: int = 1,
        image_cache: ProcessedImageCache | None = None,
    ) -> None:
        if padding_side is None:
            padding_side = "left" if for_generation else "right"
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side={padding_side!r}: must be 'left' or 'right'")
        if max_length is not None and max_length < 1:
            raise ValueError(f"max_length={max_length}: must be a positive integer or None")
        if default_num_segments < 0:
            raise ValueError(f"default_num_segments={default_num_segments}: must be >= 0")
        if system_prompt is not None and not isinstance(system_prompt, str):
            raise TypeError(f"system_prompt must be a string or None, got {type(system_prompt).__name__}")
        model_config = None
        if not isinstance(settings, LatentSettings):
            model_config = settings
            settings = LatentSettings.from_config(settings)
        self.settings = settings.validate()
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.image_processor = processor.image_processor
        self.merge_size = processor.merge_size
        self.max_length = max_length
        self.padding_side = padding_side
        self.system_prompt = system_prompt
        self.for_generation = for_generation
        self.use_latents = use_latents
        self.default_num_segments = default_num_segments
        self.image_cache = image_cache
        self._text_memo: dict[str, tuple[int, ...]] = {}

        tid = processor.token_id
        self.im_start_id = tid("<|im_start|>")
        self.im_end_id = tid("<|im_end|>")
        self.vision_start_id = tid("<|vision_start|>")
        self.vision_end_id = tid("<|vision_end|>")
        self.image_pad_id = tid("<|image_pad|>")
        if self.tokenizer.pad_token_id is None:
            raise ValueError("the tokenizer has no pad token; set tokenizer.pad_token before collating")
        self.pad_id = int(self.tokenizer.pad_token_id)
        if model_config is not None:
            cfg_image = getattr(model_config, "image_token_id", None)
            if cfg_image is not None and int(cfg_image) != self.image_pad_id:
                raise ValueError(
                    f"model config image_token_id={cfg_image} but the tokenizer's <|image_pad|> is "
                    f"{self.image_pad_id}")
            vision = getattr(model_config, "vision_config", None)
            model_merge = getattr(vision, "spatial_merge_size", None)
            if model_merge is not None and int(model_merge) != self.merge_size:
                raise ValueError(
                    f"image processor merge_size={self.merge_size} but the model's vision_config.spatial_merge_size="
                    f"{model_merge}: image token counts and latent budgets would not match the model's features")
        self.latent_start_id = self._latent_id("latent_start_token_id", LATENT_START)
        self.latent_id = self._latent_id("latent_token_id", LATENT_PAD)
        self.latent_end_id = self._latent_id("latent_end_token_id", LATENT_END)
        # Text pieces must not smuggle in tokens that define the layout.
        self._reserved = reserved_token_ids(self.tokenizer) | {
            self.im_start_id, self.im_end_id, self.vision_start_id, self.vision_end_id, self.image_pad_id,
            self.latent_start_id, self.latent_id, self.latent_end_id,
        }
        self._user_ids = self._text("user\n")
        self._assistant_ids = self._text("assistant\n")
        self._newline_ids = self._text("\n")
        self._system_ids: list[int] = []
        if system_prompt is not None:
            body = self._checked_text("system\n" + system_prompt, "<system_prompt>", "system_prompt")
            self._system_ids = [self.im_start_id, *body, self.im_end_id, *self._newline_ids]

    # ------------------------------------------------------------------ setup helpers
    def _latent_id(self, name: str, token: str) -> int:
        """The id from the settings, falling back to the tokenizer; they must agree when both exist."""
        configured = int(getattr(self.settings, name))
        try:
            from_tokenizer: int | None = self.processor.token_id(token)
        except KeyError:
            from_tokenizer = None
        if configured < 0:
            if from_tokenizer is None:
                raise ValueError(f"settings.{name} is unset and the tokenizer has no {token}")
            return from_tokenizer
        if from_tokenizer is not None and from_tokenizer != configured:
            raise ValueError(f"settings.{name}={configured} but the tokenizer's {token} is {from_tokenizer}")
        return configured

    def _text(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _checked_text(self, text: str, sample_id: str, name: str) -> tuple[int, ...]:
        """``text``'s token ids, refused when they hold a reserved token; a text that passed is remembered
        (questions and answers repeat every epoch), up to :data:`_TEXT_MEMO` texts."""
        known = self._text_memo.get(text)
        if known is not None:
            return known
        ids = tuple(self._text(text))
        bad = sorted({t for t in ids if t in self._reserved})
        if bad:
            tokens = self.tokenizer.convert_ids_to_tokens(bad)
            raise CollatorInputError(
                f"sample {sample_id!r}: field {name!r} contains reserved tokens {tokens}")
        if len(self._text_memo) >= _TEXT_MEMO:
            self._text_memo.clear()
        self._text_memo[text] = ids
        return ids

    # ------------------------------------------------------------------ budgets
    def budget_for_grid(self, grid: Sequence[int] | torch.Tensor) -> int:
        """design §3 budget of an image with grid ``(t, h, w)``."""
        s = self.settings
        return compute_latent_budget(
            num_visual_tokens(grid, self.merge_size),
            s.latent_budget_alpha, s.latent_budget_gamma, s.latent_budget_min, s.latent_budget_max,
        )

    def generation_budgets(
        self, sample: Mapping[str, Any], question_grids: list[Grid], sample_id: str | None = None
    ) -> list[int]:
        """Budgets for a record at inference (D9): explicit, else CoT image sizes, else default segments."""
        return self.plan_budgets(sample, question_grids, sample_id)[0]

    def plan_budgets(
        self, sample: Mapping[str, Any], question_grids: list[Grid], sample_id: str | None = None
    ) -> tuple[list[int], str]:
        """The budgets of a record at inference and where they came from (D9), the one place that orders
        the sources: ``explicit`` (``latent_budgets``), else ``cot_images`` (``cot_image_sizes`` as
        ``(width, height)`` pairs, else the ``cot_images`` listed, of which only the header is read), else
        ``default`` (``default_num_segments`` segments with the first question image's budget); ``none``
        when that gives no segment. Raises :class:`CollatorInputError` naming the sample and field."""
        sid = sample_id if sample_id is not None else sample_id_of(sample, 0)
        explicit = sample.get("latent_budgets")
        if explicit is not None:
            if not isinstance(explicit, Sequence) or isinstance(explicit, str):
                raise CollatorInputError(f"sample {sid!r}: field 'latent_budgets' must be a list of ints")
            out = []
            for i, b in enumerate(explicit):
                if isinstance(b, bool) or not isinstance(b, int) or b < 1:
                    raise CollatorInputError(
                        f"sample {sid!r}: latent_budgets[{i}]={b!r} must be an integer >= 1")
                out.append(int(b))
            return out, "explicit" if out else "none"
        sizes = sample.get("cot_image_sizes")
        if sizes is None:
            cot = image_list(sample, "cot_images", sid)
            sizes = [image_size(v, sid, f"cot_images[{i}]") for i, v in enumerate(cot)] if cot else None
        if sizes is not None:
            grids = []
            for i, wh in enumerate(sizes):
                try:
                    w, h = (int(v) for v in wh)
                except (TypeError, ValueError) as err:
                    raise CollatorInputError(
                        f"sample {sid!r}: cot_image_sizes[{i}]={wh!r} must be (width, height)"
                    ) from err
                if w < 1 or h < 1:
                    raise CollatorInputError(
                        f"sample {sid!r}: cot_image_sizes[{i}]={wh!r} must be positive")
                grids.append(self._grid(w, h, sid, f"cot_image_sizes[{i}]"))
            return [self.budget_for_grid(g) for g in grids], "cot_images" if grids else "none"
        if not question_grids:
            return [], "none"
        budgets = [self.budget_for_grid(question_grids[0])] * self.default_num_segments
        return budgets, "default" if budgets else "none"

    def _grid(self, width: int, height: int, sid: str, where: str) -> Grid:
        try:
            return grid_from_size(self.image_processor, width, height)
        except ValueError as err:
            raise CollatorInputError(f"sample {sid!r}: {where}: size {width}x{height}: {err}") from err

    # ------------------------------------------------------------------ record access
    @staticmethod
    def _string(sample: Mapping[str, Any], key: str, sid: str) -> str:
        value = sample.get(key)
        if value is None:
            raise CollatorInputError(f"sample {sid!r}: field {key!r} is missing")
        if not isinstance(value, str):
            raise CollatorInputError(
                f"sample {sid!r}: field {key!r} must be a string, got {type(value).__name__}")
        return value

    def _process_images(self, images: list[Image.Image]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """``(pixel_values, image_grid_thw [n, 3])`` from the image processor, or ``(None, None)``."""
        if not images:
            return None, None
        if self.image_cache is not None:
            return self.image_cache.process(images, self._process_one)
        out = self.image_processor(images=images, return_tensors="pt")
        return out["pixel_values"], out["image_grid_thw"].long()

    def _process_one(self, image: Image.Image) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.image_processor(images=[image], return_tensors="pt")
        return out["pixel_values"], out["image_grid_thw"].long()[0]

    # ------------------------------------------------------------------ one sample
    def encode_sample(
        self, sample_id: str, question: str, question_grids: list[Grid], budgets: list[int],
        answer: str | None,
    ) -> EncodedSample:
        """Assemble one sequence from ids; ``answer=None`` ends it after the assistant header/latents."""
        ids: list[int] = list(self._system_ids)
        labels: list[int] = [IGNORE_INDEX] * len(ids)
        mm: list[int] = [0] * len(ids)

        def put(pieces: Sequence[int], label: bool = False, image: bool = False) -> None:
            ids.extend(pieces)
            labels.extend(pieces if label else [IGNORE_INDEX] * len(pieces))
            mm.extend([1 if image else 0] * len(pieces))

        put([self.im_start_id, *self._user_ids])
        for grid in question_grids:
            put([self.vision_start_id])
            put([self.image_pad_id] * num_visual_tokens(grid, self.merge_size), image=True)
            put([self.vision_end_id])
        put(self._checked_text(question, sample_id, "question"))
        put([self.im_end_id, *self._newline_ids, self.im_start_id, *self._assistant_ids])
        segments: list[Segment] = []
        for i, budget in enumerate(budgets):
            put([self.latent_start_id])
            segments.append((len(ids), len(ids) + budget, i))
            put([self.latent_id] * budget)
            put([self.latent_end_id])
        if answer is not None:
            put(self._checked_text(answer, sample_id, "answer"), label=True)
            put([self.im_end_id], label=True)
            put(self._newline_ids)
        if self.max_length is not None and len(ids) > self.max_length:
            raise CollatorInputError(
                f"sample {sample_id!r}: sequence length {len(ids)} exceeds max_length {self.max_length} "
                "(sequences are never truncated)")
        return EncodedSample(sample_id, ids, labels, mm, list(budgets), segments)

    # ------------------------------------------------------------------ the batch
    def __call__(self, samples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        if not samples:
            raise ValueError("cannot collate an empty list of samples")
        ids: list[str] = []
        questions: list[str] = []
        answers: list[str | None] = []
        q_images: list[list[Image.Image]] = []
        cot_images: list[list[Image.Image]] = []
        for n, sample in enumerate(samples):
            sid = sample_id_of(sample, n)
            if not isinstance(sample, Mapping):
                raise CollatorInputError(f"sample {sid!r}: expected a dict, got {type(sample).__name__}")
            ids.append(sid)
            questions.append(self._string(sample, "question", sid))
            answers.append(None if self.for_generation else self._string(sample, "answer", sid))
            q_images.append([load_image(v, sid, f"images[{i}]")
                             for i, v in enumerate(image_list(sample, "images", sid))])
            wants_cot_pixels = self.use_latents and not self.for_generation
            cot_images.append([load_image(v, sid, f"cot_images[{i}]")
                               for i, v in enumerate(image_list(sample, "cot_images", sid))]
                              if wants_cot_pixels else [])

        pixel_values, image_grid_thw = self._process_images([im for ims in q_images for im in ims])
        cot_pixel_values, cot_grid_thw = self._process_images([im for ims in cot_images for im in ims])
        q_grids = _split_grids(image_grid_thw, [len(x) for x in q_images])
        cot_grids = _split_grids(cot_grid_thw, [len(x) for x in cot_images])

        encoded = []
        for n, sample in enumerate(samples):
            if not self.use_latents:
                budgets: list[int] = []
            elif self.for_generation:
                budgets = self.generation_budgets(sample, q_grids[n], ids[n])
            else:
                budgets = [self.budget_for_grid(g) for g in cot_grids[n]]
            encoded.append(self.encode_sample(ids[n], questions[n], q_grids[n], budgets, answers[n]))

        batch = self._pad(encoded)
        verify_segments(batch["input_ids"], batch["latent_segments"], batch["latent_budgets"], self.latent_id,
                        ids, self.latent_start_id, self.latent_end_id)
        batch.update(
            labels=batch["labels"] if not self.for_generation else None,
            pixel_values=pixel_values,
            image_grid_thw=image_grid_thw,
            cot_pixel_values=cot_pixel_values,
            cot_image_grid_thw=cot_grid_thw,
            ids=ids,
        )
        return batch

    def _pad(self, encoded: list[EncodedSample]) -> dict[str, Any]:
        """Pad to the longest sequence on ``padding_side``; shift segments into padded coordinates."""
        S = max(len(e) for e in encoded)
        B = len(encoded)
        input_ids = torch.full((B, S), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((B, S), dtype=torch.long)
        labels = torch.full((B, S), IGNORE_INDEX, dtype=torch.long)
        mm = torch.zeros((B, S), dtype=torch.int32)
        segments = []
        for b, e in enumerate(encoded):
            off = S - len(e) if self.padding_side == "left" else 0
            span = slice(off, off + len(e))
            input_ids[b, span] = torch.tensor(e.input_ids, dtype=torch.long)
            attention_mask[b, span] = 1
            labels[b, span] = torch.tensor(e.labels, dtype=torch.long)
            mm[b, span] = torch.tensor(e.mm_token_type_ids, dtype=torch.int32)
            segments.append([(start + off, end + off, img) for start, end, img in e.segments])
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": labels,
            "mm_token_type_ids": mm,
            "latent_image_counts": [len(e.budgets) for e in encoded],
            "latent_budgets": [list(e.budgets) for e in encoded],
            "latent_segments": segments,
            "latent_budget_total": [sum(e.budgets) for e in encoded],
        }


def to_device(batch: Mapping[str, Any], device: torch.device | str) -> dict[str, Any]:
    """A collated batch with every tensor on ``device`` (the other entries as they are)."""
    return {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()}


def _split_grids(grid_thw: torch.Tensor | None, counts: list[int]) -> list[list[Grid]]:
    """Split ``[sum(counts), 3]`` grid rows into per-sample lists of ``(t, h, w)`` tuples."""
    rows = [tuple(int(v) for v in r) for r in grid_thw.tolist()] if grid_thw is not None else []
    out, pos = [], 0
    for c in counts:
        out.append(rows[pos:pos + c])
        pos += c
    return out
