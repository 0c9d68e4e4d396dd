"""Partitioners: coverage, sizes, label skew measured against the global label distribution."""

from __future__ import annotations

import numpy as np
import pytest

from fedprompt.errors import ConfigError, InputError
from fedprompt.data.partition import (
    PARTITION_KINDS,
    dirichlet_partition,
    iid_partition,
    label_histograms,
    partition,
    quantity_skew_partition,
    shard_partition,
)

NUM_LABELS = 10
LABELS = np.random.default_rng(0).permutation(np.repeat(np.arange(NUM_LABELS), 200))  # 2000 balanced
UNBALANCED = np.random.default_rng(1).choice(NUM_LABELS, size=1500, p=np.linspace(1, 10, NUM_LABELS) / 55)


def assert_valid(parts, num_examples, num_clients):
    assert len(parts) == num_clients
    for p in parts:
        assert p.dtype == np.int64 and p.ndim == 1
        assert np.all(np.diff(p) > 0)  # sorted, no repeats
    everything = np.concatenate(parts)
    assert everything.size == num_examples  # disjoint ...
    np.testing.assert_array_equal(np.sort(everything), np.arange(num_examples))  # ... and covering


def mean_tv_from_global(labels, parts, weighted=False):
    """Mean total-variation distance between each client's label mix and the global one."""
    hist = label_histograms(labels, parts, NUM_LABELS).astype(np.float64)
    sizes = hist.sum(axis=1)
    local = hist / sizes[:, None]
    world = np.bincount(labels, minlength=NUM_LABELS) / labels.size
    tv = 0.5 * np.abs(local - world).sum(axis=1)
    return float(np.average(tv, weights=sizes if weighted else None))


@pytest.mark.parametrize("kind", PARTITION_KINDS)
@pytest.mark.parametrize("labels", [LABELS, UNBALANCED], ids=["balanced", "unbalanced"])
def test_every_partition_is_disjoint_and_covering(kind, labels):
    parts = partition(kind, labels, 20, alpha=0.3, labels_per_client=2, seed=3)
    assert_valid(parts, labels.size, 20)
    assert label_histograms(labels, parts, NUM_LABELS).sum() == labels.size


def test_iid_sizes_differ_by_at_most_one_and_mix_labels():
    for n, k in [(2000, 20), (1001, 7), (5, 5), (10, 1)]:
        parts = iid_partition(n, k, seed=0)
        assert_valid(parts, n, k)
        sizes = [len(p) for p in parts]
        assert max(sizes) - min(sizes) <= 1
    assert mean_tv_from_global(LABELS, iid_partition(LABELS.size, 20, seed=0)) < 0.2


def test_dirichlet_small_alpha_is_more_skewed_than_large_alpha():
    tv = {a: np.mean([mean_tv_from_global(LABELS, dirichlet_partition(LABELS, 20, a, seed=s)) for s in range(3)]) for a in (0.1, 1.0, 100.0)}
    assert tv[0.1] > tv[1.0] > tv[100.0]
    assert tv[0.1] > 0.55  # about 0.7: most clients hold one or two labels
    assert tv[100.0] < 0.1  # about 0.04: nearly IID
    distinct = (label_histograms(LABELS, dirichlet_partition(LABELS, 20, 0.1, seed=0), NUM_LABELS) > 0).sum(axis=1)
    assert np.median(distinct) <= 4


def test_dirichlet_is_seeded_and_respects_min_size():
    a = dirichlet_partition(LABELS, 20, 0.5, seed=11)
    b = dirichlet_partition(LABELS, 20, 0.5, seed=11)
    c = dirichlet_partition(LABELS, 20, 0.5, seed=12)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))
    parts = dirichlet_partition(LABELS, 10, 0.3, seed=0, min_size=50)
    assert min(len(p) for p in parts) >= 50
    with pytest.raises(ConfigError, match="no draw"):
        dirichlet_partition(LABELS, 100, 0.01, seed=0, min_size=15, max_tries=5)


def test_shards_pathological_non_iid():
    # 10 labels x 200 examples, 20 clients x 2 shards = 40 shards of 50: every shard is pure.
    parts = shard_partition(LABELS, 20, 2, seed=0)
    assert_valid(parts, LABELS.size, 20)
    assert {len(p) for p in parts} == {100}
    distinct = (label_histograms(LABELS, parts, NUM_LABELS) > 0).sum(axis=1)
    assert distinct.max() <= 2 and distinct.mean() > 1.5
    one = shard_partition(LABELS, 10, 1, seed=4)
    assert ((label_histograms(LABELS, one, NUM_LABELS) > 0).sum(axis=1) == 1).all()
    assert {len(p) for p in one} == {200}
    # Seeded.
    again = shard_partition(LABELS, 20, 2, seed=0)
    other = shard_partition(LABELS, 20, 2, seed=1)
    assert all(np.array_equal(x, y) for x, y in zip(parts, again))
    assert not all(np.array_equal(x, y) for x, y in zip(parts, other))


def test_shards_uneven_sizes_differ_by_at_most_labels_per_client():
    parts = shard_partition(UNBALANCED, 13, 3, seed=0)
    assert_valid(parts, UNBALANCED.size, 13)
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 3
    distinct = (label_histograms(UNBALANCED, parts, NUM_LABELS) > 0).sum(axis=1)
    # Here no shard straddles two label boundaries, so a shard holds <= 2 labels and a client <= 6.
    assert distinct.max() <= 2 * 3


def test_quantity_skew_varies_sizes_but_not_labels():
    cv = {}
    for alpha in (0.2, 100.0):
        parts = quantity_skew_partition(5000, 20, alpha, seed=0)
        assert_valid(parts, 5000, 20)
        sizes = np.array([len(p) for p in parts])
        assert sizes.min() >= 1
        cv[alpha] = sizes.std() / sizes.mean()
    assert cv[0.2] > 1.0 and cv[100.0] < 0.2
    labels = np.random.default_rng(5).permutation(np.repeat(np.arange(NUM_LABELS), 500))
    parts = quantity_skew_partition(labels.size, 20, 0.5, seed=1)
    big = [p for p in parts if len(p) >= 200]
    assert len(big) >= 5
    assert mean_tv_from_global(labels, big) < 0.12  # label mixes stay close to global
    assert mean_tv_from_global(labels, parts, weighted=True) < 0.12
    parts = quantity_skew_partition(1000, 10, 0.05, seed=2, min_size=30)
    assert min(len(p) for p in parts) >= 30
    a, b = quantity_skew_partition(1000, 10, 0.5, seed=3), quantity_skew_partition(1000, 10, 0.5, seed=3)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))


def test_label_histograms():
    labels = np.array([0, 1, 1, 2, 2, 2])
    hist = label_histograms(labels, [np.array([0, 3]), np.array([1, 2, 4, 5])], 4)
    np.testing.assert_array_equal(hist, [[1, 0, 1, 0], [0, 2, 2, 0]])
    with pytest.raises(InputError):
        label_histograms(labels, [np.arange(6)], 2)


@pytest.mark.parametrize(
    "call",
    [
        lambda: iid_partition(10, 0, seed=0),
        lambda: iid_partition(10, 11, seed=0),
        lambda: iid_partition(10, 2.5, seed=0),
        lambda: dirichlet_partition(LABELS, 0, 0.5, seed=0),
        lambda: dirichlet_partition(LABELS, 5, 0.0, seed=0),
        lambda: dirichlet_partition(LABELS, 5, -1.0, seed=0),
        lambda: dirichlet_partition(LABELS, 5, float("inf"), seed=0),
        lambda: dirichlet_partition(LABELS, 5, 0.5, seed=0, min_size=401),
        lambda: shard_partition(LABELS, 5, 0, seed=0),
        lambda: shard_partition(LABELS, 5, 11, seed=0),
        lambda: shard_partition(LABELS[:30], 20, 2, seed=0),
        lambda: quantity_skew_partition(100, 101, 0.5, seed=0),
        lambda: quantity_skew_partition(100, 10, 0.0, seed=0),
        lambda: quantity_skew_partition(100, 10, 0.5, seed=0, min_size=11),
        lambda: partition("label_skew", LABELS, 5, seed=0),
    ],
)
def test_bad_arguments_raise_config_error(call):
    with pytest.raises(ConfigError):
        call()


def test_bad_labels_raise_input_error():
    with pytest.raises(InputError):
        dirichlet_partition(np.zeros((4, 2), np.int64), 2, 0.5, seed=0)
    with pytest.raises(InputError):
        partition("shards", np.array([0.5, 1.5, 2.5]), 1, seed=0)
