"""The server's half of a round, from the clients' encoded updates, written once for every runtime.

The in-process simulation (:class:`~fedprompt.simulation.engine.FederatedSimulation`) and the
Flower ServerApp (:mod:`fedprompt.flower.server_app`) end a round the same way. Every sampled
client holds one *slot*; a slot either brought back the bytes of an encoded update or nothing
(the client dropped out, died, or answered with an error). Then:

1. :func:`receive_updates` treats every message as hostile input: it is decoded with the wire
   codec, its kind, round and backbone fingerprint are checked, and its tree is checked against
   the template (structure, shapes, dtypes, finite values). A bad message is rejected, with its
   reason counted; it and the missing slots keep their place with zeros.
2. :func:`aggregate_round` takes the example-weighted mean of the accepted updates (FedAvg,
   McMahan et al. 2017) with the compiled :class:`~fedprompt.server.aggregators.Aggregation`
   (rejected and missing slots weigh 0, so the remaining weights renormalize and the program
   sees ``clients_per_round`` rows every round and compiles once), SCAFFOLD's uniform mean of
   the control deltas (Karimireddy et al. 2020), and applies the algorithm's server step
   (:meth:`~fedprompt.server.algorithms.Algorithm.apply`).

Example:
  >>> import numpy as np, jax
  >>> from fedprompt.server import algorithms, aggregators
  >>> from fedprompt.wire import codec
  >>> algo = algorithms.fedavg()
  >>> state = algo.init({"w": np.zeros(2, np.float32)})
  >>> template = {"delta": {"w": np.zeros(2, np.float32)}}
  >>> good = codec.encode({"delta": {"w": np.ones(2, np.float32)}}, kind="update", round=0, fingerprint="fp")
  >>> received = receive_updates([good, b"junk", None], round_index=0, fingerprint="fp", template=template)
  >>> received.accepted.tolist(), sum(received.rejections.values())
  ([True, False, False], 1)
  >>> out = aggregate_round(state, received, [3, 3, 3], server_step=jax.jit(algo.apply),
  ...                       aggregate=aggregators.Aggregation(), num_clients=3)
  >>> out.state.params["w"].tolist(), out.num_aggregated
  ([1.0, 1.0], 1)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import numpy as np

from fedprompt.errors import WireError
from fedprompt.server import aggregators
from fedprompt.server.algorithms import ServerState
from fedprompt.wire import codec

Pytree = Any

UPDATE_KIND = "update"
"""The wire ``kind`` of a client's update."""

GLOBAL_KIND = "global"
"""The wire ``kind`` of the global state the server broadcasts."""


class ReceivedUpdates(NamedTuple):
    """What came back in one round, slot by slot.

    Attributes:
      trees: per slot, the validated update (in the template's containers), or zeros shaped like
        the template where nothing valid arrived.
      accepted: ``[K]`` bool, per slot: did a valid update arrive.
      rejections: reason -> count, over the slots whose message was refused.
      bytes_up: the total length of every message that arrived, refused ones included.
    """

    trees: list[Pytree]
    accepted: np.ndarray
    rejections: dict[str, int]
    bytes_up: int


class RoundOutcome(NamedTuple):
    """The server state after a round and the round's numbers (plain Python values).

    Attributes:
      state: the new server state (its ``round`` counts this round, even if nothing arrived).
      train_loss: the example-weighted mean of the accepted clients' losses (NaN without any).
      num_aggregated: how many updates the mean was taken over.
    """

    state: ServerState
    train_loss: float
    num_aggregated: int


def rejection_reason(err: Exception) -> str:
    """A short, countable reason for a refused message (the text before the first colon)."""
    return str(err).split(":")[0][:80] or type(err).__name__


def receive_updates(
    messages: Sequence[bytes | None],
    *,
    round_index: int,
    fingerprint: str | None,
    template: Pytree,
) -> ReceivedUpdates:
    """Decodes and validates one round's client messages.

    Args:
      messages: per slot, the bytes a client sent, or ``None`` when it sent nothing.
      round_index: the round the updates must belong to.
      fingerprint: the backbone fingerprint they must carry.
      template: the tree an update must match: ``{"delta": ...}`` and, for SCAFFOLD,
        ``"control_delta"``; leaves are arrays or anything with ``shape`` and ``dtype``.

    Returns:
      :class:`ReceivedUpdates`; a bad message never raises, it is counted as rejected.
    """
    zeros = jax.tree.map(lambda x: np.zeros(np.shape(x), np.dtype(x.dtype)), template)
    trees: list[Pytree] = [zeros] * len(messages)
    accepted = np.zeros(len(messages), bool)
    rejections: dict[str, int] = {}
    bytes_up = 0
    for slot, message in enumerate(messages):
        if message is None:
            continue
        bytes_up += len(message)
        try:
            received = codec.decode(message)
            if received.kind != UPDATE_KIND:
                raise WireError(f"not an update: kind {received.kind!r}")
            if received.round != round_index or received.fingerprint != fingerprint:
                raise WireError("update is for another round or backbone")
            trees[slot] = codec.check_template(received.tree, template)
        except WireError as err:
            reason = rejection_reason(err)
            rejections[reason] = rejections.get(reason, 0) + 1
            continue
        accepted[slot] = True
    return ReceivedUpdates(trees, accepted, rejections, bytes_up)


def aggregate_round(
    state: ServerState,
    received: ReceivedUpdates,
    weights: Sequence[float] | np.ndarray,
    *,
    server_step: Callable[..., ServerState],
    aggregate: aggregators.Aggregation,
    num_clients: int,
    to_delta: Callable[[Pytree, Pytree], Pytree] | None = None,
    scaffold: bool = False,
    losses: Sequence[float] | np.ndarray | None = None,
) -> RoundOutcome:
    """Aggregates the accepted updates of a round and applies the server step.

    Args:
      state: the server state the round started from.
      received: :func:`receive_updates`' result.
      weights: per slot, the client's weight (its number of examples); slots that were not
        accepted count 0 whatever is given.
      server_step: ``(state, mean_delta, mean_control_delta, participation) -> state``, the
        (usually jitted) :meth:`~fedprompt.server.algorithms.Algorithm.apply`.
      aggregate: the compiled aggregation (:class:`~fedprompt.server.aggregators.Aggregation`),
        or any ``(stacked, weights) -> result with .aggregate``; the updates are stacked into
        ``aggregate.bucket(K)`` rows (:func:`~fedprompt.server.aggregators.bucket_size` when it
        has no ``bucket``).
      num_clients: all clients of the federation (SCAFFOLD's participation ``|S| / N``).
      to_delta: ``(global_params, stacked payloads) -> stacked deltas`` for client programs whose
        payload is not the delta itself; ``None``: the payload is the delta.
      scaffold: also average ``control_delta`` uniformly over the accepted clients.
      losses: per slot, the client's training loss (for ``train_loss``).

    Returns:
      :class:`RoundOutcome`. Without any accepted update the global state stays and only its
      round counter moves.
    """
    accepted = np.asarray(received.accepted, bool)
    weights = np.where(accepted, np.asarray(weights, np.float32), 0).astype(np.float32)
    if not accepted.any():
        return RoundOutcome(state._replace(round=state.round + 1), float("nan"), 0)
    # Stacked straight into the aggregation's bucket of rows (zero payloads of weight 0 pad it).
    size = int(getattr(aggregate, "bucket", aggregators.bucket_size)(len(weights)))
    payloads = aggregators.stack_clients([tree["delta"] for tree in received.trees], size)
    deltas = payloads if to_delta is None else to_delta(state.params, payloads)
    mean_delta = aggregate(deltas, np.pad(weights, (0, size - len(weights)))).aggregate
    mean_control = None
    if scaffold:
        uniform = accepted.astype(np.float32)
        mean_control = aggregate([tree["control_delta"] for tree in received.trees], uniform).aggregate
    count = int(accepted.sum())
    state = server_step(state, mean_delta, mean_control, count / num_clients)
    train_loss = float("nan")
    if losses is not None:
        train_loss = float(np.average(np.asarray(losses)[accepted], weights=weights[accepted]))
    return RoundOutcome(state, train_loss, count)
