"""The server's half of a round, from the clients' encoded updates, written once for every runtime.

The in-process simulation (:class:`~fedprompt.simulation.engine.FederatedSimulation`) and the
Flower ServerApp (:mod:`fedprompt.flower.server_app`) end a round with the same two calls.
Every sampled client holds one *slot*; a slot either brought back the bytes of an encoded
update or nothing (the client dropped out, died, or answered with an error). Then:

1. :func:`receive_updates` treats every message as hostile input: it is decoded with the wire
   codec, its kind, round and backbone fingerprint are checked, and its tree is checked against
   the template (structure, shapes, dtypes, finite values). A bad message is rejected, with its
   reason counted; it and the missing slots keep their place with zeros.
2. :meth:`ServerRound.apply` turns payloads into deltas, bounds each delta's L2 norm
   (:func:`update_clip_stage`, the server's one clip of what clients send, when an
   ``update_clip`` is set), aggregates them with an
   :class:`AggregateStage` (the example-weighted mean of FedAvg, McMahan et al. 2017, a robust
   rule, or central DP-FedAvg; rejected and missing slots weigh 0, so the remaining weights
   renormalize and the compiled program sees the same bucket of rows every round), takes
   SCAFFOLD's uniform mean of the control deltas (Karimireddy et al. 2020), applies the
   algorithm's optax server step and records the privacy spent. Its state is a
   :class:`RoundState`: the algorithm's state and every protection's.

The update bound (Sun, Kairouz, Suresh & McMahan 2019, "Can You Really Backdoor Federated
Learning?") scales a delta of norm ``n > B`` by ``B / n``; with the weighted mean, one client of
weight share ``s`` then moves the mean delta by at most ``s * B``, whatever it sends. It acts on
the delta in the global parameters' space, after ``to_delta`` (a compressed update dequantized,
a zeroth-order client's seeds and scalars replayed, a BBT client's ``z``, ``sigma`` and head
change), never on the payload's own encoding. Secure aggregation's server sees only the sum:
:meth:`ServerRound.apply_mean` bounds the released mean instead (the whole round's move).

Example:
  >>> import numpy as np
  >>> from fedprompt.server import algorithms
  >>> from fedprompt.wire import codec
  >>> server = ServerRound(algorithms.fedavg(), num_clients=3)
  >>> state = server.init({"w": np.zeros(2, np.float32)})
  >>> template = {"delta": {"w": np.zeros(2, np.float32)}}
  >>> good = codec.encode({"delta": {"w": np.ones(2, np.float32)}}, kind="update", round=0, fingerprint="fp")
  >>> received = receive_updates([good, b"junk", None], round_index=0, fingerprint="fp", template=template)
  >>> received.accepted.tolist(), sum(received.rejections.values())
  ([True, False, False], 1)
  >>> state, outcome = server.apply(state, received, [3, 3, 3])
  >>> state.server.params["w"].tolist(), outcome.num_aggregated
  ([1.0, 1.0], 1)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fedprompt.config import check_number
from fedprompt.errors import InputError, WireError
from fedprompt.kernels.aggregate import clipped_mean_of_finite, clipped_mean_of_finite_host, copy_row
from fedprompt.server import aggregators
from fedprompt.server.algorithms import ServerState
from fedprompt.server.robust import clip_clients
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
      stacked: when received into row buffers (``buffers=``), the deltas stacked ``[rows, ...]``
        (zeros in every slot without a valid update and in the padding rows); each accepted
        slot's ``trees[slot]["delta"]`` is a view of its row. None otherwise.
      sq_norms: with ``stacked`` of float32 deltas, ``[rows]`` float64: each row's sum of
        squares over the whole delta, taken by the server while it wrote the row
        (:func:`fedprompt.kernels.copy_row`; ``inf`` or ``nan`` where that is not finite, 0 for
        zero rows), so the mean need not read the rows twice. None otherwise.
    """

    trees: list[Pytree]
    accepted: np.ndarray
    rejections: dict[str, int]
    bytes_up: int
    stacked: Pytree | None = None
    sq_norms: np.ndarray | None = None


def rejection_reason(err: Exception) -> str:
    """A short, countable reason for a refused message (the text before the first colon)."""
    return str(err).split(":")[0][:80] or type(err).__name__


def receive_updates(
    messages: Sequence[bytes | None],
    *,
    round_index: int,
    fingerprint: str | None,
    template: Pytree,
    max_bytes: int = codec.DEFAULT_MAX_BYTES,
    max_objects: int | None = None,
    buffers: aggregators.RowBuffers | None = None,
    rows: int | None = None,
) -> ReceivedUpdates:
    """Decodes and validates one round's client messages.

    Args:
      messages: per slot, the bytes a client sent, or ``None`` when it sent nothing.
      round_index: the round the updates must belong to.
      fingerprint: the backbone fingerprint they must carry.
      template: the tree an update must match: ``{"delta": ...}`` and, for SCAFFOLD,
        ``"control_delta"``; leaves are arrays or anything with ``shape`` and ``dtype``.
      max_bytes, max_objects: the decoder's limits (:func:`fedprompt.wire.codec.decode`); a
        deployment derives them from the template (``fedprompt.flower.common.message_limit``
        and ``object_limit``).
      buffers: decode every valid delta straight into these reused row buffers
        (:class:`~fedprompt.server.aggregators.RowBuffers`), ``rows`` rows in all (at least
        one per message): the result's ``stacked`` is then what the aggregation reads, with no
        copy of its own, and a decoded message's bytes are freed as soon as its row is written.
        Float32 deltas are squared as they are written (:func:`fedprompt.kernels.copy_row`):
        the result's ``sq_norms``, which also stand in for the decoder's check that every value
        is finite (the values are examined one by one only where a sum is not finite).
        :meth:`ServerRound.receive` passes its own.
      rows: the stack's rows (the aggregation stage's bucket); default one per message.

    Returns:
      :class:`ReceivedUpdates`; a bad message never raises, it is counted as rejected.
    """
    zeros = jax.tree.map(lambda x: np.zeros(np.shape(x), np.dtype(x.dtype)), template)
    trees: list[Pytree] = [zeros] * len(messages)
    accepted = np.zeros(len(messages), bool)
    rejections: dict[str, int] = {}
    bytes_up = 0
    stacked = sq_norms = None
    if buffers is not None:
        rows = len(messages) if rows is None else int(rows)
        if rows < len(messages):
            raise InputError(f"{len(messages)} messages do not fit in {rows} rows")
        leaves, treedef = jax.tree.flatten(template["delta"])
        stacked = jax.tree.unflatten(treedef, [
            buffers.take((rows, *np.shape(x)), np.dtype(x.dtype), slot) for slot, x in enumerate(leaves)])
        if all(np.dtype(x.dtype) == np.float32 for x in leaves):
            sq_norms = np.zeros(rows)
            row_leaves = jax.tree.leaves(stacked)
            # what is not squared (SCAFFOLD's control delta) gets the decoder's own checks
            rest = {name: part for name, part in template.items() if name != "delta"}
    for slot, message in enumerate(messages):
        if message is None:
            continue
        bytes_up += len(message)
        try:
            # read-only views over the decoded bytes: copied once, into a row of the stack
            received = codec.decode(message, max_bytes=max_bytes, max_objects=max_objects, writable=False)
            if received.kind != UPDATE_KIND:
                raise WireError(f"not an update: kind {received.kind!r}")
            if received.round != round_index or received.fingerprint != fingerprint:
                raise WireError("update is for another round or backbone")
            # Into float32 rows, the delta is squared as it is written, and its sum of squares is
            # finite only if every value is: the values are checked one by one only when it is not.
            tree = codec.check_template(received.tree, template, finite=sq_norms is None)
            if sq_norms is not None:
                sq = sum(copy_row(out[slot : slot + 1], x) for out, x in zip(row_leaves, jax.tree.leaves(tree["delta"])))
                if math.isfinite(sq):
                    codec.check_template({name: tree[name] for name in rest}, rest)
                else:  # refuses a value that is not finite; else the squares only overflowed
                    codec.check_template(tree, template)
                sq_norms[slot] = sq
        except WireError as err:
            reason = rejection_reason(err)
            rejections[reason] = rejections.get(reason, 0) + 1
            continue  # a row already written is zeroed below, with every slot not accepted
        if stacked is not None:
            if sq_norms is None:  # not float32: copied as it is
                jax.tree.map(lambda out, x, s=slot: out.__setitem__(s, x), stacked, tree["delta"])
            tree = {**tree, "delta": jax.tree.map(lambda out, s=slot: out[s], stacked)}
        trees[slot] = tree
        accepted[slot] = True
    if stacked is not None:
        absent = np.flatnonzero(~np.pad(accepted, (0, rows - len(messages))))
        jax.tree.map(lambda out: out.__setitem__(absent, 0), stacked)
    return ReceivedUpdates(trees, accepted, rejections, bytes_up, stacked, sq_norms)


def refuse(received: ReceivedUpdates, refused: Mapping[int, str]) -> ReceivedUpdates:
    """``received`` with the accepted slots of ``refused`` (slot -> reason) rejected: zeroed,
    not accepted and counted under their reason (a check of what came with a message, such as
    the deployment's replay binding, after its content passed :func:`receive_updates`)."""
    slots = [slot for slot in refused if received.accepted[slot]]
    if not slots:
        return received
    trees, accepted, rejections = list(received.trees), received.accepted.copy(), dict(received.rejections)
    zeros = jax.tree.map(lambda x: np.zeros(np.shape(x), np.asarray(x).dtype), trees[slots[0]])
    for slot in slots:
        trees[slot], accepted[slot] = zeros, False
        rejections[refused[slot]] = rejections.get(refused[slot], 0) + 1
    sq_norms = received.sq_norms
    if received.stacked is not None:
        jax.tree.map(lambda out: out.__setitem__(np.array(slots), 0), received.stacked)
        if sq_norms is not None:
            sq_norms = sq_norms.copy()
            sq_norms[slots] = 0.0
    return ReceivedUpdates(trees, accepted, rejections, received.bytes_up, received.stacked, sq_norms)


# ----------------------------------------------------------------------------- aggregation stages


class AggregateStage(NamedTuple):
    """How a round's stacked client deltas become one mean delta: an ``(init, apply)`` pair.

    Attributes:
      init: ``() -> state`` of the first round (kept in :attr:`RoundState.aggregate`).
      apply: ``(state, stacked, weights, key) -> (mean, new_state, metrics)``: ``stacked`` has a
        leading client axis of ``bucket(K)`` rows, ``weights`` is ``[bucket(K)]`` (0 for
        rejected, missing and padding rows), ``key`` is the round's noise key (None when the
        stage draws no noise), ``metrics`` is a dict of plain numbers for the round record.
      bucket: the padded number of rows for ``K`` slots (one compiled program per bucket).
      noisy: whether ``apply`` needs a key.
      clipped: ``bound -> apply`` of this stage after every update is clipped to ``bound``,
        in one program (the plain mean's fused pass); None: :func:`update_clip_stage` clips
        first, then calls ``apply``.
      row_norms: ``apply`` also takes ``sq_norms=``, each row's sum of squares when the server
        took it while receiving (:attr:`ReceivedUpdates.sq_norms`), else None.
    """

    init: Callable[[], Any]
    apply: Callable[[Any, Pytree, np.ndarray, Any], tuple[Pytree, Any, dict[str, Any]]]
    bucket: Callable[[int], int] = aggregators.bucket_size
    noisy: bool = False
    clipped: Callable[[float], Callable] | None = None
    row_norms: bool = False


HOST_PASS_MIN_FLOATS = 65_536
"""Updates of at least this many floats a client take the server's mean on the host when they
are in host memory (:func:`_clipped_mean`); smaller ones take the compiled pass, as they did
before the host pass existed, so the runs of a default soft prompt (7,680 floats) keep their
numbers to the last bit (the host pass sums in another order). Without the rows' sums of
squares the host pass squares each row in a Python loop, which at 7,680 floats a client cost
more than it saved."""


def _clipped_mean(bound: float | None):
    """The weighted mean of the finite rows, each clipped to ``bound`` (None: not clipped): on
    the host when the stacked updates are host float32 arrays of at least
    :data:`HOST_PASS_MIN_FLOATS` floats a client
    (:func:`fedprompt.kernels.clipped_mean_of_finite_host`: with ``sq_norms``, the rows' sums of
    squares :func:`receive_updates` took, one matrix-vector product per leaf; without, the rows
    are squared first), else compiled, in one read (:func:`fedprompt.kernels.clipped_mean_of_finite`)."""

    @jax.jit
    def compiled(stacked, weights):
        leaves, treedef = jax.tree.flatten(stacked)
        means, _, clipped = clipped_mean_of_finite(leaves, weights, bound)
        return jax.tree.unflatten(treedef, means), clipped

    def run(stacked, weights, sq_norms=None):
        leaves, treedef = jax.tree.flatten(stacked)
        large = isinstance(weights, np.ndarray) and sum(np.size(x) for x in leaves) >= HOST_PASS_MIN_FLOATS * weights.size
        host = clipped_mean_of_finite_host(leaves, weights, bound, sq_norms) if large else None
        if host is None:
            return compiled(stacked, weights)
        means, _, clipped = host
        return jax.tree.unflatten(treedef, means), clipped

    return run


def mean_stage(aggregator: aggregators.Aggregator = aggregators.weighted_mean) -> AggregateStage:
    """The plain (robust) rule: ``aggregator(stacked, weights)`` compiled once per bucket, with
    non-finite rows dropped (:class:`~fedprompt.server.aggregators.Aggregation`). Stateless.

    The default weighted mean runs as one pass over the updates that also drops the
    non-finite rows and, under :func:`update_clip_stage`, clips every row
    (:func:`fedprompt.kernels.clipped_mean_of_finite`)."""
    if aggregator is aggregators.weighted_mean:
        plain = _clipped_mean(None)

        def apply(state, stacked, weights, key, sq_norms=None):
            del key
            return plain(stacked, weights, sq_norms)[0], state, {}

        def clipped(bound):
            run = _clipped_mean(bound)

            def apply_clipped(state, stacked, weights, key, sq_norms=None):
                del key
                mean, count = run(stacked, weights, sq_norms)
                return mean, state, {"update_clip": bound, "clipped": int(count)}

            return apply_clipped

        return AggregateStage(init=lambda: (), apply=apply, clipped=clipped, row_norms=True)
    aggregation = aggregators.Aggregation(aggregator)

    def apply(state, stacked, weights, key):
        del key
        return aggregation(stacked, weights, stacked=True).aggregate, state, {}

    return AggregateStage(init=lambda: (), apply=apply, bucket=aggregation.bucket)


def update_clip_stage(stage: AggregateStage, bound: float) -> AggregateStage:
    """``stage`` after every update is clipped to L2 norm ``bound`` (the whole delta pytree).

    A present row of norm ``n > bound`` is scaled by ``bound / n``
    (:func:`~fedprompt.server.robust.clip_clients`); rows within the bound, padding and
    rejected rows (zeros of weight 0) pass unchanged; a non-finite row stays non-finite and
    ``stage`` drops it. The state is ``stage``'s; the metrics add ``update_clip`` (the bound)
    and ``clipped`` (how many present updates were scaled down).

    Raises:
      ConfigError: ``bound`` not a finite number > 0.
    """
    check_number("update_clip", bound, lower=0.0, strict=True)
    bound = float(bound)
    if stage.clipped is not None:
        return stage._replace(apply=stage.clipped(bound), clipped=None)

    @jax.jit
    def clip(stacked, weights):
        clipped, norms = clip_clients(stacked, bound)
        scaled = (weights > 0) & jnp.isfinite(norms) & (norms > bound)
        return clipped, jnp.sum(scaled, dtype=jnp.int32)

    def apply(state, stacked, weights, key):
        clipped, count = clip(stacked, weights)
        mean, state, metrics = stage.apply(state, clipped, weights, key)
        return mean, state, {**metrics, "update_clip": bound, "clipped": int(count)}

    return stage._replace(apply=apply, row_norms=False)


# ----------------------------------------------------------------------------- the server round


class RoundState(NamedTuple):
    """The whole server-side state of a federation between rounds (what a checkpoint holds).

    Attributes:
      server: the algorithm's :class:`~fedprompt.server.algorithms.ServerState`.
      aggregate: the aggregation stage's state (central DP's adaptive clipping norm), ``()``
        for a stateless stage.
      privacy: the privacy accountant's spent budget
        (:class:`~fedprompt.privacy.accounting.PrivacySpent`), ``()`` without DP.
      downlink: the seed downlink's :class:`~fedprompt.federation.seeds.SeedLog` (every
        round's merged seed pairs, what each client holds), ``()`` without one.
    """

    server: ServerState
    aggregate: Any = ()
    privacy: Any = ()
    downlink: Any = ()

    @property
    def params(self) -> Pytree:
        """The global parameters (``server.params``)."""
        return self.server.params

    @property
    def control(self) -> Pytree:
        """SCAFFOLD's server control variate (``server.control``)."""
        return self.server.control


class RoundOutcome(NamedTuple):
    """A round's numbers (plain Python values).

    Attributes:
      train_loss: the example-weighted mean of the aggregated clients' losses (NaN without any).
      num_aggregated: how many updates the mean was taken over.
      metrics: what the protections report (``dp_clip``, ``epsilon`` ...), for the round record.
    """

    train_loss: float
    num_aggregated: int
    metrics: dict[str, Any]


class ServerRound:
    """The server's half of a round, the same calls in every runtime: an ``(init, apply)`` pair.

    ``apply`` takes what :func:`receive_updates` validated, maps payloads to deltas
    (``to_delta``), stacks them into the aggregation stage's bucket, clips each to
    ``update_clip`` (:func:`update_clip_stage`), aggregates (the robust rule or central DP),
    averages SCAFFOLD's control deltas uniformly, applies the algorithm's optax server step and
    records the privacy spent.

    Args:
      algorithm: the federated algorithm (its ``init`` and ``apply``).
      num_clients: all clients of the federation (SCAFFOLD's participation ``|S| / N``).
      aggregate: the aggregation stage; default :func:`mean_stage` (the weighted mean).
      to_delta: ``(global_params, payload) -> delta`` of the client program (one client's);
        None: the payload is the delta.
      ledger: a :class:`~fedprompt.privacy.accounting.PrivacyLedger` when DP is on.
      update_clip: the L2 bound of every client's delta (and of secure aggregation's released
        mean); None: unbounded. SCAFFOLD's control deltas are not clipped: they steer the
        clients' corrections, and whatever the corrections, the deltas that move the global
        state are bounded.
      seeds: a zeroth-order federation's seed downlink
        (:class:`~fedprompt.federation.seeds.SeedDownlink`): the round's clients' pairs are
        merged, each client weighted by its normalized weight times its update bound's factor,
        and the state moves along them (FedAvg's weighted mean, with the server's learning
        rate, as pairs every client can replay); the aggregation stage and the optax step are
        not used.
    """

    def __init__(
        self,
        algorithm: Any,
        *,
        num_clients: int,
        aggregate: AggregateStage | None = None,
        to_delta: Callable[[Pytree, Pytree], Pytree] | None = None,
        ledger: Any = None,
        update_clip: float | None = None,
        seeds: Any = None,
    ):
        self.algorithm = algorithm
        self.seeds = seeds
        self.num_clients = int(num_clients)
        self.update_clip = None if update_clip is None else float(update_clip)
        self.stage = aggregate or mean_stage()
        if self.update_clip is not None:
            self.stage = update_clip_stage(self.stage, self.update_clip)
        self.ledger = ledger
        self._to_delta = None if to_delta is None else jax.jit(jax.vmap(to_delta, in_axes=(None, 0)))
        self._to_delta_one = None if to_delta is None else jax.jit(to_delta)
        self._server_step = jax.jit(algorithm.apply)
        self._controls = aggregators.Aggregation()
        self._rows = aggregators.RowBuffers()

    def receive(self, messages: Sequence[bytes | None], **options: Any) -> ReceivedUpdates:
        """:func:`receive_updates` into this server's reused row buffers, stacked in the
        aggregation stage's bucket of rows (what :meth:`apply` reads without another copy).
        The stack is valid until the next :meth:`receive`."""
        return receive_updates(messages, buffers=self._rows, rows=int(self.stage.bucket(len(messages))), **options)

    def init(self, params: Pytree) -> RoundState:
        """The state before the first round, for initial global ``params``."""
        privacy = self.ledger.init_spent() if self.ledger is not None else ()
        downlink = self.seeds.init() if self.seeds is not None else ()
        return RoundState(self.algorithm.init(params), self.stage.init(), privacy, downlink)

    def apply(
        self,
        state: RoundState,
        received: ReceivedUpdates,
        weights: Sequence[float] | np.ndarray,
        *,
        key: Any = None,
        losses: Sequence[float] | np.ndarray | None = None,
        participants: Sequence[int] | np.ndarray | None = None,
    ) -> tuple[RoundState, RoundOutcome]:
        """One round from the validated updates.

        Args:
          state: the state the round started from.
          received: :func:`receive_updates`' result (slot by slot).
          weights: per slot, the client's weight (its number of examples); slots that were not
            accepted count 0 whatever is given.
          key: the round's noise key (needed when the stage is noisy).
          losses: per slot, the client's training loss (for ``train_loss``).
          participants: per slot, the client id (local DP accounting counts participations).

        Returns:
          ``(new_state, outcome)``. Without any accepted update the global state stays and only
          its round counter moves (the privacy ledger still records the round).
        """
        accepted = np.asarray(received.accepted, bool)
        weights = np.where(accepted, np.asarray(weights, np.float32), 0).astype(np.float32)
        if not accepted.any():
            server = state.server._replace(round=state.server.round + 1)
            return self._account(state._replace(server=server), participants, accepted, float("nan"), 0, {})
        if self.stage.noisy and key is None:
            raise ValueError("this aggregation stage adds noise: pass the round's key")
        # Stacked straight into the stage's bucket of rows (zero payloads of weight 0 pad it).
        size = int(self.stage.bucket(len(weights)))
        payloads = received.stacked
        if payloads is None or jax.tree.leaves(payloads)[0].shape[0] != size:
            payloads = self._rows.stack([tree["delta"] for tree in received.trees], size)
        params = state.server.params
        train_loss = float("nan")
        if losses is not None:
            train_loss = float(np.average(np.asarray(losses)[accepted], weights=weights[accepted]))
        if self.seeds is not None:
            return self._seed_round(state, payloads, weights, train_loss, participants, accepted)
        deltas = payloads if self._to_delta is None else self._to_delta(params, payloads)
        norms = {}
        if self.stage.row_norms and deltas is received.stacked and received.sq_norms is not None:
            norms["sq_norms"] = received.sq_norms  # the rows' sums of squares, taken while receiving
        mean_delta, stage_state, metrics = self.stage.apply(
            state.aggregate, deltas, np.pad(weights, (0, size - len(weights))), key, **norms)
        jax.block_until_ready(mean_delta)  # done with the row buffers before the next round fills them
        mean_control = None
        if self.algorithm.scaffold:
            uniform = accepted.astype(np.float32)
            mean_control = self._controls([tree["control_delta"] for tree in received.trees], uniform).aggregate
        count = int(accepted.sum())
        server = self._server_step(state.server, mean_delta, mean_control, count / self.num_clients)
        return self._account(state._replace(server=server, aggregate=stage_state), participants, accepted,
                             train_loss, count, metrics)

    def _seed_round(self, state, payloads, weights, train_loss, participants, accepted):
        """The seed downlink's round: merged pairs of weight x bound factor (see ``seeds``)."""
        rows = len(weights)
        factors = np.ones(rows)
        metrics: dict[str, Any] = {}
        if self.update_clip is not None:
            deltas = self._to_delta(state.server.params, payloads)
            norms = np.asarray(clip_clients(deltas, self.update_clip)[1], np.float64)[:rows]
            over = np.isfinite(norms) & (norms > self.update_clip)
            factors = np.where(over, self.update_clip / np.where(over, norms, 1.0), 1.0)
            factors = np.where(np.isfinite(norms), factors, 0.0)
            metrics.update(update_clip=self.update_clip, clipped=int(np.sum(over & accepted)))
        shares = weights / weights.sum()
        present = jax.tree.map(lambda x: np.array(x[:rows]), payloads)  # a copy: the row buffers are reused
        params, log, count = self.seeds.step(state.server.params, state.downlink, int(state.server.round), present,
                                             shares * factors)
        server = state.server._replace(params=params, round=state.server.round + 1)
        metrics["seed_pairs"] = count
        return self._account(state._replace(server=server, downlink=log), participants, accepted, train_loss,
                             int(accepted.sum()), metrics)

    def apply_mean(
        self,
        state: RoundState,
        mean_payload: Pytree,
        *,
        count: int,
        train_loss: float,
        participants: Sequence[int] | np.ndarray | None = None,
        metrics: dict[str, Any] | None = None,
    ) -> tuple[RoundState, RoundOutcome]:
        """A round whose mean payload was computed elsewhere (secure aggregation's unmasked sum).

        With ``update_clip`` the mean delta is clipped to it (the server cannot clip updates it
        never sees: the round's whole move is bounded instead; metrics ``update_clip`` and
        ``clipped``, 1 when the mean was scaled down)."""
        mean = mean_payload if self._to_delta_one is None else self._to_delta_one(state.server.params, mean_payload)
        metrics = dict(metrics or {})
        if self.update_clip is not None:
            one = jax.tree.map(lambda x: jnp.asarray(x)[None], mean)
            clipped, norms = clip_clients(one, self.update_clip)
            mean = jax.tree.map(lambda x: x[0], clipped)
            metrics.update(update_clip=self.update_clip, clipped=int(bool(norms[0] > self.update_clip)))
        server = self._server_step(state.server, mean, None, count / self.num_clients)
        accepted = np.ones(len(participants), bool) if participants is not None else np.zeros(0, bool)
        return self._account(state._replace(server=server), participants, accepted, train_loss, count, metrics)

    def skip(self, state: RoundState, metrics: dict[str, Any] | None = None) -> tuple[RoundState, RoundOutcome]:
        """A round that published nothing (secure aggregation below its threshold)."""
        server = state.server._replace(round=state.server.round + 1)
        return state._replace(server=server), RoundOutcome(float("nan"), 0, dict(metrics or {}))

    def _account(self, state, participants, accepted, train_loss, count, metrics):
        if self.ledger is not None:
            released = None if participants is None else np.asarray(participants)[accepted]
            spent, epsilon = self.ledger.spend(state.privacy, released)
            state = state._replace(privacy=spent)
            metrics = {**metrics, "epsilon": epsilon if np.isfinite(epsilon) else None, "delta": self.ledger.delta}
        return state, RoundOutcome(train_loss, count, metrics)
