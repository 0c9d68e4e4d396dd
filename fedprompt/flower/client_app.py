"""The Flower ClientApp: one client of a federated prompt-tuning run, on its own SuperNode.

On a ``train`` message the client

1. reads which client it is from its node config (``partition-id``) and builds the run's
   :class:`~fedprompt.flower.common.Federation` from the run config, as the simulation does:
   the frozen backbone (loaded here, never sent), and its rows: those of its own ``data-path``
   file (``node-data = true``), or its rows of the partitioned demo set, padded as in the
   simulation;
2. decodes the server's message with the wire codec, as hostile input, and checks its kind,
   round, backbone fingerprint and tree (shapes, dtypes, finite values);
3. runs the plan's client program (``FederationPlan.program.update``: the gradient client,
   compressed or not, or the gradient-free BBT / ZO clients) with the key the simulation gives
   this client in this round (``FederationPlan.client_keys``), then its encode stage
   (``FederationPlan.encode``: local DP clips and noises the payload, with noise drawn from
   this machine's entropy, never from the run's seed);
4. replies with its payload encoded by the wire codec, bound to the round, its client id and
   the round's nonce of the server's message (echoed beside it,
   :func:`~fedprompt.flower.common.update_binding`), and its loss and number of examples.

On an ``evaluate`` message (``federated-eval = true``) it checks the global state the same way
and replies with its loss and accuracy on its own held-out rows (its ``test-path`` file, else
its training rows) and their number.

With ``head-init = "class_means"``, once before the first round, a ``query.class_statistics``
message carries the initial global params; the node replies with the class statistics of up to
``head-init-examples`` of its rows seen through that prompt
(:meth:`~fedprompt.federation.plan.FederationPlan.class_statistics`, drawn with the key the
simulation gives this client, ``KeySchedule.head_statistics``), encoded by the wire codec.

A program's client state (SCAFFOLD's control variate, compression's error-feedback residual)
stays on the node, in the run's ``context.state`` (itself codec bytes), and is replaced when
the client replies (the simulation replaces it when the server accepts the update: the two
differ only for an update that is lost or refused).

Flower's deployment starts a fresh ClientApp process for every message; within a process the
built federation, the compiled update and the client's rows are cached (Flower's simulation
runtime reuses processes). Set ``JAX_COMPILATION_CACHE_DIR`` on the SuperNodes so that a new
process finds the update already compiled.

Under Flower's simulation runtime (Ray backend) this same ClientApp serves virtual SuperNodes:
the runtime gives each one the node config ``partition-id`` and ``num-partitions`` (its number
of virtual SuperNodes), read exactly as a real node's. Each Ray actor is one long-lived process
that runs the ClientApp for whichever virtual node has a message, so it builds the federation and
compiles the update once and keeps the rows of the nodes it served (up to 64). A node's own
state (``context.state``: client state, secure-aggregation secrets) travels with the node's
``Context``, which the runtime keeps between messages, never with an actor.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import numpy as np
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedprompt.client import class_means
from fedprompt.errors import WireError
from fedprompt.federation.keys import fresh_key
from fedprompt.federation.records import client_message
from fedprompt.flower import common, secure
from fedprompt.privacy import secagg
from fedprompt.privacy.secure_round import BITS, SecureRound
from fedprompt.server.rounds import GLOBAL_KIND, UPDATE_KIND
from fedprompt.wire import codec

CLIENT_STATE_KIND = "client-state"
"""The wire ``kind`` of a program's client state kept in the node's context."""

HELD_STATE_KIND = "held-state"
"""The wire ``kind`` of the copy of the global state a seed downlink's node keeps in its context."""

app = ClientApp()


class _Client(NamedTuple):
    federation: common.Federation
    update: Callable[..., Any]
    rows: dict[str, np.ndarray]
    size: int
    evaluation: dict[str, np.ndarray]


@functools.lru_cache(maxsize=2)
def _federation(settings: common.FlowerSettings, backbone: str | None) -> tuple[common.Federation, Callable[..., Any]]:
    fed = common.build_federation(settings, common.load_run_backbone(settings, common.NodeSettings(0, None, backbone)),
                                  client=True)
    return fed, jax.jit(fed.plan.program.update)


@functools.lru_cache(maxsize=2)
def _statistics(settings: common.FlowerSettings, backbone: str | None) -> Callable[..., Any]:
    """The plan's class statistics, compiled once per process (the weights are an argument)."""
    fed, _ = _federation(settings, backbone)
    return jax.jit(fed.plan.head_statistics)


@functools.lru_cache(maxsize=64)
def _client(settings: common.FlowerSettings, node: common.NodeSettings) -> _Client:
    """This node's federation, compiled update and rows, kept while the process lives (Flower's
    deployment starts a process per message; its simulation runtime reuses processes)."""
    common.check_node(settings, node)
    fed, update = _federation(settings, node.backbone)
    rows = fed.node_rows(node)
    return _Client(fed, update, rows.train, rows.size, rows.evaluation)


def _this_client(context: Context) -> tuple[_Client, int]:
    node = common.node_settings(context.node_config)
    return _client(common.settings_from_run_config(context.run_config), node), node.partition_id


@app.query()
def hello(message: Message, context: Context) -> Message:
    """Tells the server which client this node is and which backbone it holds.

    It builds the node's federation, so a bad run config, a missing backbone or data file, a
    label outside the run's classes, or a node that does not fit the run fails here, before the
    first round.
    """
    client, client_id = _this_client(context)
    record = ConfigRecord({
        "partition-id": client_id,
        "num-partitions": client.federation.settings.run.clients,
        "fingerprint": client.federation.backbone.fingerprint,
        "num-examples": client.size,
    })
    return Message(RecordDict({common.RECORD: record}), reply_to=message)


@app.query(common.CLASS_STATISTICS)
def class_statistics(message: Message, context: Context) -> Message:
    """Once before the first round: the class statistics of this node's rows under the initial
    global params of the message (checked as hostile input), for the class-means head."""
    node = common.node_settings(context.node_config)
    settings = common.settings_from_run_config(context.run_config)
    client, client_id = _client(settings, node), node.partition_id
    fed = client.federation
    plan, fingerprint = fed.plan, fed.backbone.fingerprint
    if plan.head_statistics is None:
        raise common.FederationError("this run's head does not start from class means (head-init = \"random\")")
    record = message.content.config_records.get(common.RECORD) if message.has_content() else None
    if record is None:
        raise WireError(f"the message has no {common.RECORD!r} record")
    data, addressed, nonce = record.get("global"), record.get("client-id"), record.get("nonce")
    if not isinstance(data, bytes) or not isinstance(addressed, int) or isinstance(addressed, bool):
        raise WireError("the message must hold the global params (bytes) and a client-id (int)")
    if nonce is not None and (not isinstance(nonce, bytes) or len(nonce) != common.NONCE_BYTES):
        raise WireError(f"the message's nonce must be {common.NONCE_BYTES} bytes")
    if addressed != client_id:
        raise common.FederationError(f"the server addressed client {addressed}, this node is client {client_id}")
    received = codec.check_message(codec.decode(data), kind=GLOBAL_KIND, fingerprint=fingerprint)
    template = {"params": plan.broadcast_template()["params"]}
    params = codec.check_template(received.tree, template)["params"]
    stats = _statistics(settings, node.backbone)(plan.trainable(params), fed.backbone.weights, client.rows,
                                                 np.int32(client.size), plan.keys.head_statistics(client_id))
    payload = codec.encode(dict(jax.device_get(stats)._asdict()), kind=class_means.STATISTICS_KIND,
                           fingerprint=fingerprint)
    binding = common.update_binding(0, addressed, nonce)
    return Message(RecordDict({common.RECORD: ConfigRecord({"statistics": payload, **binding})}), reply_to=message)


@app.query(common.INSTALL)
def install(message: Message, context: Context) -> Message:
    """Once before the first round, with a seed downlink and a head set in the set-up: keeps the
    state the rounds' seeds start from, and acknowledges it (bound to round 0, this client and
    the message's nonce)."""
    client, client_id = _this_client(context)
    plan, fingerprint = client.federation.plan, client.federation.backbone.fingerprint
    if plan.seeds is None:
        raise common.FederationError("this run has no seed downlink to install a state for")
    fields = _fields(message)
    if fields["client-id"] != client_id or fields["round"] != 0:
        raise common.FederationError(f"the server addressed client {fields['client-id']} (round {fields['round']}), "
                                     f"this node is client {client_id}")
    received = codec.check_message(codec.decode(fields["global"]), kind=GLOBAL_KIND, round=0, fingerprint=fingerprint)
    params = codec.check_template(received.tree, {"params": plan.broadcast_template()["params"]})["params"]
    _keep(context, "held-state", codec.encode(params, kind=HELD_STATE_KIND, round=0, fingerprint=fingerprint))
    binding = common.update_binding(0, client_id, fields.get("nonce"))
    return Message(RecordDict({common.RECORD: ConfigRecord(binding)}), reply_to=message)


def _global_state(message: Message, context: Context, *, train: bool = False) -> tuple[_Client, int, int, dict[str, Any]]:
    """The client, its id, the round and the global state of a ``train`` or ``evaluate`` message,
    checked as hostile input (kind, round, backbone fingerprint, tree).

    With a seed downlink a ``train`` message may carry the rounds this node missed as seeds
    instead (:meth:`~fedprompt.federation.seeds.SeedDownlink.catch_up` replays them onto the
    copy this node holds); either way the node then holds the round's state."""
    client, client_id = _this_client(context)
    fields = _fields(message)
    round_index = fields["round"]
    if fields["client-id"] != client_id:
        raise common.FederationError(
            f"the server addressed client {fields['client-id']}, this node is client {client_id}"
        )
    plan = client.federation.plan
    fingerprint = client.federation.backbone.fingerprint
    received = codec.check_message(codec.decode(fields["global"]), round=round_index, fingerprint=fingerprint)
    if not (train and plan.seeds is not None):
        codec.check_message(received, kind=GLOBAL_KIND)
        return client, client_id, round_index, codec.check_template(received.tree, plan.broadcast_template())
    template = plan.broadcast_template()["params"]
    params = plan.seeds.catch_up(received, _held_state(context, plan, template, fingerprint), template)
    _keep(context, "held-state", codec.encode(jax.device_get(params), kind=HELD_STATE_KIND, round=round_index,
                                              fingerprint=fingerprint))
    return client, client_id, round_index, {"params": params}


def _held_state(context: Context, plan: Any, template: Any, fingerprint: str) -> tuple[int, Any] | None:
    """The copy of the global state this node holds for a seed downlink, with its rounds: the
    one it kept, else the initial state when every party computes it from the seed."""
    record = context.state.config_records.get(common.RECORD)
    if record is None or "held-state" not in record:
        return (0, plan.init_params()) if plan.seeds.initial_held else None
    held = codec.check_message(codec.decode(record["held-state"]), kind=HELD_STATE_KIND, fingerprint=fingerprint)
    return held.round, codec.check_template(held.tree, template)


def _keep(context: Context, key: str, data: bytes) -> None:
    """Stores ``data`` under ``key`` in this node's record of the run's ``context.state``."""
    record = context.state.config_records.get(common.RECORD)
    values = {} if record is None else {k: record[k] for k in record}
    values[key] = data
    context.state[common.RECORD] = ConfigRecord(values)


def _local_result(message: Message, context: Context) -> tuple[_Client, int, int, Any, float]:
    """This node's round of local training on the server's ``train`` message: the client, its
    id, the round, its (encoded) ``ClientResult`` on the host and the start time."""
    start = time.perf_counter()
    client, client_id, round_index, broadcast = _global_state(message, context, train=True)
    fed = client.federation
    plan = fed.plan
    fingerprint = fed.backbone.fingerprint

    params = broadcast["params"]
    zeros = jax.tree.map(np.zeros_like, params)
    control = broadcast.get("control", zeros)
    client_state = _load_client_state(context, zeros, fingerprint) if plan.program.client_state else zeros
    key = plan.client_keys(round_index)[client_id]
    result = client.update(params, fed.backbone.weights, client.rows, np.int32(client.size), key, control,
                           client_state)
    if plan.encode is not None:  # local DP: noise only this node knows
        result = result._replace(delta=plan.encode(result.delta, fresh_key()))
    result = jax.device_get(result)
    if plan.program.client_state:
        _store_client_state(context, result.control, round_index, fingerprint)
    return client, client_id, round_index, result, start


def _reply(message: Message, client: _Client, update: Any, round_index: int, loss: float, start: float) -> Message:
    """The reply to a ``train`` message: the encoded update, bound to the message's round,
    client id and nonce, and the client's loss and number of examples."""
    payload = codec.encode(update, kind=UPDATE_KIND, round=round_index, fingerprint=client.federation.backbone.fingerprint)
    fields = _fields(message)
    binding = common.update_binding(fields["round"], fields["client-id"], fields.get("nonce"))
    content = RecordDict({
        common.RECORD: ConfigRecord({"update": payload, **binding}),
        common.METRICS: MetricRecord({
            "loss": float(loss), "num-examples": client.size, "seconds": time.perf_counter() - start,
        }),
    })
    return Message(content, reply_to=message)


@app.train()
def train(message: Message, context: Context) -> Message:
    """One round of local training on this node's rows; replies with the encoded update."""
    client, _, round_index, result, start = _local_result(message, context)
    return _reply(message, client, client_message(result, client.federation.plan.scaffold), round_index,
                  result.loss, start)


@app.evaluate()
def evaluate(message: Message, context: Context) -> Message:
    """Federated evaluation: the global state's loss and accuracy on this node's held-out rows,
    bound to the message's round, client id and nonce as an update is."""
    client, _, _, broadcast = _global_state(message, context)
    result = client.federation.plan.evaluate(broadcast["params"], client.evaluation)
    metrics = MetricRecord({"eval-loss": result["eval_loss"], "eval-accuracy": result["eval_accuracy"],
                            "num-examples": len(client.evaluation["labels"])})
    fields = _fields(message)
    binding = ConfigRecord(common.update_binding(fields["round"], fields["client-id"], fields.get("nonce")))
    return Message(RecordDict({common.METRICS: metrics, common.RECORD: binding}), reply_to=message)


# -- secure aggregation (fedprompt.flower.secure): one handler per protocol step ------------------


def _secure_step(message: Message, context: Context, keys: tuple[str, ...]):
    client, client_id = _this_client(context)
    round_index, addressed, data = secure.client_fields(message, keys)
    if addressed != client_id:
        raise common.FederationError(f"the server addressed client {addressed}, this node is client {client_id}")
    fingerprint = client.federation.backbone.fingerprint
    fields = secure.protocol_fields(data, round_index, fingerprint, keys)
    return client, round_index, fields, secure.SecureClient(context, fingerprint)


@app.query(secure.SETUP)
def secagg_keys(message: Message, context: Context) -> Message:
    """Step 0: a new session's secrets, kept in the node state; replies with the public keys."""
    _, round_index, fields, node = _secure_step(message, context, ("session", "n", "t", "length", "slot"))
    setup = secure.check_setup(fields)
    party = secagg.SecAggClient(setup["slot"], n=setup["n"], t=setup["t"], length=setup["length"],
                                bits=BITS, session=setup["session"])
    node.store(party, round_index)
    return node.reply(message, round_index, **party.advertise_keys().to_wire())


@app.query(secure.SHARES)
def secagg_shares(message: Message, context: Context) -> Message:
    """Step 1: Shamir shares of this node's mask key and self-mask seed, one ciphertext a peer."""
    _, round_index, fields, node = _secure_step(message, context, ("roster",))
    if not isinstance(fields["roster"], list):
        raise WireError("the roster must be a list of public keys")
    roster = {p.index: p for p in map(secagg.PublicKeys.from_wire, fields["roster"])}
    party = node.load(round_index)
    shares = party.share_keys(roster)
    node.store(party, round_index)
    return node.reply(message, round_index, shares={str(v): c for v, c in shares.items()})


@app.train(secure.MASKED)
def secagg_train(message: Message, context: Context) -> Message:
    """Step 2: local training, then the update quantized and masked; only the masked vector leaves."""
    _, round_index, fields, node = _secure_step(message, context, ("inbox", "u2"))
    party = node.load(round_index)
    inbox, u2 = fields["inbox"], fields["u2"]
    if not isinstance(inbox, dict) or not isinstance(u2, list):
        raise WireError("the inbox must be a map and U2 a list")
    party.receive_shares({int(u): c for u, c in inbox.items()})
    client, _, round_index, result, start = _local_result(message, context)
    plan = client.federation.plan
    ints, _ = SecureRound.of(party.n, plan.secagg, plan.privacy).client_input(result.delta)
    masked = party.masked_input(ints, u2)
    node.store(party, round_index)
    return _reply(message, client, {"masked": masked}, round_index, result.loss, start)


@app.query(secure.UNMASK)
def secagg_unmask(message: Message, context: Context) -> Message:
    """Step 3: this node's shares for the survivor list (one list per session, never two)."""
    _, round_index, fields, node = _secure_step(message, context, ("u2", "u3"))
    party = node.load(round_index)
    shares = party.unmasking_shares(fields["u2"], fields["u3"])
    node.store(party, round_index)
    return node.reply(message, round_index, **shares.to_wire())


def _fields(message: Message) -> dict[str, Any]:
    """The server's fields of a ``train`` or ``evaluate`` message, type-checked; a ``train``
    message's ``nonce`` too, when it has one (the client only echoes it: the server, which drew
    it, refuses a reply without it)."""
    record = message.content.config_records.get(common.RECORD) if message.has_content() else None
    if record is None:
        raise WireError(f"the message has no {common.RECORD!r} record")
    nonce = record.get("nonce") is not None
    expected = {"global": bytes, "round": int, "client-id": int, **({"nonce": bytes} if nonce else {})}
    fields = {}
    for key, kind in expected.items():
        value = record.get(key)
        if not isinstance(value, kind) or isinstance(value, bool):
            raise WireError(f"the message's {key!r} must be {kind.__name__}, got {type(value).__name__}")
        fields[key] = value
    if fields["round"] < 0:
        raise WireError(f"the message's round must be >= 0, got {fields['round']}")
    if nonce and len(fields["nonce"]) != common.NONCE_BYTES:
        raise WireError(f"the message's nonce must be {common.NONCE_BYTES} bytes, got {len(fields['nonce'])}")
    return fields


def _load_client_state(context: Context, zeros: Any, fingerprint: str) -> Any:
    """The program's client state kept in the run's node state (zeros at first)."""
    record = context.state.config_records.get(common.RECORD)
    if record is None or "client-state" not in record:
        return zeros
    message = codec.check_message(codec.decode(record["client-state"]), kind=CLIENT_STATE_KIND,
                                  fingerprint=fingerprint)
    return codec.check_template(message.tree, zeros)


def _store_client_state(context: Context, state: Any, round_index: int, fingerprint: str) -> None:
    _keep(context, "client-state", codec.encode(state, kind=CLIENT_STATE_KIND, round=round_index,
                                                fingerprint=fingerprint))
