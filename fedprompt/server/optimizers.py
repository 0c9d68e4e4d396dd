"""Server optimizers (FedOpt) as optax transformations of the negated mean client update.

Reddi et al. 2021, "Adaptive Federated Optimization" (ICLR), Algorithm 2: each round the server
averages the client deltas, ``Δ_t = mean_k (x_k - x_t)`` (client params after local training
minus the global params they started from), and treats ``-Δ_t`` as a *pseudo-gradient* for a
server optimizer. With ``m_{-1} = 0`` and ``v_{-1} = τ²``:

    m_t = β1 m_{t-1} + (1 - β1) Δ_t
    v_t = v_{t-1} + Δ_t²                                   (FedAdagrad)
    v_t = β2 v_{t-1} + (1 - β2) Δ_t²                       (FedAdam)
    v_t = v_{t-1} - (1 - β2) Δ_t² sign(v_{t-1} - Δ_t²)     (FedYogi)
    x_{t+1} = x_t + η m_t / (sqrt(v_t) + τ)

There is no bias correction and ``τ`` sits outside the square root, which is why these are not
``optax.adam`` / ``optax.yogi`` / ``optax.adagrad`` (those bias-correct, or put their epsilon
elsewhere, or start the accumulator elsewhere). Every optimizer here *is* an optax
``GradientTransformation``: :func:`scale_by_fedopt` holds the moments and is chained with
``optax.scale_by_learning_rate``, so schedules, ``optax.chain`` and friends compose as usual.

Sign convention: optax transformations receive gradients and return updates to *add*. The
pseudo-gradient is ``g = -Δ``, so :func:`scale_by_fedopt` accumulates ``g`` and its ``mu`` is
``-m_t`` in the paper's notation (``nu`` is ``v_t`` exactly, since ``g² = Δ²``);
:func:`server_update` does the negation and ``optax.apply_updates``.

Any other optax transformation is a server optimizer too: ``server_update(params, state,
mean_delta, optax.sgd(0.5))`` moves the global params by ``0.5 Δ``, ``optax.adam(1e-2)`` runs
bias-corrected Adam on the pseudo-gradient, and so on.

Example:
  >>> import jax.numpy as jnp
  >>> opt = fedadam(server_lr=0.1)
  >>> params = {"prompt": jnp.zeros(3)}
  >>> state = opt.init(params)
  >>> params, state = server_update(params, state, {"prompt": jnp.array([0.1, -0.2, 0.0])}, opt)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from fedprompt.errors import ConfigError

ScalarOrSchedule = float | Callable[[Any], Any]

SECOND_MOMENT_RULES = ("adagrad", "adam", "yogi")


class ScaleByFedOptState(NamedTuple):
    """State of :func:`scale_by_fedopt`.

    Attributes:
      mu: first moment of the pseudo-gradient ``g = -Δ`` (the paper's ``-m_t``).
      nu: second moment ``v_t`` (the paper's, unchanged: ``g² = Δ²``).
    """

    mu: optax.Updates
    nu: optax.Updates


def _check_number(name: str, value: Any) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(value):
        raise ConfigError(f"{name} must be finite, got {value}")
    return value


def _check_learning_rate(server_lr: ScalarOrSchedule) -> ScalarOrSchedule:
    if callable(server_lr):
        return server_lr
    if _check_number("server_lr", server_lr) <= 0:
        raise ConfigError(f"server_lr must be > 0 (or an optax schedule), got {server_lr}")
    return server_lr


def _check_decay(name: str, value: float) -> float:
    value = _check_number(name, value)
    if not 0.0 <= value < 1.0:
        raise ConfigError(f"{name} must be in [0, 1), got {value}")
    return value


def _check_tau(tau: float) -> float:
    tau = _check_number("tau", tau)
    if tau <= 0:
        raise ConfigError(f"tau (the adaptivity, added to sqrt(v)) must be > 0, got {tau}")
    return tau


def scale_by_fedopt(
    second_moment: str,
    *,
    b1: float,
    b2: float = 0.99,
    tau: float = 1e-3,
    initial_accumulator: float | None = None,
) -> optax.GradientTransformation:
    """Scales the pseudo-gradient by Reddi et al.'s adaptive server rule (Algorithm 2).

    Returns ``mu_t / (sqrt(v_t) + τ)``, with ``mu_t = β1 mu_{t-1} + (1 - β1) g_t`` and ``v_t``
    updated by ``second_moment``; chain it with ``optax.scale_by_learning_rate(η)`` to get the
    update ``η m_t / (sqrt(v_t) + τ)`` to add to the params. The moments are kept in float32
    (or wider, if the params are wider), whatever the params' dtype.

    Args:
      second_moment: ``"adagrad"`` (``v += g²``), ``"adam"`` (``v = β2 v + (1-β2) g²``) or
        ``"yogi"`` (``v -= (1-β2) g² sign(v - g²)``).
      b1: first-moment decay β1 in [0, 1); 0 turns momentum off (``m_t = Δ_t``).
      b2: second-moment decay β2 in [0, 1); unused by ``"adagrad"``.
      tau: adaptivity τ > 0, added to ``sqrt(v_t)``.
      initial_accumulator: ``v_{-1}``, τ² when ``None``. The paper's analysis requires
        ``v_{-1} >= τ²``; smaller values (>= 0) are accepted for experiments.

    Raises:
      ConfigError: an unknown rule, or a hyperparameter out of range.
    """
    if second_moment not in SECOND_MOMENT_RULES:
        raise ConfigError(f"second_moment must be one of {SECOND_MOMENT_RULES}, got {second_moment!r}")
    b1 = _check_decay("b1", b1)
    b2 = _check_decay("b2", b2)
    tau = _check_tau(tau)
    v0 = tau * tau if initial_accumulator is None else _check_number("initial_accumulator", initial_accumulator)
    if v0 < 0:
        raise ConfigError(f"initial_accumulator (v_-1) must be >= 0 (the paper requires >= tau^2), got {v0}")

    def moment_dtype(x):
        return jnp.promote_types(jnp.asarray(x).dtype, jnp.float32)

    def init_fn(params):
        mu = jax.tree.map(lambda p: jnp.zeros(jnp.shape(p), moment_dtype(p)), params)
        nu = jax.tree.map(lambda p: jnp.full(jnp.shape(p), v0, moment_dtype(p)), params)
        return ScaleByFedOptState(mu=mu, nu=nu)

    def second(g2, v):
        if second_moment == "adagrad":
            return v + g2
        if second_moment == "adam":
            return b2 * v + (1.0 - b2) * g2
        return v - (1.0 - b2) * g2 * jnp.sign(v - g2)

    def update_fn(updates, state, params=None):
        del params
        g = jax.tree.map(lambda u, m: jnp.asarray(u).astype(m.dtype), updates, state.mu)
        mu = jax.tree.map(lambda u, m: b1 * m + (1.0 - b1) * u, g, state.mu)
        nu = jax.tree.map(lambda u, v: second(u * u, v), g, state.nu)
        scaled = jax.tree.map(lambda m, v: m / (jnp.sqrt(v) + tau), mu, nu)
        return scaled, ScaleByFedOptState(mu=mu, nu=nu)

    return optax.GradientTransformation(init_fn, update_fn)


def fedavg_optimizer(server_lr: ScalarOrSchedule = 1.0) -> optax.GradientTransformation:
    """FedAvg's server step, ``x_{t+1} = x_t + η Δ_t`` (McMahan et al. 2017 is ``η = 1``).

    It is ``optax.sgd(η)`` on the pseudo-gradient ``-Δ``.
    """
    return optax.sgd(_check_learning_rate(server_lr))


def fedavgm_optimizer(server_lr: ScalarOrSchedule = 1.0, momentum: float = 0.9) -> optax.GradientTransformation:
    """FedAvg with server momentum (Hsu et al. 2019, "Measuring the Effects of Non-Identical
    Data Distribution for Federated Visual Classification"): ``b_t = β b_{t-1} + Δ_t``,
    ``x_{t+1} = x_t + η b_t``.

    This is exactly ``optax.sgd(η, momentum=β)`` (heavy ball, no dampening, ``b_{-1} = 0``) on
    the pseudo-gradient. β = 0.9 is a common default; tune it together with η, since the
    effective server step grows as ``η / (1 - β)``.
    """
    return optax.sgd(_check_learning_rate(server_lr), momentum=_check_decay("momentum", momentum))


def fedadagrad_optimizer(
    server_lr: ScalarOrSchedule, b1: float = 0.0, tau: float = 1e-3, initial_accumulator: float | None = None
) -> optax.GradientTransformation:
    """FedAdagrad (Reddi et al. 2021, Algorithm 2): ``v_t = v_{t-1} + Δ_t²``.

    ``b1 = 0`` by default: plain Adagrad without momentum, the setting of the paper's
    FedAdagrad convergence analysis; pass ``b1=0.9`` for the momentum variant.
    ``tau = 1e-3`` lies inside the range of τ the paper tunes over; tune it with ``server_lr``.
    See :func:`scale_by_fedopt` for ``initial_accumulator``.
    """
    return optax.chain(
        scale_by_fedopt("adagrad", b1=b1, tau=tau, initial_accumulator=initial_accumulator),
        optax.scale_by_learning_rate(_check_learning_rate(server_lr)),
    )


def fedadam_optimizer(
    server_lr: ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.99,
    tau: float = 1e-3,
    initial_accumulator: float | None = None,
) -> optax.GradientTransformation:
    """FedAdam (Reddi et al. 2021, Algorithm 2): ``v_t = β2 v_{t-1} + (1-β2) Δ_t²``, no bias correction.

    ``b1 = 0.9``, ``b2 = 0.99`` are the values the paper fixes in its experiments (Section 5);
    ``tau = 1e-3`` lies inside the range of τ it tunes over (τ and η are tuned per task). See
    :func:`scale_by_fedopt`.
    """
    return optax.chain(
        scale_by_fedopt("adam", b1=b1, b2=b2, tau=tau, initial_accumulator=initial_accumulator),
        optax.scale_by_learning_rate(_check_learning_rate(server_lr)),
    )


def fedyogi_optimizer(
    server_lr: ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.99,
    tau: float = 1e-3,
    initial_accumulator: float | None = None,
) -> optax.GradientTransformation:
    """FedYogi (Reddi et al. 2021, Algorithm 2): ``v_t = v_{t-1} - (1-β2) Δ_t² sign(v_{t-1} - Δ_t²)``.

    Defaults as for :func:`fedadam_optimizer`. See :func:`scale_by_fedopt`.
    """
    return optax.chain(
        scale_by_fedopt("yogi", b1=b1, b2=b2, tau=tau, initial_accumulator=initial_accumulator),
        optax.scale_by_learning_rate(_check_learning_rate(server_lr)),
    )


SERVER_OPTIMIZERS: dict[str, Callable[..., optax.GradientTransformation]] = {
    "fedavg": fedavg_optimizer,
    "fedavgm": fedavgm_optimizer,
    "fedadagrad": fedadagrad_optimizer,
    "fedadam": fedadam_optimizer,
    "fedyogi": fedyogi_optimizer,
}


def make_server_optimizer(name: str, **hyperparameters: Any) -> optax.GradientTransformation:
    """A server optimizer by name (``"fedavg"``, ``"fedavgm"``, ``"fedadagrad"``, ``"fedadam"``,
    ``"fedyogi"``), e.g. from a config file: ``make_server_optimizer("fedyogi", server_lr=0.01)``.

    Raises:
      ConfigError: an unknown name, an unknown or missing hyperparameter, or a bad value.
    """
    if name not in SERVER_OPTIMIZERS:
        raise ConfigError(f"unknown server optimizer {name!r}; choose one of {sorted(SERVER_OPTIMIZERS)}")
    try:
        return SERVER_OPTIMIZERS[name](**hyperparameters)
    except TypeError as e:
        raise ConfigError(f"bad hyperparameters for server optimizer {name!r}: {e}") from None


def server_update(
    params: optax.Params, opt_state: optax.OptState, mean_delta: optax.Updates, optimizer: optax.GradientTransformation
) -> tuple[optax.Params, optax.OptState]:
    """One server step: ``params <- apply_updates(params, optimizer.update(-mean_delta))``.

    Pure and jit-friendly (close over ``optimizer`` or mark it static). ``mean_delta`` is the
    aggregated client delta (client params after local training minus ``params``) with the
    structure of ``params``; any optax ``GradientTransformation`` works as ``optimizer``, and
    ``opt_state`` comes from ``optimizer.init(params)``. The new params keep their dtypes.

    Example:
      >>> import jax.numpy as jnp, optax
      >>> opt = optax.sgd(0.5)
      >>> p, s = server_update(jnp.ones(2), opt.init(jnp.ones(2)), jnp.array([2.0, -2.0]), opt)
      >>> p.tolist()
      [2.0, 0.0]
    """
    pseudo_gradient = jax.tree.map(lambda d: -jnp.asarray(d), mean_delta)
    updates, opt_state = optimizer.update(pseudo_gradient, opt_state, params)
    return optax.apply_updates(params, updates), opt_state
