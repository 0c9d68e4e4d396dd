"""What the Flower ClientApp and ServerApp share: settings, the federation they build, the messages.

Settings come from the Flower app's run config (``[tool.flwr.app.config]`` in its
``pyproject.toml``, overridden by ``flwr run --run-config``): every
:class:`~fedprompt.config.RunConfig` field, spelled with ``-`` or ``_`` (``clients-per-round``),
with ``""`` for an unset optional value, plus the deployment's own keys (:class:`FlowerSettings`).
Each SuperNode's node config (``flower-supernode --node-config``) says which client it is:
``partition-id`` (required), ``num-partitions`` (checked against ``clients``) and optionally
``backbone``, this node's path to the checkpoint.

Both apps build the same :class:`Federation` from the settings: the run's
:class:`~fedprompt.federation.plan.FederationPlan` (:func:`~fedprompt.federation.plan.make_plan`,
as :func:`fedprompt.simulate` builds it) and the demo partition of the data, so a client's rows,
its PRNG key in a round, the sampled clients, the initial prompt, the client program, its
encode stage and the server's round are those of the in-process simulation with the same
settings.

Messages (all payloads are :mod:`fedprompt.wire.codec` bytes, the simulation's wire format):

* ``query`` server -> client: ``{"fedprompt": {"ask": "hello"}}``; the reply says
  ``partition-id``, ``num-partitions`` and the node's backbone ``fingerprint``.
* ``train`` server -> client: ``{"fedprompt": {"global": <codec kind "global">, "round": r,
  "client-id": i}}``; the reply is ``{"fedprompt": {"update": <codec kind "update">},
  "metrics": {"loss", "num-examples", "seconds"}}``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from fedprompt.backbones.backbone import Backbone
from fedprompt.backbones.loading import load_backbone
from fedprompt.config import RunConfig
from fedprompt.errors import ConfigError, FedPromptError
from fedprompt.federation.keys import KeySchedule
from fedprompt.federation.plan import FederationPlan, local_batch_sharding, make_plan
from fedprompt.data import datasets, loading

RECORD = "fedprompt"
"""The name of the ConfigRecord that carries fedprompt's fields in every message."""

METRICS = "metrics"
"""The name of the MetricRecord of a client's reply."""

HELLO = "hello"

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
    """

    run: RunConfig
    synthetic_examples: int = 0
    synthetic_labels: int = 4
    round_timeout: float = 300.0
    min_nodes: int = 0
    node_wait_timeout: float = 120.0
    overwrite: bool = False

    @property
    def required_nodes(self) -> int:
        return self.min_nodes or self.run.clients


_FLOWER_FIELDS = {f.name: f for f in dataclasses.fields(FlowerSettings) if f.name != "run"}



def settings_from_run_config(run_config: Mapping[str, Any]) -> FlowerSettings:
    """Reads a Flower run config (``context.run_config``) into :class:`FlowerSettings`.

    Raises:
      ConfigError: an unknown key (with a suggestion), a value of the wrong type or out of
        range, or a setting a deployment cannot honour (``dropout``: a deployment's clients
        drop out for real; ``baselines``: ``fedprompt run`` computes them).
    """
    run_values: dict[str, Any] = {}
    flower_values: dict[str, Any] = {}
    for key, value in run_config.items():
        name = str(key).replace("-", "_")
        if name in _FLOWER_FIELDS:
            flower_values[name] = value
            continue
        field = _RUN_FIELDS.get(name)
        if field is not None and value == "" and "None" in str(field.type):
            value = None
        run_values[name] = value
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
    for name, value in flower_values.items():
        if name == "overwrite":
            if not isinstance(value, bool):
                raise ConfigError(f"overwrite must be true or false, got {value!r}")
            continue
        kind = int if name in ("synthetic_examples", "synthetic_labels", "min_nodes") else float
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        if not ok or (kind is int and not isinstance(value, int)):
            raise ConfigError(f"{name.replace('_', '-')} must be {kind.__name__}, got {value!r}")
        if value < 0 or (kind is float and value == 0):
            raise ConfigError(f"{name.replace('_', '-')} must be {'> 0' if kind is float else '>= 0'}, got {value!r}")
        flower_values[name] = kind(value)
    settings = FlowerSettings(run=run, **flower_values)
    if settings.synthetic_examples and settings.synthetic_labels < 2:
        raise ConfigError(f"synthetic-labels must be >= 2, got {settings.synthetic_labels}")
    if settings.required_nodes > run.clients:
        raise ConfigError(f"min-nodes ({settings.min_nodes}) exceeds clients ({run.clients})")
    return settings


@dataclasses.dataclass(frozen=True)
class NodeSettings:
    """A SuperNode's node config: which client it is, and where its backbone is."""

    partition_id: int
    num_partitions: int | None = None
    backbone: str | None = None


def node_settings(node_config: Mapping[str, Any]) -> NodeSettings:
    """Reads ``context.node_config`` (``partition-id``, ``num-partitions``, ``backbone``).

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
    backbone = node_config.get("backbone")
    if backbone is not None and (not isinstance(backbone, str) or not backbone):
        raise ConfigError(f"node config backbone must be a non-empty str, got {backbone!r}")
    return NodeSettings(values["partition_id"], values["num_partitions"], backbone)


def check_node(settings: FlowerSettings, node: NodeSettings) -> None:
    """Raises :class:`FederationError` if a node's client id does not fit the federation."""
    clients = settings.run.clients
    if node.num_partitions is not None and node.num_partitions != clients:
        raise FederationError(f"the node says num-partitions={node.num_partitions}, the run has clients={clients}")
    if not 0 <= node.partition_id < clients:
        raise FederationError(f"partition-id {node.partition_id} is not a client of a run with {clients} clients")


def load_run_backbone(settings: FlowerSettings, node: NodeSettings | None = None) -> Backbone:
    """The frozen backbone: the node's own path if its node config names one, else the run's."""
    name = node.backbone if node is not None and node.backbone else settings.run.backbone
    return load_backbone(name)


@dataclasses.dataclass
class Federation:
    """The federation both apps build from the same settings.

    Attributes:
      settings: the run's settings.
      plan: the run's :class:`~fedprompt.federation.plan.FederationPlan` (backbone, client
        program, encode stage, server round, key schedule).
      parts: every client's training rows (the demo partition).
      label_names: the task's class names.
    """

    settings: FlowerSettings
    plan: FederationPlan
    parts: list[np.ndarray]
    label_names: tuple[str, ...]
    _train: Any
    _test: Any

    @property
    def backbone(self) -> Backbone:
        return self.plan.backbone

    @property
    def capacity(self) -> int:
        """The largest client's size: every client's rows are padded to it."""
        return max(len(p) for p in self.parts)

    @property
    def client_sizes(self) -> np.ndarray:
        """Every client's number of training examples."""
        return np.array([len(p) for p in self.parts], np.int32)

    def _encode(self, data: Any) -> dict[str, np.ndarray]:
        if isinstance(data, datasets.TextDataset):
            cfg = self.settings.run
            return loading.encode_dataset(self.backbone, data, cfg.max_length, cfg.num_virtual_tokens)
        return dict(data)

    def client_rows(self, client_id: int) -> tuple[dict[str, np.ndarray], int]:
        """A client's encoded rows, padded to :attr:`capacity`, and its number of real rows."""
        part = self.parts[client_id]
        if isinstance(self._train, datasets.TextDataset):
            rows = self._encode(self._train.subset(part))
        else:
            rows = {name: column[part] for name, column in self._train.items()}
        return loading.client_shard(rows, self.capacity), len(part)

    def training_set(self) -> dict[str, np.ndarray]:
        """Every client's rows, encoded (what the in-process simulation holds; a node needs only its own)."""
        return self._encode(self._train)

    def test_set(self) -> dict[str, np.ndarray]:
        """The encoded test set the server evaluates the global prompt on."""
        return self._encode(self._test)


def build_federation(settings: FlowerSettings, backbone: Backbone, *, client: bool = False) -> Federation:
    """The run's plan and its demo data partition, exactly as :func:`fedprompt.simulate` builds them.

    ``client``: the plan of a SuperNode, whose gradient steps spread each batch over its
    ``devices`` local devices (:func:`~fedprompt.federation.plan.local_batch_sharding`)."""
    cfg = settings.run
    if settings.synthetic_examples:
        shape = dict(max_length=cfg.max_length, vocab_size=backbone.config.vocab_size,
                     num_labels=settings.synthetic_labels)
        keys = KeySchedule(cfg.seed)
        train: Any = loading.synthetic_token_data(settings.synthetic_examples, seed=keys.train_subset, **shape)
        test: Any = loading.synthetic_token_data(cfg.eval_examples or 1024, seed=keys.test_subset, **shape)
        labels = train["labels"]
        label_names = tuple(f"label_{i}" for i in range(settings.synthetic_labels))
    else:
        train, test = loading.select_examples(cfg, *loading.load_data(cfg))
        labels = train.labels
        label_names = train.label_names
    parts = loading.partition_clients(cfg, labels)
    if min(len(p) for p in parts) < 1:
        raise ConfigError("every client needs at least one example")
    plan = make_plan(cfg, backbone, len(label_names), batch_sharding=local_batch_sharding(cfg) if client else None)
    return Federation(settings, plan, parts, label_names, train, test)


def flower_message_bytes(message: Any) -> int | None:
    """The bytes of a Flower message as its objects are pushed (content, records, metadata).

    ``None`` if this Flower version does not expose its objects.
    """
    try:
        from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

        return sum(len(obj.deflate()) for obj in get_all_nested_objects(message).values())
    except Exception:  # a measurement only: never fail a round for it
        return None
