"""Seed-based zeroth-order prompt tuning: forward passes only, a few bytes on the wire.

* MeZO (Malladi et al. 2023, "Fine-Tuning Language Models with Just Forward Passes"): the
  two-point SPSA estimate along a Gaussian direction ``z ~ N(0, I)``,

      g = (L(x + eps z) - L(x - eps z)) / (2 eps),        x <- x - lr g z,

  on the *same* minibatch for both evaluations. ``E[g z] = grad L(x)`` up to ``O(eps^2)``
  (exactly on a quadratic, where the central difference has no error at all).
* FedKSeed (Qin et al. 2024, "Federated Full-Parameter Tuning of Billion-Sized Language
  Models with Communication Cost under 18 Kilobytes"): directions come from a finite pool of
  ``K`` seeds shared by every party (FedKSeed's default ``K = 4096``, ours too). Direction
  ``i`` is ``N(0, I)`` drawn with the key ``fold_in(key(seed), i)``, so a client sends only
  ``(seed index, g)`` per local step, and anyone holding the same parameters rebuilds the
  client's trajectory exactly with :func:`replay`: the directions never depend on the
  parameters, and the update applied by the client *is* :func:`seed_step`, the function the
  server replays.

What is perturbed: the soft prompt (or prefix) and, by default, the linear head too
(``head="zo"``). ``head="frozen"`` keeps the head the server initialized and perturbs the
prompt only. A head trained by its exact gradient is *not* offered here, because its delta
(``D * C`` floats, ~40 KB for MiniLM and 26 labels) could not travel in the ~1 KB payload.

Payload (``ClientResult.delta``): ``{"indices": int32 [S], "scalars": float32 [S]}`` with
``S = local_steps``. Encoded by :func:`fedprompt.wire.codec.encode` as an update message
(``{"delta": payload}``, a round number < 128 and a 32-character fingerprint) it takes
:func:`payload_bytes` ``(S) = 8 S + 190`` bytes for ``S < 64`` and ``8 S + 192`` for
``64 <= S <= 127`` (msgpack needs one more length byte per array from 256 data bytes on; a
round number from 128 on adds one byte, from 256 on two). ``S = 64`` (the default) is
**704 bytes**; the 1 KB budget allows ``S <= 104``.

Bitwise reproducibility: on one platform, :func:`replay` gives the very bits of the client's
own final parameters (the tests check it with both sides jit-compiled, and through the
simulation's ``vmap``). Under FedAvg the server's move of the global state is a sum of seed
directions as well, which is what lets the server broadcast seeds too
(:mod:`fedprompt.federation.seeds`, the program's :class:`SeedSpace`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from fedprompt.backbones.backbone import Backbone
from fedprompt.client.federated import ClientResult, local_batch, random_order
from fedprompt.client.program import ClientProgram
from fedprompt.client.local import make_loss_fn
from fedprompt.errors import ConfigError
from fedprompt.prompts import PromptConfig
from fedprompt.tasks import Task

Pytree = Any
HeadMode = Literal["zo", "frozen"]
HEAD_MODES = ("zo", "frozen")

DEFAULT_NUM_SEEDS = 4096
"""FedKSeed's pool size ``K``."""


def _base_key(seed: int) -> jax.Array:
    return jax.random.key(seed)


def direction(seed: int, index: jax.Array | int, like: Pytree) -> Pytree:
    """Direction ``index`` of the seed pool ``seed``: ``N(0, I)`` in the shape of ``like``.

    The whole pytree is one flat draw (``jax.flatten_util.ravel_pytree`` order), so the
    direction depends only on ``(seed, index)`` and the shapes, never on the values.
    """
    flat, unravel = ravel_pytree(like)
    key = jax.random.fold_in(_base_key(seed), index)
    return unravel(jax.random.normal(key, flat.shape, flat.dtype))


def seed_step(params: Pytree, index: jax.Array | int, scalar: jax.Array, lr: float, seed: int) -> Pytree:
    """One ZO-SGD step ``x - (lr g) z_index``: the only update rule clients apply and :func:`replay` repeats."""
    # Barriers keep XLA from fusing or reassociating the draw and the step into the update
    # differently in different programs (a client's scan, the server's vmapped replay): the
    # update is always the plain elementwise ``x - step * z`` of materialized operands.
    z = jax.lax.optimization_barrier(direction(seed, index, params))
    step = jax.lax.optimization_barrier(jnp.asarray(lr, jnp.float32) * jnp.asarray(scalar, jnp.float32))
    return jax.tree.map(lambda x, d: x - step * d, params, z)


def replay(params: Pytree, indices: jax.Array, scalars: jax.Array, lr: float, *, seed: int = 0) -> Pytree:
    """Rebuild a client's parameters from its ``(index, scalar)`` pairs, in their order.

    Args:
      params: the parameters the client started from (the perturbed part only).
      indices: int32 ``[S]`` seed indices.
      scalars: float32 ``[S]`` projected-gradient estimates.
      lr: the client's learning rate.
      seed: the seed pool.
    """

    def body(x, pair):
        index, scalar = pair
        return seed_step(x, index, scalar, lr, seed), None

    out, _ = jax.lax.scan(body, params, (jnp.asarray(indices, jnp.int32), jnp.asarray(scalars, jnp.float32)))
    return out


def spsa_estimate(
    loss: Callable[[Pytree], jax.Array], params: Pytree, key: jax.Array, eps: float
) -> tuple[jax.Array, Pytree]:
    """Two-point SPSA estimate of the directional derivative along a random Gaussian direction.

    Returns ``(g, z)`` with ``z ~ N(0, I)`` (shaped like ``params``, drawn from ``key``) and
    ``g = (loss(params + eps z) - loss(params - eps z)) / (2 eps)``; ``g z`` is an unbiased
    estimate of the gradient of a quadratic (and unbiased up to ``O(eps^2)`` otherwise).
    """
    flat, unravel = ravel_pytree(params)
    z = unravel(jax.random.normal(key, flat.shape, flat.dtype))
    plus = jax.tree.map(lambda x, d: x + eps * d, params, z)
    minus = jax.tree.map(lambda x, d: x - eps * d, params, z)
    return (loss(plus) - loss(minus)) / (2 * eps), z


class SeedSpace(NamedTuple):
    """What a seed downlink needs of a ZO program (:mod:`fedprompt.federation.seeds`).

    Attributes:
      replay: ``(params, indices [N], scalars [N]) -> params``, jit-compiled: the global
        params moved by ``-lr * sum_j scalars_j z_{indices_j}`` on the perturbed part
        (:func:`replay`; zero scalars leave a coordinate's value unchanged).
      num_seeds: the pool's size ``K``.
      local_steps: the pairs one client sends per round.
    """

    replay: Callable[[Pytree, jax.Array, jax.Array], Pytree]
    num_seeds: int
    local_steps: int


class ZOResult(NamedTuple):
    """A client's local ZO run: final perturbed parameters, the payload pairs and the losses."""

    params: Pytree
    indices: jax.Array
    scalars: jax.Array
    losses: jax.Array


def zo_local_train(
    loss: Callable[[Pytree, Mapping[str, jax.Array]], jax.Array],
    params: Pytree,
    data: Mapping[str, jax.Array],
    num_examples: jax.Array,
    key: jax.Array,
    *,
    local_steps: int,
    batch_size: int,
    lr: float,
    eps: float,
    num_seeds: int = DEFAULT_NUM_SEEDS,
    seed: int = 0,
) -> ZOResult:
    """``local_steps`` MeZO steps with directions from the seed pool (pure, jit/vmap friendly).

    Each step draws a seed index uniformly from ``[0, num_seeds)``, evaluates ``loss`` at
    ``x + eps z`` and ``x - eps z`` on the same batch (one after the other, so only one
    forward's activations are alive), and applies :func:`seed_step`. The recorded loss is the
    mean of the two evaluations (``L(x) + O(eps^2)``).
    """
    capacity = next(iter(data.values())).shape[0]
    k_order, k_seeds = jax.random.split(key)
    order = random_order(k_order, num_examples, capacity)
    indices = jax.random.randint(k_seeds, (local_steps,), 0, num_seeds, jnp.int32)
    signs = jnp.array([1.0, -1.0], jnp.float32)

    def step(x, inputs):
        s, index = inputs
        batch = local_batch(data, order, num_examples, s, batch_size)
        z = direction(seed, index, x)

        def signed_loss(sign):
            return loss(jax.tree.map(lambda p, d: p + (sign * eps) * d, x, z), batch)

        both = jax.lax.map(signed_loss, signs)
        # One materialized g: the value sent is the value used (XLA would otherwise be free to
        # recompute the division inside two fusions, with different roundings).
        g = jax.lax.optimization_barrier((both[0] - both[1]) / (2 * eps))
        return seed_step(x, index, g, lr, seed), (g, 0.5 * (both[0] + both[1]))

    params, (scalars, losses) = jax.lax.scan(step, params, (jnp.arange(local_steps), indices))
    return ZOResult(params=params, indices=indices, scalars=scalars, losses=losses)


def payload_bytes(local_steps: int, round_index: int = 0, fingerprint: str | None = "0" * 32) -> int:
    """Encoded size of one ZO update message (what the simulation counts as ``bytes_up``)."""
    from fedprompt.wire import codec

    payload = {"indices": np.zeros((local_steps,), np.int32), "scalars": np.zeros((local_steps,), np.float32)}
    return len(codec.encode({"delta": payload}, kind="update", round=round_index, fingerprint=fingerprint))


def make_zo_program(
    backbone: Backbone,
    prompt_config: PromptConfig,
    task: Task,
    *,
    local_steps: int = 64,
    batch_size: int = 16,
    lr: float = 1e-2,
    eps: float = 1e-3,
    num_seeds: int = DEFAULT_NUM_SEEDS,
    head: HeadMode = "zo",
    seed: int = 0,
):
    """Federated seed-based ZO prompt tuning (FedKSeed with MeZO's estimator) as a ClientProgram.

    Global parameters are the usual ``{"prompt", "head"}`` trainable tree. A client runs
    :func:`zo_local_train` on the perturbed part (``{"prompt", "head"}`` with ``head="zo"``,
    ``{"prompt"}`` with ``head="frozen"``) and sends ``{"indices", "scalars"}``; the server's
    ``to_delta`` replays them (:func:`replay`) from the global parameters. Aggregate with
    FedAvg (the example-weighted mean of the replayed deltas).

    Args:
      backbone, prompt_config, task: what is tuned.
      local_steps: ZO steps per client per round ``S`` (also the payload length).
      batch_size: examples per step (both evaluations use the same batch).
      lr: ZO-SGD learning rate.
      eps: perturbation scale of the two-point estimate.
      num_seeds: size ``K`` of the shared seed pool.
      head: ``"zo"`` (perturb the head with the prompt) or ``"frozen"`` (keep the initial head).
      seed: the shared seed pool (every party must use the same).

    Returns:
      a :class:`fedprompt.client.program.ClientProgram`.
    """
    _check_positive(local_steps=local_steps, batch_size=batch_size, num_seeds=num_seeds)
    for name, value in (("lr", lr), ("eps", eps)):
        if not (isinstance(value, (int, float)) and np.isfinite(value) and value > 0):
            raise ConfigError(f"{name} must be a positive number, got {value!r}")
    if head not in HEAD_MODES:
        raise ConfigError(f"head must be one of {HEAD_MODES}, got {head!r}")
    task = task.resolve(backbone)
    loss_fn = make_loss_fn(backbone, prompt_config, task)
    perturbed = ("prompt", "head") if head == "zo" else ("prompt",)

    def split(params):
        return {name: params[name] for name in perturbed}

    def merge(params, part):
        return {**params, **part}

    def update(global_params, weights, data, num_examples, key, control=None, client_control=None):
        def loss(part, batch):
            return loss_fn(merge(global_params, part), weights, batch)[0]

        result = zo_local_train(
            loss, split(global_params), data, num_examples, key, local_steps=local_steps, batch_size=batch_size,
            lr=lr, eps=eps, num_seeds=num_seeds, seed=seed,
        )
        payload = {"indices": result.indices, "scalars": result.scalars}
        return ClientResult(payload, None, None, result.losses.mean())

    def to_delta(global_params, payload):
        start = split(global_params)
        end = replay(start, payload["indices"], payload["scalars"], lr, seed=seed)
        delta = jax.tree.map(jnp.zeros_like, global_params)
        return merge(delta, jax.tree.map(lambda a, b: a - b, end, start))

    @jax.jit
    def replay_merged(global_params, indices, scalars):
        return merge(global_params, replay(split(global_params), indices, scalars, lr, seed=seed))

    return ClientProgram(update=update, to_delta=to_delta,
                         seeds=SeedSpace(replay_merged, num_seeds=num_seeds, local_steps=local_steps))


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"{name} must be a positive integer, got {value!r}")
