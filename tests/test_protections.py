"""Privacy, robustness and attacks wired into the simulation engine (tiny backbone)."""

from __future__ import annotations

import jax
import numpy as np
import optax
from conftest import tiny_backbone

from fedprompt import PromptConfig, SequenceClassification
from fedprompt.federation.plan import SecureAggregationSettings
from fedprompt.privacy import accounting
from fedprompt.config import DPConfig
from fedprompt.server import algorithms
from fedprompt.server.robust import coordinate_median
from fedprompt.simulation.attacks import AttackConfig
from fedprompt.simulation.engine import FederatedSimulation, build_client_data, run_rounds
from fedprompt.data.partition import iid_partition

LABELS = 3


def _simulation(**kwargs):
    rng = np.random.default_rng(0)
    ids = rng.integers(5, 100, (60, 8)).astype(np.int32)
    encoded = {"input_ids": ids, "attention_mask": np.ones_like(ids), "labels": (ids[:, 0] % LABELS).astype(np.int32)}
    parts = iid_partition(60, 6, seed=0)
    options = {"clients_per_round": 6, "local_steps": 2, "batch_size": 4, "seed": 0, **kwargs}
    return FederatedSimulation.build(
        tiny_backbone("bert"), PromptConfig(num_virtual_tokens=2, init="random", random_std=0.5),
        SequenceClassification(LABELS), algorithms.fedavg(), optax.adam(0.05), build_client_data(encoded, parts, LABELS),
        **options,
    ), encoded


def _leaves(tree):
    return [np.asarray(x, np.float64) for x in jax.tree.leaves(tree)]


def test_central_dp_reports_the_accountants_epsilon_every_round():
    sim, encoded = _simulation(dp_config=DPConfig(mode="central", clip=0.1, noise_multiplier=1.3), total_rounds=3)
    _, _, history = run_rounds(sim, 3, encoded)
    delta = DPConfig(mode="central", clip=0.1, noise_multiplier=1.3).resolved_delta(6)
    for r, m in enumerate(history, start=1):
        want = accounting.epsilon(1.3, None, r, delta, sampling="fixed", population=6, cohort=6)
        np.testing.assert_allclose(m["epsilon"], want, rtol=1e-9)
        assert m["dp_clip"] == np.float32(0.1) and abs(m["dp_noise_std"] - 0.13) < 1e-6
    assert history[0]["epsilon"] < history[-1]["epsilon"]


def test_target_epsilon_is_met_by_the_run():
    sim, encoded = _simulation(dp_config=DPConfig(mode="central", clip=0.1, target_epsilon=5.0), total_rounds=2)
    _, _, history = run_rounds(sim, 2, encoded)
    assert history[-1]["epsilon"] <= 5.0 + 1e-6 and history[-1]["epsilon"] > 4.5


def test_secure_aggregation_equals_the_plain_uniform_mean():
    sim, _ = _simulation(secagg=SecureAggregationSettings(clip_range=1.0))
    state, controls = sim.init()
    ids, _ = sim.sample(0)
    deltas = sim.train_clients(state, controls, ids, 0).delta
    expected = jax.tree.map(lambda p, d: np.asarray(p) + np.asarray(d, np.float64).mean(0), state.params, deltas)
    new_state, _, result = sim.run_round(state, controls, 0)
    for a, b in zip(_leaves(new_state.params), _leaves(expected), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-4)
    assert result.clients == 6 and result.bytes_up > 0 and result.extra["secagg_threshold"] == 4


def test_secure_aggregation_with_too_few_survivors_publishes_nothing():
    sim, _ = _simulation(secagg=SecureAggregationSettings(threshold=6), dropout=0.5)
    state, controls = sim.init()
    r = next(r for r in range(50) if sim.sample(r)[1].any())
    new_state, _, result = sim.run_round(state, controls, r)
    assert result.extra["secagg_failed"] and result.clients == 0
    for a, b in zip(_leaves(new_state.params), _leaves(state.params), strict=True):
        np.testing.assert_array_equal(a, b)


def test_median_resists_sign_flip_attackers_that_pull_the_mean():
    def round_delta(aggregator):
        kwargs = {"aggregator": aggregator} if aggregator else {}
        sim, _ = _simulation(attack=AttackConfig(kind="sign_flip", fraction=0.34, scale=10.0), **kwargs)
        clean, _ = _simulation()
        state, controls = sim.init()
        honest = clean.train_clients(state, controls, *sim.sample(0)[:1], 0).delta
        new_state, _, _ = sim.run_round(state, controls, 0)
        moved = jax.tree.map(lambda a, b: np.asarray(a) - np.asarray(b), new_state.params, state.params)
        honest_mean = jax.tree.map(lambda d: np.asarray(d, np.float64).mean(0), honest)
        return sum(float(np.sum(np.square(a - b))) for a, b in zip(_leaves(moved), _leaves(honest_mean))), sim

    mean_error, sim = round_delta(None)
    median_error, _ = round_delta(coordinate_median)
    assert sim.malicious.sum() == 2
    assert median_error < 0.05 * mean_error, (median_error, mean_error)


def test_label_flip_poisons_only_malicious_clients():
    sim, _ = _simulation(attack=AttackConfig(kind="label_flip", fraction=0.34))
    clean, _ = _simulation()
    flipped = np.asarray(sim.client_data.columns["labels"])
    original = np.asarray(clean.client_data.columns["labels"])
    for c in range(6):
        n = sim.client_data.sizes[c]
        if sim.malicious[c]:
            np.testing.assert_array_equal(flipped[c, :n], LABELS - 1 - original[c, :n])
        else:
            np.testing.assert_array_equal(flipped[c, :n], original[c, :n])
