"""Robust aggregation against NumPy/SciPy references, Krum under attack, and the attack functions."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

from fedprompt.errors import ConfigError, InputError
from fedprompt.server import robust
from fedprompt.server.aggregators import Aggregation
from fedprompt.simulation import attacks

SHAPES = {"prompt": (3, 2), "head": (4,)}


def random_stacked(rng, k, scale=1.0):
    return {name: (scale * rng.standard_normal((k, *shape))).astype(np.float32) for name, shape in SHAPES.items()}


def flat(tree):
    return np.concatenate([np.asarray(tree[name], np.float64).reshape(-1) for name in SHAPES])


def flat_rows(stacked):
    k = stacked["prompt"].shape[0]
    return np.concatenate([np.asarray(stacked[name], np.float64).reshape(k, -1) for name in SHAPES], axis=1)


def run(aggregator, stacked, weights):
    """An aggregator as the server runs it: compiled (and much faster than op-by-op)."""
    return jax.jit(aggregator)(jax.tree.map(jnp.asarray, stacked), jnp.asarray(weights, jnp.float32))


def np_krum_scores(rows, f):
    n = len(rows)
    d = ((rows[:, None, :] - rows[None, :, :]) ** 2).sum(-1)
    nearest = max(n - f - 2, 1)
    return np.array([np.sort(np.delete(d[i], i))[:nearest].sum() for i in range(n)])


# ---------------------------------------------------------------- coordinate rules


@pytest.mark.parametrize("present", [[1, 1, 1, 1, 1, 1, 1], [1, 0, 1, 1, 0, 1, 1], [0, 0, 1, 0, 1, 0, 0], [0, 0, 0, 1, 0, 0, 0]])
def test_median_and_trimmed_mean_match_references_with_absent_clients(present):
    rng = np.random.default_rng(sum(present))
    stacked = random_stacked(rng, 7)
    present = np.array(present, bool)
    weights = np.where(present, rng.uniform(1, 50, 7), 0.0).astype(np.float32)   # weights only say who is present
    stacked["prompt"][~present] = 1e6   # absent rows are never used
    rows = flat_rows(stacked)[present]
    got = flat(run(robust.coordinate_median, stacked, weights))
    np.testing.assert_allclose(got, np.median(rows, axis=0), rtol=1e-6)
    for beta in (0.0, 0.2, 0.3, 0.45):
        got = flat(run(robust.trimmed_mean(beta), stacked, weights))
        np.testing.assert_allclose(got, scipy.stats.trim_mean(rows, beta, axis=0), rtol=1e-5, atol=1e-6)


def test_no_present_client_gives_zeros():
    stacked = jax.tree.map(jnp.asarray, random_stacked(np.random.default_rng(0), 4))
    for name, kw in [("median", {}), ("trimmed_mean", {"beta": 0.2}), ("krum", {"num_byzantine": 1}),
                     ("multi_krum", {"num_byzantine": 1, "m": 2}), ("norm_bound", {"bound": 1.0})]:
        out = run(robust.make_aggregator(name, **kw), stacked, jnp.zeros(4))
        assert not np.any(flat(out)), name


def test_robust_rules_run_inside_aggregation_with_padding_and_nan():
    rng = np.random.default_rng(1)
    stacked = random_stacked(rng, 5)
    stacked["head"][2] = np.nan   # rejected by Aggregation (weight 0, zeroed before use)
    rows = flat_rows(stacked)[[0, 1, 3, 4]]
    agg = Aggregation(robust.coordinate_median)   # pads 5 clients to a bucket of 8
    result = agg(stacked, np.ones(5, np.float32))
    assert result.accepted.tolist() == [True, True, False, True, True]
    np.testing.assert_allclose(flat(result.aggregate), np.median(rows, axis=0), rtol=1e-6)
    krum = Aggregation(robust.krum(1))
    result = krum(stacked, np.ones(5, np.float32))
    scores = np_krum_scores(rows, 1)
    np.testing.assert_allclose(flat(result.aggregate), rows[np.argmin(scores)], rtol=1e-6)


# ---------------------------------------------------------------- Krum


def test_krum_scores_and_selection_match_the_definition():
    rng = np.random.default_rng(2)
    stacked = random_stacked(rng, 9)
    weights = np.array([1, 1, 1, 0, 1, 1, 1, 1, 1], np.float32)
    rows = flat_rows(stacked)[weights > 0]
    scores = np.asarray(jax.jit(robust.krum_scores, static_argnums=2)(jax.tree.map(jnp.asarray, stacked), jnp.asarray(weights), 2))
    np.testing.assert_allclose(scores[weights > 0], np_krum_scores(rows, 2), rtol=1e-5)
    assert np.isinf(scores[3])
    out = run(robust.multi_krum(2, 3), stacked, weights)
    best = np.argsort(np_krum_scores(rows, 2))[:3]
    np.testing.assert_allclose(flat(out), rows[best].mean(axis=0), rtol=1e-5, atol=1e-6)


def test_krum_picks_the_honest_cluster():
    rng = np.random.default_rng(3)
    honest, f = 8, 3
    stacked = random_stacked(rng, honest + f, scale=0.1)
    for name in SHAPES:
        stacked[name][honest:] = 50.0 + rng.standard_normal(stacked[name][honest:].shape)   # a far, tight cluster
    stacked = jax.tree.map(jnp.asarray, stacked)
    weights = jnp.ones(honest + f)
    chosen = flat(run(robust.krum(f), stacked, weights))
    rows = flat_rows(stacked)
    assert any(np.allclose(chosen, rows[i]) for i in range(honest))
    averaged = flat(run(robust.multi_krum(f, honest), stacked, weights))
    np.testing.assert_allclose(averaged, rows[:honest].mean(axis=0), rtol=1e-5, atol=1e-6)


def test_norm_bounded_mean():
    rng = np.random.default_rng(4)
    stacked = random_stacked(rng, 4, scale=2.0)
    weights = np.array([1.0, 3.0, 0.0, 2.0], np.float32)
    rows = flat_rows(stacked)
    clipped = rows * np.minimum(1.0, 1.5 / np.linalg.norm(rows, axis=1))[:, None]
    expected = (weights[:, None] * clipped).sum(0) / weights.sum()
    got = flat(run(robust.norm_bounded_mean(1.5), stacked, weights))
    np.testing.assert_allclose(got, expected, rtol=1e-5)


# ---------------------------------------------------------------- under attack


def test_robust_aggregators_resist_sign_flip_attackers():
    """20% of the clients send -10x their update: the mean reverses, the robust rules do not."""
    rng = np.random.default_rng(5)
    k = 10
    truth = {name: rng.standard_normal(shape).astype(np.float32) for name, shape in SHAPES.items()}
    honest = {name: truth[name][None] + 0.3 * rng.standard_normal((k, *truth[name].shape)).astype(np.float32)
              for name in SHAPES}
    is_malicious = attacks.malicious_clients(k, 0.2, seed=0)
    assert is_malicious.sum() == 2
    sent = attacks.attack_updates("sign_flip", jax.tree.map(jnp.asarray, honest), jnp.asarray(is_malicious),
                                  jax.random.key(0), scale=10.0)
    weights = jnp.ones(k)
    target = flat(truth)

    def error(tree):
        return np.linalg.norm(flat(tree) - target) / np.linalg.norm(target)

    mean_error = error(run(robust.make_aggregator("mean"), sent, weights))
    assert mean_error > 1.0   # pulled past the origin
    for name, kw in [("median", {}), ("trimmed_mean", {"beta": 0.2}), ("krum", {"num_byzantine": 2}),
                     ("multi_krum", {"num_byzantine": 2, "m": 6}), ("norm_bound", {"bound": 1.2 * np.linalg.norm(target)})]:
        err = error(run(robust.make_aggregator(name, **kw), sent, weights))
        assert err < (0.6 if name == "norm_bound" else 0.35), (name, err)


def test_make_aggregator_errors():
    with pytest.raises(ConfigError, match="one of"):
        robust.make_aggregator("geomed")
    with pytest.raises(ConfigError, match="needs"):
        robust.make_aggregator("trimmed_mean")
    with pytest.raises(ConfigError, match="takes"):
        robust.make_aggregator("median", beta=0.1)
    with pytest.raises(ConfigError):
        robust.make_aggregator("trimmed_mean", beta=0.5)
    with pytest.raises(ConfigError):
        robust.make_aggregator("krum", num_byzantine=-1)
    with pytest.raises(ConfigError):
        robust.make_aggregator("multi_krum", num_byzantine=1, m=0)
    with pytest.raises(ConfigError):
        robust.make_aggregator("norm_bound", bound=0.0)
    assert set(robust.ROBUST_AGGREGATORS) == {"mean", "median", "trimmed_mean", "krum", "multi_krum", "norm_bound"}
    assert robust.make_aggregator("median", beta=None) is robust.coordinate_median


# ---------------------------------------------------------------- attacks


def test_attack_updates_as_documented():
    rng = np.random.default_rng(6)
    stacked = {"w": jnp.asarray(rng.standard_normal((4, 50_000)), jnp.float32)}
    bad = jnp.array([True, False, True, False])
    key = jax.random.key(1)
    flipped = attacks.attack_updates("sign_flip", stacked, bad, key, scale=3.0)["w"]
    np.testing.assert_allclose(flipped[0], -3.0 * stacked["w"][0])
    np.testing.assert_array_equal(flipped[1], stacked["w"][1])
    scaled = attacks.attack_updates("scaling", stacked, bad, key, scale=3.0)["w"]
    np.testing.assert_allclose(scaled[2], 3.0 * stacked["w"][2])
    noise = attacks.attack_updates("gaussian", stacked, bad, key, noise_std=0.5)["w"]
    np.testing.assert_array_equal(noise[3], stacked["w"][3])
    assert np.std(np.asarray(noise[0], np.float64)) == pytest.approx(0.5, rel=0.02)
    assert abs(np.corrcoef(noise[0], stacked["w"][0])[0, 1]) < 0.03   # replaced, not added
    assert attacks.attack_updates("label_flip", stacked, bad, key) is stacked
    with pytest.raises(ConfigError):
        attacks.attack_updates("backdoor", stacked, bad, key)


def test_label_flipping_and_malicious_sets():
    labels = np.array([0, 1, 2, 3, 4], np.int32)
    flipped = attacks.flip_labels(labels, 5)
    assert flipped.tolist() == [4, 3, 2, 1, 0] and flipped.dtype == np.int32
    np.testing.assert_array_equal(attacks.flip_labels(flipped, 5), labels)
    client_labels = np.array([[0, 1], [2, 0], [1, 1]], np.int32)
    poisoned = attacks.poison_client_labels(client_labels, [False, True, False], 3)
    assert poisoned.tolist() == [[0, 1], [0, 2], [1, 1]]
    assert attacks.poison_client_labels(jnp.asarray(client_labels), np.array([True, False, False]), 3).tolist()[0] == [2, 1]
    with pytest.raises(InputError):
        attacks.poison_client_labels(client_labels, [True], 3)
    a = attacks.malicious_clients(50, 0.3, seed=4)
    assert a.sum() == 15 and np.array_equal(a, attacks.malicious_clients(50, 0.3, seed=4))
    assert not np.array_equal(a, attacks.malicious_clients(50, 0.3, seed=5))
    assert attacks.malicious_clients(10, 0.0, seed=0).sum() == 0


def test_attack_config_validation():
    cfg = attacks.AttackConfig("scaling", 0.2)
    assert cfg.scale == 10.0
    for kwargs in [dict(kind="backdoor", fraction=0.1), dict(kind="sign_flip", fraction=1.0),
                   dict(kind="sign_flip", fraction=-0.1), dict(kind="scaling", fraction=0.1, scale=0.0),
                   dict(kind="gaussian", fraction=0.1, noise_std=-1.0), dict(kind="gaussian", fraction=float("nan"))]:
        with pytest.raises(ConfigError):
            attacks.AttackConfig(**kwargs)
