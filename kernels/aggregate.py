"""Fused aggregation of stacked client updates: per-client norm clipping, weighting and sum.

The server of FedAvg (McMahan et al. 2017) sums ``w_k x_k`` over clients; with update clipping
(as in DP-FedAvg, McMahan et al. 2018, "Learning Differentially Private Recurrent Language
Models") every client's update is first scaled by ``min(1, C / ||x_k||)``. Both reduce to

    out[n] = sum_k s_k * x[k, n],      s_k = w_k * min(1, C / ||x_k||_2)

over the stacked updates ``x`` ``[K, N]``. The per-client norms need one read of ``x`` (a
reduction XLA already runs at memory speed), the weighted sum a second: :func:`weighted_sum`
is that one pass, one program per column block ``[K, block]`` of ``x`` accumulating over the
client axis in float32, whatever the input dtype. Clients with ``s_k <= 0`` are skipped with a
select, not multiplied, so padding rows may hold anything (NaN included).

Every kernel sits beside its pure-jnp reference (``*_reference``). ``implementation="xla"``
(the default: on CPU the Pallas kernel only runs in interpret mode) computes the same sum,
laid out for the platform: on CPU a loop adding whole client rows, which streams memory,
where XLA's column reduction over the client axis strides through it (see
``_weighted_sum_xla``).

Example:
  >>> import jax.numpy as jnp
  >>> x = jnp.array([[3.0, 4.0], [1.0, 0.0]])
  >>> clipped_weighted_sum(x, jnp.array([1.0, 2.0]), clip_norm=1.0).tolist()
  [2.5999999046325684, 0.800000011920929]
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from scipy.linalg import blas

from fedprompt.errors import InputError
from fedprompt.kernels._common import check_implementation, column_block

Pytree = Any

__all__ = [
    "client_sq_norms",
    "copy_row",
    "clip_scales",
    "clipped_mean_of_finite",
    "clipped_mean_of_finite_host",
    "clipped_mean_of_finite_reference",
    "clipped_weighted_sum",
    "clipped_weighted_sum_reference",
    "make_clipped_mean",
    "weighted_sum",
    "weighted_sum_reference",
]


def _check_2d(updates: jax.Array, scales: jax.Array | None = None) -> None:
    if updates.ndim != 2:
        raise InputError(f"updates must be [clients, values], got shape {updates.shape}")
    if scales is not None and scales.shape != updates.shape[:1]:
        raise InputError(f"expected {updates.shape[0]} per-client scales, got shape {scales.shape}")


def client_sq_norms(updates: jax.Array) -> jax.Array:
    """``[K]`` float32 squared L2 norms of the rows of ``updates`` ``[K, N]`` (a row with a
    NaN or Inf gets a NaN or Inf norm, which :func:`clip_scales` only keeps for weights > 0)."""
    return jnp.sum(jnp.square(updates.astype(jnp.float32)), axis=1)


def clip_scales(sq_norms: jax.Array, weights: jax.Array, clip_norm: float | None) -> jax.Array:
    """``s_k = w_k * min(1, C / ||x_k||)``; 0 for a weight that is <= 0 or not finite
    (whatever that client's norm, NaN included)."""
    w = jnp.asarray(weights, jnp.float32)
    w = jnp.where(jnp.isfinite(w) & (w > 0), w, 0.0)
    if clip_norm is None:
        return w
    norm = jnp.sqrt(jnp.asarray(sq_norms, jnp.float32))
    factor = jnp.where(norm > clip_norm, clip_norm / jnp.where(norm > 0, norm, 1.0), 1.0)
    return jnp.where(w > 0, w * factor, 0.0)


# ----------------------------------------------------------------------------- weighted sum


def weighted_sum_reference(updates: jax.Array, scales: jax.Array) -> jax.Array:
    """``sum_k s_k x[k]`` ``[N]`` in float32, rows with ``s_k <= 0`` left out (pure jnp)."""
    _check_2d(updates, scales)
    s = jnp.asarray(scales, jnp.float32)[:, None]
    return jnp.sum(jnp.where(s > 0, updates.astype(jnp.float32) * s, 0.0), axis=0)


def _weighted_sum_rows(updates: jax.Array, scales: jax.Array) -> jax.Array:
    """The sum as a loop over clients, each adding its whole (contiguous) row to an accumulator."""
    s = jnp.asarray(scales, jnp.float32)

    def add(k, acc):
        return acc + jnp.where(s[k] > 0, updates[k].astype(jnp.float32) * s[k], 0.0)

    return jax.lax.fori_loop(0, updates.shape[0], add, jnp.zeros(updates.shape[1:], jnp.float32))


def _weighted_sum_xla(updates: jax.Array, scales: jax.Array) -> jax.Array:
    """The ``implementation="xla"`` path: the reference's math, laid out per platform.

    XLA's CPU backend compiles a reduction over the leading (client) axis with a fused
    producer into a loop that walks each column with a stride of a whole client row: one cache
    and TLB miss per value once a row outgrows the caches (0.1-2 GB/s measured, down to
    seconds for 100 x 409,600 floats). Adding whole rows to an accumulator streams memory
    instead, so on CPU the sum is a loop over clients; GPUs and TPUs reduce the column form
    well and keep it.
    """
    return jax.lax.platform_dependent(
        updates, scales, cpu=_weighted_sum_rows, default=lambda x, s: weighted_sum_reference(x, s)
    )


def _weighted_sum_kernel(scale_ref, x_ref, out_ref):
    s = scale_ref[...]  # [K, 1]
    x = x_ref[...].astype(jnp.float32)  # [K, block]
    out_ref[...] = jnp.sum(jnp.where(s > 0, x * s, 0.0), axis=0, keepdims=True)


@functools.partial(jax.jit, static_argnames=("block", "interpret"))
def _weighted_sum_pallas(updates, scales, *, block: int, interpret: bool):
    k, n = updates.shape
    out = pl.pallas_call(
        _weighted_sum_kernel,
        out_shape=jax.ShapeDtypeStruct((1, n), jnp.float32),
        grid=(pl.cdiv(n, block),),
        in_specs=[pl.BlockSpec((k, 1), lambda i: (0, 0)), pl.BlockSpec((k, block), lambda i: (0, i))],
        out_specs=pl.BlockSpec((1, block), lambda i: (0, i)),
        interpret=interpret,
        name="fedprompt_weighted_sum",
    )(jnp.asarray(scales, jnp.float32)[:, None], updates)
    return out[0]


def weighted_sum(
    updates: jax.Array,
    scales: jax.Array,
    *,
    implementation: str = "xla",
    interpret: bool = False,
    block_size: int | None = None,
) -> jax.Array:
    """``sum_k s_k x[k]`` over stacked updates ``[K, N]`` (any float dtype) -> float32 ``[N]``.

    Args:
      updates: ``[K, N]`` client updates.
      scales: ``[K]`` per-client factors; rows with a factor ``<= 0`` are left out.
      implementation: ``"xla"`` (the reference's math; a loop over client rows on CPU) or
        ``"pallas"`` (one program per column block).
      interpret: run the Pallas kernel in interpret mode (needed on CPU).
      block_size: columns per Pallas program (default: sized to ~1 MiB of input).
    """
    check_implementation(implementation)
    updates = jnp.asarray(updates)
    _check_2d(updates, jnp.asarray(scales))
    if implementation == "xla":
        return _weighted_sum_xla(updates, jnp.asarray(scales, jnp.float32))
    k, n = updates.shape
    block = block_size or column_block(k, n, itemsize=updates.dtype.itemsize)
    return _weighted_sum_pallas(updates, scales, block=min(block, n), interpret=interpret)


# ----------------------------------------------------------------------------- clip + weight + sum


def clipped_weighted_sum_reference(updates: jax.Array, weights: jax.Array, clip_norm: float | None = None) -> jax.Array:
    """``sum_k w_k min(1, C/||x_k||) x_k`` ``[N]`` float32 (pure jnp); no clipping when ``clip_norm`` is None."""
    _check_2d(updates)
    scales = clip_scales(client_sq_norms(jnp.where(jnp.asarray(weights)[:, None] > 0, updates, 0)), weights, clip_norm)
    return weighted_sum_reference(updates, scales)


def clipped_weighted_sum(
    updates: jax.Array,
    weights: jax.Array,
    clip_norm: float | None = None,
    *,
    implementation: str = "xla",
    interpret: bool = False,
    block_size: int | None = None,
) -> jax.Array:
    """Per-client norm clipping, weighting and sum of stacked updates ``[K, N]`` -> ``[N]`` float32.

    The norms are computed first (one read of ``updates``, skipped without ``clip_norm``),
    then :func:`weighted_sum` makes one pass computing ``sum_k w_k min(1, C/||x_k||) x_k``.
    Clients with a weight ``<= 0`` are left out (their rows may hold anything).
    """
    check_implementation(implementation)
    updates = jnp.asarray(updates)
    _check_2d(updates)
    weights = jnp.asarray(weights, jnp.float32)
    if weights.shape != updates.shape[:1]:
        raise InputError(f"expected {updates.shape[0]} weights, got shape {weights.shape}")
    # The norms read ``updates`` as they are: masking the left-out rows first would make XLA's
    # CPU backend write a masked copy of all updates (its row reduction is a library call that
    # fuses no producer); clip_scales gives those rows 0 whatever their norm instead.
    sq = None if clip_norm is None else client_sq_norms(updates)
    scales = clip_scales(sq, weights, clip_norm)
    return weighted_sum(updates, scales, implementation=implementation, interpret=interpret, block_size=block_size)


def make_clipped_mean(
    clip_norm: float | None = None, *, implementation: str = "xla", interpret: bool = False
) -> Callable[[Pytree, jax.Array], Pytree]:
    """An aggregator ``(stacked, weights) -> pytree`` for :class:`fedprompt.server.aggregators.Aggregation`.

    Returns ``sum_k w_k min(1, C/||x_k||) x_k / sum_k w_k`` per leaf (float32), where
    ``||x_k||`` is the norm of client ``k``'s whole update (all leaves together). Without
    ``clip_norm`` it equals :func:`fedprompt.server.aggregators.weighted_mean`.
    """
    check_implementation(implementation)

    def aggregate(stacked: Pytree, weights: jax.Array) -> Pytree:
        w = jnp.asarray(weights, jnp.float32)
        w = jnp.where(jnp.isfinite(w) & (w > 0), w, 0.0)
        leaves, treedef = jax.tree.flatten(stacked)
        if not leaves:
            raise InputError("the update pytree has no leaves")
        k = w.shape[0]
        flat = [jnp.asarray(x).reshape(k, -1) for x in leaves]
        sq = None if clip_norm is None else sum(client_sq_norms(x) for x in flat)
        total = jnp.sum(w)
        scales = clip_scales(sq, w, clip_norm) / jnp.where(total > 0, total, 1.0)
        out = [
            weighted_sum(x, scales, implementation=implementation, interpret=interpret).reshape(leaf.shape[1:])
            for x, leaf in zip(flat, leaves)
        ]
        return jax.tree.unflatten(treedef, out)

    return aggregate


# ----------------------------------------------------------------------------- finite rows, clip, mean in one pass


def _row_norm(parts: list[jax.Array]) -> jax.Array:
    """The L2 norm of one client's row (all its parts together), overflow-safe as
    :func:`fedprompt.server.robust.client_norms`: ``m * sqrt(sum((x / m)^2))``, ``m = max |x|``."""
    peak = functools.reduce(jnp.maximum, [jnp.max(jnp.abs(p), initial=0.0) for p in parts])
    safe = jnp.where(peak > 0, peak, 1.0)
    return peak * jnp.sqrt(sum(jnp.sum(jnp.square(p / safe)) for p in parts))


def _clip_factor(norm: jax.Array, clip_norm: float | None) -> jax.Array:
    if clip_norm is None:
        return jnp.ones_like(norm)
    return jnp.where(norm > clip_norm, clip_norm / jnp.where(norm > 0, norm, 1.0), 1.0)


def clipped_mean_of_finite_reference(
    rows: list[jax.Array], weights: jax.Array, clip_norm: float | None = None
) -> tuple[list[jax.Array], jax.Array, jax.Array]:
    """What :func:`clipped_mean_of_finite` computes, in whole-array jnp (two reads and a
    clipped copy): ``(means, accepted [K], clipped count)``."""
    k = weights.shape[0]
    flat = [jnp.asarray(x).reshape(k, -1).astype(jnp.float32) for x in rows]
    w = jnp.asarray(weights, jnp.float32)
    finite = functools.reduce(jnp.logical_and, [jnp.all(jnp.isfinite(x), axis=1) for x in flat])
    accepted = finite & jnp.isfinite(w) & (w > 0)
    w = jnp.where(accepted, w, 0.0)
    peak = functools.reduce(jnp.maximum, [jnp.max(jnp.abs(jnp.where(finite[:, None], x, 0.0)), axis=1, initial=0.0)
                                          for x in flat])
    safe = jnp.where(peak > 0, peak, 1.0)
    norms = peak * jnp.sqrt(sum(jnp.sum(jnp.square(jnp.where(finite[:, None], x, 0.0) / safe[:, None]), axis=1)
                                for x in flat))
    factor = _clip_factor(norms, clip_norm)
    total = jnp.sum(w)
    scales = w * factor / jnp.where(total > 0, total, 1.0)
    means = [weighted_sum_reference(jnp.where(accepted[:, None], x, 0.0), scales).reshape(jnp.shape(r)[1:])
             for x, r in zip(flat, rows)]
    clipped = jnp.sum(accepted & (factor < 1), dtype=jnp.int32)
    return means, accepted, clipped


def _clipped_mean_rows(flat: list[jax.Array], w: jax.Array, clip_norm: float | None):
    """The CPU layout: one loop over clients, each client's row read from memory once while
    its norm and weighted contribution are taken (XLA's CPU reductions run below memory speed,
    so the loop takes one: the sum of squares, whose finiteness shows that every value is
    finite and the norm did not overflow; only a row where it is not pays the exact checks)."""

    def exact(k):
        parts = [x[k].astype(jnp.float32) for x in flat]
        finite = functools.reduce(jnp.logical_and, [jnp.all(jnp.isfinite(p)) for p in parts])
        return _row_norm([jnp.where(finite, p, 0.0) for p in parts]), finite

    def add(k, carry):
        sums, total, accepted, clipped = carry
        sq = sum(jnp.sum(jnp.square(x[k].astype(jnp.float32))) for x in flat)
        norm, finite = jax.lax.cond(jnp.isfinite(sq), lambda k: (jnp.sqrt(sq), jnp.bool_(True)), exact, k)
        ok = finite & jnp.isfinite(w[k]) & (w[k] > 0)
        factor = _clip_factor(norm, clip_norm)
        scale = jnp.where(ok, w[k] * factor, 0.0)
        sums = [acc + jnp.where(ok, x[k].astype(jnp.float32) * scale, 0.0) for acc, x in zip(sums, flat)]
        return (sums, total + jnp.where(ok, w[k], 0.0), accepted.at[k].set(ok),
                clipped + (ok & (factor < 1)).astype(jnp.int32))

    init = ([jnp.zeros(x.shape[1:], jnp.float32) for x in flat], jnp.float32(0.0),
            jnp.zeros(w.shape[0], bool), jnp.int32(0))
    sums, total, accepted, clipped = jax.lax.fori_loop(0, w.shape[0], add, init)
    return [s / jnp.where(total > 0, total, 1.0) for s in sums], accepted, clipped


def clipped_mean_of_finite(
    rows: list[jax.Array], weights: jax.Array, clip_norm: float | None = None
) -> tuple[list[jax.Array], jax.Array, jax.Array]:
    """The server's default aggregation in one read of the updates: drop every client with a
    non-finite value (or a weight that is not a finite number > 0), clip each remaining
    client's whole update to L2 norm ``clip_norm`` (all of ``rows`` together; None: no clip)
    and take the weighted mean, ``sum_k w_k min(1, C/||x_k||) x_k / sum_k w_k`` over the kept
    clients.

    Args:
      rows: the update's leaves, each ``[K, ...]`` (any float dtype).
      weights: ``[K]`` per-client weights.
      clip_norm: the L2 bound of a client's update, or None.

    Returns:
      ``(means, accepted, clipped)``: per leaf the float32 mean (one client's shape; zeros when
      no client is kept), ``[K]`` bool of the kept clients, and how many kept clients were
      scaled down (int32).

    On CPU a loop over clients (each row is read from memory once: finiteness, norm and sum
    while it is cached); elsewhere :func:`clipped_mean_of_finite_reference`'s array form.
    """
    if not rows:
        raise InputError("the update has no leaves")
    w = jnp.asarray(weights, jnp.float32)
    k = w.shape[0]
    shapes = [jnp.shape(x) for x in rows]
    if any(not s or s[0] != k for s in shapes):
        raise InputError(f"every leaf needs a leading axis of {k} clients, got shapes {shapes}")
    flat = [jnp.asarray(x).reshape(k, -1) for x in rows]
    means, accepted, clipped = jax.lax.platform_dependent(
        flat, w,
        cpu=lambda f, v: _clipped_mean_rows(f, v, clip_norm),
        default=lambda f, v: clipped_mean_of_finite_reference(f, v, clip_norm),
    )  # both give flat means
    return [m.reshape(s[1:]) for m, s in zip(means, shapes)], accepted, clipped


def copy_row(dst: np.ndarray, src: Any) -> float:
    """Copies ``src`` into the float32 C-contiguous array ``dst`` (as many values) and returns the
    sum of squares of what was written, as a Python float (``inf`` or ``nan`` when a value is
    not finite or the squares overflow float32).

    The squares are taken right after the copy (BLAS ``sdot``), while the row is still in
    cache: a server that decodes updates into rows gets their norms, and a check that every
    value is finite, for a fraction of the copy's time, and :func:`clipped_mean_of_finite_host`
    then reads each row once, not twice.
    """
    if not (isinstance(dst, np.ndarray) and dst.dtype == np.float32 and dst.flags.c_contiguous and dst.flags.writeable):
        raise InputError("copy_row writes into a writable float32 C-contiguous array (a row of a stack: x[i : i + 1] "
                         "for a stack of scalars)")
    out = dst.reshape(-1)  # a view: dst is contiguous
    flat = np.asarray(src).reshape(-1)
    if out.shape != flat.shape:
        raise InputError(f"cannot copy {flat.shape[0]} values into a row of {out.shape[0]}")
    out[...] = flat
    return float(blas.sdot(out, out))


def _robust_norm(parts: list[np.ndarray]) -> float | None:
    """The L2 norm of a row whose float32 sum of squares was not finite: None when a value is
    not finite, else the norm taken overflow-safe (scaled by the row's largest magnitude)."""
    if not all(np.isfinite(p).all() for p in parts):
        return None
    peak = max(float(np.max(np.abs(p), initial=0.0)) for p in parts)
    if peak == 0.0:
        return 0.0
    return peak * float(np.sqrt(sum(float(np.sum(np.square(p / peak, dtype=np.float64))) for p in parts)))


def clipped_mean_of_finite_host(
    rows: list[np.ndarray], weights: np.ndarray, clip_norm: float | None = None, sq_norms: Any = None
) -> tuple[list[np.ndarray], np.ndarray, int] | None:
    """:func:`clipped_mean_of_finite` on updates that are already in host memory, in NumPy:
    ``(means, accepted, clipped)`` as NumPy values, or None when the updates are not float32
    C-contiguous NumPy arrays (the caller then runs the compiled pass).

    ``sq_norms``: per client, the sum of squares of its row over all leaves, when the caller
    already has it (:func:`copy_row` returns it while writing the row); otherwise it is taken
    here (BLAS ``sdot``, one more read of every row of positive weight). The weighted sum of the
    clipped rows is then one matrix-vector product per leaf (BLAS ``sgemv``, at memory speed
    where XLA's CPU reductions are not), over the runs of rows between those that hold a value
    that is not finite. A client whose weight is not a finite number > 0 adds nothing; one
    whose sum of squares is not finite gets the exact checks of :func:`clipped_mean_of_finite`
    (a non-finite value drops it; a norm that only overflowed float32 is taken overflow-safe).
    The float32 sums may differ from the compiled pass's in the last bits (another summation
    order).

    Raises:
      InputError: a leaf without the leading axis of one row per weight, or ``sq_norms`` not
        one number per weight.
    """
    if not rows or not all(isinstance(x, np.ndarray) and x.dtype == np.float32 and x.flags.c_contiguous
                           for x in rows):
        return None
    w = np.asarray(weights, np.float32).reshape(-1)
    k = w.shape[0]
    if any(x.ndim == 0 or x.shape[0] != k for x in rows):
        raise InputError(f"every leaf needs a leading axis of {k} clients, got shapes {[x.shape for x in rows]}")
    flat = [x.reshape(k, -1) for x in rows]
    usable = np.isfinite(w) & (w > 0)
    if sq_norms is None:
        sq = np.full(k, np.nan)  # rows of weight 0 are not read: they count as not finite
        for i in np.flatnonzero(usable).tolist():
            sq[i] = sum(float(blas.sdot(x[i], x[i])) for x in flat)
    else:
        sq = np.asarray(sq_norms, np.float64).reshape(-1)
        if sq.shape != (k,):
            raise InputError(f"sq_norms needs one value per client ({k}), got shape {np.shape(sq_norms)}")
    with np.errstate(invalid="ignore"):
        norms = np.sqrt(sq)
    finite = np.isfinite(norms)
    for i in np.flatnonzero(usable & ~finite).tolist():
        norm = _robust_norm([x[i] for x in flat])
        if norm is not None:
            norms[i], finite[i] = norm, True
    accepted = usable & finite
    factor = np.ones(k)
    if clip_norm is not None:
        over = accepted & (norms > clip_norm)
        factor[over] = clip_norm / norms[over]
    coef = np.where(accepted, w * factor, 0.0).astype(np.float32)
    sums = [np.zeros(x.shape[1], np.float32) for x in flat]
    # Rows that are not finite are left out by splitting the product around them (0 x NaN is
    # NaN); padding and absent rows are zeros of weight 0 and ride along.
    edges = np.flatnonzero(np.diff(np.concatenate([[0], finite.astype(np.int8), [0]])))
    for start, stop in zip(edges[::2].tolist(), edges[1::2].tolist()):
        if not coef[start:stop].any():
            continue
        for acc, x in zip(sums, flat):
            blas.sgemv(1.0, x[start:stop].T, coef[start:stop], beta=1.0, y=acc, overwrite_y=True)
    total = float(np.sum(w[accepted], dtype=np.float64))
    divisor = np.float32(total if total > 0 else 1.0)
    means = [(acc / divisor).reshape(x.shape[1:]) for acc, x in zip(sums, rows)]
    return means, accepted, int(np.sum(factor < 1.0))
