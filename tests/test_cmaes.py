"""CMA-ES against its known behaviour on standard test functions (Hansen's tutorial, pycma)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedprompt.client import cmaes
from fedprompt.errors import ConfigError

DIM = 10
SEEDS = 3
ROTATION = np.linalg.qr(np.random.default_rng(0).normal(size=(DIM, DIM)))[0].astype(np.float32)


def sphere(x):
    return jnp.sum(x**2)


def ellipsoid(x):
    """Condition number 1e6, axis-parallel."""
    n = x.shape[0]
    return jnp.sum(10.0 ** (6 * jnp.arange(n) / (n - 1)) * x**2)


def rotated_ellipsoid(x):
    return ellipsoid(jnp.asarray(ROTATION) @ x)


def rosenbrock(x):
    return jnp.sum(100 * (x[1:] - x[:-1] ** 2) ** 2 + (1 - x[:-1]) ** 2)


FUNCTIONS = {"sphere": sphere, "ellipsoid": ellipsoid, "rotated_ellipsoid": rotated_ellipsoid, "rosenbrock": rosenbrock}
GENERATIONS = 1000
_curves: dict[bool, dict[str, np.ndarray]] = {}


def best_so_far(diagonal: bool) -> dict[str, np.ndarray]:
    """``{function: [seeds, generations]}`` best fitness so far, for every function and seed in
    ONE compiled program (a ``lax.switch`` over the functions, ``vmap`` over runs)."""
    if diagonal not in _curves:
        fns = list(FUNCTIONS.values())

        def run(fid, x0, key):
            def fn(x):
                return jax.lax.switch(fid, fns, x)

            return cmaes.minimize(fn, cmaes.init(x0, 0.5, diagonal=diagonal), key, GENERATIONS)[1].best_fitness

        fids = np.repeat(np.arange(len(fns)), SEEDS)
        x0 = np.stack([np.zeros(DIM) if FUNCTIONS[list(FUNCTIONS)[i]] is rosenbrock else np.ones(DIM) for i in fids])
        keys = jax.random.split(jax.random.key(0), len(fids))
        best = jax.jit(jax.vmap(run))(jnp.asarray(fids), jnp.asarray(x0, jnp.float32), keys)
        curves = np.minimum.accumulate(np.asarray(best), axis=1)
        _curves[diagonal] = {name: curves[i * SEEDS : (i + 1) * SEEDS] for i, name in enumerate(FUNCTIONS)}
    return _curves[diagonal]


def evaluations_to_reach(name, target, *, diagonal=False):
    """Per seed: evaluations until the best fitness so far is below ``target`` (None: never)."""
    popsize = cmaes.default_popsize(DIM)
    out = []
    for row in best_so_far(diagonal)[name]:
        hit = np.flatnonzero(row < target)
        out.append(int(hit[0] + 1) * popsize if hit.size else None)
    return out


def test_strategy_parameters_are_the_tutorials():
    # Hansen's tutorial, Table 1, for n = 10: lambda = 10, mu = 5.
    assert cmaes.default_popsize(10) == 10
    w = np.array(cmaes.recombination_weights(10))
    raw = np.log(5.5) - np.log(np.arange(1, 6))
    np.testing.assert_allclose(w[:5], raw / raw.sum())
    assert np.all(w[5:] == 0) and math.isclose(w.sum(), 1.0)
    k = cmaes.constants(10, 10)
    mu_eff = 1 / np.sum(w[:5] ** 2)
    assert math.isclose(k.mu_eff, mu_eff) and 3.1 < mu_eff < 3.2
    assert math.isclose(k.c_sigma, (mu_eff + 2) / (10 + mu_eff + 5))
    assert math.isclose(k.c_c, (4 + mu_eff / 10) / (10 + 4 + 2 * mu_eff / 10))
    assert math.isclose(k.c_1, 2 / (11.3**2 + mu_eff))
    assert math.isclose(k.c_mu, 2 * (mu_eff - 2 + 1 / mu_eff) / (144 + mu_eff))
    assert math.isclose(k.chi_n, math.sqrt(10) * (1 - 1 / 40 + 1 / 2100))
    sep = cmaes.constants(10, 10, diagonal=True)
    assert math.isclose(sep.c_1, k.c_1 * 4) and math.isclose(sep.c_mu, k.c_mu * 4)


def test_sphere_converges_linearly_within_the_known_budget():
    # CMA-ES needs about 1.3-1.5e3 evaluations on the 10-D sphere from x0 = 1, sigma0 = 0.5,
    # and its progress is linear in log f: every decade costs about the same.
    evals = evaluations_to_reach("sphere", 1e-8)
    assert all(e is not None and 800 < e <= 2000 for e in evals), evals
    decades = [np.mean(evaluations_to_reach("sphere", 10.0**-k)) for k in (2, 4, 6, 8)]
    steps = np.diff(decades)
    assert steps.max() < 1.5 * steps.min(), decades


def test_full_cma_learns_an_ill_conditioned_ellipsoid_in_any_rotation():
    # Learning a 1e6-conditioned covariance costs a few thousand evaluations (pycma: ~6e3 in 10-D),
    # axis-parallel or rotated alike, and far more than the sphere.
    for name in ("ellipsoid", "rotated_ellipsoid"):
        evals = evaluations_to_reach(name, 1e-8)
        assert all(e is not None and 3000 < e <= 8000 for e in evals), (name, evals)


def test_separable_cma_is_fast_on_the_axis_parallel_ellipsoid_and_fails_when_rotated():
    assert all(e is not None and e <= 3500 for e in evaluations_to_reach("ellipsoid", 1e-8, diagonal=True))
    assert evaluations_to_reach("rotated_ellipsoid", 1e-2, diagonal=True) == [None] * SEEDS
    assert all(e is not None and e <= 2000 for e in evaluations_to_reach("sphere", 1e-8, diagonal=True))


def test_rosenbrock_reaches_the_global_minimum():
    # From x0 = 0 the 10-D Rosenbrock valley takes about 5-7e3 evaluations. Rosenbrock has a
    # second, local minimum for n >= 4 (near x = (-1, 1, ..., 1); f = 3.98662 in 10-D) that
    # CMA-ES with the default population ends in now and then: which seed does depends on the
    # last bits of the arithmetic (the CPU, XLA's code generation). Most runs reach the global
    # minimum; a run that does not sits in that local one, not somewhere in between.
    evals = evaluations_to_reach("rosenbrock", 1e-6)
    final = [float(row[-1]) for row in best_so_far(False)["rosenbrock"]]
    assert sum(e is not None and e <= 10_000 for e in evals) >= SEEDS - 1, evals
    for e, f in zip(evals, final):
        assert e is not None or abs(f - 3.98662) < 1e-3, (evals, final)


def test_step_size_grows_on_a_linear_function():
    def linear(x):
        return x[0]

    state, _ = jax.jit(lambda s, k: cmaes.minimize(linear, s, k, 40))(cmaes.init(jnp.zeros(DIM), 1.0), jax.random.key(1))
    assert float(state.sigma) > 20  # CSA: consistent progress lengthens the steps, exponentially
    assert float(state.mean[0]) < -50


def test_tell_ranks_candidates_itself_and_ignores_nan():
    state = cmaes.init(jnp.ones(4), 0.3, popsize=6)
    x = cmaes.ask(state, jax.random.key(0))
    f = jax.vmap(sphere)(x)
    tell = jax.jit(cmaes.tell)
    perm = np.array([3, 0, 5, 1, 4, 2])
    a = tell(state, x, f)
    jax.tree.map(np.testing.assert_array_equal, a, tell(state, x[perm], f[perm]))
    worst = int(jnp.argmax(f))
    jax.tree.map(np.testing.assert_array_equal, a, tell(state, x, f.at[worst].set(jnp.nan)))  # weight 0 anyway


def test_bad_arguments_are_refused():
    with pytest.raises(ConfigError, match="popsize"):
        cmaes.init(jnp.zeros(3), 1.0, popsize=1)
    with pytest.raises(ConfigError, match="vector"):
        cmaes.init(jnp.zeros((2, 2)), 1.0)
    with pytest.raises(ConfigError, match="shape"):
        state = cmaes.init(jnp.zeros(3), 1.0, popsize=4)
        cmaes.tell(state, jnp.zeros((5, 3)), jnp.zeros(5))
