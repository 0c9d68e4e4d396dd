"""CMA-ES in JAX: pure, jit-compiled ``init`` / ``ask`` / ``tell``.

The covariance matrix adaptation evolution strategy of Hansen and Ostermeier (2001), in the
form of Hansen's tutorial ("The CMA Evolution Strategy: A Tutorial", arXiv:1604.00772, 2016,
Table 1 and Eq. 47 with positive weights only): a ``(mu/mu_w, lambda)`` strategy with

* weighted recombination of the best ``mu = lambda // 2`` of ``lambda`` candidates, weights
  ``w_i ∝ ln((lambda + 1) / 2) - ln i``;
* cumulative step-size adaptation (CSA) through the conjugate evolution path ``p_sigma``;
* the rank-one update (evolution path ``p_c``, with the ``h_sigma`` stall) plus the rank-mu
  update of the covariance matrix ``C``.

Two variants, chosen at :func:`init`:

* full (default): ``C`` is ``[d, d]``; :func:`tell` eigendecomposes it every generation
  (``O(d^3)``; right for the small ``d`` of test functions and fine up to a few hundred);
* separable (``diagonal=True``, sep-CMA-ES of Ros and Hansen 2008, "A Simple Modification in
  CMA-ES Achieving Linear Time and Space Complexity"): ``C`` is diagonal, the learning rates
  ``c_1`` and ``c_mu`` are multiplied by ``(d + 2) / 3``, and a generation costs ``O(lambda d)``.
  This is the cheap choice for black-box prompt tuning with ``d ≈ 500``, where the full
  ``C`` would learn at rates ``c_1 + c_mu ≈ 4e-5`` per generation anyway.

The state is an immutable pytree (:class:`CMAState`); every function is pure, so a client
runs generations in a ``lax.scan`` and the simulation ``vmap``s whole CMA-ES runs over
clients. Fitness is *minimized*.

Example:
  >>> import jax, jax.numpy as jnp
  >>> sphere = lambda x: jnp.sum(x ** 2)
  >>> state = init(jnp.ones(4), 0.5)
  >>> for g in range(60):
  ...     x = ask(state, jax.random.key(g))
  ...     state = tell(state, x, jax.vmap(sphere)(x))
  >>> bool(sphere(state.mean) < 1e-4)
  True
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from fedprompt.errors import ConfigError

MIN_SIGMA = 1e-30
MAX_SIGMA = 1e30
"""The step size is kept in ``[MIN_SIGMA, MAX_SIGMA]`` (a guard for float32, not a stopping rule)."""


class CMAState(NamedTuple):
    """The search distribution ``N(mean, sigma^2 C)`` and the evolution paths.

    Attributes:
      mean: the distribution's mean ``m`` ``[d]``.
      sigma: the step size (scalar).
      cov: ``C``: ``[d, d]`` (full) or its diagonal ``[d]`` (separable).
      basis: eigenvectors ``B`` of ``C`` ``[d, d]`` (full); None when separable.
      scale: square roots of ``C``'s eigenvalues ``D`` ``[d]`` (the axis scales when separable).
      path_sigma: the conjugate evolution path ``p_sigma`` ``[d]``.
      path_c: the evolution path ``p_c`` ``[d]``.
      generation: completed generations (int32 scalar).
      weights: recombination weights ``[lambda]``, sorted best first, zero after ``mu``; the
        population size is ``weights.shape[0]``.
    """

    mean: jax.Array
    sigma: jax.Array
    cov: jax.Array
    basis: jax.Array | None
    scale: jax.Array
    path_sigma: jax.Array
    path_c: jax.Array
    generation: jax.Array
    weights: jax.Array


class Constants(NamedTuple):
    """The strategy parameters of Hansen's tutorial for dimension ``d`` and population ``lambda``."""

    mu: int
    mu_eff: float
    c_sigma: float
    d_sigma: float
    c_c: float
    c_1: float
    c_mu: float
    chi_n: float


def default_popsize(dim: int) -> int:
    """``4 + floor(3 ln d)`` (Hansen's default)."""
    return 4 + int(3 * math.log(dim))


def recombination_weights(popsize: int) -> list[float]:
    """Positive weights ``ln((lambda + 1) / 2) - ln i`` for the best ``mu = lambda // 2``, summing to 1,
    followed by zeros for the rest of the population."""
    mu = popsize // 2
    raw = [math.log((popsize + 1) / 2) - math.log(i + 1) for i in range(mu)]
    total = sum(raw)
    return [w / total for w in raw] + [0.0] * (popsize - mu)


def constants(dim: int, popsize: int, diagonal: bool = False) -> Constants:
    """Learning rates and damping (tutorial Table 1; sep-CMA scaling when ``diagonal``)."""
    n = float(dim)
    w = [x for x in recombination_weights(popsize) if x > 0]
    mu_eff = 1.0 / sum(x * x for x in w)
    c_sigma = (mu_eff + 2) / (n + mu_eff + 5)
    d_sigma = 1 + 2 * max(0.0, math.sqrt((mu_eff - 1) / (n + 1)) - 1) + c_sigma
    c_c = (4 + mu_eff / n) / (n + 4 + 2 * mu_eff / n)
    c_1 = 2 / ((n + 1.3) ** 2 + mu_eff)
    c_mu = min(1 - c_1, 2 * (mu_eff - 2 + 1 / mu_eff) / ((n + 2) ** 2 + mu_eff))
    if diagonal:  # Ros and Hansen 2008: a diagonal C can learn (d + 2) / 3 times faster
        c_1 = c_1 * (n + 2) / 3
        c_mu = min(1 - c_1, c_mu * (n + 2) / 3)
    chi_n = math.sqrt(n) * (1 - 1 / (4 * n) + 1 / (21 * n * n))
    return Constants(len(w), mu_eff, c_sigma, d_sigma, c_c, c_1, c_mu, chi_n)


def init(mean: jax.Array, sigma: float | jax.Array, popsize: int | None = None, *, diagonal: bool = False) -> CMAState:
    """A fresh search distribution ``N(mean, sigma^2 I)``.

    Args:
      mean: the initial mean ``[d]`` (may be traced: ``init`` runs inside ``jit``/``vmap``).
      sigma: the initial step size (> 0).
      popsize: candidates per generation ``lambda`` (>= 2); None: :func:`default_popsize`.
      diagonal: the separable variant (diagonal ``C``, sep-CMA-ES).
    """
    mean = jnp.asarray(mean, jnp.float32)
    if mean.ndim != 1 or mean.shape[0] < 1:
        raise ConfigError(f"the CMA-ES mean must be a non-empty vector, got shape {mean.shape}")
    dim = mean.shape[0]
    popsize = default_popsize(dim) if popsize is None else popsize
    if not isinstance(popsize, int) or popsize < 2:
        raise ConfigError(f"popsize must be an integer >= 2, got {popsize!r}")
    zeros = jnp.zeros((dim,), jnp.float32)
    ones = jnp.ones((dim,), jnp.float32)
    return CMAState(
        mean=mean,
        sigma=jnp.asarray(sigma, jnp.float32),
        cov=ones if diagonal else jnp.eye(dim, dtype=jnp.float32),
        basis=None if diagonal else jnp.eye(dim, dtype=jnp.float32),
        scale=ones,
        path_sigma=zeros,
        path_c=zeros,
        generation=jnp.zeros((), jnp.int32),
        weights=jnp.asarray(recombination_weights(popsize), jnp.float32),
    )


def is_diagonal(state: CMAState) -> bool:
    """Whether ``state`` is the separable variant."""
    return state.basis is None


def ask(state: CMAState, key: jax.Array) -> jax.Array:
    """``lambda`` candidates ``m + sigma B D z``, ``z ~ N(0, I)``: ``[lambda, d]``."""
    popsize, dim = state.weights.shape[0], state.mean.shape[0]
    z = jax.random.normal(key, (popsize, dim), jnp.float32)
    y = z * state.scale
    if not is_diagonal(state):
        y = y @ state.basis.T
    return state.mean + state.sigma * y


def tell(state: CMAState, solutions: jax.Array, fitness: jax.Array) -> CMAState:
    """Update the distribution from evaluated candidates (lower fitness is better).

    ``solutions`` ``[lambda, d]`` may come in any order (they are ranked here) and need not
    be the ones :func:`ask` returned (e.g. repaired or injected candidates). A NaN fitness
    ranks last.
    """
    popsize, dim = state.weights.shape[0], state.mean.shape[0]
    if solutions.shape != (popsize, dim):
        raise ConfigError(f"tell expects solutions of shape {(popsize, dim)}, got {solutions.shape}")
    diagonal = is_diagonal(state)
    k = constants(dim, popsize, diagonal)
    fitness = jnp.where(jnp.isnan(fitness), jnp.inf, jnp.asarray(fitness, jnp.float32))
    order = jnp.argsort(fitness, stable=True)
    y = (solutions[order] - state.mean) / state.sigma  # [lambda, d], best first
    w = state.weights
    y_w = w @ y
    mean = state.mean + state.sigma * y_w

    # C^{-1/2} y_w
    if diagonal:
        whitened = y_w / state.scale
    else:
        whitened = state.basis @ ((state.basis.T @ y_w) / state.scale)
    path_sigma = (1 - k.c_sigma) * state.path_sigma + math.sqrt(k.c_sigma * (2 - k.c_sigma) * k.mu_eff) * whitened
    norm_ps = jnp.linalg.norm(path_sigma)
    g1 = (state.generation + 1).astype(jnp.float32)
    h_sigma = (norm_ps / jnp.sqrt(1 - (1 - k.c_sigma) ** (2 * g1)) < (1.4 + 2 / (dim + 1)) * k.chi_n).astype(jnp.float32)
    path_c = (1 - k.c_c) * state.path_c + h_sigma * math.sqrt(k.c_c * (2 - k.c_c) * k.mu_eff) * y_w

    delta_h = (1 - h_sigma) * k.c_c * (2 - k.c_c)
    keep = 1 - k.c_1 - k.c_mu * float(sum(recombination_weights(popsize)))
    if diagonal:
        rank_one = path_c**2 + delta_h * state.cov
        rank_mu = w @ (y**2)
        cov = keep * state.cov + k.c_1 * rank_one + k.c_mu * rank_mu
        cov = jnp.maximum(cov, 1e-20)
        basis, scale = None, jnp.sqrt(cov)
    else:
        rank_one = jnp.outer(path_c, path_c) + delta_h * state.cov
        rank_mu = (y * w[:, None]).T @ y
        cov = keep * state.cov + k.c_1 * rank_one + k.c_mu * rank_mu
        cov = 0.5 * (cov + cov.T)
        eigenvalues, basis = jnp.linalg.eigh(cov)
        scale = jnp.sqrt(jnp.maximum(eigenvalues, 1e-20))

    # CSA; the exponent is capped at 1 (at most a factor e per generation), as pycma does.
    sigma = state.sigma * jnp.exp(jnp.minimum(1.0, (k.c_sigma / k.d_sigma) * (norm_ps / k.chi_n - 1)))
    # Long runs past convergence would underflow float32 and divide by zero next generation.
    sigma = jnp.clip(sigma, MIN_SIGMA, MAX_SIGMA)
    return CMAState(
        mean=mean, sigma=sigma, cov=cov, basis=basis, scale=scale, path_sigma=path_sigma,
        path_c=path_c, generation=state.generation + 1, weights=w,
    )


class Trace(NamedTuple):
    """Per-generation record of :func:`minimize`: best fitness of the generation and step size."""

    best_fitness: jax.Array
    sigma: jax.Array


def minimize(
    fn: Callable[[jax.Array], jax.Array],
    state: CMAState,
    key: jax.Array,
    generations: int,
) -> tuple[CMAState, Trace]:
    """Run ``generations`` ask/evaluate/tell steps in one ``lax.scan`` (jittable).

    ``fn`` maps one candidate ``[d]`` to its scalar fitness; it is ``vmap``ped over the
    population. Evaluations used: ``generations * lambda``.
    """

    def step(state, key):
        x = ask(state, key)
        f = jax.vmap(fn)(x)
        return tell(state, x, f), Trace(jnp.min(f), state.sigma)

    return jax.lax.scan(step, state, jax.random.split(key, generations))
