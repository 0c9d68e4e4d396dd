"""Simulated Byzantine clients: model-poisoning and data-poisoning attacks.

A fixed fraction of the clients (:func:`malicious_clients`, drawn once per run) is malicious.
Whenever a malicious client is sampled, its update is replaced before it is sent
(:func:`attack_updates`), or, for label flipping, it trains honestly on poisoned labels
(:func:`flip_labels`, :func:`poison_client_labels`):

* ``"sign_flip"``: sends ``-scale * delta`` (``scale = 1``: the plain sign flip; a larger
  ``scale`` also amplifies it, e.g. ``-10 delta``);
* ``"scaling"``: sends ``scale * delta`` (model replacement by boosting, Bagdasaryan et al. 2020,
  "How To Backdoor Federated Learning");
* ``"gaussian"``: sends pure noise ``N(0, noise_std^2 I)`` in place of the update (the Gaussian
  Byzantine attack of Blanchard et al. 2017);
* ``"label_flip"``: trains on labels ``y -> num_labels - 1 - y`` (Tolpegin, Truex, Gursoy & Liu
  2020, "Data Poisoning Attacks Against Federated Learning Systems"); its update is otherwise
  untouched.

Attacks act on what the client *sends*: apply them after the client update and after any local
privatization (a malicious client does not have to clip or add noise), before the wire encode.

Example:
  >>> import jax, jax.numpy as jnp
  >>> out = attack_updates("sign_flip", {"w": jnp.ones((2, 3))}, jnp.array([True, False]), jax.random.key(0), scale=10.0)
  >>> out["w"][:, 0].tolist()
  [-10.0, 1.0]
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fedprompt import config
from fedprompt.errors import ConfigError, InputError

PyTree = Any

ATTACKS = config.ATTACKS
"""The attack kinds."""

__all__ = ["ATTACKS", "AttackConfig", "attack_updates", "flip_labels", "malicious_clients", "poison_client_labels"]


@dataclasses.dataclass(frozen=True)
class AttackConfig:
    """Which attack, and how many clients mount it. Validated on construction.

    Attributes:
      kind: one of :data:`ATTACKS`.
      fraction: the fraction of all clients that are malicious, in ``[0, 1)``.
      scale: the factor of ``sign_flip`` (``-scale``) and ``scaling`` (``+scale``), > 0.
      noise_std: the standard deviation of the ``gaussian`` attack's updates, > 0.
    """

    kind: str
    fraction: float
    scale: float = 10.0
    noise_std: float = 1.0

    def __post_init__(self) -> None:
        config.check_attack(self.kind, self.fraction, self.scale, self.noise_std)


def malicious_clients(num_clients: int, fraction: float, seed: int) -> np.ndarray:
    """``[num_clients]`` bool: exactly ``round(fraction * num_clients)`` malicious clients, chosen
    uniformly at random (seeded), fixed for the whole run."""
    if isinstance(num_clients, bool) or not isinstance(num_clients, (int, np.integer)) or num_clients < 1:
        raise ConfigError(f"num_clients must be an integer >= 1, got {num_clients!r}")
    if not (isinstance(fraction, (int, float)) and 0 <= fraction < 1):
        raise ConfigError(f"fraction must be in [0, 1), got {fraction!r}")
    count = int(round(fraction * num_clients))
    chosen = np.random.default_rng([int(seed), 0xA77AC4]).choice(num_clients, count, replace=False)
    mask = np.zeros(num_clients, bool)
    mask[chosen] = True
    return mask


def attack_updates(
    kind: str,
    stacked_deltas: PyTree,
    is_malicious: jax.Array,
    key: jax.Array,
    scale: float = 10.0,
    noise_std: float = 1.0,
) -> PyTree:
    """Replaces the malicious clients' updates (rows of ``[K, ...]`` leaves) as ``kind`` says.

    Honest rows are returned unchanged (values and dtype). ``label_flip`` changes no update
    (its poison is in the data). Jittable with ``kind`` static.

    Args:
      kind: one of :data:`ATTACKS`.
      stacked_deltas: pytree with leading client axis ``[K, ...]``.
      is_malicious: ``[K]`` bool.
      key: PRNG key (``gaussian`` only).
      scale: ``sign_flip`` sends ``-scale * delta``, ``scaling`` sends ``scale * delta``.
      noise_std: ``gaussian`` sends ``N(0, noise_std^2 I)``.

    Raises:
      ConfigError: unknown ``kind``.
    """
    if kind not in ATTACKS:
        raise ConfigError(f"attack must be one of {', '.join(ATTACKS)}; got {kind!r}")
    if kind == "label_flip":
        return stacked_deltas
    bad = jnp.asarray(is_malicious, bool)
    leaves, treedef = jax.tree.flatten(stacked_deltas)
    keys = jax.random.split(key, max(len(leaves), 1))
    out = []
    for leaf_key, x in zip(keys, leaves):
        x = jnp.asarray(x)
        if kind == "sign_flip":
            attacked = -scale * x
        elif kind == "scaling":
            attacked = scale * x
        else:
            attacked = noise_std * jax.random.normal(leaf_key, x.shape, jnp.float32)
        mask = bad.reshape(bad.shape + (1,) * (x.ndim - 1))
        out.append(jnp.where(mask, attacked.astype(x.dtype), x))
    return jax.tree.unflatten(treedef, out)


def flip_labels(labels: Any, num_labels: int) -> Any:
    """Label flipping: ``y -> num_labels - 1 - y`` (an involution on ``0 .. num_labels - 1``).

    Works on NumPy and JAX integer arrays alike and keeps the dtype.

    Raises:
      ConfigError: ``num_labels < 2``.
    """
    if isinstance(num_labels, bool) or not isinstance(num_labels, (int, np.integer)) or num_labels < 2:
        raise ConfigError(f"label flipping needs num_labels >= 2, got {num_labels!r}")
    return (num_labels - 1 - labels).astype(labels.dtype)


def poison_client_labels(labels: Any, is_malicious: Any, num_labels: int) -> Any:
    """Flips the labels of the malicious clients in a ``[C, N_max]`` label array.

    Padding rows flip too; that is harmless, they are masked by the client sizes.

    Raises:
      InputError: ``is_malicious`` is not ``[C]``.
    """
    is_malicious = np.asarray(is_malicious, bool)
    if is_malicious.shape != (np.shape(labels)[0],):
        raise InputError(f"is_malicious must have shape ({np.shape(labels)[0]},), got {is_malicious.shape}")
    mask = is_malicious.reshape(is_malicious.shape + (1,) * (np.ndim(labels) - 1))
    if isinstance(labels, np.ndarray):
        return np.where(mask, flip_labels(labels, num_labels), labels)
    return jnp.where(jnp.asarray(mask), flip_labels(labels, num_labels), labels)
