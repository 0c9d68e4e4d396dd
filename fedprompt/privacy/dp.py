"""Differentially private aggregation of client updates: clipping, Gaussian noise, adaptive clipping.

DP-FedAvg (McMahan, Ramage, Talwar & Zhang 2018, "Learning Differentially Private Recurrent
Language Models", ICLR) makes Federated Averaging differentially private at the level of a
*client* (all of one client's data at once):

1. every client update ``Delta_k`` (a pytree) is clipped to L2 norm at most ``C``, the norm
   taken over the whole pytree: ``Delta_k * min(1, C / ||Delta_k||)``;
2. the clipped updates are *summed* and Gaussian noise ``N(0, (z C)^2 I)`` is added to the sum,
   ``z`` being the *noise multiplier*;
3. the noisy sum is divided by a *fixed* denominator, the expected number of clients per round
   (``clients_per_round``), not by the number that actually reported and not by example
   counts. Every client counts the same: a weight that depends on the client's data would
   change the sensitivity. (The paper's "fixed denominator" estimator; dropouts only shrink the
   sum.)

The sum of clipped updates changes by at most ``C`` when one client is added or removed, so
step 2 is the Gaussian mechanism with noise multiplier ``z``; sampling the clients of a round at
random amplifies it, and :mod:`fedprompt.privacy.accounting` composes it over rounds.

*Central* DP (this module's :func:`dp_aggregate`, :class:`CentralDP`) trusts the server with the
raw updates and adds the noise once, to the sum. *Local* DP (:func:`local_privatize`) has every
client clip its own update and add ``N(0, (z C)^2 I)`` before it leaves the device; the server
then averages noisy updates (much more noise in total: ``sqrt(K)`` times the central noise in
the sum of ``K`` clients).

Adaptive clipping (Andrew, Thakkar, McMahan & Ramaswamy 2021, "Differentially Private Learning
with Adaptive Clipping", NeurIPS) replaces the fixed ``C`` by a private estimate of the
``gamma``-quantile of the update norms (:func:`adaptive_clip_update`).

Example:
  >>> import jax, jax.numpy as jnp
  >>> clipped, norm = clip_update({"w": jnp.array([3.0, 4.0])}, 1.0)
  >>> clipped["w"].tolist(), float(norm)
  ([0.6000000238418579, 0.800000011920929], 5.0)
  >>> stacked = {"w": jnp.array([[3.0, 4.0], [0.3, 0.4]])}
  >>> mean = dp_aggregate(stacked, jnp.array([True, True]), clip=1.0, noise_multiplier=0.0,
  ...                     denominator=2.0, key=jax.random.key(0))
  >>> [round(v, 4) for v in mean["w"].tolist()]
  [0.45, 0.6]
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fedprompt.config import check_number
from fedprompt.errors import ConfigError, InputError
from fedprompt.server.aggregators import bucket_size, finite_clients, pad_clients, stack_clients
from fedprompt.server.rounds import AggregateStage

PyTree = Any


__all__ = [
    "AdaptiveClipState",
    "CentralDP",
    "CentralDPResult",
    "adaptive_clip_update",
    "add_gaussian_noise",
    "clip_and_sum",
    "clip_update",
    "default_count_stddev",
    "dp_aggregate",
    "gaussian_noise_like",
    "global_norm",
    "init_adaptive_clip",
    "local_privatize",
    "privatize_sum",
    "update_noise_multiplier",
]


# ----------------------------------------------------------------------------- clipping


def global_norm(tree: PyTree) -> jax.Array:
    """The L2 norm of a whole pytree (all leaves as one vector), float32, overflow-safe.

    Computed as ``m * sqrt(sum((x / m)^2))`` with ``m`` the largest absolute value, so updates
    with values near the float32 range (1e20 and up, whose squares overflow) still get a
    finite norm. An empty pytree or all zeros has norm 0; a non-finite value gives a
    non-finite norm.
    """
    leaves = [jnp.asarray(x).astype(jnp.float32) for x in jax.tree.leaves(tree)]
    if not leaves:
        return jnp.zeros((), jnp.float32)
    peak = jnp.max(jnp.stack([jnp.max(jnp.abs(x), initial=0.0) for x in leaves]))
    safe = jnp.where(peak > 0, peak, 1.0)
    total = sum(jnp.sum(jnp.square(x / safe)) for x in leaves)
    return peak * jnp.sqrt(total)


def clip_update(tree: PyTree, bound: float | jax.Array) -> tuple[PyTree, jax.Array]:
    """Scales a pytree to L2 norm at most ``bound``: ``tree * min(1, bound / ||tree||)``.

    The norm is the global one (every leaf together, :func:`global_norm`). A tree already
    within the bound is returned unchanged (as float32); a zero tree stays zero; otherwise the
    result has norm ``bound`` up to float32 rounding (relative error below 1e-6). Jittable and
    ``vmap``-able; ``bound`` may be a traced scalar.

    Args:
      tree: a pytree of float arrays (one client's update).
      bound: the clipping norm ``C > 0``.

    Returns:
      ``(clipped, norm)``: the clipped pytree (float32 leaves) and the norm *before* clipping.
    """
    norm = global_norm(tree)
    bound = jnp.asarray(bound, jnp.float32)
    scale = jnp.where(norm > bound, bound / jnp.where(norm > 0, norm, 1.0), 1.0)
    return jax.tree.map(lambda x: jnp.asarray(x).astype(jnp.float32) * scale, tree), norm


# ----------------------------------------------------------------------------- noise


def gaussian_noise_like(key: jax.Array, tree: PyTree, std: float | jax.Array) -> PyTree:
    """Independent ``N(0, std^2)`` float32 noise with the structure and shapes of ``tree``.

    Every leaf gets its own key (``jax.random.split(key, num_leaves)``), so the noise is
    independent across leaves and coordinates.
    """
    leaves, treedef = jax.tree.flatten(tree)
    if not leaves:
        return tree
    keys = jax.random.split(key, len(leaves))
    std = jnp.asarray(std, jnp.float32)
    noise = [std * jax.random.normal(k, jnp.shape(x), jnp.float32) for k, x in zip(keys, leaves)]
    return jax.tree.unflatten(treedef, noise)


def add_gaussian_noise(key: jax.Array, tree: PyTree, std: float | jax.Array) -> PyTree:
    """``tree + N(0, std^2 I)``, leaves in float32 (see :func:`gaussian_noise_like`)."""
    noise = gaussian_noise_like(key, tree, std)
    return jax.tree.map(lambda x, n: jnp.asarray(x).astype(jnp.float32) + n, tree, noise)


# ----------------------------------------------------------------------------- central DP


def _client_axis(v: jax.Array, x: jax.Array) -> jax.Array:
    return v.reshape(v.shape + (1,) * (x.ndim - 1))


def clip_and_sum(stacked: PyTree, present: jax.Array, clip: float | jax.Array) -> tuple[PyTree, jax.Array]:
    """Clips every client's update to norm ``clip`` and sums the present ones.

    Args:
      stacked: pytree with leading client axis ``[K, ...]``.
      present: ``[K]`` bool; absent clients (padding, dropped, rejected) add nothing, whatever
        their values (NaN included).
      clip: the L2 bound ``C``.

    Returns:
      ``(sum, norms)``: the float32 sum of the clipped present updates (one client's shapes)
      and the ``[K]`` norms before clipping.
    """
    present = jnp.asarray(present, bool)
    clipped, norms = jax.vmap(clip_update, in_axes=(0, None))(stacked, clip)
    summed = jax.tree.map(lambda x: jnp.sum(jnp.where(_client_axis(present, x), x, 0.0), axis=0), clipped)
    return summed, norms


def privatize_sum(
    key: jax.Array,
    summed: PyTree,
    *,
    clip: float | jax.Array,
    noise_multiplier: float | jax.Array,
    denominator: float | jax.Array,
) -> PyTree:
    """The DP-FedAvg server step on a sum of clipped updates: ``(sum + N(0, (z C)^2 I)) / denominator``.

    This is the part of :func:`dp_aggregate` after the sum, on its own so that a sum computed
    elsewhere (by secure aggregation of client-clipped updates,
    :func:`fedprompt.privacy.secagg.secure_sum`) is privatized the same way.
    """
    noisy = add_gaussian_noise(key, summed, jnp.asarray(noise_multiplier, jnp.float32) * jnp.asarray(clip, jnp.float32))
    denominator = jnp.asarray(denominator, jnp.float32)
    return jax.tree.map(lambda x: x / denominator, noisy)


def dp_aggregate(
    stacked: PyTree,
    participating_mask: jax.Array,
    *,
    clip: float | jax.Array,
    noise_multiplier: float | jax.Array,
    denominator: float | jax.Array,
    key: jax.Array,
) -> PyTree:
    """Central DP-FedAvg aggregation: clip each update, sum, add Gaussian noise, divide.

    ``mean = (sum_{k present} clip(Delta_k, C) + N(0, (z C)^2 I)) / denominator``.

    The clients count *uniformly* (example counts are not used: they would make the
    sensitivity data-dependent), and ``denominator`` is fixed in advance: ``clients_per_round``
    (fixed-size sampling) or ``sample_rate * num_clients`` (Poisson sampling), as in McMahan et
    al. 2018. Jittable; every scalar argument may be traced.

    Args:
      stacked: client updates with a leading client axis ``[K, ...]`` (padded rows allowed).
      participating_mask: ``[K]`` bool, the clients whose update counts.
      clip: the L2 clipping norm ``C``.
      noise_multiplier: ``z``; the noise on the sum has standard deviation ``z * C``.
      denominator: the fixed number the noisy sum is divided by.
      key: PRNG key of the noise.

    Returns:
      The privatized mean update, float32 leaves with one client's shapes.
    """
    summed, _ = clip_and_sum(stacked, participating_mask, clip)
    return privatize_sum(key, summed, clip=clip, noise_multiplier=noise_multiplier, denominator=denominator)


# ----------------------------------------------------------------------------- local DP


def local_privatize(
    key: jax.Array, update: PyTree, clip: float | jax.Array, noise_multiplier: float | jax.Array
) -> PyTree:
    """Client-side (local) DP: ``clip(update, C) + N(0, (z C)^2 I)``, before the update is sent.

    Jittable and ``vmap``-able over clients (``in_axes=(0, 0, None, None)``). The noise is per
    client, so the server may average the noisy updates any way it likes (post-processing).
    See :func:`fedprompt.privacy.accounting.local_epsilon` for what it guarantees.
    """
    clipped, _ = clip_update(update, clip)
    return add_gaussian_noise(key, clipped, jnp.asarray(noise_multiplier, jnp.float32) * jnp.asarray(clip, jnp.float32))


# ----------------------------------------------------------------------------- adaptive clipping


class AdaptiveClipState(NamedTuple):
    """The state of adaptive clipping: the clipping norm of the next round (float32 scalar)."""

    clip: jax.Array


def init_adaptive_clip(initial_clip: float) -> AdaptiveClipState:
    """The state before the first round, clipping at ``initial_clip``."""
    if not initial_clip > 0:
        raise ConfigError(f"the initial clipping norm must be > 0, got {initial_clip}")
    return AdaptiveClipState(clip=jnp.asarray(initial_clip, jnp.float32))


def adaptive_clip_update(
    state: AdaptiveClipState,
    norms: jax.Array,
    present: jax.Array,
    *,
    target_quantile: float | jax.Array,
    learning_rate: float | jax.Array,
    count_stddev: float | jax.Array,
    denominator: float | jax.Array,
    key: jax.Array,
) -> tuple[AdaptiveClipState, jax.Array]:
    """One step of adaptive clipping (Andrew et al. 2021, geometric update).

    With ``C`` the clipping norm of this round (``state.clip``), ``m`` the fixed denominator
    (expected clients per round), ``gamma`` the target quantile and ``eta`` the learning rate:

    * every present client reports ``b_k = 1[||Delta_k|| <= C]``, shifted to ``b_k - 1/2`` so
      that one client changes the sum by at most 1/2;
    * the server computes the noised fraction of unclipped clients
      ``b_bar = clamp((sum_k (b_k - 1/2) + N(0, sigma_b^2)) / m + 1/2, 0, 1)``;
    * and moves the clipping norm geometrically toward the ``gamma``-quantile of the norms:
      ``C <- C * exp(-eta * (b_bar - gamma))``: if more than a ``gamma`` fraction of the clients
      were unclipped, ``C`` shrinks, otherwise it grows.

    ``b_bar`` is an unbiased estimate of the unclipped fraction when all ``m`` expected clients
    report. Releasing it is a Gaussian mechanism of sensitivity 1/2 and noise ``sigma_b``; the
    paper's Theorem 1 (see :func:`update_noise_multiplier`) folds it and the update's noise into
    one noise multiplier for the accountant. Jittable.

    Args:
      state: the current clipping norm.
      norms: ``[K]`` L2 norms of the client updates *before* clipping.
      present: ``[K]`` bool, the clients that count.
      target_quantile: ``gamma`` in (0, 1) (the paper's default: 0.5, the median).
      learning_rate: ``eta`` > 0 (the paper's default: 0.2).
      count_stddev: ``sigma_b``, the noise on the count (0: not private).
      denominator: ``m``.
      key: PRNG key of the count noise.

    Returns:
      ``(new_state, b_bar)``.
    """
    present = jnp.asarray(present, bool)
    below = jnp.where(present, (norms <= state.clip).astype(jnp.float32) - 0.5, 0.0)
    noise = jnp.asarray(count_stddev, jnp.float32) * jax.random.normal(key, (), jnp.float32)
    b_bar = jnp.clip((jnp.sum(below) + noise) / jnp.asarray(denominator, jnp.float32) + 0.5, 0.0, 1.0)
    new_clip = state.clip * jnp.exp(-jnp.asarray(learning_rate, jnp.float32) * (b_bar - jnp.asarray(target_quantile, jnp.float32)))
    return AdaptiveClipState(clip=new_clip), b_bar


def update_noise_multiplier(noise_multiplier: float, count_stddev: float) -> float:
    """The noise multiplier left for the update when adaptive clipping also releases a count.

    Andrew et al. 2021, Theorem 1: releasing the noised sum of clipped updates (noise
    multiplier ``z_Delta``) together with the noised count of unclipped clients (sensitivity
    1/2, noise ``sigma_b``) is exactly as private as one Gaussian mechanism with noise
    multiplier ``z = (z_Delta^-2 + (2 sigma_b)^-2)^(-1/2)``. So to spend the budget of ``z`` the
    update gets ``z_Delta = (z^-2 - (2 sigma_b)^-2)^(-1/2)``, which needs ``2 sigma_b > z``.

    Args:
      noise_multiplier: the total ``z`` the accountant is told about.
      count_stddev: ``sigma_b``.

    Returns:
      ``z_Delta >= z``; 0 when ``z`` is 0 (no privacy asked for).

    Raises:
      ConfigError: ``2 * sigma_b <= z`` (the count would use up the whole budget).
    """
    z, sigma_b = float(noise_multiplier), float(count_stddev)
    if z == 0:
        return 0.0
    if not 2 * sigma_b > z:
        raise ConfigError(
            f"adaptive clipping needs a count noise 2 * count_stddev > noise_multiplier, got count_stddev "
            f"{sigma_b} and noise_multiplier {z}"
        )
    return (z**-2 - (2 * sigma_b) ** -2) ** -0.5


def default_count_stddev(clients_per_round: float, noise_multiplier: float) -> float:
    """The count noise ``sigma_b`` used when none is configured: ``max(m / 20, z)``.

    ``m / 20`` is the paper's choice (Andrew et al. 2021, section 4); with few clients per round
    it can leave no budget for the update (``2 sigma_b <= z``), so it is raised to ``z``, which
    costs the update at most ``1 / sqrt(3/4) - 1 = 15.5%`` more noise
    (:func:`update_noise_multiplier`).
    """
    return max(float(clients_per_round) / 20.0, float(noise_multiplier))


# ----------------------------------------------------------------------------- configuration


# ----------------------------------------------------------------------------- server driver


class CentralDPResult(NamedTuple):
    """What one :class:`CentralDP` round returns (arrays on device).

    Attributes:
      aggregate: the privatized mean update (float32, one client's shapes).
      num_aggregated: int32, the clients that counted (finite update, weight > 0).
      accepted: ``[K]`` bool per real client (padding removed).
      clip: the clipping norm ``C`` used this round.
      noise_std: the standard deviation of the noise added to the *sum* (``z_Delta * C``).
      unclipped_fraction: the noised fraction ``b_bar`` of unclipped clients (adaptive
        clipping); NaN without adaptive clipping (the exact fraction is not private).
    """

    aggregate: PyTree
    num_aggregated: jax.Array
    accepted: jax.Array
    clip: jax.Array
    noise_std: jax.Array
    unclipped_fraction: jax.Array


class CentralDP:
    """Central DP-FedAvg aggregation, compiled once per client bucket, optionally adaptive.

    It plays the part of :class:`~fedprompt.server.aggregators.Aggregation` when central DP is
    on: pads the client axis to a bucket, drops non-finite updates (weight 0, values zeroed
    before use), clips every update to the current ``C``, sums, adds ``N(0, (z_Delta C)^2 I)``
    and divides by the fixed ``denominator``. The weights only say who counts (``> 0``); they
    do not weight the mean (module docstring). The adaptive clipping norm is explicit state:
    keep it with the server state (and in checkpoints).

    Args:
      clip: the clipping norm (the initial one when ``adaptive``).
      noise_multiplier: the *total* ``z`` of the accountant. With adaptive clipping the update
        gets ``z_Delta = update_noise_multiplier(z, count_stddev)``, the rest pays for the count.
      denominator: the fixed denominator (expected clients per round).
      adaptive: adapt ``C`` (Andrew et al. 2021).
      target_quantile, clip_lr: ``gamma`` and ``eta`` of :func:`adaptive_clip_update`.
      count_stddev: ``sigma_b``; None: :func:`default_count_stddev` (adaptive only).
      bucket: padded client count for ``K`` clients.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> dp = CentralDP(clip=1.0, noise_multiplier=0.0, denominator=2)
      >>> state = dp.init()
      >>> result, state = dp(state, [{"w": jnp.array([3.0, 4.0])}, {"w": jnp.zeros(2)}], None, jax.random.key(0))
      >>> [round(v, 4) for v in result.aggregate["w"].tolist()]
      [0.3, 0.4]
    """

    def __init__(
        self,
        *,
        clip: float,
        noise_multiplier: float,
        denominator: float,
        adaptive: bool = False,
        target_quantile: float = 0.5,
        clip_lr: float = 0.2,
        count_stddev: float | None = None,
        bucket: Callable[[int], int] = bucket_size,
    ):
        check_number("clip", clip, lower=0.0, strict=True)
        check_number("noise_multiplier", noise_multiplier, lower=0.0)
        check_number("denominator", denominator, lower=0.0, strict=True)
        self.initial_clip = float(clip)
        self.noise_multiplier = float(noise_multiplier)
        self.denominator = float(denominator)
        self.adaptive = bool(adaptive)
        self.target_quantile = float(target_quantile)
        self.clip_lr = float(clip_lr)
        if self.adaptive:
            self.count_stddev = (default_count_stddev(denominator, noise_multiplier) if count_stddev is None
                                 else float(count_stddev))
            self.update_noise_multiplier = update_noise_multiplier(self.noise_multiplier, self.count_stddev)
        else:
            self.count_stddev = 0.0
            self.update_noise_multiplier = self.noise_multiplier
        self.bucket = bucket
        adaptive_flag = self.adaptive

        def run(clip_state, stacked, weights, key, z_update, denominator, gamma, eta, sigma_b):
            finite = finite_clients(stacked)
            present = finite & jnp.isfinite(weights) & (weights > 0)
            clean = jax.tree.map(lambda x: jnp.where(_client_axis(finite, x), x, jnp.zeros((), x.dtype)), stacked)
            noise_key, count_key = jax.random.split(key)
            summed, norms = clip_and_sum(clean, present, clip_state.clip)
            mean = privatize_sum(noise_key, summed, clip=clip_state.clip, noise_multiplier=z_update, denominator=denominator)
            noise_std = z_update * clip_state.clip
            if adaptive_flag:
                new_state, b_bar = adaptive_clip_update(
                    clip_state, norms, present, target_quantile=gamma, learning_rate=eta, count_stddev=sigma_b,
                    denominator=denominator, key=count_key,
                )
            else:
                new_state, b_bar = clip_state, jnp.full((), jnp.nan, jnp.float32)
            num = jnp.sum(present, dtype=jnp.int32)
            return mean, num, present, clip_state.clip, noise_std, b_bar, new_state

        self._run = jax.jit(run)

    def init(self) -> AdaptiveClipState:
        """The clipping state of the first round."""
        return init_adaptive_clip(self.initial_clip)

    def __call__(
        self,
        state: AdaptiveClipState,
        updates: PyTree | Sequence[PyTree],
        weights: Any,
        key: jax.Array,
        *,
        stacked: bool | None = None,
    ) -> tuple[CentralDPResult, AdaptiveClipState]:
        """Aggregates one round privately.

        Args:
          state: the clipping state (:meth:`init`, then what the previous call returned).
          updates: a list of per-client pytrees, or one stacked pytree ``[K, ...]``.
          weights: ``[K]``, a client counts where its weight is > 0; None: all count.
          key: the round's PRNG key for the noise (a fresh one every round).
          stacked: as in :class:`~fedprompt.server.aggregators.Aggregation`.

        Returns:
          ``(result, new_state)``.
        """
        if stacked is None:
            stacked = not isinstance(updates, (list, tuple))
        tree = updates if stacked else stack_clients(updates)
        leaves = jax.tree.leaves(tree)
        if not leaves:
            raise InputError("the update pytree has no leaves")
        k = int(np.shape(leaves[0])[0])
        w = np.ones((k,), np.float32) if weights is None else np.asarray(weights, np.float32)
        if w.shape != (k,):
            raise InputError(f"weights must have shape ({k},), one per client, got {w.shape}")
        tree, w = pad_clients(tree, jnp.asarray(w), int(self.bucket(k)))
        mean, num, present, clip, noise_std, b_bar, new_state = self._run(
            state, tree, w, key, jnp.float32(self.update_noise_multiplier), jnp.float32(self.denominator),
            jnp.float32(self.target_quantile), jnp.float32(self.clip_lr), jnp.float32(self.count_stddev),
        )
        return CentralDPResult(mean, num, present[:k], clip, noise_std, b_bar), new_state


# ----------------------------------------------------------------------------- stages


def central_dp_stage(central: CentralDP) -> AggregateStage:
    """Central DP-FedAvg as the server round's aggregation stage
    (:class:`~fedprompt.server.rounds.AggregateStage`): its state is the adaptive clipping
    norm, its metrics the round's clip and noise."""
    def apply(state, stacked, weights, key):
        result, state = central(state, stacked, weights, key, stacked=True)
        metrics = {"dp_clip": float(result.clip), "dp_noise_std": float(result.noise_std)}
        if central.adaptive:
            metrics["dp_unclipped_fraction"] = float(result.unclipped_fraction)
        return result.aggregate, state, metrics

    return AggregateStage(init=central.init, apply=apply, bucket=central.bucket, noisy=True)


def local_dp_stage(clip: float, noise_multiplier: float) -> Callable[[PyTree, jax.Array], PyTree]:
    """Local DP as a client's encode stage: ``(payload, key) -> clip(payload) + noise``
    (:func:`local_privatize`), jitted; the simulation ``vmap``s the same function over clients."""

    def encode(payload: PyTree, key: jax.Array) -> PyTree:
        return local_privatize(key, payload, clip, noise_multiplier)

    return encode
