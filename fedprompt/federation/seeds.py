"""FedKSeed's seed-only downlink: a zeroth-order federation where both directions carry seeds.

With ``method = "zo"`` a client's update is a list of (seed index, scalar) pairs, and a step
along seed direction ``z_i`` does not depend on where it is taken
(:func:`fedprompt.client.zeroth_order.seed_step`). So under FedAvg's weighted mean the round's
whole move of the global state is a sum of seed directions too:

    x <- x - lr * sum_j a_j z_{i_j},       a_j = eta * sum over (k, s) with i_ks = i_j of w_k f_k g_ks

(``w_k`` the clients' normalized weights, ``f_k`` the update bound's factor of client ``k``,
``eta`` the server learning rate, ``lr`` the clients' ZO-SGD rate). The server merges the
round's pairs by index (:func:`merge_pairs`: at most ``clients x local_steps`` pairs, sorted by
index) and applies them with :func:`~fedprompt.client.zeroth_order.replay`; it keeps every
round's merged pairs in a :class:`SeedLog`, with the number of rounds each client's copy of
the state has seen.

What a sampled client is sent (:meth:`SeedDownlink.messages`), chosen by bytes:

* ``kind = "seeds"``: the merged pairs of every round since the state it holds, with
  ``meta = {"base": rounds it holds, "digest": the state's digest after them}``; the client
  replays them round by round (:meth:`SeedDownlink.catch_up`) -- the same function on the same
  inputs as the server, so the same bits, which the digest checks;
* ``kind = "global"``: the whole state (the usual broadcast), when it is fewer bytes or the
  client holds nothing the server knows of.

A client starts holding the initial state when every party can compute it from the seed (a
random head); with a class-means head the set-up delivers it once (counted with the set-up's
bytes). A client that did not answer a round is assumed to hold nothing (the next message it
gets is the whole state); one whose copy does not match refuses the message (a
``FederationError`` naming both versions), and is sent the whole state next time.

The rule needs the plain weighted mean and FedAvg's server (``algorithm = "fedavg"``,
``aggregator = "mean"``): a robust rule or an adaptive server optimizer does not move the state
along seed directions, and those runs broadcast the state (``zo_downlink = "auto"`` picks).
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fedprompt.errors import FedPromptError, WireError
from fedprompt.server import aggregators
from fedprompt.server.rounds import GLOBAL_KIND
from fedprompt.wire import codec

Pytree = Any

SEEDS_KIND = "seeds"
"""The wire ``kind`` of a seed-only downlink message."""

NOTHING = -1
""":attr:`SeedLog.held` of a client the server knows no copy of."""


class SeedLog(NamedTuple):
    """The server's record of the seed downlink (a pytree of arrays; checkpointed with the state).

    Attributes:
      indices: int32 ``[rounds, pairs]``, each round's merged seed indices (zero-padded).
      scalars: float32 ``[rounds, pairs]``, their scalars (zero-padded).
      counts: int32 ``[rounds]``, how many pairs each round has.
      held: int32 ``[clients]``, the rounds applied to the copy each client holds
        (:data:`NOTHING`: none the server knows of).
    """

    indices: Any
    scalars: Any
    counts: Any
    held: Any


def merge_pairs(indices: np.ndarray, scalars: np.ndarray, coefficients: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The round's merged pairs: ``a_i = sum over (k, s) with indices[k, s] = i of coefficients[k] scalars[k, s]``.

    Args:
      indices, scalars: ``[K, S]`` the clients' pairs.
      coefficients: ``[K]`` each client's factor (normalized weight x bound factor x server lr);
        a client of coefficient 0 adds nothing.

    Returns:
      ``(indices int32 [N], scalars float32 [N])``, sorted by index, without zero scalars
      (summed in float64, then rounded once).
    """
    indices = np.asarray(indices, np.int64)
    scalars = np.asarray(scalars, np.float64)
    coefficients = np.asarray(coefficients, np.float64)
    keep = coefficients != 0
    flat_indices = indices[keep].ravel()
    terms = (coefficients[keep, None] * scalars[keep]).ravel()
    unique, inverse = np.unique(flat_indices, return_inverse=True)
    sums = np.zeros(len(unique), np.float64)
    np.add.at(sums, inverse, terms)
    nonzero = sums != 0
    return unique[nonzero].astype(np.int32), sums[nonzero].astype(np.float32)


def state_digest(params: Pytree) -> str:
    """A short digest of a state's bits (SHA-256 of its leaves' little-endian bytes, in tree order)."""
    digest = hashlib.sha256()
    for leaf in jax.tree.leaves(jax.device_get(params)):
        array = np.ascontiguousarray(np.asarray(leaf))
        digest.update(str(array.dtype).encode() + str(array.shape).encode())
        digest.update(array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes())
    return digest.hexdigest()[:32]


@dataclasses.dataclass(frozen=True)
class SeedDownlink:
    """The seed-only downlink of a ZO federation: the server's rule and the client's catch-up.

    Args:
      apply: ``(params, indices [N], scalars [N]) -> params``: the global state moved by merged
        pairs (the ZO program's replay of the perturbed part at the clients' learning rate).
      num_seeds: the seed pool's size ``K`` (indices must lie in ``[0, K)``).
      pairs_per_round: the most pairs a round can have (clients per round x local steps).
      rounds: the rounds of the run (the log's length).
      num_clients: the federation's clients.
      server_lr: FedAvg's server learning rate ``eta``.
      initial_held: whether every client holds the initial state from the start (it is computed
        from the seed); False when the set-up delivers it (a class-means head).
    """

    apply: Callable[[Pytree, Any, Any], Pytree]
    num_seeds: int
    pairs_per_round: int
    rounds: int
    num_clients: int
    server_lr: float = 1.0
    initial_held: bool = True

    # -- the server ----------------------------------------------------------------------------

    def init(self) -> SeedLog:
        """The log before the first round."""
        held = np.full(self.num_clients, 0 if self.initial_held else NOTHING, np.int32)
        return SeedLog(np.zeros((self.rounds, self.pairs_per_round), np.int32),
                       np.zeros((self.rounds, self.pairs_per_round), np.float32), np.zeros(self.rounds, np.int32), held)

    def step(self, params: Pytree, log: SeedLog, round_index: int, payloads: Pytree,
             coefficients: np.ndarray) -> tuple[Pytree, SeedLog, int]:
        """The server's round: merge the clients' pairs, move ``params`` along them, log them.

        ``payloads``: ``{"indices", "scalars"}`` stacked ``[K, S]``; ``coefficients``: ``[K]``
        (normalized weight x the update bound's factor; 0 for a slot without an update).
        Returns the new params, the new log and the number of merged pairs.
        """
        if not 0 <= round_index < self.rounds:
            raise ValueError(f"round {round_index} is outside the run's {self.rounds} rounds")
        indices, scalars = merge_pairs(np.asarray(payloads["indices"]), np.asarray(payloads["scalars"]),
                                       self.server_lr * np.asarray(coefficients, np.float64))
        params = self.replay(params, indices, scalars)
        log = jax.tree.map(np.array, log)  # a copy: the log is a value
        count = len(indices)
        log.indices[round_index] = 0
        log.scalars[round_index] = 0
        log.indices[round_index, :count] = indices
        log.scalars[round_index, :count] = scalars
        log.counts[round_index] = count
        return params, log, count

    def replay(self, params: Pytree, indices: np.ndarray, scalars: np.ndarray) -> Pytree:
        """``params`` moved by one round's merged pairs, padded (zero scalars) to a power-of-two
        length so every party runs the same compiled program on the same inputs; a round
        without pairs leaves ``params`` as they are (no program runs)."""
        if len(indices) == 0:
            return params
        size = aggregators.bucket_size(len(indices))
        padded_indices = np.zeros(size, np.int32)
        padded_scalars = np.zeros(size, np.float32)
        padded_indices[: len(indices)] = indices
        padded_scalars[: len(scalars)] = scalars
        return self.apply(params, jnp.asarray(padded_indices), jnp.asarray(padded_scalars))

    @staticmethod
    def delivered(log: SeedLog, clients: np.ndarray, ok: np.ndarray, round_index: int) -> SeedLog:
        """The log after a round's messages: clients ``clients[ok]`` now hold the state of the
        round's start (``round_index`` rounds); the others are assumed to hold nothing."""
        held = np.array(log.held)
        clients = np.asarray(clients, np.int64)
        ok = np.asarray(ok, bool)
        held[clients[ok]] = round_index
        held[clients[~ok]] = NOTHING
        return log._replace(held=held)

    @staticmethod
    def installed(log: SeedLog, clients: np.ndarray) -> SeedLog:
        """The log after the set-up delivered the initial state to ``clients``."""
        held = np.array(log.held)
        held[np.asarray(clients, np.int64)] = 0
        return log._replace(held=held)

    def messages(self, log: SeedLog, clients: Sequence[int], round_index: int, params: Pytree, *,
                 fingerprint: str | None, full: bytes | None = None) -> list[bytes]:
        """What each of ``clients`` is sent in round ``round_index``: the rounds it missed as seeds,
        or ``full`` (the encoded global state) when that is fewer bytes or it holds nothing known.
        The state's digest and its full encoding are made once for all of them."""
        if full is None:
            full = codec.encode({"params": jax.device_get(params)}, kind=GLOBAL_KIND, round=round_index,
                                fingerprint=fingerprint)
        held = np.asarray(log.held)
        digest = None
        sent = []
        for client in clients:
            base = int(held[int(client)])
            if base == NOTHING or base > round_index:
                sent.append(full)
                continue
            if digest is None:
                digest = state_digest(params)
            seeds = self._encode_missed(log, base, round_index, digest, fingerprint)
            sent.append(seeds if len(seeds) < len(full) else full)
        return sent

    def _encode_missed(self, log: SeedLog, base: int, round_index: int, digest: str, fingerprint: str | None) -> bytes:
        """The merged pairs of rounds ``base`` to ``round_index - 1``, as one seeds message."""
        counts = np.asarray(log.counts)[base:round_index]
        index_rows = np.asarray(log.indices)[base:round_index]
        scalar_rows = np.asarray(log.scalars)[base:round_index]
        indices = np.concatenate([row[:n] for row, n in zip(index_rows, counts)] or [np.zeros(0, np.int32)])
        scalars = np.concatenate([row[:n] for row, n in zip(scalar_rows, counts)] or [np.zeros(0, np.float32)])
        return codec.encode(
            {"counts": counts.astype(np.int32), "indices": indices.astype(self.index_dtype),
             "scalars": scalars.astype(np.float32)},
            kind=SEEDS_KIND, round=round_index, fingerprint=fingerprint, meta={"base": base, "digest": digest},
        )

    @property
    def index_dtype(self) -> np.dtype:
        """The narrowest unsigned integer type of the seed indices on the wire."""
        return np.dtype(np.uint16) if self.num_seeds <= 1 << 16 else np.dtype(np.int32)

    # -- the client ----------------------------------------------------------------------------

    def catch_up(self, message: codec.Message, held: tuple[int, Pytree] | None, template: Pytree) -> Pytree:
        """A client's copy of the state at the start of ``message.round``, from a downlink message.

        Args:
          message: a decoded ``global`` message (``{"params": ...}``) or ``seeds`` message.
          held: ``(rounds, params)`` of the copy this client holds, or None.
          template: the params' shapes and dtypes (checked on a ``global`` message).

        Raises:
          WireError: a malformed message.
          SeedDownlinkError: a seeds message that does not start from the held copy, or whose
            replay does not end at the server's digest.
        """
        if message.kind == GLOBAL_KIND:
            return codec.check_template(message.tree, {"params": template})["params"]
        if message.kind != SEEDS_KIND:
            raise WireError(f"a downlink message must be {GLOBAL_KIND!r} or {SEEDS_KIND!r}, got {message.kind!r}")
        round_index = message.round
        meta = message.meta or {}
        base, digest = meta.get("base"), meta.get("digest")
        if not isinstance(base, int) or isinstance(base, bool) or not isinstance(digest, str):
            raise WireError("a seeds message needs meta base (int) and digest (str)")
        if round_index is None or not 0 <= base <= round_index:
            raise WireError(f"a seeds message for round {round_index} cannot start from {base} rounds")
        counts, indices, scalars = _seed_arrays(message.tree, round_index - base, self.pairs_per_round,
                                                self.num_seeds)
        if held is None or held[0] != base:
            have = "nothing" if held is None else f"the state after {held[0]} rounds"
            raise SeedDownlinkError(f"the server sent the rounds after {base} but this client holds {have}")
        params = held[1]
        offsets = np.concatenate([[0], np.cumsum(counts)])
        for n, start in zip(counts, offsets[:-1]):
            params = self.replay(params, indices[start : start + n], scalars[start : start + n])
        if state_digest(params) != digest:
            raise SeedDownlinkError(f"replaying rounds {base}..{round_index - 1} did not reach the server's state "
                                    "(different bits: another platform or a damaged copy)")
        return params


class SeedDownlinkError(FedPromptError):
    """A client's copy of the state and a seeds message do not fit together."""


def _seed_arrays(tree: Any, num_rounds: int, pairs_per_round: int, num_seeds: int):
    if not isinstance(tree, dict) or set(tree) != {"counts", "indices", "scalars"}:
        raise WireError("a seeds message's tree must be {counts, indices, scalars}")
    counts, indices, scalars = (np.asarray(tree[name]) for name in ("counts", "indices", "scalars"))
    if counts.shape != (num_rounds,) or counts.dtype != np.int32:
        raise WireError(f"a seeds message must count the pairs of its {num_rounds} rounds (int32)")
    if np.any(counts < 0) or np.any(counts > pairs_per_round):
        raise WireError(f"a round has 0..{pairs_per_round} pairs")
    total = int(counts.sum())
    if indices.shape != (total,) or scalars.shape != (total,) or scalars.dtype != np.float32:
        raise WireError(f"a seeds message must hold {total} indices and float32 scalars")
    if indices.dtype.kind not in "iu" or (total and (indices.min() < 0 or indices.max() >= num_seeds)):
        raise WireError(f"seed indices must lie in [0, {num_seeds})")
    if not np.all(np.isfinite(scalars)):
        raise WireError("a seeds message's scalars must be finite")
    return counts, indices.astype(np.int32), scalars
