"""Partitioners: split a labelled data set over simulated clients, IID or non-IID.

Every partitioner returns a list with one sorted ``int64`` index array per client. The arrays
are disjoint and together cover every example (``np.concatenate(parts)`` is a permutation of
``range(N)``). All randomness comes from ``np.random.default_rng(seed)``: the same arguments
give the same partition.

* :func:`iid_partition`: a uniformly random split into near-equal sizes.
* :func:`dirichlet_partition`: label skew with a Dirichlet prior. Hsu et al. 2019 ("Measuring
  the Effects of Non-Identical Data Distribution for Federated Visual Classification")
  introduced Dirichlet(α) label skew, drawing each *client's* class mix; here, as in the
  per-label variant used by Li et al. 2022 ("Federated Learning on Non-IID Data Silos: An
  Experimental Study", ICDE), each *label's* examples are spread over the clients with
  proportions ~ Dir(α). Small α: each client holds few labels; large α: close to IID.
* :func:`shard_partition`: the pathological non-IID split of McMahan et al. 2017
  ("Communication-Efficient Learning of Deep Networks from Decentralized Data"): sort by label,
  cut into ``num_clients * labels_per_client`` shards, deal each client ``labels_per_client``.
* :func:`quantity_skew_partition`: quantity skew of Li et al. 2022: client *sizes* follow
  Dir(α) proportions while labels stay IID.

Example:
  >>> import numpy as np
  >>> labels = np.repeat(np.arange(4), 25)
  >>> parts = partition("dirichlet", labels, 5, alpha=0.5, seed=0)
  >>> sorted(np.concatenate(parts).tolist()) == list(range(100))
  True
  >>> int(label_histograms(labels, parts, 4).sum())
  100
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from fedprompt.errors import ConfigError, InputError

PARTITION_KINDS = ("iid", "dirichlet", "shards", "quantity")


def _check_labels(labels: Any) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise InputError(f"labels must be a 1-D array, got shape {labels.shape}")
    if labels.size and not np.issubdtype(labels.dtype, np.integer):
        raise InputError(f"labels must be integers, got dtype {labels.dtype}")
    return labels


def _check_num_clients(num_clients: Any, num_examples: int) -> int:
    if isinstance(num_clients, bool) or not isinstance(num_clients, (int, np.integer)):
        raise ConfigError(f"num_clients must be an int, got {num_clients!r}")
    if not 1 <= num_clients <= num_examples:
        raise ConfigError(f"num_clients must be in [1, {num_examples}] (the number of examples), got {num_clients}")
    return int(num_clients)


def _check_alpha(alpha: Any) -> float:
    try:
        alpha = float(alpha)
    except (TypeError, ValueError):
        raise ConfigError(f"alpha must be a number, got {alpha!r}") from None
    if not (math.isfinite(alpha) and alpha > 0):
        raise ConfigError(f"alpha (the Dirichlet concentration) must be finite and > 0, got {alpha}")
    return alpha


def _check_min_size(min_size: Any, num_clients: int, num_examples: int) -> int:
    if isinstance(min_size, bool) or not isinstance(min_size, (int, np.integer)) or min_size < 0:
        raise ConfigError(f"min_size must be an int >= 0, got {min_size!r}")
    if min_size * num_clients > num_examples:
        raise ConfigError(f"min_size={min_size} for {num_clients} clients needs {min_size * num_clients} examples, only {num_examples} exist")
    return int(min_size)


def _sorted_parts(parts: list[np.ndarray]) -> list[np.ndarray]:
    return [np.sort(np.asarray(p, np.int64)) for p in parts]


def iid_partition(num_examples: int, num_clients: int, seed: int) -> list[np.ndarray]:
    """A uniformly random split; client sizes differ by at most 1.

    Example:
      >>> [len(p) for p in iid_partition(10, 3, seed=0)]
      [4, 3, 3]
    """
    num_examples = int(num_examples)
    num_clients = _check_num_clients(num_clients, num_examples)
    order = np.random.default_rng(seed).permutation(num_examples)
    return _sorted_parts(np.array_split(order, num_clients))


def dirichlet_partition(
    labels: Any, num_clients: int, alpha: float, seed: int, min_size: int = 1, max_tries: int = 1000
) -> list[np.ndarray]:
    """Label skew: each label's examples go to the clients in proportions ``p ~ Dir(α · 1_K)``.

    For every label, its examples are shuffled and cut at ``floor(cumsum(p) * n_label)``. The
    whole draw is repeated (up to ``max_tries`` times, from the same generator) until every
    client holds at least ``min_size`` examples.

    Args:
      labels: ``[N]`` integer labels.
      num_clients: ``K``, 1 to N.
      alpha: Dirichlet concentration > 0; 0.1 is strongly skewed, 100 is nearly IID.
      seed: seed of the numpy generator.
      min_size: fewest examples a client may hold.
      max_tries: how many draws to try before giving up.

    Raises:
      ConfigError: bad arguments, or no draw in ``max_tries`` gave every client ``min_size``
        examples (lower ``min_size`` or ``num_clients``, or raise ``alpha``).
    """
    labels = _check_labels(labels)
    n = labels.size
    num_clients = _check_num_clients(num_clients, n)
    alpha = _check_alpha(alpha)
    min_size = _check_min_size(min_size, num_clients, n)
    rng = np.random.default_rng(seed)
    by_label = [np.flatnonzero(labels == c) for c in np.unique(labels)]
    for _ in range(max(1, int(max_tries))):
        parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
        for idx in by_label:
            idx = rng.permutation(idx)
            p = rng.dirichlet(np.full(num_clients, alpha))
            if not np.all(np.isfinite(p)):
                break
            cuts = np.floor(np.cumsum(p)[:-1] * idx.size).astype(np.int64)
            for client, chunk in enumerate(np.split(idx, cuts)):
                parts[client].append(chunk)
        else:
            merged = [np.concatenate(chunks) for chunks in parts]
            if min(len(m) for m in merged) >= min_size:
                return _sorted_parts(merged)
    raise ConfigError(
        f"dirichlet_partition: no draw in {max_tries} tries gave all {num_clients} clients >= {min_size} "
        f"examples (alpha={alpha}, {n} examples); lower min_size or num_clients, or raise alpha"
    )


def shard_partition(labels: Any, num_clients: int, labels_per_client: int, seed: int) -> list[np.ndarray]:
    """McMahan et al.'s pathological non-IID split: every client gets ``labels_per_client`` shards.

    The examples are sorted by label (ties in random order), cut into ``S = num_clients *
    labels_per_client`` contiguous shards of near-equal size (sizes differ by at most 1), and
    the shards are dealt to clients by a random permutation, ``labels_per_client`` each.

    Exact semantics:

    * client sizes are equal when ``S`` divides ``N``, and otherwise differ by at most
      ``labels_per_client``;
    * a shard holds one label unless it straddles a boundary between labels in sorted order.
      When every label's count is a multiple of the shard size ``N / S`` (e.g. balanced labels
      with ``num_labels * k == S`` for an integer ``k``), every shard is pure and each client
      sees at most ``labels_per_client`` distinct labels (fewer if it draws two shards of the
      same label). Otherwise a client may see more: each straddled boundary adds one.

    Args:
      labels: ``[N]`` integer labels.
      num_clients: ``K``, with ``K * labels_per_client <= N`` (no empty shard).
      labels_per_client: shards per client, from 1 to the number of distinct labels.
      seed: seed of the numpy generator.

    Raises:
      ConfigError: bad arguments.
    """
    labels = _check_labels(labels)
    n = labels.size
    num_clients = _check_num_clients(num_clients, n)
    num_labels = np.unique(labels).size
    if isinstance(labels_per_client, bool) or not isinstance(labels_per_client, (int, np.integer)):
        raise ConfigError(f"labels_per_client must be an int, got {labels_per_client!r}")
    if not 1 <= labels_per_client <= num_labels:
        raise ConfigError(f"labels_per_client must be in [1, {num_labels}] (the distinct labels), got {labels_per_client}")
    num_shards = num_clients * int(labels_per_client)
    if num_shards > n:
        raise ConfigError(f"{num_clients} clients x {labels_per_client} shards = {num_shards} shards > {n} examples")
    rng = np.random.default_rng(seed)
    shuffled = rng.permutation(n)
    order = shuffled[np.argsort(labels[shuffled], kind="stable")]
    shards = np.array_split(order, num_shards)
    dealt = rng.permutation(num_shards).reshape(num_clients, int(labels_per_client))
    return _sorted_parts([np.concatenate([shards[s] for s in row]) for row in dealt])


def quantity_skew_partition(num_examples: int, num_clients: int, alpha: float, seed: int, min_size: int = 1) -> list[np.ndarray]:
    """Quantity skew: client sizes follow ``Dir(α · 1_K)`` proportions, labels stay IID.

    Every client first gets ``min_size`` examples; the other ``N - K * min_size`` are shared
    out in proportions ``q ~ Dir(α)``, rounded down with the remainder going to the largest
    fractional parts, so the sizes sum to ``N`` exactly and no resampling is needed. The
    examples are assigned by a uniformly random permutation, so every client's label mix is
    the global one up to sampling noise.

    Raises:
      ConfigError: bad arguments (``min_size * num_clients > num_examples`` included).
    """
    num_examples = int(num_examples)
    num_clients = _check_num_clients(num_clients, num_examples)
    alpha = _check_alpha(alpha)
    min_size = _check_min_size(min_size, num_clients, num_examples)
    rng = np.random.default_rng(seed)
    q = rng.dirichlet(np.full(num_clients, alpha))
    q = np.where(np.isfinite(q), q, 0.0)
    q = q / q.sum() if q.sum() > 0 else np.full(num_clients, 1.0 / num_clients)
    rest = num_examples - min_size * num_clients
    exact = q * rest
    extra = np.floor(exact).astype(np.int64)
    short = rest - int(extra.sum())
    extra[np.argsort(-(exact - extra), kind="stable")[:short]] += 1
    sizes = min_size + extra
    order = rng.permutation(num_examples)
    return _sorted_parts(np.split(order, np.cumsum(sizes)[:-1]))


def label_histograms(labels: Any, parts: list[np.ndarray], num_labels: int) -> np.ndarray:
    """``[clients, num_labels]`` int64: how many examples of each label every client holds.

    Raises:
      InputError: labels outside ``[0, num_labels)``.
    """
    labels = _check_labels(labels)
    if labels.size and (labels.min() < 0 or labels.max() >= num_labels):
        raise InputError(f"labels must lie in [0, {num_labels}), got range [{labels.min()}, {labels.max()}]")
    return np.stack([np.bincount(labels[np.asarray(p, np.int64)], minlength=num_labels) for p in parts]).astype(np.int64)


def partition(
    kind: str,
    labels: Any,
    num_clients: int,
    *,
    alpha: float = 0.5,
    labels_per_client: int = 2,
    min_size: int = 1,
    seed: int,
) -> list[np.ndarray]:
    """Partitions by name: ``"iid"``, ``"dirichlet"`` (uses ``alpha``, ``min_size``),
    ``"shards"`` (uses ``labels_per_client``) or ``"quantity"`` (uses ``alpha``, ``min_size``).

    Raises:
      ConfigError: an unknown ``kind``, or bad arguments for that kind.
    """
    labels = _check_labels(labels)
    if kind == "iid":
        return iid_partition(labels.size, num_clients, seed)
    if kind == "dirichlet":
        return dirichlet_partition(labels, num_clients, alpha, seed, min_size=min_size)
    if kind == "shards":
        return shard_partition(labels, num_clients, labels_per_client, seed)
    if kind == "quantity":
        return quantity_skew_partition(labels.size, num_clients, alpha, seed, min_size=min_size)
    raise ConfigError(f"unknown partition kind {kind!r}; choose one of {PARTITION_KINDS}")
