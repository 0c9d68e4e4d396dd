"""Building blocks shared by every frozen backbone.

A backbone is a Flax NNX module whose weights are all :class:`FrozenWeight` variables. It is
never differentiated: the library splits it once into ``(graphdef, weights)`` and only the
prompt pytree that is passed into :meth:`forward` gets gradients.

Every architecture module implements the same small interface (see :class:`BackboneModule`):

* ``embed_tokens(input_ids) -> [B, T, D]``: the word embeddings alone. Soft prompts live in
  this space: they are prepended to the word embeddings (PEFT's semantics), and the model then
  adds its own position/type embeddings to the whole sequence.
* ``__call__(inputs_embeds, attention_mask, *, prefix=None, token_type_ids=None, remat=False) -> [B, S, D]``:
  the transformer body on word-space embeddings, returning the final hidden states (after the
  final norm for decoders). With ``remat`` each block runs through :func:`run_block`
  rematerialised (recomputed in the backward pass). ``prefix`` is ``(keys, values)``, each ``[L, B, P, H_kv, head_dim]``:
  per-layer attention prefixes (deep prefix tuning). Prefix keys are used as given (no
  rotary embedding is applied to them, exactly like a pre-filled key/value cache), they are
  always visible to every query, and the positions of the real tokens start at ``P``, as in a
  Hugging Face model called with a cache of length ``P``.
* decoders also have ``lm_head(hidden) -> [B, S, vocab]`` and, for incremental decoding,
  ``forward_cached(inputs_embeds, cache, start) -> (hidden, cache)``: the new tokens at
  positions ``start..`` against a :class:`KVCache` whose slot ``j`` holds position ``j`` (a deep
  prefix fills slots ``0..P-1``); equal to ``__call__`` on the whole sequence.

Weights are loaded from a Hugging Face ``state_dict`` (name -> NumPy array) by each module's
``from_hf(config, tensors, dtype)`` classmethod, which uses :func:`take` so that a missing or
misshapen tensor gives a :class:`~fedprompt.errors.CheckpointError` naming it.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any, NamedTuple, Protocol

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fedprompt.errors import CheckpointError, ConfigError


class FrozenWeight(nnx.Variable):
    """A backbone weight. Frozen by type: the library never differentiates this variable type."""


def take(
    tensors: Mapping[str, np.ndarray],
    name: str,
    shape: tuple[int, ...],
    *,
    transpose: bool = False,
    dtype: Any = jnp.float32,
) -> FrozenWeight:
    """Fetch one checkpoint tensor, check its shape and wrap it as a frozen weight.

    Args:
      tensors: the checkpoint's ``state_dict`` (names as in the Hugging Face model).
      name: tensor name.
      shape: expected shape *after* the optional transpose.
      transpose: transpose a 2-D PyTorch ``Linear`` weight ``[out, in]`` into ``[in, out]``.
      dtype: storage dtype of the weight.

    A :class:`jax.ShapeDtypeStruct` in ``tensors`` (an abstract checkpoint, see
    :mod:`fedprompt.backbones.abstract`) gives a weight that holds a ``ShapeDtypeStruct`` of
    ``shape`` and ``dtype``: the module can be traced and compiled, but nothing is allocated.

    Raises:
      CheckpointError: the tensor is missing or has the wrong shape.
    """
    if name not in tensors:
        raise CheckpointError(f"checkpoint is missing tensor {name!r}")
    raw = tensors[name]
    if isinstance(raw, jax.ShapeDtypeStruct):  # an abstract checkpoint: shape only, nothing allocated
        got = tuple(reversed(raw.shape)) if transpose and len(raw.shape) == 2 else tuple(raw.shape)
        if got != tuple(shape):
            want = tuple(reversed(shape)) if transpose else tuple(shape)
            raise CheckpointError(f"tensor {name!r} has shape {tuple(raw.shape)}, expected {want}")
        return FrozenWeight(jax.ShapeDtypeStruct(tuple(shape), jnp.dtype(dtype)))
    value = np.asarray(raw)
    if transpose:
        value = value.T
    if tuple(value.shape) != tuple(shape):
        got = value.T.shape if transpose else value.shape
        want = tuple(reversed(shape)) if transpose else tuple(shape)
        raise CheckpointError(f"tensor {name!r} has shape {tuple(got)}, expected {want}")
    return FrozenWeight(jnp.asarray(value.astype(np.float32), dtype=dtype))


def linear(x: jax.Array, w: FrozenWeight | jax.Array, b: FrozenWeight | jax.Array | None = None) -> jax.Array:
    """``x @ w + b`` computed in ``x``'s dtype (weights are cast, so bf16 compute works)."""
    y = x @ jnp.asarray(w[...] if isinstance(w, nnx.Variable) else w).astype(x.dtype)
    if b is not None:
        y = y + jnp.asarray(b[...] if isinstance(b, nnx.Variable) else b).astype(x.dtype)
    return y


def value(v: FrozenWeight | jax.Array, dtype: Any | None = None) -> jax.Array:
    """The array held by a weight, optionally cast."""
    a = v[...] if isinstance(v, nnx.Variable) else v
    return a if dtype is None else a.astype(dtype)


def layer_norm(x: jax.Array, scale, bias, eps: float) -> jax.Array:
    """LayerNorm over the last axis, computed in float32 and returned in ``x``'s dtype.

    Its gradient is written out (:func:`jax.custom_vjp`): the backward pass keeps only ``x``
    and the row statistics and needs two row sums, fewer passes than differentiating the
    forward formula. The values and gradients are those of
    ``(x - mean) / sqrt(var + eps) * scale + bias`` to float32 rounding.
    """
    return _layer_norm(x, value(scale), value(bias), float(eps))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, eps: float) -> jax.Array:
    return _layer_norm_forward(x, scale, bias, eps)[0]


def _layer_norm_forward(x, scale, bias, eps):
    xf = x.astype(jnp.float32)
    mean = xf.mean(-1, keepdims=True)
    rstd = jax.lax.rsqrt(jnp.square(xf - mean).mean(-1, keepdims=True) + eps)
    y = (xf - mean) * rstd * scale.astype(jnp.float32) + bias.astype(jnp.float32)
    return y.astype(x.dtype), (x, mean, rstd, scale, bias)


def _layer_norm_backward(eps, saved, g):
    x, mean, rstd, scale, bias = saved
    xhat = (x.astype(jnp.float32) - mean) * rstd
    gf = g.astype(jnp.float32)
    gs = gf * scale.astype(jnp.float32)
    # Written as a difference of two full-size terms, not rstd * (...): XLA duplicates a producer
    # into each consumer when all but one of its operands are broadcasts, so with a trailing
    # `* rstd` every layer's backward fusion would recompute the residual stream's gradient of
    # all the layers above it (quadratic in depth); a two-operand root is computed once.
    dx = gs * rstd - (gs.mean(-1, keepdims=True) + xhat * (gs * xhat).mean(-1, keepdims=True)) * rstd
    rows = tuple(range(x.ndim - 1))
    return dx.astype(x.dtype), (gf * xhat).sum(rows).astype(scale.dtype), gf.sum(rows).astype(bias.dtype)


_layer_norm.defvjp(_layer_norm_forward, _layer_norm_backward)


def gelu(x: jax.Array, approximate: bool) -> jax.Array:
    """GELU computed in float32 and returned in ``x``'s dtype.

    ``approximate``: the tanh approximation (Hugging Face's ``gelu_new``); otherwise the exact
    ``x * (1 + erf(x / sqrt(2))) / 2`` (Hugging Face's ``gelu``), whose gradient is written out
    (:func:`jax.custom_vjp`): the backward pass keeps only ``x`` and computes
    ``Phi(x) + x * phi(x)`` in one pass.
    """
    if approximate:
        return jax.nn.gelu(x.astype(jnp.float32), approximate=True).astype(x.dtype)
    return _exact_gelu(x)


def _normal_cdf(xf: jax.Array) -> jax.Array:
    return 0.5 * (1.0 + jax.lax.erf(xf * np.float32(1.0 / np.sqrt(2.0))))


@jax.custom_vjp
def _exact_gelu(x: jax.Array) -> jax.Array:
    xf = x.astype(jnp.float32)
    return (xf * _normal_cdf(xf)).astype(x.dtype)


def _exact_gelu_forward(x):
    return _exact_gelu(x), x


def _exact_gelu_backward(x, g):
    xf = x.astype(jnp.float32)
    pdf = jnp.exp(-0.5 * xf * xf) * np.float32(1.0 / np.sqrt(2.0 * np.pi))
    # Phi(x) from erf(|x| / sqrt 2) with x's sign (erf is odd), not the forward's erf(x / sqrt 2):
    # the compiler would merge two equal erf terms and keep the forward's [.., F] result alive
    # for the backward pass instead of recomputing it. (erfc would also do, at 4x the ops.)
    cdf = 0.5 + 0.5 * jnp.copysign(jax.lax.erf(jnp.abs(xf) * np.float32(1.0 / np.sqrt(2.0))), xf)
    return ((g.astype(jnp.float32) * (cdf + xf * pdf)).astype(x.dtype),)


_exact_gelu.defvjp(_exact_gelu_forward, _exact_gelu_backward)


def rms_norm(x: jax.Array, scale, eps: float) -> jax.Array:
    """RMSNorm as in Llama: normalize in float32, cast back, then scale."""
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.square(xf).mean(-1, keepdims=True) + eps)
    return value(scale, x.dtype) * y.astype(x.dtype)


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    key_mask: jax.Array,
    *,
    causal: bool,
    prefix: tuple[jax.Array, jax.Array] | None = None,
    sliding_window: int | None = None,
    grad_rows: int | None = None,
) -> jax.Array:
    """Scaled dot-product attention with an optional per-layer prefix and grouped-query heads.

    Args:
      q: queries ``[B, T, H, hd]``.
      k, v: keys and values ``[B, T, H_kv, hd]`` with ``H % H_kv == 0``.
      key_mask: ``[B, T]`` boolean, True where a real (non-padding) token is.
      causal: whether query ``i`` may only see keys ``j <= i`` (prefix keys are always visible).
      prefix: optional ``(keys, values)`` of shape ``[B, P, H_kv, hd]`` placed before ``k, v``.
      sliding_window: optional window ``W`` (Mistral-style local attention). Query ``i`` sits at
        absolute position ``P + i`` and key ``j`` of the concatenated ``[prefix; k]`` sequence at
        position ``j``; the query may only see keys with ``position > P + i - W``, i.e. itself and
        the ``W - 1`` keys before it. Prefix keys count against the window like any cached key
        (as in Hugging Face's sliding-window mask with a pre-filled cache). ``None``: no window.
      grad_rows: compute the gradient for the prefix and the first ``grad_rows`` positions of
        ``q``, ``k`` and ``v`` only; the other positions get a zero gradient, as if they were
        constants (for a soft prompt's first layer, where only the virtual tokens are trained).
        The values are unchanged; the backward pass does about ``grad_rows / T`` of the work.
        ``None``: every position; a value outside ``[1, T]`` raises ``ConfigError``.

    Returns:
      ``[B, T, H, hd]`` in ``q``'s dtype. Softmax is computed in float32.
    """
    b, t, h, hd = q.shape
    n_kv = k.shape[2]
    if grad_rows is not None and not 0 < grad_rows <= t:
        raise ConfigError(f"grad_rows must be in [1, {t}], got {grad_rows}")
    mask = key_mask.astype(bool)[:, None, None, :]  # [B, 1, 1, T]
    if causal:
        mask = mask & jnp.tril(jnp.ones((t, t), dtype=bool))[None, None]
    else:
        mask = jnp.broadcast_to(mask, (b, 1, t, t))
    if prefix is not None:
        pk, pv = prefix
        p = pk.shape[1]
        k = jnp.concatenate([pk.astype(k.dtype), k], axis=1)
        v = jnp.concatenate([pv.astype(v.dtype), v], axis=1)
        mask = jnp.concatenate([jnp.ones((b, 1, t, p), dtype=bool), jnp.broadcast_to(mask, (b, 1, t, t))], axis=-1)
    else:
        p = 0
    if sliding_window is not None:
        q_pos = p + np.arange(t)
        k_pos = np.arange(p + t)
        window = k_pos[None, :] > q_pos[:, None] - int(sliding_window)
        mask = mask & jnp.asarray(window)[None, None]
    group = h // n_kv
    # Heads first, each product one batched matmul over (batch, kv head): [B, H_kv, G*T, hd]
    # queries (the G query heads of a kv head stacked along the rows), scaled before the product.
    qh = (q * np.float32(1.0 / np.sqrt(hd)).astype(q.dtype)).reshape(b, t, n_kv, group, hd)
    qh = qh.transpose(0, 2, 3, 1, 4).reshape(b, n_kv, group * t, hd)
    if grad_rows is None:
        out = _softmax_attention(qh, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), mask[:, :, None])
    else:
        out = _softmax_attention_rows(qh, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), mask[:, :, None],
                                      (group, p, int(grad_rows)))
    return out.reshape(b, n_kv, group, t, hd).transpose(0, 3, 1, 2, 4).reshape(b, t, h, hd)


@jax.custom_vjp
def _softmax_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """``softmax(q k^T, masked) v`` for heads-first ``q [B, K, G*T, hd]``, ``k, v [B, K, S, hd]``
    and a boolean ``mask`` broadcastable to ``[B, K, G, T, S]``; softmax in float32.

    The softmax is normalised after the product with ``v`` (a pass over ``[G*T, hd]`` instead
    of ``[G*T, S]``), and the gradient is written out: the backward pass keeps the unnormalised
    weights and uses ``dS = P * (dP - rowsum(dO * O))``, whose row sum runs over ``hd``.
    """
    return _softmax_attention_forward(q, k, v, mask)[0]


def _softmax_attention_forward(q, k, v, mask):
    b, n_kv, rows, _ = q.shape
    keys = k.shape[2]
    scores = jnp.matmul(q, k.swapaxes(-1, -2)).astype(jnp.float32)
    scores = jnp.where(mask, scores.reshape(b, n_kv, -1, mask.shape[3], keys), jnp.finfo(jnp.float32).min)
    weights = jnp.exp(scores - scores.max(-1, keepdims=True)).reshape(b, n_kv, rows, keys)
    inv_total = 1.0 / weights.sum(-1, keepdims=True)
    weights = weights.astype(v.dtype)
    out = (jnp.matmul(weights, v).astype(jnp.float32) * inv_total).astype(v.dtype)
    return out, (q, k, v, weights, inv_total, out)


def _softmax_attention_backward(saved, g):
    q, k, v, weights, inv_total, out = saved
    gf = g.astype(jnp.float32)
    dv = jnp.matmul(weights.swapaxes(-1, -2), (gf * inv_total).astype(v.dtype))
    dp = jnp.matmul(g, v.swapaxes(-1, -2)).astype(jnp.float32)
    delta = (gf * out.astype(jnp.float32)).sum(-1, keepdims=True)
    ds = (weights.astype(jnp.float32) * inv_total * (dp - delta)).astype(q.dtype)
    return jnp.matmul(ds, k), jnp.matmul(ds.swapaxes(-1, -2), q), dv, None


_softmax_attention.defvjp(_softmax_attention_forward, _softmax_attention_backward)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _softmax_attention_rows(q, k, v, mask, rows):
    """:func:`_softmax_attention` whose gradient is computed for the prefix keys and the first
    ``n`` token rows of ``q``, ``k`` and ``v`` only (zero for the other rows); ``rows = (group,
    prefix, n)``: the query heads per kv head, the prefix keys before the tokens, and ``n``.
    The products of the backward pass shrink to those rows' share: ``dk``/``dv`` need only the
    columns of the kept keys and ``dq`` only the kept queries' rows."""
    return _softmax_attention_forward(q, k, v, mask)[0]


def _softmax_attention_rows_backward(rows, saved, g):
    group, prefix, n = rows
    q, k, v, weights, inv_total, out = saved
    b, n_kv, r, hd = q.shape
    t = r // group
    keys = slice(0, prefix + n)

    def query_rows(x):  # [B, K, G*T, ...] -> the first n tokens of each query group
        return x.reshape(b, n_kv, group, t, *x.shape[3:])[:, :, :, :n].reshape(b, n_kv, group * n, *x.shape[3:])

    gf = g.astype(jnp.float32)
    delta = (gf * out.astype(jnp.float32)).sum(-1, keepdims=True)
    # Columns of the n key rows, for dk and dv: all queries see them.
    w_cols = weights[..., keys].astype(jnp.float32) * inv_total
    dv = jnp.matmul(w_cols.astype(v.dtype).swapaxes(-1, -2), g)
    dp_cols = jnp.matmul(g, v[:, :, keys].swapaxes(-1, -2)).astype(jnp.float32)
    dk = jnp.matmul((w_cols * (dp_cols - delta)).astype(q.dtype).swapaxes(-1, -2), q)
    # Rows of the n queries, for dq: they see every key.
    g_rows = query_rows(g)
    dp_rows = jnp.matmul(g_rows, v.swapaxes(-1, -2)).astype(jnp.float32)
    ds_rows = query_rows(weights).astype(jnp.float32) * query_rows(inv_total) * (dp_rows - query_rows(delta))
    dq_rows = jnp.matmul(ds_rows.astype(q.dtype), k).reshape(b, n_kv, group, n, hd)
    dq = jnp.pad(dq_rows, [(0, 0), (0, 0), (0, 0), (0, t - n), (0, 0)]).reshape(q.shape)
    pad = [(0, 0), (0, 0), (0, k.shape[2] - prefix - n), (0, 0)]
    return dq, jnp.pad(dk, pad), jnp.pad(dv, pad), None


_softmax_attention_rows.defvjp(lambda q, k, v, mask, rows: _softmax_attention_forward(q, k, v, mask),
                               _softmax_attention_rows_backward)


def linear_rows(x: jax.Array, w, b, n: int) -> jax.Array:
    """:func:`linear` over ``[B, S, D]`` whose gradient w.r.t. ``x`` is computed for the first
    ``n`` rows only (zero for the others, as if they were constants): the backward product is
    ``[B, n, out] @ w.T`` instead of ``[B, S, out] @ w.T``. The weights get a zero gradient
    (they are frozen)."""
    if not 0 < n <= x.shape[1]:
        raise ConfigError(f"n must be in [1, {x.shape[1]}], got {n}")
    return _linear_rows(x, value(w), None if b is None else value(b), n)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _linear_rows(x, w, b, n):
    return linear(x, w, b)


def _linear_rows_backward(n, saved, g):
    x, w, b = saved
    dx = jnp.matmul(g[:, :n], w.astype(g.dtype).T).astype(x.dtype)
    dx = jnp.concatenate([dx, jnp.zeros((x.shape[0], x.shape[1] - n, x.shape[2]), x.dtype)], axis=1)
    return dx, jnp.zeros_like(w), None if b is None else jnp.zeros_like(b)


_linear_rows.defvjp(lambda x, w, b, n: (linear(x, w, b), (x, w, b)), _linear_rows_backward)


def cached_attention(
    q: jax.Array,
    cache_k: jax.Array,
    cache_v: jax.Array,
    key_valid: jax.Array,
    q_positions: jax.Array,
    *,
    sliding_window: int | None = None,
) -> jax.Array:
    """Attention of new queries over a key/value cache (incremental decoding).

    Slot ``j`` of the cache holds the key and value at absolute position ``j`` (a deep prefix
    fills slots ``0..P-1``, the tokens follow). The masking rules are those of :func:`attention`
    written in absolute positions: a query at position ``p`` sees the valid slots ``j <= p``
    (prefix slots are always ``< p``), and with a window ``W`` only those with ``j > p - W``.
    Unfilled slots must be marked invalid in ``key_valid``; masked scores are
    ``finfo(float32).min`` as in :func:`attention`, so they carry exactly zero weight.

    Args:
      q: queries ``[B, T, H, hd]``.
      cache_k, cache_v: ``[B, S, H_kv, hd]`` with ``H % H_kv == 0``.
      key_valid: ``[B, S]`` boolean, True where a slot holds a real (prefix or unpadded) key.
      q_positions: ``[T]`` absolute positions of the queries (may be traced).
      sliding_window: optional window ``W``.

    Returns:
      ``[B, T, H, hd]`` in ``q``'s dtype; softmax in float32.
    """
    b, t, h, hd = q.shape
    s = cache_k.shape[1]
    n_kv = cache_k.shape[2]
    k_pos = jnp.arange(s)
    visible = key_valid.astype(bool)[:, None, :] & (k_pos[None, None, :] <= q_positions[None, :, None])
    if sliding_window is not None:
        visible = visible & (k_pos[None, None, :] > q_positions[None, :, None] - int(sliding_window))
    mask = visible[:, None]  # [B, 1, T, S]
    group = h // n_kv
    qg = q.reshape(b, t, n_kv, group, hd)
    scores = jnp.einsum("btkgd,bskd->bkgts", qg, cache_k.astype(q.dtype)).astype(jnp.float32) / np.sqrt(hd).astype(np.float32)
    scores = jnp.where(mask[:, :, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(cache_v.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, cache_v)
    return out.reshape(b, t, h, hd).astype(q.dtype)


def write_cache(cache: jax.Array, new: jax.Array, start: jax.Array | int) -> jax.Array:
    """``cache`` ``[B, S, H_kv, hd]`` with ``new`` ``[B, T, H_kv, hd]`` written at slots ``start..start+T-1``."""
    start = jnp.asarray(start, jnp.int32)
    zero = jnp.zeros((), jnp.int32)
    return jax.lax.dynamic_update_slice(cache, new.astype(cache.dtype), (zero, start, zero, zero))


class KVCache(NamedTuple):
    """A key/value cache for incremental decoding.

    Attributes:
      keys, values: ``[L, B, S, H_kv, head_dim]``; slot ``j`` holds absolute position ``j``.
      valid: ``[B, S]`` boolean, True where a slot holds a real key (prefix or unpadded token).
    """

    keys: jax.Array
    values: jax.Array
    valid: jax.Array


def run_block(block: nnx.Module, x: jax.Array, *args: Any, remat: bool = False, **options: Any) -> jax.Array:
    """``block(x, *args, **options)``, rematerialised in the backward pass when ``remat`` is True
    (``options``: static keyword arguments, such as python ints).

    Rematerialised, a gradient through the block keeps only its inputs (``x`` ``[B, S, D]``;
    the other arguments are shared by every block) and recomputes the block's activations
    during the backward pass, so the activations held at once are one block's plus one
    ``[B, S, D]`` tensor per block, instead of every block's (``jax.checkpoint`` with the
    ``nothing_saveable`` policy). The values, and the gradients w.r.t. ``x`` and ``args``, are
    those of the plain call. For frozen blocks only: the gradient w.r.t. the block's own
    weights is zero (the backbones pass their weights through ``stop_gradient`` anyway), and,
    being a :func:`jax.custom_vjp`, it supports reverse-mode gradients, not ``jax.jvp``.

    Why not ``jax.checkpoint`` itself: the blocks are an unrolled Python loop, and its
    recomputation depends only on values of the forward pass, so a compiler is free to run it
    early, during the forward pass, which keeps every block's activations alive again. XLA's
    CPU compiler does that (it drops ``jax.checkpoint``'s optimization barriers and schedules
    for concurrency), and its memory analysis then shows no saving. Here the backward rule
    makes the recomputation depend on the incoming cotangent (by adding an exact zero derived
    from it to the saved input and to the weights), so no compiler can start it before the
    backward pass reaches the block. On an accelerator the zero costs one elementwise pass over
    the block's input and weights in the backward pass.
    """
    if not remat:
        return block(x, *args, **options)
    graphdef, state = nnx.split(block)

    def call(x: jax.Array, state: Any, rest: tuple[Any, ...]) -> jax.Array:
        return nnx.merge(graphdef, state)(x, *rest, **options)

    @jax.custom_vjp
    def rematerialised(x: jax.Array, state: Any, rest: tuple[Any, ...]) -> jax.Array:
        return call(x, state, rest)

    def forward(x: jax.Array, state: Any, rest: tuple[Any, ...]):
        return call(x, state, rest), (x, state, rest)

    def backward(saved, cotangent: jax.Array):
        x, state, rest = saved
        # An exact zero that exists only once the cotangent does (nan_to_num keeps it finite).
        zero = jnp.nan_to_num(cotangent.reshape(-1)[0].astype(jnp.float32)) * 0.0
        x = x + zero.astype(x.dtype)
        # The weights pass through the same zero, so anything a compiler derives from them
        # (XLA on CPU converts bfloat16 weights to float32 for every matrix product) is derived
        # again here, one block at a time, instead of being kept from the forward pass.
        state = jax.tree.map(lambda w: w + zero.astype(w.dtype) if jnp.issubdtype(w.dtype, jnp.floating) else w, state)
        _, vjp = jax.vjp(lambda x, rest: call(x, state, rest), x, rest)
        grad_x, grad_rest = vjp(cotangent)
        # The weights are frozen (stop_gradient upstream): their zero cotangent is discarded.
        return grad_x, jax.tree.map(jnp.zeros_like, state), grad_rest

    rematerialised.defvjp(forward, backward)
    return rematerialised(x, state, tuple(args))


def split_prefix(prefix: tuple[jax.Array, jax.Array] | None, layer: int) -> tuple[jax.Array, jax.Array] | None:
    """The ``(keys, values)`` of one layer from a stacked ``[L, B, P, H_kv, hd]`` prefix."""
    if prefix is None:
        return None
    return prefix[0][layer], prefix[1][layer]


def prefix_length(prefix: tuple[jax.Array, jax.Array] | None) -> int:
    """How many prefix positions precede the real tokens (0 without a prefix)."""
    return 0 if prefix is None else int(prefix[0].shape[2])


class BackboneModule(Protocol):
    """The interface every architecture module implements (see the module docstring)."""

    def embed_tokens(self, input_ids: jax.Array) -> jax.Array: ...

    def __call__(
        self,
        inputs_embeds: jax.Array,
        attention_mask: jax.Array,
        *,
        prefix: tuple[jax.Array, jax.Array] | None = None,
        token_type_ids: jax.Array | None = None,
        remat: bool = False,
    ) -> jax.Array: ...

    # A module whose class sets ``row_options = True`` also takes ``grad_rows: int | None``
    # (compute the gradient w.r.t. ``inputs_embeds`` for its first rows only) and
    # ``output_from: int`` (return the hidden states of rows ``output_from:`` only); see
    # :meth:`fedprompt.backbones.bert.Bert.__call__`. ``Backbone.apply`` uses them for soft prompts.


@dataclasses.dataclass(frozen=True)
class ArchConfig:
    """Architecture facts every part of the library needs, whatever the backbone.

    Each architecture subclasses this with its own fields and a ``from_hf(dict)`` classmethod
    that reads a Hugging Face ``config.json`` (raising ``ConfigError``/``CheckpointError`` on
    values it cannot honour).
    """

    model_type: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_positions: int | None  # None: no learned position table (rotary embeddings)
    is_decoder: bool
    pad_token_id: int | None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict of every field (used in fingerprints and artifacts)."""
        return dataclasses.asdict(self)
