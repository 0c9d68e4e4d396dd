"""Byzantine-robust aggregators: drop-in replacements for the weighted mean.

Every aggregator here has the signature of :mod:`fedprompt.server.aggregators`,
``aggregate(stacked, weights) -> pytree``, and is jittable for a fixed, padded client axis
``[K, ...]``, so it plugs into :class:`~fedprompt.server.aggregators.Aggregation` (which pads
to a bucket and zeroes non-finite clients) and into every algorithm (the server optimizer
consumes whatever replaces the mean).

A client is *present* when its weight is > 0 (padding, dropped and rejected clients have
weight 0 and are ignored whatever their values). The robust rules are *unweighted* over the
present clients: a weight (an example count) is something a malicious client could inflate,
so it only says who is present. Only :func:`norm_bounded_mean` keeps the weights.

* :func:`coordinate_median`: the coordinate-wise median (Yin, Chen, Ramchandran & Bartlett 2018,
  "Byzantine-Robust Distributed Learning: Towards Optimal Statistical Rates", ICML).
* :func:`trimmed_mean`: per coordinate, drop the ``floor(beta m)`` largest and smallest of the
  ``m`` present values and average the rest (same paper).
* :func:`krum`, :func:`multi_krum`: Blanchard, El Mhamdi, Guerraoui & Stainer 2017, "Machine
  Learning with Adversaries: Byzantine Tolerant Gradient Descent", NeurIPS. Each present update
  gets the score ``sum of squared L2 distances to its n - f - 2 nearest present neighbours``
  (``n`` present clients, ``f`` assumed Byzantine); Krum returns the update with the lowest
  score, Multi-Krum the average of the ``m`` lowest-scored ones. The guarantee needs
  ``n > 2f + 2``; with fewer present clients the rule still runs, using
  ``max(n - f - 2, 1)`` neighbours (the guarantee is then void).
* :func:`norm_bounded_mean`: clip each update to L2 norm ``bound``, then the weighted mean
  (Sun, Kairouz, Suresh & McMahan 2019, "Can You Really Backdoor Federated Learning?").

With no present client every rule returns zeros.

Example:
  >>> import jax.numpy as jnp
  >>> stacked = {"w": jnp.array([[1.0], [2.0], [100.0], [7.0]])}
  >>> coordinate_median(stacked, jnp.array([1.0, 1.0, 1.0, 0.0]))["w"].tolist()
  [2.0]
  >>> make_aggregator("trimmed_mean", beta=0.34)(stacked, jnp.ones(4))["w"].tolist()
  [4.5]
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from fedprompt import kernels
from fedprompt.kernels._common import check_implementation
from fedprompt.config import (
    AGGREGATORS,
    check_aggregator,
    check_byzantine,
    check_krum_m,
    check_norm_bound,
    check_trim_beta,
)
from fedprompt.server.aggregators import Aggregator, weighted_mean

PyTree = Any

ROBUST_AGGREGATORS = AGGREGATORS
"""The names :func:`make_aggregator` knows (:data:`fedprompt.config.AGGREGATORS`)."""

_MEDIAN_XLA = kernels.make_median()

__all__ = [
    "ROBUST_AGGREGATORS",
    "client_norms",
    "clip_clients",
    "coordinate_median",
    "krum",
    "krum_scores",
    "make_aggregator",
    "multi_krum",
    "norm_bounded_mean",
    "pairwise_sq_distances",
    "trimmed_mean",
]


def _present(weights: jax.Array) -> jax.Array:
    w = jnp.asarray(weights, jnp.float32)
    return w > 0  # NaN compares False: absent


def _client_axis(v: jax.Array, x: jax.Array) -> jax.Array:
    return v.reshape(v.shape + (1,) * (x.ndim - 1))


def coordinate_median(stacked: PyTree, weights: jax.Array) -> PyTree:
    """The coordinate-wise median of the present clients' updates (unweighted).

    With an even number ``m`` of present clients, the mean of the two middle values (as
    ``numpy.median``). Zeros when no client is present. The XLA path of
    :func:`fedprompt.kernels.make_median`; :func:`make_aggregator` selects the Pallas kernel
    with ``implementation="pallas"``.
    """
    return _MEDIAN_XLA(stacked, weights)


def trimmed_mean(beta: float, *, implementation: str = "xla", interpret: bool = False) -> Aggregator:
    """The coordinate-wise ``beta``-trimmed mean: per coordinate, of the ``m`` present values, drop
    the ``k = floor(beta m)`` smallest and the ``k`` largest and average the ``m - 2k`` left.

    Args:
      beta: the fraction trimmed from *each* end, ``0 <= beta < 1/2`` (0: the plain unweighted
        mean).
      implementation, interpret: :func:`fedprompt.kernels.make_trimmed_mean`'s kernel choice.

    Raises:
      ConfigError: ``beta`` out of range.
    """
    beta = check_trim_beta(beta)
    aggregate = kernels.make_trimmed_mean(float(beta), implementation=implementation, interpret=interpret)
    aggregate.__name__ = f"trimmed_mean_{beta:g}"
    return aggregate


def pairwise_sq_distances(stacked: PyTree) -> jax.Array:
    """``[K, K]`` squared L2 distances between the clients' whole updates (float32).

    Computed row by row from the differences (``lax.map``), not from ``|a|^2 + |b|^2 - 2ab``,
    so near-equal updates get exact small distances and memory stays at one ``[K, ...]`` copy.
    """
    flat = jnp.concatenate([jnp.asarray(x).astype(jnp.float32).reshape(jnp.shape(x)[0], -1)
                            for x in jax.tree.leaves(stacked)], axis=1)
    return jax.lax.map(lambda row: jnp.sum(jnp.square(flat - row), axis=1), flat)


def krum_scores(stacked: PyTree, weights: jax.Array, num_byzantine: int) -> jax.Array:
    """``[K]`` Krum scores: the sum of squared distances to the ``max(n - f - 2, 1)`` nearest
    other present clients (``n`` present); ``+inf`` for absent clients."""
    present = _present(weights)
    k = present.shape[0]
    n = jnp.sum(present, dtype=jnp.int32)
    neighbours = jnp.maximum(n - num_byzantine - 2, 1)
    d = pairwise_sq_distances(stacked)
    valid = present[None, :] & present[:, None] & ~jnp.eye(k, dtype=bool)
    d = jnp.sort(jnp.where(valid, d, jnp.inf), axis=1)
    rank = jnp.arange(k)[None, :]
    score = jnp.sum(jnp.where((rank < neighbours) & jnp.isfinite(d), d, 0.0), axis=1)
    return jnp.where(present, score, jnp.inf)


def _mean_of_selected(stacked: PyTree, selected: jax.Array) -> PyTree:
    count = jnp.maximum(jnp.sum(selected), 1).astype(jnp.float32)

    def leaf(x):
        x = jnp.asarray(x).astype(jnp.float32)
        return jnp.sum(jnp.where(_client_axis(selected, x), x, 0.0), axis=0) / count

    return jax.tree.map(leaf, stacked)


def multi_krum(num_byzantine: int, m: int) -> Aggregator:
    """Multi-Krum: the unweighted average of the ``m`` present updates with the lowest Krum scores.

    Args:
      num_byzantine: ``f``, the number of Byzantine clients tolerated.
      m: how many updates to average (fewer when fewer are present); ``m = 1`` is Krum.

    Raises:
      ConfigError: ``f < 0`` or ``m < 1``.
    """
    f = check_byzantine(num_byzantine)
    m = check_krum_m(m)

    def aggregate(stacked: PyTree, weights: jax.Array) -> PyTree:
        scores = krum_scores(stacked, weights, f)
        present = _present(weights)
        order = jnp.argsort(scores, stable=True)
        rank = jnp.zeros_like(order).at[order].set(jnp.arange(order.shape[0]))
        selected = present & (rank < m)
        return _mean_of_selected(stacked, selected)

    aggregate.__name__ = f"multi_krum_f{f}_m{m}"
    return aggregate


def krum(num_byzantine: int) -> Aggregator:
    """Krum: the present update with the lowest Krum score (ties: the lowest index)."""
    aggregate = multi_krum(num_byzantine, 1)
    aggregate.__name__ = f"krum_f{num_byzantine}"
    return aggregate


def client_norms(stacked: PyTree) -> jax.Array:
    """``[K]`` L2 norms of the clients' whole updates (every leaf of a row together), float32.

    Overflow-safe (``m * sqrt(sum((x / m)^2))`` with ``m`` the row's largest absolute value, as
    :func:`fedprompt.privacy.dp.global_norm`): an update of values near float32's range still
    gets a finite norm; a non-finite value gives a non-finite norm.
    """
    leaves = [jnp.asarray(x).astype(jnp.float32) for x in jax.tree.leaves(stacked)]
    k = leaves[0].shape[0]
    peak = jnp.max(jnp.stack([jnp.max(jnp.abs(x.reshape(k, -1)), axis=1, initial=0.0) for x in leaves]), axis=0)
    safe = jnp.where(peak > 0, peak, 1.0)
    return peak * jnp.sqrt(sum(jnp.sum(jnp.square(x.reshape(k, -1) / safe[:, None]), axis=1) for x in leaves))


def clip_clients(stacked: PyTree, bound: float | jax.Array) -> tuple[PyTree, jax.Array]:
    """Every client's update scaled to L2 norm at most ``bound``: row ``i`` times
    ``min(1, bound / ||row_i||)`` (float32 leaves); ``(clipped, norms before clipping)``.

    A row within the bound is unchanged, a zero row stays zero, a non-finite row stays
    non-finite (the aggregation drops it). Jittable for a fixed client axis.
    """
    norms = client_norms(stacked)
    scale = jnp.where(norms > bound, bound / jnp.where(norms > 0, norms, 1.0), 1.0)
    clipped = jax.tree.map(lambda x: jnp.asarray(x).astype(jnp.float32) * _client_axis(scale, jnp.asarray(x)), stacked)
    return clipped, norms


def norm_bounded_mean(bound: float) -> Aggregator:
    """Clip every update to L2 norm ``bound`` (whole pytree, :func:`clip_clients`), then the
    weighted mean.

    Raises:
      ConfigError: ``bound <= 0``.
    """
    bound = check_norm_bound(bound)

    def aggregate(stacked: PyTree, weights: jax.Array) -> PyTree:
        return weighted_mean(clip_clients(stacked, bound)[0], weights)

    aggregate.__name__ = f"norm_bounded_mean_{bound:g}"
    return aggregate


def make_aggregator(name: str, *, implementation: str = "xla", interpret: bool = False, **params: Any) -> Aggregator:
    """The aggregator called ``name`` (one of :data:`ROBUST_AGGREGATORS`) with its parameters.

    ``mean``: :func:`~fedprompt.server.aggregators.weighted_mean`; ``median``:
    :func:`coordinate_median`; ``trimmed_mean(beta)``; ``krum(num_byzantine)``;
    ``multi_krum(num_byzantine, m)``; ``norm_bound(bound)``. Parameters set to None are
    treated as absent.

    Raises:
      ConfigError: an unknown name, a missing, unknown or invalid parameter.
    """
    params = check_aggregator(name, params)
    check_implementation(implementation)
    xla = implementation == "xla" and not interpret
    kernel = {"implementation": implementation, "interpret": interpret}
    factories: dict[str, Callable[..., Aggregator]] = {
        "mean": lambda: weighted_mean if xla else kernels.make_clipped_mean(None, **kernel),
        "median": lambda: coordinate_median if xla else kernels.make_median(**kernel),
        "trimmed_mean": lambda beta: trimmed_mean(beta, **kernel),
        "krum": krum,
        "multi_krum": multi_krum,
        "norm_bound": norm_bounded_mean,
    }
    return factories[name](**params)
