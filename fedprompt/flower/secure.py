"""Secure aggregation over Flower messages: the server only ever sees masked vectors.

One round of the protocol of Bonawitz et al. 2017 (:mod:`fedprompt.privacy.secagg`) among the
round's sampled clients that have a SuperNode, four exchanges of Flower messages:

=======================  =========================================  =============================
message type             server -> client                           client -> server
=======================  =========================================  =============================
``query.secagg_keys``    session id, ``n``, ``t``, length, slot      its two X25519 public keys
``query.secagg_shares``  the roster of public keys (``U1``)          encrypted Shamir shares
``train.secagg``         the global state, its inbox of shares,      its masked, quantized update
                         ``U2``
``query.secagg_unmask``  ``U2`` and the survivors ``U3``             its unmasking shares
=======================  =========================================  =============================

Each client's secrets (private keys, self-mask seed, the shares it holds) stay in its node
state between the messages, drawn from its own machine's entropy; the session id is drawn
by the server from its own. A client that does not answer a step is dropped from the protocol
from then on; a client that sent its masked input and then died is recovered from the others'
shares; with fewer than ``t`` clients at any step the round publishes nothing (the global
state stays). What the server publishes is the plan's
:meth:`~fedprompt.privacy.secure_round.SecureRound.publish`, the simulation's call.

``bytes_up`` counts the masked-update messages (as the simulation does); the protocol's other
messages, both ways, are ``secagg_bytes``. A masked input is bound, as a plain update is, to
the round, the client id and a fresh nonce of the ``train.secagg`` message
(:func:`~fedprompt.flower.common.check_binding`); a refused one is counted in ``rejections``.
The plan's update bound (``update-clip``, without central DP) clips the released mean: the
server never sees a single update (:meth:`~fedprompt.server.rounds.ServerRound.apply_mean`).
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from flwr.app import ConfigRecord, Message, RecordDict

from fedprompt.errors import SecureAggregationError, WireError
from fedprompt.federation.keys import fresh_key
from fedprompt.federation.records import RoundRecord
from fedprompt.flower import common
from fedprompt.privacy import secagg
from fedprompt.privacy.secure_round import BITS, SecureRound
from fedprompt.server import rounds
from fedprompt.wire import codec

SETUP = "secagg_keys"
SHARES = "secagg_shares"
MASKED = "secagg"
UNMASK = "secagg_unmask"
KIND = "secagg"
"""The wire ``kind`` of the protocol's messages (their content is in ``meta``)."""


def protocol_message(meta: Mapping[str, Any], round_index: int, fingerprint: str) -> bytes:
    """A protocol step's fields as wire-codec bytes."""
    return codec.encode({}, kind=KIND, round=round_index, fingerprint=fingerprint, meta=dict(meta))


def protocol_fields(data: Any, round_index: int, fingerprint: str, keys: tuple[str, ...]) -> dict[str, Any]:
    """The fields of a protocol message, checked as hostile input (raises ``WireError``)."""
    if not isinstance(data, bytes):
        raise WireError("the secure-aggregation message is not bytes")
    message = codec.check_message(codec.decode(data), kind=KIND, round=round_index, fingerprint=fingerprint)
    meta = message.meta or {}
    if set(meta) != set(keys):
        raise WireError(f"the secure-aggregation message must hold {sorted(keys)}, got {sorted(meta)}")
    return meta


def _exchange(grid, settings, sends: dict[int, tuple[int, str, dict[str, Any]]], r: int) -> tuple[dict[int, Message], int]:
    """Sends ``{slot: (node, message type, fields)}``; the replies without error by slot, and the
    bytes of the protocol payloads that crossed."""
    messages, slot_of = [], {}
    for slot, (node, message_type, fields) in sends.items():
        message = Message(RecordDict({common.RECORD: ConfigRecord(fields)}), dst_node_id=node,
                          message_type=message_type, group_id=str(r), ttl=settings.round_timeout + 60.0)
        messages.append(message)
    replies = common.send_and_receive(grid, messages, timeout=settings.round_timeout)
    for message, slot in zip(messages, sends):
        slot_of[message.metadata.message_id] = slot
    out, crossed = {}, sum(len(f.get("secagg", b"")) + len(f.get("global", b"")) for _, _, f in sends.values())
    for reply in replies:
        slot = slot_of.get(reply.metadata.reply_to_message_id)
        if slot is None or slot in out or reply.has_error() or not reply.has_content():
            continue
        record = reply.content.config_records.get(common.RECORD)
        if record is None:
            continue
        crossed += sum(len(v) for v in record.values() if isinstance(v, bytes))
        out[slot] = reply
    return out, crossed


def _field(reply: Message, name: str) -> Any:
    return reply.content.config_records[common.RECORD].get(name)


def secure_round(grid, settings, fed, nodes, state, r: int, template) -> tuple[Any, RoundRecord]:
    """One secure-aggregation round over Flower (module docstring); the new state and its record."""
    plan = fed.plan
    fingerprint = fed.backbone.fingerprint
    nodes.refresh(timeout=min(settings.round_timeout, settings.node_wait_timeout))
    ids, _ = plan.sample(r)
    present = [int(c) for c in ids if int(c) in nodes.node_of]
    n = len(present)
    spec_template = secagg.flatten_tree(jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), template["delta"]))[1]
    secure = SecureRound.of(max(n, 2), plan.secagg, plan.privacy)
    extra: dict[str, Any] = {"secagg_threshold": secure.t, "unreachable": len(ids) - n}
    known = fed.client_sizes  # the demo partition's sizes; None with node data (the mean is uniform)
    secagg_bytes = bytes_up = bytes_down = 0
    losses: dict[int, float] = {}
    rejections: dict[str, int] = {}  # refused masked inputs, by reason

    def record(outcome, participants) -> RoundRecord:
        extra.update(outcome.metrics)
        extra["secagg_bytes"] = secagg_bytes
        return RoundRecord(
            round=r + 1, train_loss=outcome.train_loss, clients=outcome.num_aggregated, sampled=len(ids),
            dropped=len(ids) - outcome.num_aggregated, rejections=rejections, bytes_up=bytes_up, bytes_down=bytes_down,
            participants=sorted(participants), extra=extra)

    def failed(reason: str):
        new_state, outcome = plan.server.skip(state, {"secagg_failed": True, "secagg_error": reason})
        return new_state, record(outcome, [])

    if n < secure.t or n < 2:
        return failed(f"only {n} sampled clients have a node, fewer than the threshold {secure.t}")
    server = secagg.SecAggServer(n=n, t=secure.t, length=spec_template.size, bits=BITS, session=secrets.token_bytes(16))
    node = {slot: nodes.node_of[client] for slot, client in enumerate(present)}

    def send(slots, message_type, fields_of):
        nonlocal secagg_bytes
        replies, crossed = _exchange(grid, settings, {s: (node[s], message_type, fields_of(s)) for s in slots}, r)
        secagg_bytes += crossed
        return replies

    def meta(s, **fields):
        return {"secagg": protocol_message(fields, r, fingerprint), "round": r, "client-id": present[s]}

    try:
        # 0. AdvertiseKeys
        replies = send(range(n), f"query.{SETUP}", lambda s: meta(
            s, session=server.session, n=n, t=secure.t, length=spec_template.size, slot=s))
        keys = []
        for s, reply in replies.items():
            try:
                public = secagg.PublicKeys.from_wire(protocol_fields(_field(reply, "secagg"), r, fingerprint,
                                                                     ("index", "cipher_key", "mask_key")))
            except WireError:
                continue
            if public.index == s:
                keys.append(public)
        roster = server.collect_keys(keys)
        # 1. ShareKeys
        wire_roster = [p.to_wire() for p in roster.values()]
        replies = send(sorted(roster), f"query.{SHARES}", lambda s: meta(s, roster=wire_roster))
        outgoing = {}
        for s, reply in replies.items():
            try:
                shares = protocol_fields(_field(reply, "secagg"), r, fingerprint, ("shares",))["shares"]
                outgoing[s] = {int(v): bytes(c) for v, c in shares.items()}
            except (WireError, TypeError, ValueError, AttributeError):
                continue
        inbox = server.route_shares(outgoing)
        u2 = sorted(server.u2)
        # 2. MaskedInputCollection, with local training
        broadcast = codec.encode(jax.device_get(plan.broadcast(state)), kind=rounds.GLOBAL_KIND, round=r,
                                 fingerprint=fingerprint)
        bytes_down = len(broadcast) * len(u2)
        extra["largest_down"] = len(broadcast)
        nonce = common.fresh_nonce()  # a masked input must echo it (common.check_binding)
        replies = send(u2, f"train.{MASKED}", lambda s: {
            **meta(s, inbox={str(u): c for u, c in inbox[s].items()}, u2=u2), "global": broadcast, "nonce": nonce})
        masked = {}
        masked_template = {"masked": np.zeros(spec_template.size, np.uint32)}
        limit = common.message_limit(masked_template, kind=rounds.UPDATE_KIND, round=r, fingerprint=fingerprint)
        objects = common.object_limit(masked_template, kind=rounds.UPDATE_KIND, round=r, fingerprint=fingerprint)
        for s, reply in replies.items():
            update = _field(reply, "update")
            metrics = reply.content.metric_records.get(common.METRICS)
            try:
                if metrics is None:
                    raise WireError("reply without the client's metrics")
                common.check_examples(metrics.get("num-examples"), None if known is None else int(known[present[s]]))
                if not isinstance(update, bytes) or len(update) > limit:
                    raise WireError("the masked update is missing or over the message limit")
                received = codec.check_message(codec.decode(update, max_bytes=limit, max_objects=objects), kind=rounds.UPDATE_KIND,
                                               round=r, fingerprint=fingerprint)
                vector = codec.check_template(received.tree, masked_template)
                common.check_binding(reply.content.config_records[common.RECORD], round_index=r,
                                     client_id=present[s], nonce=nonce)
            except (WireError, TypeError) as err:
                reason = rounds.rejection_reason(err)
                rejections[reason] = rejections.get(reason, 0) + 1
                continue
            bytes_up += len(update)
            masked[s] = vector["masked"]
            losses[s] = float(metrics.get("loss"))
        total = server.sum_masked(masked)
        u3 = sorted(masked)
        # 3. Unmasking
        replies = send(u3, f"query.{UNMASK}", lambda s: meta(s, u2=u2, u3=u3))
        responses = []
        for s, reply in replies.items():
            try:
                responses.append(secagg.UnmaskingShares.from_wire(protocol_fields(
                    _field(reply, "secagg"), r, fingerprint, ("index", "mask_key_shares", "self_mask_shares"))))
            except WireError:
                continue
        total = server.unmask(total, u3, [resp for resp in responses if resp.index in u3])
    except SecureAggregationError as err:
        return failed(str(err))
    # Central DP's noise comes from this machine's entropy: nobody who knows the seed can remove it.
    mean, metrics = secure.publish(total, spec_template, len(u3), clients_per_round=plan.clients_per_round,
                                   key=fresh_key())
    train_loss = float(np.mean([losses[s] for s in u3]))
    participants = [present[s] for s in u3]
    state, outcome = plan.server.apply_mean(state, mean, count=len(u3), train_loss=train_loss,
                                            participants=np.asarray(participants), metrics=metrics)
    return state, record(outcome, participants)


class SecureClient:
    """The client's side of :func:`secure_round`: one handler per protocol message, its
    secrets kept between them in the node's state (never sent)."""

    STATE = "secagg-state"

    def __init__(self, context: Any, fingerprint: str):
        self.context = context
        self.fingerprint = fingerprint

    def load(self, round_index: int) -> secagg.SecAggClient:
        record = self.context.state.config_records.get(self.STATE)
        if record is None or "state" not in record:
            raise SecureAggregationError("no secure-aggregation session on this node")
        message = codec.check_message(codec.decode(record["state"]), kind=self.STATE, round=round_index,
                                      fingerprint=self.fingerprint)
        return secagg.SecAggClient.from_state(message.meta or {})

    def store(self, client: secagg.SecAggClient, round_index: int) -> None:
        data = codec.encode({}, kind=self.STATE, round=round_index, fingerprint=self.fingerprint, meta=client.to_state())
        self.context.state[self.STATE] = ConfigRecord({"state": data})

    def reply(self, message: Message, round_index: int, **fields: Any) -> Message:
        record = ConfigRecord({"secagg": protocol_message(fields, round_index, self.fingerprint)})
        return Message(RecordDict({common.RECORD: record}), reply_to=message)


def client_fields(message: Message, keys: tuple[str, ...]) -> tuple[int, int, dict[str, Any]]:
    """``(round, client id, protocol fields)`` of a protocol message to a client."""
    record = message.content.config_records.get(common.RECORD) if message.has_content() else None
    if record is None:
        raise WireError(f"the message has no {common.RECORD!r} record")
    round_index, client = record.get("round"), record.get("client-id")
    for name, value in (("round", round_index), ("client-id", client)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise WireError(f"the message's {name!r} must be an int >= 0, got {value!r}")
    return round_index, client, record.get("secagg")


def check_setup(fields: Mapping[str, Any]) -> dict[str, Any]:
    """The setup fields, typed (raises ``WireError`` on bad input)."""
    session = fields["session"]
    if not isinstance(session, bytes) or len(session) != 16:
        raise WireError("the session id must be 16 bytes")
    values = {k: fields[k] for k in ("n", "t", "length", "slot")}
    for k, v in values.items():
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise WireError(f"{k} must be an int >= 0, got {v!r}")
    return {"session": session, **values}

