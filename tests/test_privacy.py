"""Differential privacy: epsilon against dp-accounting, noise statistics, clipping bounds, adaptive clipping."""

from __future__ import annotations

import json
import math

import dp_accounting
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats
from dp_accounting.pld import pld_privacy_accountant
from dp_accounting.rdp import rdp_privacy_accountant
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from fedprompt.config import DPConfig
from fedprompt.errors import ConfigError
from fedprompt.privacy import accounting, dp

NR = dp_accounting.NeighboringRelation


# ---------------------------------------------------------------- accounting


def test_poisson_rdp_epsilon_equals_dp_accounting():
    z, q, rounds, delta = 1.1, 0.05, 300, 1e-5
    direct = rdp_privacy_accountant.RdpAccountant(neighboring_relation=NR.ADD_OR_REMOVE_ONE)
    direct.compose(dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)), rounds))
    assert accounting.epsilon(z, q, rounds, delta, accountant="rdp", sampling="poisson") == direct.get_epsilon(delta)


def test_poisson_pld_epsilon_equals_dp_accounting():
    z, q, rounds, delta = 1.3, 0.1, 20, 1e-6
    direct = pld_privacy_accountant.PLDAccountant(neighboring_relation=NR.ADD_OR_REMOVE_ONE)
    direct.compose(dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)), rounds))
    ours = accounting.epsilon(z, q, rounds, delta, accountant="pld", sampling="poisson")
    assert ours == direct.get_epsilon(delta)
    # PLD is tighter than RDP for the same mechanism.
    assert ours < accounting.epsilon(z, q, rounds, delta, accountant="rdp", sampling="poisson")


def test_fixed_size_epsilon_is_replace_one_with_sensitivity_2c():
    z, population, cohort, rounds, delta = 2.0, 100, 10, 50, 1e-5
    direct = rdp_privacy_accountant.RdpAccountant(neighboring_relation=NR.REPLACE_ONE)
    direct.compose(dp_accounting.SelfComposedDpEvent(
        dp_accounting.SampledWithoutReplacementDpEvent(population, cohort, dp_accounting.GaussianDpEvent(z / 2)), rounds))
    ours = accounting.epsilon(z, None, rounds, delta, sampling="fixed", population=population, cohort=cohort)
    assert ours == direct.get_epsilon(delta)
    assert ours == accounting.epsilon(z, 0.1, rounds, delta, sampling="fixed", population=population, cohort=cohort)


def test_local_epsilon_is_an_unsampled_gaussian_of_sensitivity_2c():
    z, participations, delta = 4.0, 12, 1e-5
    direct = rdp_privacy_accountant.RdpAccountant()
    direct.compose(dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(z / 2), participations))
    assert accounting.local_epsilon(z, participations, delta) == direct.get_epsilon(delta)


def test_accounting_rejects_bad_combinations():
    with pytest.raises(ConfigError, match="PLD"):
        accounting.epsilon(1.0, None, 10, 1e-5, accountant="pld", sampling="fixed", population=10, cohort=2)
    with pytest.raises(ConfigError, match="PLD"):
        DPConfig(mode="central", noise_multiplier=1.0, accountant="pld", sampling="fixed")
    with pytest.raises(ConfigError, match="population"):
        accounting.epsilon(1.0, None, 10, 1e-5, sampling="fixed")
    with pytest.raises(ConfigError, match="disagrees"):
        accounting.epsilon(1.0, 0.5, 10, 1e-5, sampling="fixed", population=10, cohort=2)
    with pytest.raises(ConfigError, match="sample_rate"):
        accounting.epsilon(1.0, 1.5, 10, 1e-5)
    with pytest.raises(ConfigError, match="delta"):
        accounting.epsilon(1.0, 0.1, 10, 0.0)
    with pytest.raises(ConfigError, match="accountant"):
        accounting.epsilon(1.0, 0.1, 10, 1e-5, accountant="moments")
    assert accounting.epsilon(0.0, 0.1, 3, 1e-5) == math.inf
    assert accounting.epsilon(1.0, 0.1, 0, 1e-5) == 0.0


@pytest.mark.parametrize("target, kwargs", [
    (2.0, dict(sample_rate=0.02, rounds=500, sampling="poisson")),
    (8.0, dict(sample_rate=None, rounds=15, sampling="fixed", population=16, cohort=8)),
])
def test_target_epsilon_calibration(target, kwargs):
    delta = 1e-5
    z = accounting.noise_multiplier_for_epsilon(target, delta=delta, tol=1e-3, **kwargs)
    eps = accounting.epsilon(z, delta=delta, **kwargs)
    assert eps <= target
    assert eps == pytest.approx(target, rel=0.01)
    # Less noise spends more than the target.
    assert accounting.epsilon(z * 0.98, delta=delta, **kwargs) > target


def test_ledger_reports_epsilon_of_rounds_so_far():
    kwargs = dict(sampling="fixed", population=20, cohort=5)
    ledger = accounting.PrivacyLedger(noise_multiplier=1.5, delta=1e-5, **kwargs)
    spent, got = ledger.init_spent(), []
    for _ in range(3):
        spent, eps = ledger.spend(spent)
        got.append(eps)
    expected = [accounting.epsilon(1.5, None, r, 1e-5, **kwargs) for r in (1, 2, 3)]
    assert got == expected
    assert got[0] < got[1] < got[2]
    summary = ledger.summary(spent)
    assert summary["epsilon"] == expected[-1] and summary["dp_rounds"] == 3 and summary["sample_rate"] == 0.25
    json.dumps(summary)
    fresh = accounting.PrivacyLedger(noise_multiplier=1.5, delta=1e-5, **kwargs)  # a resumed run's ledger
    assert fresh.epsilon(accounting.PrivacySpent(np.asarray(3), np.zeros(0, np.int64))) == expected[-1]


def test_ledger_local_mode_tracks_the_most_exposed_client():
    ledger = accounting.PrivacyLedger(noise_multiplier=3.0, delta=1e-5, mode="local", population=4)
    spent, _ = ledger.spend(ledger.init_spent(), [0, 1])
    spent, eps = ledger.spend(spent, [1, 2])
    assert spent.participations.tolist() == [1, 2, 1, 0]
    assert eps == accounting.local_epsilon(3.0, 2, 1e-5)
    with pytest.raises(ConfigError):
        ledger.spend(spent)
    with pytest.raises(ConfigError):
        ledger.spend(spent, [4])


def test_ledger_without_noise_is_json_safe():
    ledger = accounting.PrivacyLedger(noise_multiplier=0.0, delta=1e-5, sampling="poisson", sample_rate=0.5)
    spent, eps = ledger.spend(ledger.init_spent())
    assert eps == math.inf
    assert ledger.summary(spent)["epsilon"] is None


# ---------------------------------------------------------------- clipping


BIG, TINY = float(np.float32(1e30)), float(np.float32(1e-30))
heavy_tailed = st.one_of(
    st.floats(-BIG, BIG, width=32),          # squares overflow float32
    st.floats(-TINY, TINY, width=32),        # squares underflow
    st.floats(-10, 10, width=32),
)
_clip = jax.jit(dp.clip_update)


@settings(max_examples=60, deadline=None)
@given(a=hnp.arrays(np.float32, (6, 5), elements=heavy_tailed), b=hnp.arrays(np.float32, (4,), elements=heavy_tailed),
       bound=st.floats(1e-3, 1e3))
def test_clipped_norm_never_exceeds_the_bound(a, b, bound):
    clipped, norm = _clip({"a": a, "b": {"c": b}}, np.float32(bound))
    bound = float(np.float32(bound))
    flat = np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(clipped)])
    original = np.concatenate([a.ravel(), b.ravel()]).astype(np.float64)
    peak = np.abs(original).max()
    true_norm = peak * np.sqrt(np.sum((original / peak) ** 2)) if peak > 0 else 0.0
    assert np.linalg.norm(flat) <= bound * (1 + 1e-6)
    assert float(norm) == pytest.approx(true_norm, rel=1e-5, abs=1e-37)
    if true_norm <= bound * (1 - 1e-6):
        # untouched (XLA on CPU flushes float32 subnormals to zero: hence the atol)
        np.testing.assert_allclose(flat, original.astype(np.float32), rtol=0, atol=np.finfo(np.float32).tiny)
    else:
        assert np.linalg.norm(flat) == pytest.approx(bound, rel=1e-5)        # scaled onto the sphere


def test_zero_update_stays_zero():
    clipped, norm = _clip({"w": jnp.zeros((3, 2))}, 0.5)
    assert float(norm) == 0.0
    assert not np.any(np.asarray(clipped["w"]))


# ---------------------------------------------------------------- noise


def test_noise_has_the_configured_standard_deviation():
    std = 0.37
    tree = {"a": jnp.zeros((200_000,)), "b": jnp.zeros((400, 500))}
    noise = dp.gaussian_noise_like(jax.random.key(3), tree, std)
    a, b = (np.asarray(noise[k], np.float64).ravel() for k in ("a", "b"))
    for x in (a, b):
        # std of a sample std ~ std / sqrt(2N) = 0.16% at N = 200k: 1% is > 6 sigma.
        assert np.std(x) == pytest.approx(std, rel=0.01)
        assert abs(np.mean(x)) < 5 * std / np.sqrt(x.size)
    assert abs(np.corrcoef(a, b)[0, 1]) < 5 / np.sqrt(a.size)   # independent leaves
    noisy = dp.add_gaussian_noise(jax.random.key(3), tree, std)
    np.testing.assert_array_equal(noisy["a"], noise["a"])


def test_central_noise_on_the_mean_is_z_c_over_denominator():
    z, clip, denominator = 1.3, 0.5, 4.0
    stacked = {"w": jnp.zeros((3, 200_000))}
    mean = jax.jit(dp.dp_aggregate)(stacked, jnp.array([True, True, False]), clip=clip, noise_multiplier=z,
                                    denominator=denominator, key=jax.random.key(0))
    assert np.std(np.asarray(mean["w"], np.float64)) == pytest.approx(z * clip / denominator, rel=0.01)


def test_local_privatize_clips_then_adds_noise():
    update = {"w": jnp.full((200_000,), 1.0)}
    privatize = jax.jit(dp.local_privatize)
    exact = privatize(jax.random.key(1), update, 2.0, 0.0)
    np.testing.assert_allclose(exact["w"], 2.0 / np.sqrt(200_000), rtol=1e-5)
    noisy = privatize(jax.random.key(1), update, 2.0, 0.8)
    residual = np.asarray(noisy["w"], np.float64) - np.asarray(exact["w"], np.float64)
    assert np.std(residual) == pytest.approx(0.8 * 2.0, rel=0.01)


# ---------------------------------------------------------------- central aggregation


def np_clipped_uniform_sum(stacked, present, clip):
    rows = []
    for k in np.flatnonzero(present):
        leaves = [np.asarray(x[k], np.float64) for x in jax.tree.leaves(stacked)]
        norm = np.sqrt(sum(np.sum(x**2) for x in leaves))
        rows.append([x * min(1.0, clip / norm) for x in leaves])
    return [sum(r[i] for r in rows) for i in range(len(jax.tree.leaves(stacked)))]


def test_dp_aggregate_without_noise_is_the_clipped_uniform_mean():
    rng = np.random.default_rng(0)
    stacked = {"p": rng.normal(size=(5, 4, 3)).astype(np.float32), "h": rng.normal(size=(5, 7)).astype(np.float32)}
    stacked["p"][3] = np.nan   # absent: never read
    present = np.array([True, True, False, False, True])
    clip, denominator = 1.5, 4.0
    mean = jax.jit(dp.dp_aggregate)(jax.tree.map(jnp.asarray, stacked), jnp.asarray(present), clip=clip,
                                    noise_multiplier=0.0, denominator=denominator, key=jax.random.key(0))
    expected = np_clipped_uniform_sum(stacked, present, clip)
    for got, want in zip(jax.tree.leaves(mean), expected):
        np.testing.assert_allclose(np.asarray(got, np.float64), want / denominator, rtol=1e-5, atol=1e-6)


def test_central_dp_driver_rejects_non_finite_and_ignores_weights():
    rng = np.random.default_rng(1)
    updates = [{"w": rng.normal(size=6).astype(np.float32) * s} for s in (0.1, 5.0, 1.0)]
    updates.append({"w": np.full(6, np.inf, np.float32)})
    runner = dp.CentralDP(clip=1.0, noise_multiplier=0.0, denominator=3)
    result, state = runner(runner.init(), updates, [10.0, 1.0, 0.0, 5.0], jax.random.key(0))
    assert result.accepted.tolist() == [True, True, False, False]
    assert int(result.num_aggregated) == 2
    expected = np_clipped_uniform_sum({"w": np.stack([u["w"] for u in updates[:2]])}, np.array([True, True]), 1.0)[0]
    np.testing.assert_allclose(result.aggregate["w"], expected / 3, rtol=1e-5, atol=1e-7)
    assert float(state.clip) == 1.0 and np.isnan(float(result.unclipped_fraction))


def test_central_dp_driver_noise_and_adaptive_state():
    runner = dp.CentralDP(clip=0.5, noise_multiplier=1.0, denominator=4, adaptive=True, count_stddev=2.0)
    z_update = dp.update_noise_multiplier(1.0, 2.0)
    assert runner.update_noise_multiplier == pytest.approx(z_update)
    updates = {"w": jnp.zeros((4, 100_000))}
    result, state = runner(runner.init(), updates, jnp.ones(4), jax.random.key(5))
    assert float(result.noise_std) == pytest.approx(z_update * 0.5)
    assert np.std(np.asarray(result.aggregate["w"])) == pytest.approx(z_update * 0.5 / 4, rel=0.02)
    assert 0.0 <= float(result.unclipped_fraction) <= 1.0
    assert float(state.clip) == pytest.approx(0.5 * math.exp(-0.2 * (float(result.unclipped_fraction) - 0.5)), rel=1e-6)


# ---------------------------------------------------------------- adaptive clipping


def test_adaptive_step_is_the_geometric_update():
    norms = jnp.array([0.5, 1.5, 0.9, 3.0, 7.0])
    present = jnp.array([True, True, True, True, False])
    state, b_bar = dp.adaptive_clip_update(dp.AdaptiveClipState(jnp.float32(1.0)), norms, present, target_quantile=0.3,
                                           learning_rate=0.2, count_stddev=0.0, denominator=4.0, key=jax.random.key(0))
    assert float(b_bar) == pytest.approx(0.5)   # 2 of the 4 present clients have norm <= 1
    assert float(state.clip) == pytest.approx(math.exp(-0.2 * (0.5 - 0.3)), rel=1e-6)


@pytest.mark.parametrize("gamma", [0.5, 0.9])
def test_adaptive_clipping_tracks_the_target_quantile(gamma):
    rng = np.random.default_rng(0)
    state = dp.init_adaptive_clip(0.01)
    step = jax.jit(lambda s, n, k: dp.adaptive_clip_update(s, n, jnp.ones(n.shape[0], bool), target_quantile=gamma,
                                                         learning_rate=0.2, count_stddev=1.0, denominator=50.0, key=k))
    clips = []
    for r in range(400):
        norms = jnp.asarray(rng.lognormal(mean=0.0, sigma=1.0, size=50), jnp.float32)
        state, _ = step(state, norms, jax.random.key(r))
        clips.append(float(state.clip))
    late = np.mean(clips[-100:])
    true_quantile = float(np.exp(scipy.stats.norm.ppf(gamma)))   # of lognormal(0, 1)
    assert late == pytest.approx(true_quantile, rel=0.15)
    assert clips[0] > 0.01   # it moved up from far below


def test_noise_split_and_defaults():
    assert dp.update_noise_multiplier(0.0, 0.0) == 0.0
    z_update = dp.update_noise_multiplier(1.0, 1.0)
    assert (z_update**-2 + 2.0**-2) ** -0.5 == pytest.approx(1.0)
    with pytest.raises(ConfigError, match="count"):
        dp.update_noise_multiplier(1.0, 0.5)
    assert dp.default_count_stddev(100, 1.0) == 5.0
    assert dp.default_count_stddev(8, 1.0) == 1.0


def test_dp_config_validation():
    cfg = DPConfig(mode="central", clip=0.5, target_epsilon=4.0, adaptive=True)
    assert cfg.enabled and cfg.resolved_delta(16) == 1e-5 and cfg.resolved_delta(10**6) == 1e-6
    assert not DPConfig().enabled
    bad = [
        dict(mode="global", noise_multiplier=1.0),
        dict(mode="central"),
        dict(mode="central", noise_multiplier=1.0, target_epsilon=2.0),
        dict(mode="central", noise_multiplier=-1.0),
        dict(mode="central", noise_multiplier=1.0, clip=0.0),
        dict(mode="central", noise_multiplier=1.0, delta=1.0),
        dict(mode="central", noise_multiplier=1.0, target_quantile=1.0),
        dict(mode="central", noise_multiplier=1.0, clip_lr=0.0),
        dict(mode="central", noise_multiplier=1.0, sampling="shuffle"),
        dict(mode="local", noise_multiplier=1.0, adaptive=True),
        dict(noise_multiplier=1.0),
        dict(mode="central", noise_multiplier=float("nan")),
    ]
    for kwargs in bad:
        with pytest.raises(ConfigError):
            DPConfig(**kwargs)
