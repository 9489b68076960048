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
from ..model.layout import check_latent_inputs
from ..processor import LatentProcessor
from ..tokens import LATENT_END, LATENT_PAD, LATENT_START
from .records import open_rgb

IGNORE_INDEX = -100

Grid = tuple[int, int, int]
Segment = tuple[int, int, int]


class CollatorInputError(ValueError):
    """A record cannot be collated; the message names the sample id and the field."""


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
def _image_label(value: Any) -> str:
    return repr(os.fspath(value)) if isinstance(value, (str, os.PathLike)) else type(value).__name__


def _read(value: Any, sample_id: str, where: str, read: Any) -> Any:
    """``read(path)`` with errors that name the sample and field; PIL images pass through as ``None``."""
    if isinstance(value, Image.Image):
        return None
    if isinstance(value, (str, os.PathLike)):
        try:
            return read(value)
        except (OSError, ValueError) as err:
            raise CollatorInputError(
                f"sample {sample_id!r}: {where}: cannot read image {_image_label(value)}: {err}"
            ) from err
    raise CollatorInputError(
        f"sample {sample_id!r}: {where}: expected a PIL image or a path, got {type(value).__name__}"
    )


def load_image(value: Any, sample_id: str, where: str) -> Image.Image:
    """A PIL image (RGB) from a PIL image or a path, read as the dataset reads it (``open_rgb``);
    ``where`` names the field, e.g. ``images[0]``."""
    return value if isinstance(value, Image.Image) else _read(value, sample_id, where, open_rgb)


def image_size(value: Any, sample_id: str, where: str) -> tuple[int, int]:
    """``(width, height)`` of a PIL image or an image file; for a file only the header is read."""
    if isinstance(value, Image.Image):
        return value.size

    def header_size(path: Any) -> tuple[int, int]:
        with Image.open(path) as im:
            return im.size

    return _read(value, sample_id, where, header_size)


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


def verify_segments(
    input_ids: torch.Tensor,
    segments: list[list[Segment]],
    budgets: list[list[int]],
    latent_token_id: int,
    sample_ids: list[str],
    latent_start_token_id: int | None = None,
    latent_end_token_id: int | None = None,
) -> None:
    """Check segments against padded ``input_ids`` ``[B, S]``; raise naming the sample id on a mismatch.

    Beyond :func:`latentvl.model.layout.check_latent_inputs` (one segment per CoT image, in order,
    only latent ids, length == budget) it checks that no latent id lies outside the segments and, when
    the ids are given, that each segment is framed by ``<|latent_start|>`` and ``<|latent_end|>``.
    """
    check_latent_inputs(input_ids, segments, budgets, latent_token_id, "A", sample_ids=sample_ids)
    rows = input_ids.tolist()
    for b, (row, segs) in enumerate(zip(rows, segments, strict=True)):
        who = f"sample {b} (id {sample_ids[b]!r})"
        for i, (start, end, img) in enumerate(segs):
            where = f"{who}: segment {i} ({start}, {end}, {img})"
            if img != i:
                raise CollatorInputError(f"{where}: belongs to CoT image {img}, expected {i}")
            if latent_start_token_id is not None and (start == 0 or row[start - 1] != latent_start_token_id):
                raise CollatorInputError(f"{where}: not preceded by {LATENT_START}")
            if latent_end_token_id is not None and (end >= len(row) or row[end] != latent_end_token_id):
                raise CollatorInputError(f"{where}: not followed by {LATENT_END}")
        inside = sum(end - start for start, end, _ in segs)
        total = sum(1 for t in row if t == latent_token_id)
        if total != inside:
            raise CollatorInputError(
                f"{who}: {total} latent tokens in input_ids but the segments cover {inside}")


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
    rejects (never truncates) a longer sequence.
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
        self._reserved = {
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

    def _checked_text(self, text: str, sample_id: str, name: str) -> list[int]:
        ids = self._text(text)
        bad = sorted({t for t in ids if t in self._reserved})
        if bad:
            tokens = self.tokenizer.convert_ids_to_tokens(bad)
            raise CollatorInputError(
                f"sample {sample_id!r}: field {name!r} contains reserved tokens {tokens}")
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
        sid = sample_id if sample_id is not None else self._sample_id(sample, 0)
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
            return out
        sizes = sample.get("cot_image_sizes")
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
            return [self.budget_for_grid(g) for g in grids]
        cot = self._image_list(sample, "cot_images", sid)
        if cot:
            sizes = [image_size(v, sid, f"cot_images[{i}]") for i, v in enumerate(cot)]
            return [self.budget_for_grid(self._grid(w, h, sid, f"cot_images[{i}]"))
                    for i, (w, h) in enumerate(sizes)]
        if not question_grids:
            return []
        return [self.budget_for_grid(question_grids[0])] * self.default_num_segments

    def _grid(self, width: int, height: int, sid: str, where: str) -> Grid:
        try:
            return grid_from_size(self.image_processor, width, height)
        except ValueError as err:
            raise CollatorInputError(f"sample {sid!r}: {where}: size {width}x{height}: {err}") from err

    # ------------------------------------------------------------------ record access
    @staticmethod
    def _sample_id(sample: Mapping[str, Any], index: int) -> str:
        sid = sample.get("id") if isinstance(sample, Mapping) else None
        return str(sid) if sid is not None else f"#{index}"

    @staticmethod
    def _image_list(sample: Mapping[str, Any], key: str, sid: str) -> list[Any]:
        value = sample.get(key)
        if value is None:
            return []
        if isinstance(value, (str, os.PathLike, Image.Image)) or not isinstance(value, Sequence):
            raise CollatorInputError(f"sample {sid!r}: field {key!r} must be a list of images or paths")
        return list(value)

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
        out = self.image_processor(images=images, return_tensors="pt")
        return out["pixel_values"], out["image_grid_thw"].long()

    # ------------------------------------------------------------------ one sample
    def encode_sample(
        self, sample_id: str, question: str, question_grids: list[Grid], budgets: list[int],
        answer: str | None,
    ) -> EncodedSample:
        """Assemble one sequence from ids; ``answer=None`` ends it after the assistant header/latents."""
        ids: list[int] = list(self._system_ids)
        labels: list[int] = [IGNORE_INDEX] * len(ids)
        mm: list[int] = [0] * len(ids)

        def put(pieces: list[int], label: bool = False, image: bool = False) -> None:
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
            sid = self._sample_id(sample, n)
            if not isinstance(sample, Mapping):
                raise CollatorInputError(f"sample {sid!r}: expected a dict, got {type(sample).__name__}")
            ids.append(sid)
            questions.append(self._string(sample, "question", sid))
            answers.append(None if self.for_generation else self._string(sample, "answer", sid))
            q_images.append([load_image(v, sid, f"images[{i}]")
                             for i, v in enumerate(self._image_list(sample, "images", sid))])
            wants_cot_pixels = self.use_latents and not self.for_generation
            cot_images.append([load_image(v, sid, f"cot_images[{i}]")
                               for i, v in enumerate(self._image_list(sample, "cot_images", sid))]
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


def _split_grids(grid_thw: torch.Tensor | None, counts: list[int]) -> list[list[Grid]]:
    """Split ``[sum(counts), 3]`` grid rows into per-sample lists of ``(t, h, w)`` tuples."""
    rows = [tuple(int(v) for v in r) for r in grid_thw.tolist()] if grid_thw is not None else []
    out, pos = [], 0
    for c in counts:
        out.append(rows[pos:pos + c])
        pos += c
    return out
