"""The client update of federated prompt tuning, written once for every runtime.

``client_update(global_params, weights, data, num_examples, key, control, client_control)``
runs ``local_steps`` optimizer steps on one client's data and returns the change of its
trainable state. It is a pure function of arrays, so the simulation engine ``vmap``s it over a
block of clients that share one copy of the frozen ``weights``, and a deployed client calls
the very same function for itself.

Local objectives:

* FedAvg (McMahan et al. 2017, "Communication-Efficient Learning of Deep Networks from
  Decentralized Data"): plain local steps.
* FedProx (Li et al. 2020, "Federated Optimization in Heterogeneous Networks"): the proximal
  term ``mu / 2 * ||w - w_global||^2`` on the trainable state is added to the loss.
* SCAFFOLD (Karimireddy et al. 2020, "SCAFFOLD: Stochastic Controlled Averaging for Federated
  Learning"): every local gradient is corrected by ``c - c_i``; afterwards the client control
  variate is refreshed with the paper's option II, ``c_i+ = c_i - c + (x - y_i) / (K * lr)``.

Client data is a dict of arrays padded to a common length ``N_max``; only the first
``num_examples`` rows are real. Every local step draws a full batch from a per-client random
order of the real rows (cycling through them as epochs), so all clients run the same
program whatever their size.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from fedprompt.client.local import LossFn
from fedprompt.errors import ConfigError

Pytree = Any


class ClientResult(NamedTuple):
    """What one client's local training produces.

    Attributes:
      delta: trained state minus the global state (what a client sends).
      control_delta: SCAFFOLD only: ``c_i+ - c_i`` (also sent); zeros otherwise.
      control: SCAFFOLD only: the client's new control variate ``c_i+`` (kept by the client).
      loss: mean training loss over the local steps.
    """

    delta: Pytree
    control_delta: Pytree
    control: Pytree
    loss: jax.Array


def tree_sqnorm(tree: Pytree) -> jax.Array:
    """Sum of squares of all leaves (float32)."""
    return sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree))


def random_order(key: jax.Array, num_examples: jax.Array, capacity: int) -> jax.Array:
    """A random permutation of ``range(num_examples)`` in the first slots of a ``[capacity]`` array."""
    u = jax.random.uniform(key, (capacity,))
    return jnp.argsort(jnp.where(jnp.arange(capacity) < num_examples, u, 2.0))


def label_log_prior(labels: jax.Array, num_examples: jax.Array, num_labels: int) -> jax.Array:
    """``[num_labels]`` log frequencies of the first ``num_examples`` labels, add-one smoothed."""
    real = (jnp.arange(labels.shape[0]) < num_examples).astype(jnp.float32)
    counts = jnp.sum(jax.nn.one_hot(labels, num_labels, dtype=jnp.float32) * real[:, None], axis=0)
    return jnp.log((counts + 1.0) / (jnp.sum(counts) + num_labels))


def local_batch(
    data: Mapping[str, jax.Array], order: jax.Array, num_examples: jax.Array, step: jax.Array, batch_size: int
) -> dict[str, jax.Array]:
    """The ``step``-th local batch: rows ``order[step * batch_size ...]`` cycling over the real examples."""
    slots = (step * batch_size + jnp.arange(batch_size)) % jnp.maximum(num_examples, 1)
    return {name: column[order[slots]] for name, column in data.items()}


def make_client_update(
    loss_fn: LossFn,
    local_optimizer: optax.GradientTransformation,
    *,
    local_steps: int,
    batch_size: int,
    prox_mu: float = 0.0,
    scaffold_lr: float | None = None,
    batch_sharding: Any = None,
    logit_adjustment: float = 0.0,
    num_labels: int | None = None,
) -> Callable[..., ClientResult]:
    """Build the pure client update.

    Args:
      loss_fn: ``loss(params, weights, batch) -> (loss, metrics)``, usually
        :func:`~fedprompt.client.local.make_loss_fn` of a backbone, prompt config and task.
      local_optimizer: any optax transformation (a fresh state every round).
      local_steps: optimizer steps per round, ``K``.
      batch_size: examples per step.
      prox_mu: FedProx proximal coefficient (0: plain FedAvg objective).
      scaffold_lr: enables SCAFFOLD's gradient correction and control update; the local
        learning rate ``lr`` of option II (use it with ``optax.sgd(scaffold_lr)``).
      batch_sharding: a ``jax.sharding.Sharding`` of each local batch along its examples (for
        one client's data-parallel steps on several local devices: XLA splits the forward and
        backward pass and sums the gradients); None: one device.
      logit_adjustment, num_labels: tau > 0 trains on logits shifted by tau times the log of
        the client's own label frequencies (``batch["logit_offset"]``; logit-calibrated local
        training for label skew, Zhang et al. 2022, FedLC; Menon et al. 2021): the classifier
        then models the classes' evidence, not the client's prior, and local steps no longer
        pull it towards the client's own classes. Evaluation uses the plain logits.

    Returns:
      ``client_update(global_params, weights, data, num_examples, key, control=None,
      client_control=None) -> ClientResult``.
    """
    if local_steps < 1 or batch_size < 1:
        raise ConfigError(f"local_steps and batch_size must be >= 1, got {local_steps}, {batch_size}")
    if prox_mu < 0:
        raise ConfigError(f"prox_mu must be >= 0, got {prox_mu}")
    if logit_adjustment < 0 or (logit_adjustment and not num_labels):
        raise ConfigError(f"logit_adjustment must be >= 0 and needs num_labels, got {logit_adjustment}, {num_labels}")

    def client_update(
        global_params: Pytree,
        weights: Pytree,
        data: Mapping[str, jax.Array],
        num_examples: jax.Array,
        key: jax.Array,
        control: Pytree | None = None,
        client_control: Pytree | None = None,
    ) -> ClientResult:
        capacity = next(iter(data.values())).shape[0]
        order = random_order(key, num_examples, capacity)
        if logit_adjustment:
            offset = logit_adjustment * label_log_prior(data["labels"], num_examples, num_labels)
        correction = None
        if scaffold_lr is not None:
            correction = jax.tree.map(lambda c, ci: c - ci, control, client_control)

        def objective(params, batch):
            loss, _ = loss_fn(params, weights, batch)
            total = loss
            if prox_mu:
                diff = jax.tree.map(lambda a, b: a - b, params, global_params)
                total = total + 0.5 * prox_mu * tree_sqnorm(diff)
            return total, loss

        def local_step(carry, step):
            params, opt_state = carry
            batch = local_batch(data, order, num_examples, step, batch_size)
            if logit_adjustment:
                batch["logit_offset"] = jnp.broadcast_to(offset, (batch_size, num_labels))
            if batch_sharding is not None:
                batch = jax.lax.with_sharding_constraint(batch, batch_sharding)
            grads, loss = jax.grad(objective, has_aux=True)(params, batch)
            if correction is not None:
                grads = jax.tree.map(lambda g, c: g + c, grads, correction)
            updates, opt_state = local_optimizer.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state), loss

        init = (global_params, local_optimizer.init(global_params))
        (params, _), losses = jax.lax.scan(local_step, init, jnp.arange(local_steps))
        delta = jax.tree.map(lambda a, b: a - b, params, global_params)
        if scaffold_lr is None:
            zeros = jax.tree.map(jnp.zeros_like, delta)
            return ClientResult(delta, zeros, zeros, losses.mean())
        scale = 1.0 / (local_steps * scaffold_lr)
        new_control = jax.tree.map(lambda ci, c, d: ci - c - scale * d, client_control, control, delta)
        control_delta = jax.tree.map(lambda n, ci: n - ci, new_control, client_control)
        return ClientResult(delta, control_delta, new_control, losses.mean())

    return client_update
