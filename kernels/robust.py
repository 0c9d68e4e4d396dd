"""Robust aggregation over the client axis: coordinate-wise median and trimmed mean.

Both are order statistics of every coordinate over the clients (Yin et al. 2018,
"Byzantine-Robust Distributed Learning: Towards Optimal Statistical Rates", ICML): with the
``m`` counted clients of a coordinate sorted, ``x_(0) <= ... <= x_(m-1)``,

* the trimmed mean with fraction ``beta`` drops ``t = floor(beta * m)`` values at each end and
  averages the ``m - 2t`` left;
* the median is the same with ``t = floor((m - 1) / 2)``: the middle value, or the mean of the
  two middle values when ``m`` is even.

Clients are counted by a mask (``weights > 0`` in an aggregator): the others are set to
``+inf`` so they sort last and are never selected, which lets :class:`~fedprompt.server.
aggregators.Aggregation` pad the client axis. Weights do not weigh the statistics: a robust
statistic that a client could move by claiming more examples would not be robust.

The Pallas kernel holds a ``[K, block]`` column block, sorts it over the client axis with a
bitonic sorting network (compare-exchange steps made of elementwise min/max, so no sort
primitive is needed on the accelerator; the client axis is padded to a power of two with
``+inf`` inside the program), then selects the ranks ``[t, m - t)``. The reference sorts with
``jnp.sort``; it is the ``implementation="xla"`` path and the default.

Example:
  >>> import jax.numpy as jnp
  >>> x = jnp.array([[1.0], [2.0], [100.0], [3.0]])
  >>> coordinate_median(x).tolist(), trimmed_mean(x, 0.25).tolist()
  ([2.5], [2.5])
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from fedprompt.errors import ConfigError, InputError
from fedprompt.kernels._common import check_implementation, column_block, next_pow2

Pytree = Any

__all__ = [
    "coordinate_median",
    "coordinate_median_reference",
    "make_median",
    "make_trimmed_mean",
    "trimmed_mean",
    "trimmed_mean_reference",
]

_MEDIAN = None  # ``trim`` value meaning "median" inside this module


def _trim_count(m: jax.Array, trim: float | None) -> jax.Array:
    """Values dropped at each end, as float32: ``floor(trim * m)`` or the median's ``floor((m-1)/2)``."""
    t = jnp.floor((m - 1.0) / 2.0) if trim is _MEDIAN else jnp.floor(jnp.float32(trim) * m)
    return jnp.maximum(t, 0.0)


def _select_mean(sorted_x: jax.Array, m: jax.Array, trim: float | None) -> jax.Array:
    """Mean of ranks ``[t, m - t)`` of ``sorted_x`` ``[K, N]`` (ascending over axis 0)."""
    t = _trim_count(m, trim)
    rank = jax.lax.broadcasted_iota(jnp.float32, sorted_x.shape, 0)
    keep = (rank >= t) & (rank < m - t)
    count = jnp.maximum(m - 2.0 * t, 1.0)
    return jnp.sum(jnp.where(keep, sorted_x, 0.0), axis=0, keepdims=True) / count


def _check(x: jax.Array, mask: jax.Array | None, trim: float | None) -> tuple[jax.Array, jax.Array]:
    x = jnp.asarray(x)
    if x.ndim != 2:
        raise InputError(f"updates must be [clients, values], got shape {x.shape}")
    if mask is None:
        mask = jnp.ones(x.shape[:1], bool)
    mask = jnp.asarray(mask)
    if mask.shape != x.shape[:1]:
        raise InputError(f"expected a mask of {x.shape[0]} clients, got shape {mask.shape}")
    if trim is not _MEDIAN and not 0.0 <= trim < 0.5:
        raise ConfigError(f"trim must be in [0, 0.5), got {trim}")
    return x, mask.astype(bool)


def _order_statistic_reference(x: jax.Array, mask: jax.Array | None, trim: float | None) -> jax.Array:
    x, mask = _check(x, mask, trim)
    values = jnp.where(mask[:, None], x.astype(jnp.float32), jnp.inf)
    m = jnp.sum(mask, dtype=jnp.float32)
    return _select_mean(jnp.sort(values, axis=0), m, trim)[0]


def coordinate_median_reference(x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """Coordinate-wise median over the clients of ``x`` ``[K, N]`` -> float32 ``[N]`` (pure jnp).

    ``mask`` ``[K]`` (default all True) marks the clients that count; 0 where none does.
    """
    return _order_statistic_reference(x, mask, _MEDIAN)


def trimmed_mean_reference(x: jax.Array, trim: float, mask: jax.Array | None = None) -> jax.Array:
    """Coordinate-wise ``trim``-trimmed mean over the clients of ``x`` ``[K, N]`` -> float32 ``[N]``."""
    return _order_statistic_reference(x, mask, float(trim))


# ----------------------------------------------------------------------------- Pallas kernel


def bitonic_sort_rows(x: jax.Array) -> jax.Array:
    """Sorts ``x`` ``[K, N]`` ascending over axis 0 with a bitonic network (``K`` a power of two).

    Each of the ``log2(K) (log2(K) + 1) / 2`` stages compares every row ``i`` with row
    ``i XOR j`` (the two halves of each group of ``2j`` rows, swapped) and keeps the minimum
    or the maximum: elementwise operations only.
    """
    k, n = x.shape
    if k & (k - 1):
        raise InputError(f"the bitonic network needs a power-of-two row count, got {k}")
    row = jax.lax.broadcasted_iota(jnp.int32, (k, 1), 0)
    size = 2
    while size <= k:
        j = size // 2
        while j >= 1:
            partner = x.reshape(k // (2 * j), 2, j, n)[:, ::-1].reshape(k, n)
            ascending = (row & size) == 0
            lower = (row & j) == 0
            x = jnp.where(lower == ascending, jnp.minimum(x, partner), jnp.maximum(x, partner))
            j //= 2
        size *= 2
    return x


def _order_statistic_kernel(mask_ref, x_ref, out_ref, *, trim: float | None, rows: int):
    mask = mask_ref[...] > 0  # [K, 1]
    x = jnp.where(mask, x_ref[...].astype(jnp.float32), jnp.inf)  # [K, block]
    k, block = x.shape
    if rows > k:
        x = jnp.concatenate([x, jnp.full((rows - k, block), jnp.inf, jnp.float32)], axis=0)
    m = jnp.sum(mask.astype(jnp.float32))
    out_ref[...] = _select_mean(bitonic_sort_rows(x), m, trim)


@functools.partial(jax.jit, static_argnames=("trim", "block", "interpret"))
def _order_statistic_pallas(x, mask, *, trim, block: int, interpret: bool):
    k, n = x.shape
    kernel = functools.partial(_order_statistic_kernel, trim=trim, rows=next_pow2(k))
    out = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((1, n), jnp.float32),
        grid=(pl.cdiv(n, block),),
        in_specs=[pl.BlockSpec((k, 1), lambda i: (0, 0)), pl.BlockSpec((k, block), lambda i: (0, i))],
        out_specs=pl.BlockSpec((1, block), lambda i: (0, i)),
        interpret=interpret,
        name="fedprompt_order_statistic",
    )(mask.astype(jnp.float32)[:, None], x)
    return out[0]


def _order_statistic(x, mask, trim, implementation, interpret, block_size):
    check_implementation(implementation)
    x, mask = _check(x, mask, trim)
    if implementation == "xla":
        return _order_statistic_reference(x, mask, trim)
    k, n = x.shape
    # The sorting network keeps a few [next_pow2(K), block] float32 temporaries live.
    block = block_size or column_block(4 * next_pow2(k), n)
    return _order_statistic_pallas(x, mask, trim=trim, block=min(block, n), interpret=interpret)


def coordinate_median(
    x: jax.Array,
    mask: jax.Array | None = None,
    *,
    implementation: str = "xla",
    interpret: bool = False,
    block_size: int | None = None,
) -> jax.Array:
    """Coordinate-wise median over the clients of ``x`` ``[K, N]`` (any float dtype) -> float32 ``[N]``.

    Args:
      x: stacked client updates.
      mask: ``[K]`` bool, the clients that count (default: all); 0 where none does.
      implementation: ``"xla"`` (sort, the reference) or ``"pallas"`` (bitonic network).
      interpret: run the Pallas kernel in interpret mode (needed on CPU).
      block_size: columns per Pallas program.
    """
    return _order_statistic(x, mask, _MEDIAN, implementation, interpret, block_size)


def trimmed_mean(
    x: jax.Array,
    trim: float,
    mask: jax.Array | None = None,
    *,
    implementation: str = "xla",
    interpret: bool = False,
    block_size: int | None = None,
) -> jax.Array:
    """Coordinate-wise trimmed mean: drop ``floor(trim * m)`` values at each end, average the rest.

    ``trim`` is in ``[0, 0.5)``; ``trim=0`` is the plain (unweighted) mean of the counted
    clients. Other arguments as in :func:`coordinate_median`.
    """
    return _order_statistic(x, mask, float(trim), implementation, interpret, block_size)


# ----------------------------------------------------------------------------- aggregators


def _make(trim: float | None, implementation: str, interpret: bool) -> Callable[[Pytree, jax.Array], Pytree]:
    check_implementation(implementation)

    def aggregate(stacked: Pytree, weights: jax.Array) -> Pytree:
        mask = jnp.asarray(weights, jnp.float32) > 0

        def leaf(x):
            x = jnp.asarray(x)
            flat = x.reshape(x.shape[0], -1)
            return _order_statistic(flat, mask, trim, implementation, interpret, None).reshape(x.shape[1:])

        return jax.tree.map(leaf, stacked)

    return aggregate


def make_median(*, implementation: str = "xla", interpret: bool = False) -> Callable[[Pytree, jax.Array], Pytree]:
    """Aggregator ``(stacked, weights) -> pytree``: coordinate-wise median of the clients with weight > 0."""
    return _make(_MEDIAN, implementation, interpret)


def make_trimmed_mean(
    trim: float = 0.1, *, implementation: str = "xla", interpret: bool = False
) -> Callable[[Pytree, jax.Array], Pytree]:
    """Aggregator ``(stacked, weights) -> pytree``: coordinate-wise ``trim``-trimmed mean of the
    clients with weight > 0."""
    if not 0.0 <= trim < 0.5:
        raise ConfigError(f"trim must be in [0, 0.5), got {trim}")
    return _make(float(trim), implementation, interpret)
