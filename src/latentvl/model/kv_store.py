"""Pass 1's key/value store: linear memory under autograd (replaces the KV cache in the latent loop).

A KV cache that grows by concatenation makes a new ``[B, H_kv, c, D]`` tensor at every step, and
attention saves that tensor for backward: training memory grows with (steps x sequence length).
:class:`LatentKVStore` instead keeps, per text layer, one preallocated buffer ``[R, H_kv, W, D]`` for
keys and one for values. Column ``c`` is written once, by the call that feeds column ``c``, and never
changes after, so every step reads its keys as the view ``[..., :c+1]`` and its backward can read the
same values again from the buffer. Nothing of length ``c`` is saved per step; memory is that of a
static KV cache plus, during backward, a gradient accumulator (float32 at least) of the same shape.

Gradient bookkeeping (exact, no approximation):

- a step's backward recomputes its one-token attention from the buffer, adds the gradient of every
  key/value it attended to (its own included) into the accumulator and returns the gradient of its
  query and, read from the accumulator, of its own key/value;
- a column's entry is complete when its own backward runs, provided every later column's ran first.
  Autograd is told that order: every call of a layer returns a zero-size token that the next call of
  the same layer takes as input (this holds with ``latent_detach_step_inputs`` too, where no hidden
  state links the steps);
- the prefix call writes its keys/values through :class:`_PrefixWrite`, whose backward adds what the
  steps accumulated for the prefix columns.

With ``latent_null_scale > 0`` (soft gating) the key/value of an inactive slot is written already
scaled (its gate is known when it is written and never changes), and its gradient is scaled alike.

Static-shape steps (``latent_compile``): :meth:`LatentKVStore.attend_step_at` takes the column as a
``[1]`` long tensor, writes it with ``index_copy_`` and attends over the buffers' full width under a
key mask that is -inf on the columns not yet written. Every step then has the same shapes and no
Python value that depends on the step, so ``torch.compile`` captures one step and replays it. Its
values and gradients equal :meth:`~LatentKVStore.attend_step`'s (the masked columns get probability 0).
Under autograd the step and its backward are two operators (``latentvl::store_step`` and
``latentvl::store_step_backward``, ``torch.library`` custom ops with a registered autograd formula), so
that the compiler captures the whole step, forward and backward, without a graph break.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class LatentKVStore:
    """Per-layer key/value buffers for one latent pass over ``rows`` rows and ``width`` columns.

    ``write_scale``: ``None`` (write as is) or ``[R]`` float, the factor the next step's key/value is
    written with (``latent_null_scale`` at inactive slots, 1 elsewhere). The owner sets it before
    each step call and advances nothing else: the column a call writes is the number of columns
    its layer has written so far.
    """

    def __init__(self, rows: int, width: int, num_layers: int) -> None:
        self.rows, self.width = rows, width
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers
        self.written = [0] * num_layers
        self.grad_keys: list[torch.Tensor | None] = [None] * num_layers
        self.grad_values: list[torch.Tensor | None] = [None] * num_layers
        self.order: list[torch.Tensor | None] = [None] * num_layers
        self.write_scale: torch.Tensor | None = None
        self.static_grad = False  # set by prepare_static_grad

    def write_prefix(self, layer: int, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the prefix's ``[R, H_kv, P, D]`` keys/values; returns them for the prefix's own attention."""
        if self.written[layer] != 0:
            raise RuntimeError(f"layer {layer}: the prefix must be the first call of a latent pass")
        key, value, self.order[layer] = _PrefixWrite.apply(key, value, self, layer)
        return key, value

    def attend_step(
        self, layer: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, bias: torch.Tensor,
        scaling: float,
    ) -> torch.Tensor:
        """One column: write its key/value, attend over every column so far.

        ``query`` ``[R, H, 1, D]``, ``key``/``value`` ``[R, H_kv, 1, D]``, ``bias`` ``[R, 1, 1, c+1]``, an
        additive key mask in the query's dtype (0 = may attend, -inf = may not) that covers exactly the
        columns written, this one included. Returns ``[R, H, 1, D]``.
        """
        col = self.written[layer]
        if col >= self.width or bias.shape[-1] != col + 1:
            raise RuntimeError(f"layer {layer}: step at column {col} of {self.width} with a mask over "
                               f"{bias.shape[-1]} keys")
        if not (torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad)):
            return self._write_and_attend(layer, query, key, value, bias, scaling, self.write_scale)
        out, self.order[layer] = _StepAttention.apply(query, key, value, self.order[layer], self, layer, bias,
                                                      scaling, self.write_scale)
        return out

    def attend_step_at(
        self, layer: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, bias: torch.Tensor,
        column: torch.Tensor, scaling: float,
    ) -> torch.Tensor:
        """The static-shape form of :meth:`attend_step`: write column ``column`` (a ``[1]`` long tensor),
        attend over all ``width`` columns. ``bias`` ``[R, 1, 1, width]`` must be -inf on every column
        after ``column`` (and wherever the step may not attend). The layer's column counter is not used
        or advanced: the steps of one pass all take one form. Returns ``[R, H, 1, D]``."""
        if bias.shape[-1] != self.width:
            raise RuntimeError(f"layer {layer}: a static step needs a mask over all {self.width} columns, "
                               f"got {bias.shape[-1]}")
        keys, values = self._buffers(layer, key)
        if not (torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad)):
            _write_column(keys, values, key, value, column, self.write_scale)
            return _one_token_attention(query, keys, values, bias, scaling)
        if self.grad_keys[layer] is None:  # the compiled pass prepares the store before its first step
            self.prepare_static_grad()
        out, self.order[layer] = _store_step(query, key, value, self.order[layer], keys, values, self.grad_keys[layer],
                                             self.grad_values[layer], bias, column, self.write_scale, scaling)
        return out

    def prepare_static_grad(self) -> None:
        """Allocate every layer's gradient accumulators now (static steps under autograd hand them to the
        step operator, which must not allocate inside a compiled graph) and give every layer an order
        token that requires gradient (a prefix run without autograd leaves one that does not, and the
        first step would compile apart from the others). Call after the prefix."""
        self.static_grad = True
        for layer in range(len(self.keys)):
            if self.keys[layer] is not None:
                self._grad_buffers(layer)
                if self.order[layer] is None or not self.order[layer].requires_grad:
                    self.order[layer] = self.keys[layer].new_zeros(0).requires_grad_()

    def _write_and_attend(self, layer, query, key, value, bias, scaling, scale) -> torch.Tensor:
        keys, values = self._buffers(layer, key)
        col = self.written[layer]
        k, v = key[:, :, 0], value[:, :, 0]
        if scale is not None:
            s = scale.to(k.dtype)[:, None, None]
            k, v = k * s, v * s
        keys[:, :, col] = k
        values[:, :, col] = v
        self.written[layer] = col + 1
        groups = query.shape[1] // keys.shape[1]
        return F.scaled_dot_product_attention(query, keys[:, :, : col + 1], values[:, :, : col + 1], attn_mask=bias,
                                              scale=scaling, enable_gqa=groups > 1)

    def close(self) -> None:
        """Drop the order tokens once the pass is over: each holds its call's autograd node, whose
        context holds this store (a reference cycle through the autograd graph, which Python's
        collector may not free)."""
        self.order = [None] * len(self.order)

    def _buffers(self, layer: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.keys[layer] is None:
            shape = (self.rows, like.shape[1], self.width, like.shape[-1])
            self.keys[layer] = like.new_zeros(shape)
            self.values[layer] = like.new_zeros(shape)
        return self.keys[layer], self.values[layer]

    def _grad_buffers(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.grad_keys[layer] is None:
            k = self.keys[layer]
            dtype = _accumulate_dtype(k.dtype)
            self.grad_keys[layer] = torch.zeros(k.shape, dtype=dtype, device=k.device)
            self.grad_values[layer] = torch.zeros(k.shape, dtype=dtype, device=k.device)
        return self.grad_keys[layer], self.grad_values[layer]


def _one_token_attention(query, keys, values, bias, scaling: float) -> torch.Tensor:
    """Attention of one query token ``[R, H, 1, D]`` over ``keys``/``values`` ``[R, H_kv, n, D]`` under the
    additive ``bias`` ``[R, 1, 1, n]``, written out (two matmuls and a float32 softmax, heads grouped by
    K/V head) so that a compiler fuses it instead of calling a fused sdpa kernel per layer."""
    R, H, _, D = query.shape
    Hkv = keys.shape[1]
    q = query.reshape(R, Hkv, H // Hkv, D)
    scores = (q @ keys.transpose(-1, -2)) * scaling + bias  # [R, Hkv, G, n]
    p = torch.softmax(scores, dim=-1, dtype=torch.promote_types(scores.dtype, torch.float32)).to(values.dtype)
    return (p @ values).reshape(R, H, 1, D)


def _accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """Gradients are computed and accumulated in float32 at least (float64 stays float64)."""
    return torch.promote_types(dtype, torch.float32)


class _PrefixWrite(torch.autograd.Function):
    """Identity on the prefix's keys/values that stores them (and starts the layer's order token);
    backward adds the steps' gradients."""

    @staticmethod
    def forward(ctx, key, value, store: LatentKVStore, layer: int):
        keys, values = store._buffers(layer, key)
        n = key.shape[-2]
        keys[:, :, :n] = key
        values[:, :, :n] = value
        store.written[layer] = n
        ctx.store, ctx.layer, ctx.n = store, layer, n
        return key.clone(), value.clone(), key.new_zeros(0)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_key, grad_value, _grad_token):
        store, layer, n = ctx.store, ctx.layer, ctx.n
        if store.grad_keys[layer] is not None:
            grad_key = grad_key + store.grad_keys[layer][:, :, :n].to(grad_key.dtype)
            grad_value = grad_value + store.grad_values[layer][:, :, :n].to(grad_value.dtype)
            # every later column has already run its backward: free the accumulator (a retained graph's
            # next backward starts from zero again). Static steps hold theirs as saved state: zeroed in place
            # (the eager steps' gradients are views of it, which must not change: it is dropped instead).
            if store.static_grad:
                with torch.autograd._unsafe_preserve_version_counter((store.grad_keys[layer],
                                                                      store.grad_values[layer])):
                    store.grad_keys[layer].zero_()
                    store.grad_values[layer].zero_()
            store.grad_keys[layer] = store.grad_values[layer] = None
        return grad_key, grad_value, None, None


class _StepAttention(torch.autograd.Function):
    """One-token attention over the store: forward writes the column and runs sdpa on the buffer view;
    backward recomputes the attention (float32 at least) from the buffer (nothing of length c is saved)."""

    @staticmethod
    def forward(ctx, query, key, value, token, store: LatentKVStore, layer: int, bias, scaling: float, scale):
        col = store.written[layer]
        out = store._write_and_attend(layer, query, key, value, bias, scaling, scale)
        ctx.save_for_backward(query)
        ctx.store, ctx.layer, ctx.col, ctx.bias, ctx.scaling, ctx.scale = store, layer, col, bias, scaling, scale
        return out, query.new_zeros(0)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out, _grad_token):
        (query,) = ctx.saved_tensors
        store, layer, col = ctx.store, ctx.layer, ctx.col
        acc_k, acc_v = store._grad_buffers(layer)
        n = col + 1
        grad_query = _step_backward(query, grad_out, store.keys[layer][:, :, :n], store.values[layer][:, :, :n],
                                    ctx.bias, ctx.scaling, acc_k[:, :, :n], acc_v[:, :, :n])
        grad_key, grad_value = acc_k[:, :, col : col + 1], acc_v[:, :, col : col + 1]  # [R, Hkv, 1, D]
        return _own_grads(query, grad_query, grad_key, grad_value, ctx.scale, store.keys[layer].dtype)


# The static step as two opaque operators, so that ``torch.compile`` captures a whole step under autograd:
# the compiler sees pure functions of tensors (query, key, value, order token, buffers, mask, column) and
# the autograd formula below; it does not look inside them. They write the store's buffers (the forward
# its column of ``keys``/``values``, the backward the accumulators) without declaring it, on purpose:
# nothing in a compiled graph reads those buffers, and a declared mutation would make the compiler save a
# copy of the ``[R, H_kv, W, D]`` buffers per step for backward (memory growing with the steps again).
# The writes keep the buffers' autograd version counters, which the buffers' being saved by every step
# would otherwise trip; the order tokens sequence the steps' backwards as in the eager store.
@torch.library.custom_op("latentvl::store_step", mutates_args=())
def _store_step(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, token: torch.Tensor, keys: torch.Tensor,
    values: torch.Tensor, grad_keys: torch.Tensor, grad_values: torch.Tensor, bias: torch.Tensor,
    column: torch.Tensor, scale: torch.Tensor | None, scaling: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Write ``key``/``value`` ``[R, H_kv, 1, D]`` (times ``scale`` ``[R]`` when given) at ``column`` of
    ``keys``/``values`` and attend; returns ``[R, H, 1, D]`` and a new order token."""
    with torch.autograd._unsafe_preserve_version_counter((keys, values)):
        _write_column(keys, values, key, value, column, scale)
    return _one_token_attention(query, keys, values, bias, scaling), query.new_zeros(0)


@_store_step.register_fake
def _(query, key, value, token, keys, values, grad_keys, grad_values, bias, column, scale, scaling):
    return torch.empty_like(query), query.new_empty(0)


@torch.library.custom_op("latentvl::store_step_backward", mutates_args=())
def _store_step_backward(
    query: torch.Tensor, grad_out: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
    grad_keys: torch.Tensor, grad_values: torch.Tensor, bias: torch.Tensor, column: torch.Tensor,
    scale: torch.Tensor | None, scaling: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`_step_backward` over the full width into the accumulators; the query's gradient and the
    step's own key/value gradients ``[R, H_kv, 1, D]`` (scaled as written, in the buffers' dtype)."""
    with torch.autograd._unsafe_preserve_version_counter((grad_keys, grad_values)):
        grad_query = _step_backward(query, grad_out, keys, values, bias, scaling, grad_keys, grad_values)
    grad_key, grad_value = grad_keys.index_select(2, column), grad_values.index_select(2, column)
    return _own_grads(query, grad_query, grad_key, grad_value, scale, keys.dtype)[:3]


@_store_step_backward.register_fake
def _(query, grad_out, keys, values, grad_keys, grad_values, bias, column, scale, scaling):
    R, Hkv, _, D = keys.shape
    return torch.empty_like(query), keys.new_empty(R, Hkv, 1, D), keys.new_empty(R, Hkv, 1, D)


def _store_step_setup(ctx, inputs, output) -> None:
    query, _k, _v, _t, keys, values, grad_keys, grad_values, bias, column, scale, scaling = inputs
    ctx.save_for_backward(query, keys, values, grad_keys, grad_values, bias, column, scale)
    ctx.scaling = scaling


def _store_step_grad(ctx, grad_out, _grad_token):
    query, keys, values, grad_keys, grad_values, bias, column, scale = ctx.saved_tensors
    grad_query, grad_key, grad_value = _store_step_backward(query, grad_out, keys, values, grad_keys, grad_values,
                                                            bias, column, scale, ctx.scaling)
    # The order token gets a (size-0) gradient, not None: a compiled step whose token input had no
    # gradient would lose its autograd edge to the previous step, and with it the order of the backwards.
    return grad_query, grad_key, grad_value, grad_out.new_zeros(0), None, None, None, None, None, None, None, None


_store_step.register_autograd(_store_step_grad, setup_context=_store_step_setup)


def _write_column(keys, values, key, value, column, scale) -> None:
    """``keys[:, :, column] = key * scale`` (and ``values`` alike), in place."""
    if scale is not None:
        s = scale.to(key.dtype)[:, None, None, None]
        key, value = key * s, value * s
    keys.index_copy_(2, column, key.to(keys.dtype))
    values.index_copy_(2, column, value.to(values.dtype))


def _step_backward(query, grad_out, keys, values, bias, scaling: float, acc_k, acc_v) -> torch.Tensor:
    """Recompute one query token's attention over ``keys``/``values`` ``[R, Hkv, n, D]`` (float32 at
    least), add every key's/value's gradient into ``acc_k``/``acc_v`` (views ``[R, Hkv, n, D]`` of the
    accumulators) in place, and return the query's gradient ``[R, H, 1, D]`` in the query's dtype."""
    dtype = _accumulate_dtype(query.dtype)
    keys, values = keys.to(dtype), values.to(dtype)
    R, H, _, D = query.shape
    Hkv, n = keys.shape[1], keys.shape[2]
    G = H // Hkv
    q = query.reshape(R, Hkv, G, D).to(dtype)  # one query token: its heads grouped by K/V head
    g = grad_out.reshape(R, Hkv, G, D).to(dtype)
    scores = (q * scaling) @ keys.transpose(-1, -2) + bias.to(dtype)  # [R, Hkv, G, n]
    p = torch.softmax(scores, dim=-1)
    dp = g @ values.transpose(-1, -2)
    ds = p * (dp - (p * dp).sum(-1, keepdim=True)) * scaling
    # The accumulators hold, per column, its key/value gradient from every step whose backward has
    # run: this step adds its share to the columns it attended to in place; its own column is then complete.
    acc_k.view(R * Hkv, n, D).baddbmm_(ds.reshape(R * Hkv, G, n).transpose(1, 2), q.reshape(R * Hkv, G, D))
    acc_v.view(R * Hkv, n, D).baddbmm_(p.reshape(R * Hkv, G, n).transpose(1, 2), g.reshape(R * Hkv, G, D))
    return (ds @ keys).reshape(R, H, 1, D).to(query.dtype)


def _own_grads(query, grad_query, grad_key, grad_value, scale, kv_dtype):
    """The step's backward results: query, own key/value (scaled as written), then ``None`` for the rest."""
    if scale is not None:
        s = scale.to(grad_key.dtype)[:, None, None, None]
        grad_key, grad_value = grad_key * s, grad_value * s
    return grad_query, grad_key.to(kv_dtype), grad_value.to(kv_dtype), None, None, None, None, None, None
