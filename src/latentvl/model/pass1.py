"""Pass 1 in parts (design §4, D8): the shifted frame, the step functions, the halting state, the step loop
and the outputs. :meth:`LatentQwen2_5_VLForConditionalGeneration.latent_pass` strings them together.

Coordinates. The batch ``[B, S]`` is sample ``b`` at original column ``s``. Pass 1 runs the ``R`` rows of
the :class:`ShiftedFrame`: row ``r`` holds sample ``frame.rows[r]`` moved right by ``frame.shifts[r]``, so
that every row's first latent slot falls on column ``P`` (the prefix length); the frame is ``W = P + steps``
columns wide. Step ``j`` feeds column ``P + j`` of every row, i.e. original column ``P + j - shifts[r]``.
The step grid ``[R, steps]`` says what each step is for each row (a latent slot or not, its slot index,
its segment index, whether it is a segment's last slot).
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..errors import LatentInputError
from ..segments import Layout
from .kv_store import LatentKVStore
from .visual import VisualStack

if TYPE_CHECKING:
    from ..config import LatentSettings


@dataclass
class LatentPassOutput:
    """What pass 1 returns.

    - ``ce_patch_pos`` ``[P, 2]`` long: (batch row, column) of every *active* latent slot, ordered by
      row, then column. ``ce_patch_vec`` ``[P, H]``: the input embedding placed at that slot.
    - ``latent_kv_mask`` ``[B, S]`` bool, True = keep; False only at inactive latent slots.
    - ``latent_used_lens`` ``[B][M]`` and ``latent_stop_probs`` ``[B][M][used_len]`` (stage C; empty
      lists in stage A) as Python lists, for logs.
    - ``used_lens`` ``[B, M_max]`` long tensor (0 where a sample has fewer segments);
      ``stop_logits`` / ``stop_step_active`` ``[B, S]`` (stage C): the stop head's logit after each
      latent slot, and whether that step was taken (a decision the model actually made).
    - ``position_ids`` ``[3, B, S]``: the M-RoPE positions used (D2), for pass 2 and generation.
    - ``align_vec`` ``[P, H]``: the model's own fed-back state at each active slot (what the alignment loss
      scores); it differs from ``ce_patch_vec`` only at teacher-forced slots (``latent_teacher_forcing``).
    """

    ce_patch_pos: torch.LongTensor | None = None
    ce_patch_vec: torch.FloatTensor | None = None
    latent_kv_mask: torch.BoolTensor | None = None
    latent_used_lens: list[list[int]] | None = None
    latent_stop_probs: list[list[list[float]]] | None = None
    used_lens: torch.LongTensor | None = None
    stop_logits: torch.FloatTensor | None = None
    stop_step_active: torch.BoolTensor | None = None
    position_ids: torch.LongTensor | None = None
    num_model_calls: int = 0
    align_vec: torch.FloatTensor | None = None


# ---------------------------------------------------------------------------------------------- the frame
@dataclass
class ShiftedFrame:
    """The rows pass 1 runs, shifted so that their first latent slots share column ``prefix_len``.

    Frame tensors (``W = prefix_len + steps`` columns): ``embeds`` ``[R, W, H]``, ``positions`` ``[3, R, W]``,
    ``attend`` ``[R, W]`` long (1 = a real token; 0 = padding or outside the sample). Step grid
    (``[R, steps]``): ``is_latent``, ``slot_index`` (-1 off segments), ``segment_index`` (-1 off segments),
    ``is_last_slot``. ``rows`` / ``shifts`` ``[R]`` long; ``real`` ``[R, 1]`` bool (False only for the dummy
    row of a batch without latents). ``forced`` ``[R, W]`` bool and ``forced_inputs`` ``[R, W, H]``: the
    teacher-forced slots and their inputs (None without ``latent_teacher_forcing``). ``visual``: the question
    images' :class:`~latentvl.model.visual.VisualStack` in frame coordinates (a family with DeepStack), whose
    visual positions all lie in the prefix.
    """

    rows: torch.Tensor
    shifts: torch.Tensor
    real: torch.Tensor
    prefix_len: int
    steps: int
    embeds: torch.Tensor
    positions: torch.Tensor
    attend: torch.Tensor
    is_latent: torch.Tensor
    slot_index: torch.Tensor
    segment_index: torch.Tensor
    is_last_slot: torch.Tensor
    forced: torch.Tensor | None = None
    forced_inputs: torch.Tensor | None = None
    visual: VisualStack | None = None

    @property
    def num_rows(self) -> int:
        return self.rows.shape[0]

    @property
    def width(self) -> int:
        return self.prefix_len + self.steps

    def original(self, r: torch.Tensor, j: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(sample, original column) of step ``j`` of row ``r`` (equal-length long tensors)."""
        return self.rows[r], self.prefix_len + j - self.shifts[r]


def shifted_frame(layout: Layout, steps: int, inputs_embeds: torch.Tensor, position_ids: torch.Tensor,
                  attention_mask: torch.Tensor,
                  forcing: tuple[torch.Tensor, torch.Tensor] | None = None,
                  visual: VisualStack | None = None) -> ShiftedFrame:
    """Gather the batch ``[B, S]`` into the frame of ``layout`` with ``steps`` steps (the layout's own,
    or more in a distributed run, where every process makes the same number of calls). ``forcing``:
    ``(forced [B, S] bool, inputs [B, S, H])``, the teacher-forced slots and their inputs, gathered alike;
    ``visual`` likewise. A visual position at or after a row's first latent slot is refused (DeepStack
    features enter with the prefix call only)."""
    device = inputs_embeds.device
    S = inputs_embeds.shape[1]
    rows = torch.tensor(layout.rows, device=device)
    shifts = torch.tensor(layout.shifts, device=device)
    orig = torch.arange(layout.prefix_len + steps, device=device)[None, :] - shifts[:, None]  # [R, W]
    inside = (orig >= 0) & (orig < S)
    orig_c = orig.clamp(0, S - 1)
    if visual is not None:
        visual = visual.take(rows, orig_c, inside)
        late = visual.mask[:, layout.prefix_len:].any(dim=1)
        if bool(late.any()):
            sample = int(rows[late.nonzero()[0, 0]])
            raise LatentInputError(f"sample {sample}: an image token after the first latent slot; latentvl places "
                                   "question images before the latent segments")
    return ShiftedFrame(
        rows=rows, shifts=shifts, real=torch.as_tensor(layout.real_rows, device=device)[:, None],
        prefix_len=layout.prefix_len, steps=steps,
        embeds=inputs_embeds[rows[:, None], orig_c],
        positions=position_ids[:, rows[:, None], orig_c],
        attend=(inside & attention_mask[rows[:, None], orig_c].bool()).long(),
        is_latent=torch.as_tensor(layout.is_latent(steps), device=device),
        slot_index=torch.as_tensor(layout.slot_index(steps), device=device),
        segment_index=torch.as_tensor(layout.segment_index(steps), device=device),
        is_last_slot=torch.as_tensor(layout.is_last_slot(steps), device=device),
        forced=None if forcing is None else forcing[0][rows[:, None], orig_c] & inside,
        forced_inputs=None if forcing is None else forcing[1][rows[:, None], orig_c],
        visual=visual,
    )


# ----------------------------------------------------------------------------------------- step functions
def _step_mask(step_bias: torch.Tensor, layer_types: tuple[str, ...]):
    """The text model's ``attention_mask`` for a prepared 4D mask: one per layer type for a text model that
    builds one per type (Qwen2.5-VL's ``layer_types``), the tensor itself for one that builds a single mask
    (Qwen3-VL). Both pass a prepared 4D mask to the attention as is."""
    return {t: step_bias for t in layer_types} if layer_types else step_bias


def _eager_step(lm, x: torch.Tensor, pos: torch.Tensor, key_bias: torch.Tensor, c: int, store: LatentKVStore,
                layer_types: tuple[str, ...]) -> torch.Tensor:
    """One latent step: ``x`` ``[R, H]`` fed at column ``c`` (positions ``pos`` ``[3, R, 1]``); returns the
    last hidden state ``[R, H]``. A one-token step needs no causal mask: the ``[R, 1, 1, c+1]`` key mask
    is the whole mask, handed to the attention layers as is (contiguous: sdpa is slower on a strided one)."""
    step_bias = key_bias[:, None, None, : c + 1].contiguous()
    out = lm(inputs_embeds=x[:, None], attention_mask=_step_mask(step_bias, layer_types), position_ids=pos,
             use_cache=False, latent_kv_store=store)
    return out.last_hidden_state[:, 0]


def _static_step(lm, x: torch.Tensor, pos: torch.Tensor, key_bias: torch.Tensor, column: torch.Tensor,
                 store: LatentKVStore, layer_types: tuple[str, ...]) -> torch.Tensor:
    """:func:`_eager_step` with static shapes: the column is a ``[1]`` long tensor and the key mask covers
    the store's full width, -inf after the column. Every step of a pass has the same shapes."""
    future = torch.arange(key_bias.shape[-1], device=key_bias.device) > column
    step_bias = key_bias.masked_fill(future, float("-inf"))[:, None, None, :]
    out = lm(inputs_embeds=x[:, None], attention_mask=_step_mask(step_bias, layer_types), position_ids=pos,
             use_cache=False, latent_kv_store=store, latent_step_column=column)
    return out.last_hidden_state[:, 0]


@functools.cache
def compiled_latent_step(backend: str = "inductor", cpp_wrapper: bool = False):
    """:func:`_static_step` through ``torch.compile`` with ``backend`` (one compiled function per backend and
    wrapper; its graphs are built on first use and reused by every later step and pass of the same shapes).
    ``cpp_wrapper`` (inductor only): inductor writes the step's wrapper in C++. A one-token step is a few
    dozen small kernels, whose calls from a Python wrapper cost about as much as the kernels on a CPU."""
    options = {"cpp_wrapper": True} if backend == "inductor" and cpp_wrapper else None
    return torch.compile(_static_step, backend=backend, dynamic=False, options=options)


def step_runner(lm, store: LatentKVStore, key_bias: torch.Tensor, layer_types: tuple[str, ...],
                compile_option: bool | str):
    """``run(x, pos, c) -> h``: the pass's step function, eager or (``latent_compile``) static and compiled.

    Under autograd the compiled step hands the store's gradient accumulators to its step operator, so
    they are allocated (:meth:`LatentKVStore.prepare_static_grad`) before the first step, outside the graph.
    """
    if compile_option is False:
        return lambda x, pos, c: _eager_step(lm, x, pos, key_bias, c, store, layer_types)
    device = key_bias.device
    # the C++ wrapper where it was measured to pay: steps without gradient on a CPU (under autograd it
    # gained 3% and is left out)
    step = compiled_latent_step("inductor" if compile_option is True else compile_option,
                                cpp_wrapper=device.type == "cpu" and not torch.is_grad_enabled())

    def run(x, pos, c):
        if torch.is_grad_enabled():
            store.prepare_static_grad()
        return step(lm, x, pos, key_bias, torch.tensor([c], device=device), store, layer_types)
    return run


@contextlib.contextmanager
def no_gradient_checkpointing(module: nn.Module):
    """Turn layer-level gradient checkpointing off inside the block (pass 1 steps over its K/V store)."""
    layers = [m for m in module.modules() if getattr(m, "gradient_checkpointing", False) is True]
    for m in layers:
        m.gradient_checkpointing = False
    try:
        yield
    finally:
        for m in layers:
            m.gradient_checkpointing = True


# ---------------------------------------------------------------------------------------- halting state
class Halting:
    """Which slots a step takes, and (stage C) the stop head's decisions so far.

    Stage A (``stop_head=None``): every latent slot is active. Stage C: a segment stops at the first
    active slot where ``sigmoid(logit) >= threshold``, from its ``min_used``-th slot on; its later slots are
    inactive: with ``null_scale == 0`` their column gets -inf in ``key_bias`` (removed from attention),
    otherwise their key/value are written scaled by ``null_scale`` (the store's ``write_scale``). A new
    segment starts unhalted. All state is ``[R]`` tensors: no host synchronisation.
    """

    def __init__(self, frame: ShiftedFrame, stop_head: nn.Module | None, threshold: float, null_scale: float,
                 key_bias: torch.Tensor, store: LatentKVStore | None, min_used: int = 1) -> None:
        self.frame, self.stop_head, self.threshold = frame, stop_head, threshold
        self.min_used = min_used
        self.key_bias, self.store = key_bias, store
        self.soft = null_scale > 0
        self.null_scale = frame.attend.new_full((frame.num_rows,), null_scale, dtype=torch.float32)
        self.halted = torch.zeros(frame.num_rows, dtype=torch.bool, device=frame.rows.device)
        self.logits: list[torch.Tensor] = []  # per step [R] float32 at least
        self.done_lens: list[torch.Tensor] = []  # per step [R] long: the used length where a segment ends

    def active(self, j: int) -> torch.Tensor:
        """``[R]`` bool: the rows whose step ``j`` is an active latent slot; gates the inactive ones."""
        is_lat = self.frame.is_latent[:, j]
        if self.stop_head is None:
            return is_lat
        self.halted = self.halted & (self.frame.slot_index[:, j] != 0)
        inactive = is_lat & self.halted  # a latent slot after its segment stopped
        if self.soft:  # suppressed, not removed: its K/V are stored scaled
            self.store.write_scale = torch.where(inactive, self.null_scale, 1.0)
        else:
            self.key_bias[:, self.frame.prefix_len + j].masked_fill_(inactive, float("-inf"))
        return is_lat ^ inactive

    def decide(self, j: int, active: torch.Tensor, h: torch.Tensor) -> None:
        """Stage C: the stop head reads step ``j``'s last hidden state ``h`` ``[R, H]``."""
        if self.stop_head is None:
            return
        logit = self.stop_head(h).squeeze(-1)
        logit = logit.to(torch.promote_types(logit.dtype, torch.float32))
        fire = active & (torch.sigmoid(logit) >= self.threshold)
        if self.min_used > 1:  # latent_min_used: no stop before a segment's min_used-th slot
            fire = fire & (self.frame.slot_index[:, j] + 1 >= self.min_used)
        done = active & (fire | self.frame.is_last_slot[:, j])
        self.done_lens.append(torch.where(done, self.frame.slot_index[:, j] + 1, 0))
        self.logits.append(logit)
        self.halted = self.halted | fire


# -------------------------------------------------------------------------------------------- step loop
@dataclass
class StepTrace:
    """What the loop leaves: ``inputs`` ``[R, steps, H]`` (each step's input embedding), ``own`` (the same
    with the model's own state at teacher-forced slots; ``inputs`` itself without forcing), ``active``
    ``[R, steps]`` bool, the :class:`Halting` state, and the model calls made (prefix included)."""

    inputs: torch.Tensor
    own: torch.Tensor
    active: torch.Tensor
    halting: Halting
    calls: int


def run_steps(model, frame: ShiftedFrame, settings: LatentSettings, threshold: float, stage_c: bool) -> StepTrace:
    """The prefix call, then one model call per column ``P .. W-1`` (none for pause tokens at fixed budgets:
    :func:`reads_hidden_states`).

    Step input: an active slot takes the previous step's last hidden state (detached with
    ``latent_detach_step_inputs``, through ``latent_feedback_gain`` with ``latent_feedback_norm``; the pause
    vector when ``latent_feedback=False``; a teacher-forced slot takes its forced input, rescaled to the norm
    of the state it replaces, and ``own`` keeps that state for the alignment loss); any other column keeps
    its own embedding (text between segments, and an inactive slot's ``<|latent_pad|>``, as in pass 2 and
    ``generate()``, where only active slots are patched). ``model.latent_step_override`` (interventions) may
    replace it. Layer-level gradient checkpointing is off inside the loop.
    """
    if not reads_hidden_states(settings, stage_c):
        return _pause_steps(model, frame)
    lm = model.model.language_model
    text = model.config.text_config
    P = frame.prefix_len
    store = LatentKVStore(frame.num_rows, frame.width, text.num_hidden_layers)
    # [R, W] additive key mask, 0 = the column may be attended to: -inf on padding and (Halting) on the
    # removed inactive slots. Column c is set before step c and never changes after. Additive, so sdpa need
    # not convert a boolean mask in every layer.
    key_bias = torch.zeros(frame.attend.shape, dtype=frame.embeds.dtype, device=frame.embeds.device)
    key_bias.masked_fill_(frame.attend == 0, float("-inf"))
    halting = Halting(frame, model.latent_stop_head if stage_c else None, threshold,
                      float(settings.latent_null_scale), key_bias, store, int(settings.latent_min_used))
    layer_types = tuple(sorted(set(getattr(text, "layer_types", None) or ())))
    run_step = step_runner(lm, store, key_bias, layer_types, settings.latent_compile)
    inputs, owns, actives = [], [], []
    with no_gradient_checkpointing(model), contextlib.closing(store):
        # latent_prefix_grad=False: the prefix (question, images) runs without autograd in pass 1, so its
        # activations are not kept; pass 2 still trains it through the CE loss.
        with torch.set_grad_enabled(torch.is_grad_enabled() and settings.latent_prefix_grad):
            visual = model.text_visual_kwargs(None if frame.visual is None else frame.visual.columns(0, P))
            out = lm(inputs_embeds=frame.embeds[:, :P], attention_mask=frame.attend[:, :P],
                     position_ids=frame.positions[:, :, :P], use_cache=False, latent_kv_store=store, **visual)
        h_prev = out.last_hidden_state[:, -1]
        if not settings.latent_feedback:  # called as a module, so a LoRA wrapper's trainable copy is used
            pause = model.latent_pause_embedding(torch.zeros(1, dtype=torch.long, device=h_prev.device))[0]
        gain = model.latent_feedback_gain if settings.latent_feedback_norm and settings.latent_feedback else None
        for j in range(frame.steps):
            c = P + j
            step_in = h_prev.detach() if settings.latent_detach_step_inputs else h_prev
            if gain is not None:  # latent_feedback_norm: unit RMS times the learned gain
                step_in = gain(step_in)
            if not settings.latent_feedback:  # pause tokens: no hidden state reaches the next slot
                step_in = pause.to(h_prev.dtype).expand_as(h_prev)
            active = halting.active(j)
            x = own = torch.where(active[:, None], step_in, frame.embeds[:, c])
            if frame.forced is not None:  # latent_teacher_forcing: the target at the own state's norm
                target = frame.forced_inputs[:, c].to(step_in.dtype)
                scale = (step_in.norm(dim=-1, keepdim=True) / target.norm(dim=-1, keepdim=True).clamp_min(1e-6))
                x = torch.where((active & frame.forced[:, c])[:, None], (target * scale).detach(), own)
            if model.latent_step_override is not None:  # interventions (latentvl.evaluation.causal)
                x = model.latent_step_override(x, frame.rows, c - frame.shifts)
            h_prev = run_step(x, frame.positions[:, :, c : c + 1], c)
            halting.decide(j, active, h_prev)
            inputs.append(x)
            owns.append(own)
            actives.append(active)
    if frame.steps == 0:  # a rank with no latents in a distributed run: nothing to return but its calls
        stacked = own_stacked = frame.embeds.new_zeros(frame.num_rows, 0, frame.embeds.shape[-1])
        act = torch.zeros(frame.num_rows, 0, dtype=torch.bool, device=frame.embeds.device)
    else:
        stacked, act = torch.stack(inputs, dim=1), torch.stack(actives, dim=1)
        own_stacked = stacked if frame.forced is None else torch.stack(owns, dim=1)
    return StepTrace(inputs=stacked, own=own_stacked, active=act & frame.real, halting=halting,
                     calls=1 + frame.steps)


def reads_hidden_states(settings: LatentSettings, stage_c: bool) -> bool:
    """Whether pass 1 needs the model: a slot's input is a fed-back hidden state, or a stop head reads one.
    Pause tokens at fixed budgets (``latent_feedback=False``, no stop head) need neither."""
    return settings.latent_feedback or stage_c


def _pause_steps(model, frame: ShiftedFrame) -> StepTrace:
    """Pass 1 of pause tokens at fixed budgets, without a model call: every latent slot (all active) takes the
    pause vector and any other column its own embedding, through ``latent_step_override`` as in the step loop,
    whose inputs these equal (its hidden states would feed nothing)."""
    pause = model.latent_pause_embedding(torch.zeros(1, dtype=torch.long, device=frame.embeds.device))[0]
    key_bias = torch.zeros(frame.attend.shape, dtype=frame.embeds.dtype, device=frame.embeds.device)
    halting = Halting(frame, None, 1.0, 0.0, key_bias, None)
    inputs, actives = [], []
    for j in range(frame.steps):
        c = frame.prefix_len + j
        active = halting.active(j)
        x = torch.where(active[:, None], pause.to(frame.embeds.dtype), frame.embeds[:, c])
        if model.latent_step_override is not None:
            x = model.latent_step_override(x, frame.rows, c - frame.shifts)
        inputs.append(x)
        actives.append(active)
    if frame.steps == 0:
        stacked = frame.embeds.new_zeros(frame.num_rows, 0, frame.embeds.shape[-1])
        act = torch.zeros(frame.num_rows, 0, dtype=torch.bool, device=frame.embeds.device)
    else:
        stacked, act = torch.stack(inputs, dim=1), torch.stack(actives, dim=1)
    return StepTrace(inputs=stacked, own=stacked, active=act & frame.real, halting=halting, calls=0)


# ---------------------------------------------------------------------------------------------- outputs
def pass_output(layout: Layout, frame: ShiftedFrame, trace: StepTrace, batch_shape: tuple[int, int],
                position_ids: torch.Tensor) -> LatentPassOutput:
    """Map the loop's results from the frame back to the batch ``[B, S]`` (see :class:`LatentPassOutput`).
    The pass's host synchronisations are here, after the loop (index lists and the logged Python lists)."""
    B, S = batch_shape
    device = frame.rows.device
    M = layout.max_segments
    r_idx, j_idx = trace.active.nonzero(as_tuple=True)
    sample, column = frame.original(r_idx, j_idx)
    ce_patch_pos = torch.stack([sample, column], dim=1)
    latent_real = frame.is_latent & frame.real
    kv_mask = torch.ones(B, S, dtype=torch.bool, device=device)
    kv_mask[frame.original(*(latent_real & ~trace.active).nonzero(as_tuple=True))] = False

    stage_c = trace.halting.stop_head is not None and frame.steps > 0
    logits = stop_active = None
    used = torch.zeros(B, max(M, 1), dtype=torch.long, device=device)
    if stage_c:
        lens = torch.stack(trace.halting.done_lens, dim=1)  # [R, steps]
        per_seg = torch.zeros(frame.num_rows, max(M, 1), dtype=torch.long, device=device)
        per_seg.scatter_reduce_(1, frame.segment_index.clamp_min(0), torch.where(frame.is_latent, lens, 0),
                                reduce="amax")
        used[frame.rows] = per_seg
        step_logits = torch.stack(trace.halting.logits, dim=1)  # [R, steps]
        lr, lj = latent_real.nonzero(as_tuple=True)
        logits = torch.zeros(B, S, dtype=step_logits.dtype, device=device).index_put(
            frame.original(lr, lj), step_logits[lr, lj])
        stop_active = torch.zeros(B, S, dtype=torch.bool, device=device)
        stop_active[sample, column] = True
    else:
        for b, budgets in enumerate(layout.budgets):
            if budgets:
                used[b, : len(budgets)] = torch.tensor(budgets, device=device)
    used = used[:, :M]
    used_lists = [u[: len(bud)] for u, bud in zip(used.tolist(), layout.budgets)]
    return LatentPassOutput(
        ce_patch_pos=ce_patch_pos, ce_patch_vec=trace.inputs[r_idx, j_idx], latent_kv_mask=kv_mask,
        align_vec=trace.own[r_idx, j_idx],
        latent_used_lens=used_lists, latent_stop_probs=_stop_probs(layout, logits, used_lists),
        used_lens=used, stop_logits=logits, stop_step_active=stop_active, position_ids=position_ids,
        num_model_calls=trace.calls,
    )


def _stop_probs(layout: Layout, logits: torch.Tensor | None, used_lists: list[list[int]]) -> list[list[list[float]]]:
    """``[B][M][used_len]`` stop probabilities of the steps taken (empty lists without stop logits)."""
    if logits is None:
        return [[] for _ in layout.segments]
    probs = torch.sigmoid(logits).tolist()
    return [[probs[b][s:s + u] for (s, _e, _i), u in zip(segs, used_lists[b])]
            for b, segs in enumerate(layout.segments)]
