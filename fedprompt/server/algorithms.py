"""Federated algorithms as ``(init, apply)`` pairs over the trainable prompt pytree.

An :class:`Algorithm` says what clients do locally (plain steps, a FedProx proximal term, or
SCAFFOLD's corrected steps) and how the server turns the aggregated client deltas into the
next global state (an optax server optimizer applied to the negated mean delta, Reddi et al.
2021). ``init(params)`` gives the :class:`ServerState`; ``apply(state, mean_delta,
mean_control_delta, participation)`` gives the next one. Both are pure and jit-compiled.

* FedAvg: McMahan et al. 2017. FedAvgM: Hsu et al. 2019.
* FedAdagrad, FedAdam, FedYogi: Reddi et al. 2021, "Adaptive Federated Optimization", Alg. 2.
* FedProx: Li et al. 2020 (``prox_mu``; the server step is FedAvg's).
* SCAFFOLD: Karimireddy et al. 2020 (server and client control variates, option II).
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from fedprompt.errors import ConfigError
from fedprompt.server import optimizers

Pytree = Any


class ServerState(NamedTuple):
    """The global state of a federation.

    Attributes:
      params: the global trainable pytree (prompt + head).
      opt_state: the server optimizer's state.
      control: SCAFFOLD's server control variate ``c`` (zeros for other algorithms).
      round: number of completed rounds.
    """

    params: Pytree
    opt_state: Any
    control: Pytree
    round: jax.Array


@dataclasses.dataclass(frozen=True)
class Algorithm:
    """A federated algorithm: local objective switches plus a server optimizer.

    Attributes:
      name: short name (recorded in metrics and artifacts).
      server_optimizer: optax transformation applied to the pseudo-gradient ``-mean_delta``.
      prox_mu: FedProx proximal coefficient for the client objective.
      scaffold: whether clients run SCAFFOLD's corrected local steps.
      plain_server_lr: FedAvg's server learning rate ``eta`` when the server step is exactly
        ``params + eta * mean_delta`` (what a seed downlink can replay); None for servers with
        state (momentum, adaptivity).
    """

    name: str
    server_optimizer: optax.GradientTransformation
    prox_mu: float = 0.0
    scaffold: bool = False
    plain_server_lr: float | None = None

    def init(self, params: Pytree) -> ServerState:
        """The initial server state for initial global ``params``."""
        params = jax.tree.map(jnp.asarray, params)
        return ServerState(
            params=params,
            opt_state=self.server_optimizer.init(params),
            control=jax.tree.map(jnp.zeros_like, params),
            round=jnp.zeros((), jnp.int32),
        )

    def apply(
        self,
        state: ServerState,
        mean_delta: Pytree,
        mean_control_delta: Pytree | None = None,
        participation: float | jax.Array = 1.0,
    ) -> ServerState:
        """One server step.

        Args:
          state: the current server state.
          mean_delta: the aggregated (weighted mean) client delta of this round.
          mean_control_delta: SCAFFOLD: the uniform mean of the clients' ``c_i+ - c_i``.
          participation: SCAFFOLD: ``|S| / N``, the fraction of all clients that reported.
        """
        params, opt_state = optimizers.server_update(state.params, state.opt_state, mean_delta, self.server_optimizer)
        control = state.control
        if self.scaffold and mean_control_delta is not None:
            control = jax.tree.map(lambda c, d: c + participation * d, control, mean_control_delta)
        return ServerState(params=params, opt_state=opt_state, control=control, round=state.round + 1)


def fedavg(server_lr: float = 1.0) -> Algorithm:
    """FedAvg: the global state moves by the example-weighted mean client delta (times ``server_lr``)."""
    return Algorithm("fedavg", optimizers.fedavg_optimizer(server_lr), plain_server_lr=float(server_lr))


def fedavgm(server_lr: float = 1.0, momentum: float = 0.9) -> Algorithm:
    """FedAvg with server momentum (Hsu et al. 2019)."""
    return Algorithm("fedavgm", optimizers.fedavgm_optimizer(server_lr, momentum))


def fedprox(mu: float = 0.01, server_lr: float = 1.0) -> Algorithm:
    """FedProx: FedAvg's server with a proximal term ``mu / 2 ||w - w_global||^2`` on clients."""
    if not mu >= 0:
        raise ConfigError(f"FedProx mu must be >= 0, got {mu}")
    return Algorithm("fedprox", optimizers.fedavg_optimizer(server_lr), prox_mu=float(mu))


def fedadagrad(server_lr: float = 0.1, tau: float = 1e-3, b1: float = 0.0) -> Algorithm:
    """FedAdagrad, Reddi et al. 2021, Algorithm 2."""
    return Algorithm("fedadagrad", optimizers.fedadagrad_optimizer(server_lr, b1=b1, tau=tau))


def fedadam(server_lr: float = 0.03, b1: float = 0.9, b2: float = 0.99, tau: float = 1e-3) -> Algorithm:
    """FedAdam, Reddi et al. 2021, Algorithm 2 (``server_lr`` 0.03: best of 0.01/0.03 on the default task;
    see the README's sweep)."""
    return Algorithm("fedadam", optimizers.fedadam_optimizer(server_lr, b1=b1, b2=b2, tau=tau))


def fedyogi(server_lr: float = 0.03, b1: float = 0.9, b2: float = 0.99, tau: float = 1e-3) -> Algorithm:
    """FedYogi, Reddi et al. 2021, Algorithm 2."""
    return Algorithm("fedyogi", optimizers.fedyogi_optimizer(server_lr, b1=b1, b2=b2, tau=tau))


def scaffold(server_lr: float = 1.0) -> Algorithm:
    """SCAFFOLD with stateful clients; pair it with a plain SGD local optimizer."""
    return Algorithm("scaffold", optimizers.fedavg_optimizer(server_lr), scaffold=True)


ALGORITHMS = {
    "fedavg": fedavg,
    "fedavgm": fedavgm,
    "fedprox": fedprox,
    "fedadagrad": fedadagrad,
    "fedadam": fedadam,
    "fedyogi": fedyogi,
    "scaffold": scaffold,
}


def from_name(name: str, **kwargs: Any) -> Algorithm:
    """An algorithm by name with its keyword arguments (``server_lr``, ``mu``, ``tau`` ...)."""
    if name not in ALGORITHMS:
        raise ConfigError(f"unknown algorithm {name!r}; choose one of {', '.join(ALGORITHMS)}")
    try:
        return ALGORITHMS[name](**kwargs)
    except TypeError as err:
        raise ConfigError(f"bad options for algorithm {name!r}: {err}") from None
