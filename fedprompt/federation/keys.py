"""The one key schedule of a run: every seeded random choice, named, derived from ``seed``.

Both runtimes draw from this schedule, so a deployment and the in-process simulation with the
same seed sample the same clients, give each client the same PRNG key in a round, and start
from the same global state. Each stream has a name and exactly one derivation:

=====================  ============================================  ==============================
stream                 derivation                                    used for
=====================  ============================================  ==============================
``init``               ``fold_in(key(seed), 0)``                     the initial global prompt/head
``client_keys(r)``     ``split(fold_in(key(seed), r + 1), C)``       client ``i``'s key in round r
``sampling(r)``        ``default_rng([seed, r])``                    which clients a round samples
``round_noise(r)``     ``fold_in(key(seed), 2_000_000 + r)``         simulated DP noise of round r
``attack(r)``          ``fold_in(round_noise(r), 1)``                simulated attacks of round r
``secagg_session(r)``  ``seed * 100_003 + r``                        simulated secure-aggregation
``train_subset``       ``seed``                                      the ``train_examples`` subset
``test_subset``        ``seed + 1``                                  the ``eval_examples`` subset
``baseline_local(i)``  ``fold_in(key(seed), 10_000 + i)``            local-only baseline client i
``baseline_central``   ``default_rng([seed, 7])``                    centralized baseline batches
``head_statistics(i)`` ``fold_in(key(seed), 3_000_000 + i)``         client i's class-means rows
``tpt_split``          ``seed + 2``                                  TPT's label-shifted test split
``tpt_adapt``          ``key(seed + 3)``                             TPT's augmented views
=====================  ============================================  ==============================

The key streams are distinct while a run has fewer than 10,000 rounds (the baseline keys start
at ``fold_in(., 10_000)``, client keys at ``fold_in(., 1)``, the initial state is ``fold_in(., 0)``).

Secrets are not part of the schedule. Anything that must stay unknown to the other parties,
the DP noise of a deployed client or server and the secure-aggregation key material of a
deployed client, comes from the operating system's entropy (:func:`fresh_key`); only the
simulation draws them from ``round_noise`` and ``secagg_session``, so that a simulated run is
reproducible.

Example:
  >>> keys = KeySchedule(seed=3)
  >>> keys.sampling(0).integers(100) == KeySchedule(seed=3).sampling(0).integers(100)
  True
"""

from __future__ import annotations

import dataclasses
import secrets

import jax
import numpy as np

_ROUND_NOISE = 2_000_000
_BASELINE_LOCAL = 10_000
_SECAGG_STRIDE = 100_003
_HEAD_STATISTICS = 3_000_000


@dataclasses.dataclass(frozen=True)
class KeySchedule:
    """Every seeded stream of a run (module docstring)."""

    seed: int

    @property
    def _root(self) -> jax.Array:
        return jax.random.key(self.seed)

    def init(self) -> jax.Array:
        """The key of the initial global state."""
        return jax.random.fold_in(self._root, 0)

    def client_keys(self, round_index: int, num_clients: int) -> jax.Array:
        """``[num_clients]`` keys of a round, one per client id (independent of who is sampled)."""
        return jax.random.split(jax.random.fold_in(self._root, round_index + 1), num_clients)

    def sampling(self, round_index: int) -> np.random.Generator:
        """The generator that samples a round's clients (and simulated dropouts)."""
        return np.random.default_rng([self.seed, round_index])

    def round_noise(self, round_index: int) -> jax.Array:
        """The simulation's DP noise key of a round (a deployment uses :func:`fresh_key`)."""
        return jax.random.fold_in(self._root, _ROUND_NOISE + round_index)

    def attack(self, round_index: int) -> jax.Array:
        """The key of a simulated attack in a round."""
        return jax.random.fold_in(self.round_noise(round_index), 1)

    def secagg_session(self, round_index: int) -> int:
        """The seed of a simulated secure-aggregation session (a deployment uses OS entropy)."""
        return self.seed * _SECAGG_STRIDE + round_index

    @property
    def train_subset(self) -> int:
        return self.seed

    @property
    def test_subset(self) -> int:
        return self.seed + 1

    def baseline_local(self, client: int) -> jax.Array:
        """The key of client ``client``'s local-only baseline."""
        return jax.random.fold_in(self._root, _BASELINE_LOCAL + client)

    def baseline_central(self) -> np.random.Generator:
        """The generator of the centralized baseline's batches."""
        return np.random.default_rng([self.seed, 7])

    def head_statistics(self, client: int) -> jax.Array:
        """The key with which client ``client`` draws the rows of its class statistics
        (:mod:`fedprompt.client.class_means`)."""
        return jax.random.fold_in(self._root, _HEAD_STATISTICS + client)

    @property
    def tpt_split(self) -> int:
        return self.seed + 2

    def tpt_adapt(self) -> jax.Array:
        return jax.random.key(self.seed + 3)


def fresh_key() -> jax.Array:
    """A PRNG key from the operating system's entropy, for secrets no other party may know."""
    return jax.random.key(secrets.randbits(63))
