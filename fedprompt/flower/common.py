"""What the Flower ClientApp and ServerApp share: settings, the federation they build, the messages.

Settings come from the Flower app's run config (``[tool.flwr.app.config]`` in its
``pyproject.toml``, overridden by ``flwr run --run-config``): every
:class:`~fedprompt.config.RunConfig` field, spelled with ``-`` or ``_`` (``clients-per-round``),
with ``""`` for an unset optional value, plus the deployment's own keys (:class:`FlowerSettings`).
Each SuperNode's node config (``flower-supernode --node-config``) says which client it is:
``partition-id`` (required), ``num-partitions`` (checked against ``clients``), optionally
``backbone`` (this node's path to the checkpoint), ``data-path`` (this node's own training file,
with ``node-data = true``) and ``test-path`` (its own held-out file, for federated evaluation).

Which node is which client: without ``client-keys`` a node is the client its ``partition-id``
says, first come first served (any node that reaches the SuperLink can claim any client: fit
only for a trusted network). With ``client-keys = "0=SHA256:...,1=SHA256:..."`` (what
``python -m fedprompt.flower.credentials`` writes to ``client-keys.txt``) client i is only ever
the node whose authentication key has that fingerprint: the SuperLink reports each node's
public key, checked by its signature on every request (SuperNode authentication, over TLS); a
node whose key is bound to no client is left out without being sent anything, and a node that
claims a client its key is not bound to is left out too (both logged and counted in the
summary's ``binding``). A bound client without its node is unreachable, as without the setting.

Where the data come from:

* ``node-data = false`` (the demo, and the tests' option): every node builds the run's demo
  partition of one data set (``data``, the built-in WordNet set, or ``synthetic-examples``) and
  trains on its ``partition-id``'s rows; the server holds the same data and knows every
  client's size, so a client's rows, its PRNG key in a round, the sampled clients, the initial
  prompt, the client program, its encode stage and the server's round are those of the
  in-process simulation with the same settings.
* ``node-data = true``: each node reads its own ``data-path`` (JSONL or CSV, read with
  ``text-key`` / ``label-key``), whose labels must lie in the run's ``label-names``, and trains
  on exactly that file's rows; the server loads no training data. It weighs a client's update
  by the example count the client reports, capped at ``max-client-examples``
  (``client-weighting = "reported"``), or weighs every client the same (``"uniform"``), and
  evaluates on ``test-data`` only if its operator gives one.

Messages (all payloads are :mod:`fedprompt.wire.codec` bytes, the simulation's wire format):

* ``query`` server -> client: ``{"fedprompt": {"ask": "hello"}}``; the reply says
  ``partition-id``, ``num-partitions``, the node's backbone ``fingerprint`` and its
  ``num-examples``.
* ``train`` server -> client: ``{"fedprompt": {"global": <codec kind "global">, "round": r,
  "client-id": i, "nonce": <16 random bytes, new every round>}}``; the reply is
  ``{"fedprompt": {"update": <codec kind "update">, "round": r, "client-id": i, "nonce": ...},
  "metrics": {"loss", "num-examples", "seconds"}}``: the update bound (:func:`update_binding`)
  to the round, the client and the round's nonce the server sent that node; a reply bound to
  anything else is a counted rejection (:func:`check_binding`).
* ``evaluate`` server -> client (``federated-eval = true``): the fields of ``train``, the
  global state after ``round`` rounds; the reply is ``{"metrics": {"eval-loss",
  "eval-accuracy", "num-examples"}}``, the node's evaluation on its ``test-path`` rows (else
  on its training rows).

* ``query.class_statistics`` server -> client, once before round 1 with ``head-init =
  "class_means"``: ``{"fedprompt": {"global": <codec kind "global", no round: the initial
  params>, "client-id": i}}``; the reply is ``{"fedprompt": {"statistics": <codec kind
  "class_statistics">}}``, the node's
  :meth:`~fedprompt.federation.plan.FederationPlan.class_statistics` of its rows.

* ``query.install`` server -> client, once before round 1 with a seed downlink and a
  class-means head: the fields of ``train`` for round 0 with the state after the set-up; the
  node keeps it (the rounds' seeds start from it) and replies with its binding.
* With a seed downlink (``method = "zo"``, FedAvg, the mean), a ``train`` message's
  ``"global"`` is either codec kind ``"global"`` or kind ``"seeds"``: the merged seed pairs of
  the rounds since the copy the node holds (:mod:`fedprompt.federation.seeds`), whichever is
  fewer bytes; a node that cannot replay them answers with an error, and gets the state next.

Replay protection: the server draws a fresh nonce from the operating system's entropy
(:func:`fresh_nonce`) for every round and refuses an update whose binding does not echo it,
with the round and the client id it sent to that node. The binding travels in the reply's
record beside the codec payload, not inside it: the payload stays the simulation's, byte for
byte (``bytes_up`` is the same in both runtimes), and one Flower message is covered as a whole
by the channel. Only under an authenticated channel (TLS and SuperNode authentication) does it
stop a party on the network from replaying or re-addressing another node's update; stale
content that a client sends itself is what the update bound (``update-clip``) and the robust
rules are for.

A reported ``num-examples`` that is not a positive int (or, with the demo partition, not the
client's size) makes the reply a rejected one. The server decodes a client's codec payload with
a limit of :func:`message_limit` of what it expects (twice its encoded size, plus
:data:`MESSAGE_SLACK`), never the codec's 64 MiB default: a larger reply is a rejection; and
with at most :func:`object_limit` msgpack objects (twice the template's, plus
:data:`OBJECT_SLACK`), so a reply of many tiny containers is refused before it is built.
"""

from __future__ import annotations

import dataclasses
import hmac
import math
import re
import secrets
import time
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import numpy as np

from fedprompt.backbones.backbone import Backbone
from fedprompt.backbones.loading import load_backbone
from fedprompt.config import RunConfig
from fedprompt.errors import ConfigError, DataError, FedPromptError, WireError
from fedprompt.federation.keys import KeySchedule
from fedprompt.federation.plan import FederationPlan, local_batch_sharding, make_plan
from fedprompt.data import datasets, instructions, loading
from fedprompt.wire import codec
from fedprompt.wire.limits import MAX_CLASSES

RECORD = "fedprompt"
"""The name of the ConfigRecord that carries fedprompt's fields in every message."""

METRICS = "metrics"
"""The name of the MetricRecord of a client's reply."""

HELLO = "hello"

CLASS_STATISTICS = "class_statistics"
"""The ``query`` of the one-time class statistics (message type ``query.class_statistics``)."""

INSTALL = "install"
"""The ``query`` that hands a seed downlink's nodes the state after the set-up (``query.install``)."""

MESSAGE_SLACK = 4096
"""Bytes a reply's codec payload may exceed twice its template's encoded size by (headers, meta)."""

OBJECT_SLACK = 64
"""Msgpack objects a reply's codec payload may hold beyond twice its template's (headers, meta)."""

NONCE_BYTES = 16
"""The length of a round's nonce (:func:`fresh_nonce`)."""

WEIGHTINGS = ("reported", "uniform")
"""How the server weighs a client's update (``client-weighting``)."""

_RUN_FIELDS = {field.name: field for field in dataclasses.fields(RunConfig)}


class FederationError(FedPromptError):
    """The deployment cannot run: too few nodes, a node for an unknown client, a mismatched node."""


@dataclasses.dataclass(frozen=True)
class FlowerSettings:
    """A Flower run's settings.

    Attributes:
      run: the federation itself, as for ``fedprompt run``.
      synthetic_examples: if > 0, train on that many synthetic token-id examples
        (:func:`~fedprompt.data.loading.synthetic_token_data`, seeded by ``seed``, for
        backbones without a tokenizer) instead of ``data`` / the built-in WordNet set; the test
        set is then ``eval_examples`` (or 1024) more of them.
      synthetic_labels: the synthetic task's number of classes.
      round_timeout: seconds the server waits for a round's replies; a client that has not
        answered by then is left out of the round (the weights of the others renormalize).
      min_nodes: start when this many clients have a node (0: every client).
      node_wait_timeout: seconds to wait for ``min_nodes`` nodes at the start.
      overwrite: replace a run that ``out`` already holds (else the run is refused).
      node_data: each SuperNode trains on its own ``data-path`` file; the server loads no
        training data (else: the demo partition of one data set, on every node).
      label_names: the classes every node's file uses, in index order (required with
        ``node_data``; ``label-names = "neg,pos"`` in the run config).
      test_data: with ``node_data``, the server's own held-out file (JSONL/CSV, at most
        ``eval_examples`` of its rows, seeded); None: no server-side evaluation. Without
        ``node_data``, ``test-data`` is the run's (:class:`~fedprompt.config.RunConfig`).
      client_weighting: ``"reported"``: a client's update weighs its reported example count,
        capped at ``max_client_examples``; ``"uniform"``: every client weighs the same.
      max_client_examples: the most examples a client's weight counts.
      federated_eval: in every evaluated round, every node evaluates the global state on its
        own rows and the server averages their loss and accuracy (``federated_eval_*`` in the
        metrics), weighted as the updates are.
      node_capacity: the rows a node pads its own training rows to (0: its own count). The
        simulation pads every client to the largest client's count, and the client update's
        random batch order depends on it: set this to that count to reproduce a simulation.
      client_keys: ``(client id, key fingerprint)`` pairs in client order: the one SuperNode
        key that may hold each bound client (:func:`parse_client_keys`; a tuple, so that the
        settings stay hashable); empty: any node may say it is any client (trusted networks
        only).
    """

    run: RunConfig
    synthetic_examples: int = 0
    synthetic_labels: int = 4
    round_timeout: float = 300.0
    min_nodes: int = 0
    node_wait_timeout: float = 120.0
    overwrite: bool = False
    node_data: bool = False
    label_names: tuple[str, ...] = ()
    test_data: str | None = None
    client_weighting: str = "reported"
    max_client_examples: int = 10_000
    federated_eval: bool = False
    node_capacity: int = 0
    client_keys: tuple[tuple[int, str], ...] = ()

    @property
    def required_nodes(self) -> int:
        return self.min_nodes or self.run.clients


# How each deployment key of the run config is read (``test_data`` is RunConfig's key, taken
# over by the server with node_data).
_FLOWER_KINDS: dict[str, Any] = {
    "synthetic_examples": int, "synthetic_labels": int, "min_nodes": int, "node_capacity": int,
    "max_client_examples": int, "round_timeout": float, "node_wait_timeout": float,
    "overwrite": bool, "node_data": bool, "federated_eval": bool,
    "client_weighting": WEIGHTINGS, "label_names": tuple, "client_keys": dict,
}
_FLOWER_FIELDS = {f.name: f for f in dataclasses.fields(FlowerSettings) if f.name in _FLOWER_KINDS}


def _flower_value(name: str, value: Any) -> Any:
    """One deployment setting, type-checked (raises ConfigError)."""
    key, kind = name.replace("_", "-"), _FLOWER_KINDS[name]
    if kind is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false, got {value!r}")
        return value
    if kind is tuple:
        return parse_label_names(value)
    if kind is dict:
        return tuple(sorted(parse_client_keys(value).items()))
    if isinstance(kind, tuple):
        if value not in kind:
            raise ConfigError(f"{key} must be one of {', '.join(map(repr, kind))}, got {value!r}")
        return value
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or (kind is int and not isinstance(value, int)):
        raise ConfigError(f"{key} must be {kind.__name__}, got {value!r}")
    minimum = 1 if name == "max_client_examples" else 0
    if value < minimum or (kind is float and value == 0):
        raise ConfigError(f"{key} must be {'> 0' if kind is float else f'>= {minimum}'}, got {value!r}")
    return kind(value)


def parse_label_names(value: Any) -> tuple[str, ...]:
    """``label-names``: a comma-separated string (``"neg,pos"``; ``""``: none) or a list of str.

    Raises:
      ConfigError: an empty or repeated name, or a single class.
    """
    if isinstance(value, str):
        names = tuple(name.strip() for name in value.split(",")) if value.strip() else ()
    elif isinstance(value, (list, tuple)) and all(isinstance(name, str) for name in value):
        names = tuple(name.strip() for name in value)
    else:
        raise ConfigError(f"label-names must be a comma-separated string of class names, got {value!r}")
    if not names:
        return ()
    if not all(names) or len(set(names)) != len(names):
        raise ConfigError(f"label-names must be distinct, non-empty names, got {value!r}")
    if not 2 <= len(names) <= MAX_CLASSES:
        raise ConfigError(f"label-names must name between 2 and {MAX_CLASSES} classes, got {len(names)}")
    return names


KEY_FINGERPRINT = re.compile(r"SHA256:[A-Za-z0-9+/]{43}")
"""A public key's fingerprint as :func:`~fedprompt.flower.credentials.key_fingerprint` writes it
(and ``ssh-keygen -l`` prints it): ``SHA256:`` and 43 base64 characters, no padding."""


def parse_client_keys(value: Any) -> dict[int, str]:
    """``client-keys``: which SuperNode key holds which client, ``"<client>=<fingerprint>,..."``
    (``"0=SHA256:...,1=SHA256:..."``, the line ``client-keys.txt`` holds; ``""``: no binding).

    Raises:
      ConfigError: not a string, an entry that is not a client id, ``=`` and a
        :data:`KEY_FINGERPRINT`, or a client or a key named twice (one node is one client).
    """
    if not isinstance(value, str):
        raise ConfigError(f"client-keys must be a string \"0=SHA256:...,1=SHA256:...\", got {value!r}")
    keys: dict[int, str] = {}
    for entry in (part.strip() for part in value.split(",")) if value.strip() else ():
        client, _, key = (text.strip() for text in entry.partition("="))
        if not re.fullmatch(r"[0-9]+", client) or not KEY_FINGERPRINT.fullmatch(key):
            raise ConfigError(f"client-keys entries must be <client id>=SHA256:<43 base64 characters>, got {entry!r}")
        if int(client) in keys:
            raise ConfigError(f"client-keys names client {int(client)} twice")
        keys[int(client)] = key
    if len(set(keys.values())) != len(keys):
        raise ConfigError("client-keys binds one key to two clients: a node is one client")
    return keys


def settings_from_run_config(run_config: Mapping[str, Any]) -> FlowerSettings:
    """Reads a Flower run config (``context.run_config``) into :class:`FlowerSettings`.

    Raises:
      ConfigError: an unknown key (with a suggestion), a value of the wrong type or out of
        range, or a setting a deployment cannot honour (``dropout``: a deployment's clients
        drop out for real; ``baselines``: ``fedprompt run`` computes them); with ``node-data``,
        a shared ``data`` or ``synthetic-examples``, no ``label-names``, or ``tpt`` without
        ``test-data``; ``client-keys`` that bind a client the run does not have, or fewer
        clients than the run needs to start.
    """
    run_values: dict[str, Any] = {}
    flower_values: dict[str, Any] = {}
    for key, value in run_config.items():
        name = str(key).replace("-", "_")
        if name in _FLOWER_FIELDS:
            flower_values[name] = _flower_value(name, value)
            continue
        field = _RUN_FIELDS.get(name)
        if field is not None and value == "" and "None" in str(field.type):
            value = None
        run_values[name] = value
    if flower_values.get("node_data"):  # the server's own held-out file, not the demo's split
        test_data = run_values.pop("test_data", None)
        if test_data is not None and (not isinstance(test_data, str) or not test_data):
            raise ConfigError(f"test-data must be a path, got {test_data!r}")
        flower_values["test_data"] = test_data
    run = RunConfig.from_sources(overrides={k: v for k, v in run_values.items()})
    for name, value in run_values.items():
        if value is None and getattr(run, name) is not None:  # from_sources drops None: unset it
            run = dataclasses.replace(run, **{name: None})
    if run.dropout:
        raise ConfigError("dropout simulates clients that do not answer; in a deployment they drop out for real "
                          "(set 0)")
    if run.baselines:
        raise ConfigError("baselines are computed by `fedprompt run`, not by a deployment (set false)")
    if run.attack is not None:
        raise ConfigError("attack simulates malicious clients; a deployment's clients are what they are (unset it)")
    settings = FlowerSettings(run=run, **flower_values)
    if settings.synthetic_examples and settings.synthetic_labels < 2:
        raise ConfigError(f"synthetic-labels must be >= 2, got {settings.synthetic_labels}")
    if settings.required_nodes > run.clients:
        raise ConfigError(f"min-nodes ({settings.min_nodes}) exceeds clients ({run.clients})")
    if settings.client_keys:
        outside = [client for client, _ in settings.client_keys if client >= run.clients]
        if outside:
            raise ConfigError(f"client-keys binds client {outside[0]}, not a client of a run with {run.clients} clients")
        if len(settings.client_keys) < settings.required_nodes:
            raise ConfigError(f"client-keys binds {len(settings.client_keys)} clients, the run needs "
                              f"{settings.required_nodes} (min-nodes, 0: every client)")
    if settings.node_data:
        if run.data is not None or settings.synthetic_examples:
            raise ConfigError("with node-data each SuperNode reads its own data-path: unset data (\"\") and "
                              "synthetic-examples (0)")
        if not settings.label_names and run.task == "classify":
            raise ConfigError("node-data needs label-names, the classes of every node's file (\"neg,pos\")")
        if run.tpt and settings.test_data is None:
            raise ConfigError("tpt adapts the prompt on the server's test set: with node-data, give test-data")
    elif settings.label_names:
        raise ConfigError("label-names is the class set of node-data = true; the demo data set names its own")
    return settings


@dataclasses.dataclass(frozen=True)
class NodeSettings:
    """A SuperNode's node config: which client it is, where its backbone and its own data are."""

    partition_id: int
    num_partitions: int | None = None
    backbone: str | None = None
    data_path: str | None = None
    test_path: str | None = None


def node_settings(node_config: Mapping[str, Any]) -> NodeSettings:
    """Reads ``context.node_config`` (``partition-id``, ``num-partitions``, ``backbone``,
    ``data-path``, ``test-path``).

    Raises:
      ConfigError: no ``partition-id``, or a value of the wrong type.
    """
    if "partition-id" not in node_config:
        raise ConfigError(
            "this SuperNode has no partition-id: start it with --node-config \"partition-id=<i> num-partitions=<n>\""
        )
    values = {}
    for key in ("partition-id", "num-partitions"):
        value = node_config.get(key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
            raise ConfigError(f"node config {key} must be a non-negative int, got {value!r}")
        values[key.replace("-", "_")] = value
    for key in ("backbone", "data-path", "test-path"):
        value = node_config.get(key)
        if value is not None and (not isinstance(value, str) or not value):
            raise ConfigError(f"node config {key} must be a non-empty str, got {value!r}")
        values[key.replace("-", "_")] = value
    return NodeSettings(**values)


def check_node(settings: FlowerSettings, node: NodeSettings) -> None:
    """Raises :class:`FederationError` if a node's client id or data do not fit the federation."""
    clients = settings.run.clients
    if node.num_partitions is not None and node.num_partitions != clients:
        raise FederationError(f"the node says num-partitions={node.num_partitions}, the run has clients={clients} "
                              "(under Flower's simulation runtime: num-supernodes must equal clients)")
    if not 0 <= node.partition_id < clients:
        raise FederationError(f"partition-id {node.partition_id} is not a client of a run with {clients} clients")
    if settings.node_data and node.data_path is None:
        raise FederationError("the run says node-data = true: start this SuperNode with --node-config "
                              "\"partition-id=<i> data-path='<its training file>'\" (the virtual SuperNodes of "
                              "Flower's simulation runtime have no data path: node-data needs real SuperNodes)")
    if not settings.node_data and node.data_path is not None:
        raise FederationError(f"this SuperNode names data-path {node.data_path!r}, but the run trains on the demo "
                              "partition (node-data = false)")


def check_examples(value: Any, expected: int | None = None) -> int:
    """A client's reported example count: a positive int (and ``expected``, when the server knows it).

    Raises:
      WireError: anything else (the reply is rejected).
    """
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise WireError(f"bad example count: {value!r} is not a positive int")
    if expected is not None and value != expected:
        raise WireError(f"wrong number of examples: {value}, the client has {expected}")
    return value


def message_limit(template: Any, **header: Any) -> int:
    """The most bytes the server decodes of a client's payload that should match ``template``:
    twice the encoded size of the template's tree (zeros, with ``header``: ``kind``,
    ``round``, ``fingerprint``), plus :data:`MESSAGE_SLACK`.

    An honest payload is exactly the template's size, so a hostile one can make the decoder
    walk at most about twice that, not the codec's 64 MiB default.
    """
    zeros = jax.tree.map(lambda x: np.zeros(np.shape(x), np.dtype(x.dtype)), template)
    return 2 * codec.encoded_size(zeros, **header) + MESSAGE_SLACK


def object_limit(template: Any, **header: Any) -> int:
    """The most msgpack objects the server decodes of a client's payload that should match
    ``template``: twice those of the template's own encoding (zeros, with ``header``), plus
    :data:`OBJECT_SLACK`. A message of many tiny objects (empty maps: one byte each, a Python
    dict each once decoded) is refused before msgpack builds any, so decoding a reply costs a
    few times its size, not the ~140x of Python objects per byte."""
    zeros = jax.tree.map(lambda x: np.zeros(np.shape(x), np.dtype(x.dtype)), template)
    return 2 * codec.object_count(codec.encode(zeros, **header)) + OBJECT_SLACK


def fresh_nonce() -> bytes:
    """A round's nonce: :data:`NONCE_BYTES` bytes of the operating system's entropy (``secrets``)."""
    return secrets.token_bytes(NONCE_BYTES)


def update_binding(round_index: int, client_id: int, nonce: bytes | None) -> dict[str, Any]:
    """The fields a client's reply carries beside its update: the round, the client id and the
    round's nonce of the ``train`` message it answers (echoed as the server sent them; no nonce
    field when the message had none, which the server refuses)."""
    return {"round": round_index, "client-id": client_id, **({} if nonce is None else {"nonce": nonce})}


def check_binding(record: Mapping[str, Any], *, round_index: int, client_id: int, nonce: bytes) -> None:
    """Checks a reply's binding against what the server sent that node (:func:`update_binding`).

    Raises:
      WireError: a missing or mistyped field (``"update without its binding"``), another round
        (``"update bound to another round"``), another client (``"update bound to another
        client"``) or not this round's nonce (``"update bound to another nonce"``).
    """
    got_round, got_client, got_nonce = (record.get(key) for key in ("round", "client-id", "nonce"))
    for value in (got_round, got_client):
        if not isinstance(value, int) or isinstance(value, bool):
            raise WireError("update without its binding: round and client-id must be ints")
    if not isinstance(got_nonce, bytes) or len(got_nonce) != NONCE_BYTES:
        raise WireError(f"update without its binding: the nonce must be {NONCE_BYTES} bytes")
    if got_round != round_index:
        raise WireError(f"update bound to another round: {got_round}, this is round {round_index}")
    if got_client != client_id:
        raise WireError(f"update bound to another client: {got_client}, sent to client {client_id}")
    if not hmac.compare_digest(got_nonce, nonce):
        raise WireError("update bound to another nonce: not this round's")


def example_weights(settings: FlowerSettings, counts: Sequence[int] | np.ndarray) -> np.ndarray:
    """The clients' weights in the mean: their counts capped at ``max_client_examples``
    (``client_weighting = "reported"``), or ones (``"uniform"``)."""
    counts = np.asarray(counts, np.float64)
    if settings.client_weighting == "uniform":
        return np.ones(len(counts), np.float32)
    return np.minimum(counts, settings.max_client_examples).astype(np.float32)


def load_run_backbone(settings: FlowerSettings, node: NodeSettings | None = None) -> Backbone:
    """The frozen backbone: the node's own path if its node config names one, else the run's."""
    name = node.backbone if node is not None and node.backbone else settings.run.backbone
    return load_backbone(name)


class NodeRows(NamedTuple):
    """A node's data: its training rows padded for the client update, their number, and the
    (unpadded) rows it evaluates the global state on."""

    train: dict[str, np.ndarray]
    size: int
    evaluation: dict[str, np.ndarray]


@dataclasses.dataclass
class Federation:
    """The federation both apps build from the same settings.

    Attributes:
      settings: the run's settings.
      plan: the run's :class:`~fedprompt.federation.plan.FederationPlan` (backbone, client
        program, encode stage, server round, key schedule).
      parts: every client's training rows (the demo partition); None with node data.
      label_names: the task's class names.
    """

    settings: FlowerSettings
    plan: FederationPlan
    parts: list[np.ndarray] | None
    label_names: tuple[str, ...]
    _train: Any
    _test: Any

    @property
    def backbone(self) -> Backbone:
        return self.plan.backbone

    @property
    def capacity(self) -> int:
        """The largest client's size: every client's rows are padded to it (the demo partition)."""
        return max(len(p) for p in self._parts())

    @property
    def client_sizes(self) -> np.ndarray | None:
        """Every client's number of training examples (the demo partition); None with node data,
        where only the nodes know them."""
        return None if self.parts is None else np.array([len(p) for p in self.parts], np.int32)

    def _parts(self) -> list[np.ndarray]:
        if self.parts is None:
            raise FederationError("with node-data the clients' rows are on their nodes")
        return self.parts

    def _encode(self, data: Any) -> dict[str, np.ndarray]:
        if isinstance(data, datasets.TextDataset):
            cfg = self.settings.run
            return loading.encode_dataset(self.backbone, data, cfg.max_length, cfg.num_virtual_tokens)
        return dict(data)

    def client_rows(self, client_id: int) -> tuple[dict[str, np.ndarray], int]:
        """A client's encoded rows of the demo partition, padded to :attr:`capacity`, and its
        number of real rows."""
        part = self._parts()[client_id]
        if isinstance(self._train, datasets.TextDataset):
            rows = self._encode(self._train.subset(part))
        else:
            rows = {name: column[part] for name, column in self._train.items()}
        return loading.client_shard(rows, self.capacity), len(part)

    def node_rows(self, node: NodeSettings) -> NodeRows:
        """A node's rows: its ``data-path``'s (padded to ``node_capacity`` or its own count) or
        its demo partition's; it evaluates on its ``test-path``'s rows, else on its training rows.

        Raises:
          FederationError: a file that cannot be read or holds a label outside the run's classes.
        """
        if node.data_path is not None:
            rows = self._encode(self._read(node.data_path, "data-path"))
            size = len(rows["labels"])
            train = loading.client_shard(rows, max(size, self.settings.node_capacity))
        else:
            train, size = self.client_rows(node.partition_id)
            rows = {name: column[:size] for name, column in train.items()}
        evaluation = rows if node.test_path is None else self._encode(self._read(node.test_path, "test-path"))
        return NodeRows(train, size, evaluation)

    def _read(self, path: str, key: str) -> datasets.TextDataset:
        try:
            return loading.load_labelled_file(self.settings.run, path, self.label_names or None)
        except DataError as err:
            raise FederationError(f"this SuperNode's {key} does not fit the run (label-names "
                                  f"{','.join(self.label_names)}): {err}") from err

    @property
    def test_examples(self) -> datasets.TextDataset | None:
        """The server's test examples as texts (for generations), None without them or with
        synthetic token data."""
        return self._test if isinstance(self._test, datasets.TextDataset) else None

    def training_set(self) -> dict[str, np.ndarray]:
        """Every client's rows, encoded (what the in-process simulation holds; a node needs only its own)."""
        if self._train is None:
            raise FederationError("with node-data the training rows are on the nodes")
        return self._encode(self._train)

    def test_set(self) -> dict[str, np.ndarray] | None:
        """The encoded test set the server evaluates the global prompt on; None when it has none
        (node data without ``test-data``)."""
        return None if self._test is None else self._encode(self._test)

    def template_rows(self) -> dict[str, np.ndarray]:
        """One encoded example: the columns and dtypes that fix the shape of a client's update."""
        if self._test is None and self.settings.run.task == "generate":
            return self._encode(instructions.from_records([{"prompt": "template", "response": "template"}]))
        if self._test is None:
            return self._encode(datasets.from_lists(["template"], [0], self.label_names))
        if isinstance(self._test, datasets.TextDataset):
            return self._encode(self._test.subset([0]))
        return {name: column[:1] for name, column in self._test.items()}


def build_federation(settings: FlowerSettings, backbone: Backbone, *, client: bool = False) -> Federation:
    """The run's plan and its data: the demo partition, exactly as :func:`fedprompt.simulate` builds
    them; with ``node_data`` none but the server's ``test_data`` (each node reads its own rows,
    :meth:`Federation.node_rows`).

    ``client``: the plan of a SuperNode, whose gradient steps spread each batch over its
    ``devices`` local devices (:func:`~fedprompt.federation.plan.local_batch_sharding`); a node
    never reads the server's ``test_data``."""
    cfg = settings.run
    parts = None
    if settings.node_data:
        label_names = settings.label_names
        train = test = None
        if settings.test_data is not None and not client:
            test = loading.select_test_examples(cfg, loading.load_labelled_file(cfg, settings.test_data,
                                                                                label_names or None))
    elif settings.synthetic_examples:
        shape = dict(max_length=cfg.max_length, vocab_size=backbone.config.vocab_size,
                     num_labels=settings.synthetic_labels)
        keys = KeySchedule(cfg.seed)
        train = loading.synthetic_token_data(settings.synthetic_examples, seed=keys.train_subset, **shape)
        test = loading.synthetic_token_data(cfg.eval_examples or 1024, seed=keys.test_subset, **shape)
        label_names = tuple(f"label_{i}" for i in range(settings.synthetic_labels))
        parts = loading.partition_clients(cfg, train["labels"])
    else:
        train, test = loading.select_examples(cfg, *loading.load_data(cfg))
        label_names = train.label_names
        parts = loading.partition_clients(cfg, train.labels)
    if parts is not None and min(len(p) for p in parts) < 1:
        raise ConfigError("every client needs at least one example")
    plan = make_plan(cfg, backbone, len(label_names), batch_sharding=local_batch_sharding(cfg) if client else None,
                     label_names=label_names)
    return Federation(settings, plan, parts, label_names, train, test)


POLL_FIRST_SECONDS = 0.05
"""How long :func:`send_and_receive` waits before its second pull of replies."""

POLL_MAX_SECONDS = 3.0
"""The longest wait between two pulls (Flower's own ``Grid.send_and_receive`` always waits this)."""


def send_and_receive(grid: Any, messages: Sequence[Any], *, timeout: float) -> list[Any]:
    """Pushes ``messages`` through ``grid`` and pulls their replies until every one came or
    ``timeout`` seconds passed; returns the replies that came.

    Flower's ``Grid.send_and_receive`` does the same but sleeps 3 s between pulls, so each
    exchange of a round waited 1.5 s on average after its last reply. This one pulls again after
    50 ms and waits 1.5 times longer each time, up to 3 s: a quick exchange ends within a few
    tens of milliseconds of its last reply, a long one polls the SuperLink no more often than
    Flower does.
    """
    if not messages:
        return []
    pending = set(grid.push_messages(messages)) - {None}  # None: a message the SuperLink did not take
    deadline = time.monotonic() + timeout
    replies: list[Any] = []
    wait = POLL_FIRST_SECONDS
    while pending:
        came = list(grid.pull_messages(pending))
        replies.extend(came)
        pending.difference_update(reply.metadata.reply_to_message_id for reply in came)
        left = deadline - time.monotonic()
        if not pending or left <= 0:
            break
        time.sleep(min(wait, left))
        wait = min(wait * 1.5, POLL_MAX_SECONDS)
    return replies


def flower_message_bytes(message: Any) -> int | None:
    """The bytes of a Flower message as its objects are pushed (content, records, metadata).

    ``None`` if this Flower version does not expose its objects.
    """
    try:
        from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

        return sum(len(obj.deflate()) for obj in get_all_nested_objects(message).values())
    except Exception:  # a measurement only: never fail a round for it
        return None
