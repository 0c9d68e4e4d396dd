"""The Flower apps against the in-process simulation, run in this process.

The ServerApp and ClientApps run here, through a Grid that hands each message to the
ClientApp of its destination node (Flower's message objects, no transport): fast checks of
the protocol, of every method and protection against the simulation, of SCAFFOLD's node
state, of nodes with their own data, and of nodes that send garbage or go silent. The real
deployment (SuperLink and SuperNode processes) is tests/test_flower_deployment.py, which uses
this module's settings and references.

The backbone is the tiny BERT fixture; it has no tokenizer, so the data are seeded synthetic
token ids (``synthetic-examples``), built by the same function the in-process reference uses.
"""

from __future__ import annotations

import json
import sys
import time
import tomllib
from pathlib import Path
from types import SimpleNamespace

import jax
import numpy as np
import pytest
from conftest import FIXTURES, with_word_tokenizer
from flwr.app import ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

from fedprompt.client import class_means, zeroth_order
from fedprompt.data import datasets, loading
from fedprompt.errors import ConfigError, WireError
from fedprompt.federation.evaluation import evaluate_tpt, generation_summary
from fedprompt.flower import client_app, common, server_app
from fedprompt.federation.records import client_message
from fedprompt.privacy import accounting, dp
from fedprompt.privacy.secure_round import SecureRound
from fedprompt.server import rounds
from fedprompt.simulation.engine import FederatedSimulation, build_client_data, run_rounds
from fedprompt.wire import artifact, codec

APP = Path(__file__).resolve().parents[1] / "examples" / "flower_app"
BIN = Path(sys.executable).parent
NODES = 3
RUN = {
    "backbone": str(FIXTURES / "bert"),
    "synthetic-examples": 96,
    "synthetic-labels": 3,
    "eval-examples": 32,
    "train-examples": "",
    "clients": NODES,
    "clients-per-round": NODES,
    "partition": "dirichlet",
    "alpha": 1.0,
    "rounds": 3,
    "local-steps": 3,
    "batch-size": 4,
    "max-length": 8,
    "num-virtual-tokens": 4,
    "local-lr": 0.05,
    "seed": 3,
    "node-wait-timeout": 90.0,
}


def _app_config(overrides: dict) -> dict:
    """The run config Flower gives the apps: the app's ``[tool.flwr.app.config]``, overridden."""
    return {**tomllib.loads((APP / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"], **overrides}


def _settings(out: Path, **extra) -> tuple[dict, common.FlowerSettings]:
    """The overrides for ``flwr run`` and the settings the apps see: the app's config, overridden."""
    overrides = {**RUN, "out": str(out), **extra}
    config = _app_config(overrides)
    assert len(config) == len(_app_config({})), "flwr run refuses keys the app's config does not have"
    return overrides, common.settings_from_run_config(config)


def _reference(settings: common.FlowerSettings, **engine):
    """The in-process simulation of the same run: all clients' rows, vmapped training."""
    fed = common.build_federation(settings, common.load_run_backbone(settings))
    client_data = build_client_data(fed.training_set(), fed.parts, len(fed.label_names))
    if engine:
        return fed, FederatedSimulation(fed.plan, client_data, **engine)
    return fed, FederatedSimulation.from_config(settings.run, fed.plan, client_data)


def _read_run(out: Path):
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((out / "summary.json").read_text())
    final = codec.decode((out / server_app.FINAL_STATE_FILE).read_bytes())
    assert final.kind == rounds.GLOBAL_KIND and final.round == len(metrics)
    prompt = artifact.load_prompt(out / "prompt.fpp")
    return metrics, summary, final.tree["params"], prompt


def _assert_close(actual, expected, atol=1e-5):
    flat_a, tree_a = jax.tree.flatten(actual)
    flat_e, tree_e = jax.tree.flatten(jax.device_get(expected))
    assert tree_a == tree_e
    for a, e in zip(flat_a, flat_e):
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(e), rtol=1e-5, atol=atol)


def test_run_config_is_read_like_fedprompt_run_and_refuses_what_a_deployment_cannot_do():
    settings = common.settings_from_run_config(_app_config({"clients-per-round": 2, "local-lr": 0.1, "server_lr": ""}))
    assert settings.run.clients_per_round == 2 and settings.run.local_lr == 0.1 and settings.run.server_lr is None
    assert settings.run.train_examples == 2048 and settings.required_nodes == settings.run.clients == 4
    with pytest.raises(ConfigError, match="did you mean 'rounds'"):
        common.settings_from_run_config({"roundz": 3})
    with pytest.raises(ConfigError, match="drop out for real"):
        common.settings_from_run_config({"dropout": 0.5})
    with pytest.raises(ConfigError, match="round-timeout must be float"):
        common.settings_from_run_config({"round-timeout": "soon"})
    with pytest.raises(ConfigError, match="malicious clients"):
        common.settings_from_run_config({"attack": "sign_flip"})
    with pytest.raises(ConfigError, match="min-nodes"):
        common.settings_from_run_config({"clients": 2, "clients-per-round": 2, "min-nodes": 3})
    with pytest.raises(ConfigError, match="partition-id"):
        common.node_settings({"num-partitions": 3})
    with pytest.raises(common.FederationError, match="num-partitions=3"):
        common.check_node(settings, common.node_settings({"partition-id": 0, "num-partitions": 3}))


class _LateGrid:
    """Replies that the SuperLink holds only from given times on (seconds after the push)."""

    def __init__(self, ready_after: dict[str, float | None]):
        self.ready_after, self.pulls = ready_after, []

    def push_messages(self, messages):
        self.pushed = time.monotonic()
        return [None if m == "refused" else m for m in messages]

    def pull_messages(self, message_ids):
        now = time.monotonic() - self.pushed
        self.pulls.append((now, set(message_ids)))
        came = [i for i in message_ids if self.ready_after[i] is not None and self.ready_after[i] <= now]
        return [SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id=i)) for i in came]


def test_send_and_receive_pulls_soon_after_each_reply_and_stops_at_its_timeout():
    # Two replies come at 0.3 s and 0.5 s: every reply once, the exchange over within Flower's
    # first 3 s wait, and the waits between pulls growing 1.5x from 50 ms.
    grid = _LateGrid({"a": 0.3, "b": 0.5, "refused": None})
    start = time.monotonic()
    replies = common.send_and_receive(grid, ["a", "b", "refused"], timeout=10.0)
    took = time.monotonic() - start
    assert sorted(r.metadata.reply_to_message_id for r in replies) == ["a", "b"]
    assert 0.5 <= took < 1.5, took
    assert all("refused" not in asked for _, asked in grid.pulls)  # never asked for what was not taken
    assert grid.pulls[-1][1] == {"b"}  # a reply pulled once is not asked for again
    gaps = np.diff([at for at, _ in grid.pulls])
    assert np.all(gaps >= 0.04) and gaps[0] < 0.2 and np.all(gaps[1:] > gaps[:-1] * 1.2), gaps
    # A node that never answers: the exchange ends at its timeout with what came.
    grid = _LateGrid({"a": 0.0, "b": None})
    start = time.monotonic()
    replies = common.send_and_receive(grid, ["a", "b"], timeout=0.6)
    assert [r.metadata.reply_to_message_id for r in replies] == ["a"]
    assert 0.6 <= time.monotonic() - start < 1.2
    assert common.send_and_receive(grid, [], timeout=5.0) == []


def test_a_node_holds_exactly_its_simulation_rows(tmp_path):
    _, settings = _settings(tmp_path, partition="dirichlet", alpha=0.3)
    fed, sim = _reference(settings)
    node = common.build_federation(settings, common.load_run_backbone(settings))  # what a node builds
    sizes = sim.client_data.sizes
    assert len(set(sizes.tolist())) > 1  # unequal clients: the padding matters
    for client in range(settings.run.clients):
        rows, size = fed.client_rows(client)
        assert size == sizes[client]
        for name, column in sim.client_data.columns.items():
            np.testing.assert_array_equal(rows[name], np.asarray(column[client]))
        keys = sim.client_keys(5)
        np.testing.assert_array_equal(jax.random.key_data(node.plan.client_keys(5)[client]),
                                      jax.random.key_data(keys[client]))
    for r in range(4):
        np.testing.assert_array_equal(node.plan.sample(r)[0], sim.sample(r)[0])


class InProcessGrid(Grid):
    """A Grid whose SuperNodes are ClientApp calls in this process.

    ``silent`` nodes (a set of client ids) never answer; ``tamper(client_id, reply)`` may
    replace a reply, or drop it (None). An exception in the ClientApp becomes an error reply, as in Flower.
    ``node_config(i)``: more keys of node ``i``'s node config (its ``data-path``).
    """

    def __init__(self, run_config: dict, nodes: int, node_config=lambda i: {}):
        self.contexts = {
            1000 + i: Context(run_id=1, node_id=1000 + i,
                              node_config={"partition-id": i, "num-partitions": nodes, **node_config(i)},
                              state=RecordDict(), run_config=run_config)
            for i in range(nodes)
        }
        self.silent: set[int] = set()
        self.tamper = None
        self.sent: list[Message] = []
        self.replies: dict[str, Message] = {}  # message id -> the reply not yet pulled

    def set_run(self, run):
        pass

    @property
    def run(self):
        raise NotImplementedError

    def create_message(self, *args, **kwargs):
        raise NotImplementedError

    def get_node_ids(self):
        return list(self.contexts)

    def push_messages(self, messages):
        """Runs the ClientApp on each message now; its reply waits for :meth:`pull_messages`."""
        ids = []
        for message in messages:
            message.metadata.__dict__["_message_id"] = message.object_id  # what pushing does
            ids.append(message.metadata.message_id)
            self.sent.append(message)
            context = self.contexts[message.metadata.dst_node_id]
            client = context.node_config["partition-id"]
            if client in self.silent:
                continue
            try:
                reply = client_app.app(message, context)
            except Exception as err:  # noqa: BLE001 - Flower turns it into an error reply
                reply = Message(Error(code=1, reason=repr(err)), reply_to=message)
            if self.tamper is not None:
                reply = self.tamper(client, reply)
            if reply is not None:  # a tamper hook returning None silences that one reply
                self.replies[message.metadata.message_id] = reply
        return ids

    def pull_messages(self, message_ids):
        """The replies to ``message_ids`` that were not pulled yet, in the order they came."""
        asked = set(message_ids)
        return [self.replies.pop(i) for i in [i for i in self.replies if i in asked]]

    def send_and_receive(self, messages, *, timeout=None):
        raise NotImplementedError  # the ServerApp pulls with common.send_and_receive


class _InstantClock:
    """The clock of :func:`common.send_and_receive` next to an :class:`InProcessGrid`, which
    answers every message while it is pushed: a reply missing then never comes, so waiting
    for it until the round's timeout takes no time."""

    def __init__(self):
        self.now = 0.0

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def flower_task(monkeypatch):
    """The identity Flower gives the ServerApp's process (messages are stamped with it), and
    the ServerApp's waits for replies on an :class:`_InstantClock`."""
    for name, value in (("_run_id", 1), ("_node_id", 1), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, name, value)
    monkeypatch.setattr(common, "time", _InstantClock())


def _replay(fed, sim, metrics, settings):
    """The in-process simulation's rounds with exactly the clients the deployment aggregated,
    through the plan's public round functions."""
    plan = sim.plan
    state, controls = sim.init()
    template = plan.update_template(fed.test_set())
    for r, m in enumerate(metrics):
        ids, _ = sim.sample(r)
        host = jax.device_get(sim.train_clients(state, controls, ids, r))
        messages = [
            codec.encode(client_message(jax.tree.map(lambda x, s=slot: x[s], host), plan.scaffold),
                         kind=rounds.UPDATE_KIND, round=r, fingerprint=fed.backbone.fingerprint)
            if int(client) in m["participants"] else None
            for slot, client in enumerate(ids)
        ]
        received = rounds.receive_updates(messages, round_index=r, fingerprint=fed.backbone.fingerprint,
                                          template=template)
        state, _ = plan.server.apply(state, received, sim.client_data.sizes[ids], key=plan.keys.round_noise(r),
                                     participants=ids)
    return state


@pytest.mark.parametrize("algorithm", ["fedavg", "scaffold"])
def test_apps_in_process_equal_the_simulation(tmp_path, flower_task, algorithm):
    overrides, settings = _settings(tmp_path / "out", algorithm=algorithm, **{"clients-per-round": 2, "clients": 4})
    grid = InProcessGrid(_app_config(overrides), 4)
    result = server_app.run_federation(grid, settings, log=lambda text: None)
    fed, sim = _reference(settings)
    state, _, expected = run_rounds(sim, settings.run.rounds, fed.test_set())
    _assert_close(result.state.params, state.params)
    if algorithm == "scaffold":  # the server control variate, from the clients' kept controls
        _assert_close(result.state.control, state.control)
        assert all(common.RECORD in c.state.config_records for c in grid.contexts.values()
                   if c.node_config["partition-id"] in {p for m in result.metrics for p in m["participants"]})
    for got, want in zip(result.metrics, expected):
        assert got["participants"] == sorted(int(i) for i in sim.sample(got["round"] - 1)[0])
        for key in ("bytes_up", "bytes_down", "clients"):
            assert got[key] == want[key]
    lines = (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["round"] for line in lines] == [1, 2, 3]


# Every method and protection, deployed through the apps, against the in-process run. The
# noise of DP is zero here (a deployment draws it from its own entropy); the tests below check
# that with noise on it is there, at the right scale. Every row sets the server's update bound
# (update-clip, one stage of the plan's server round) explicitly, low enough to scale honest
# updates of most rows, so both runtimes must clip alike; with central DP the DP clip is the bound.
PARITY = {
    "prefix-median": {"method": "prefix", "aggregator": "median", "update-clip": 0.2},
    "bbt": {"method": "bbt", "local-steps": 2, "update-clip": 0.2},
    "zo": {"method": "zo", "local-steps": 4, "update-clip": 0.2},
    # the seed downlink: 2 of 3 clients a round, so clients miss rounds and catch up from seeds;
    # the set-up installs the class-means head on every node
    "zo-seeds": {"method": "zo", "algorithm": "fedavg", "local-steps": 4, "update-clip": 0.2, "rounds": 4,
                 "clients-per-round": 2, "head-init": "class_means", "head-init-examples": 8, "zo-head": "frozen"},
    "int8-error-feedback-multi-krum": {"compress": "int8", "error-feedback": True, "aggregator": "multi_krum",
                                       "num-byzantine": 0, "krum-m": 2, "update-clip": 0.2},
    "int4-trimmed-mean": {"compress": "int4", "aggregator": "trimmed_mean", "trim-beta": 0.34, "update-clip": 0.2},
    "local-dp-krum": {"dp": "local", "dp-clip": 0.05, "dp-noise-multiplier": 0.0, "aggregator": "krum",
                      "num-byzantine": 0, "update-clip": 0.2},
    "norm-bound-tpt": {"aggregator": "norm_bound", "norm-bound": 0.05, "tpt": True, "tpt-test-clients": 2,
                       "tpt-views": 2, "update-clip": 0.2},
    "central-dp": {"dp": "central", "dp-clip": 0.05, "dp-noise-multiplier": 0.0, "update-clip": 0.2},
    "secagg-central-dp": {"secagg": True, "dp": "central", "dp-clip": 0.05, "dp-noise-multiplier": 0.0,
                          "update-clip": 0.2},
}


@pytest.mark.parametrize("name", sorted(PARITY))
def test_every_method_and_protection_deployed_equals_the_simulation(tmp_path, flower_task, name):
    overrides, settings = _settings(tmp_path / "out", **{"rounds": 2, **PARITY[name]})
    grid = InProcessGrid(_app_config(overrides), NODES)
    result = server_app.run_federation(grid, settings, log=lambda text: None)
    # The reference trains one client per program, as a node does: a vmapped block rounds
    # differently (on some CPUs by enough to move an update across the clip bound, and ZO's
    # scalars divide a difference of two losses by 2 eps, which magnifies that rounding).
    fed, sim = _reference(settings, client_block=1)
    state, _, expected = run_rounds(sim, settings.run.rounds, fed.test_set())
    # (zo-seeds: the class-means head's statistics are computed by vmapped blocks in one runtime
    # and node by node in the other; ZO's 1 / (2 eps) magnifies that rounding over 4 rounds)
    _assert_close(result.state.server.params, state.server.params, atol=1e-4 if name == "zo-seeds" else 1e-5)
    for got, want in zip(result.metrics, expected, strict=True):
        for key in ("bytes_up", "bytes_down", "clients", "participants", "epsilon", "dp_clip", "update_clip", "clipped"):
            assert got.get(key) == want.get(key), (key, got.get(key), want.get(key))
        np.testing.assert_allclose(got["eval_accuracy"], want["eval_accuracy"], atol=1e-6)
    if name == "zo":  # only seeds and scalars travel up: the encoded pairs and the header
        fingerprint = fed.backbone.fingerprint
        for r, got in enumerate(result.metrics):
            assert got["bytes_up"] == NODES * zeroth_order.payload_bytes(4, r, fingerprint) < 300 * NODES
    if name == "zo-seeds":  # and down: every node's kept copy is the server's state of its last round
        assert result.summary["setup"]["bytes_down"] == sim.setup_bytes()["bytes_down"]
        assert all(m["bytes_down"] < 400 * m["sampled"] for m in result.metrics[1:])
        last = {}
        for m in result.metrics:
            for c in sim.sample(m["round"] - 1)[0]:
                last[int(c)] = m["round"] - 1
        for context in grid.contexts.values():
            held = codec.decode(context.state.config_records[common.RECORD]["held-state"])
            client = context.node_config["partition-id"]
            assert held.round == last.get(client, 0)
        assert result.summary["zo_downlink"] == "seeds"
    if settings.run.dp:
        assert result.summary["privacy"]["dp_mode"] == settings.run.dp
        prompt = artifact.load_prompt(tmp_path / "out" / "prompt.fpp")
        assert prompt.training["privacy_epsilon"] == result.summary["privacy"]["epsilon"]
    if settings.run.tpt:
        reference = evaluate_tpt(settings.run, sim.plan, sim.plan.trainable(state.server.params), fed.test_set())
        for key in ("accuracy_before", "accuracy_after"):
            np.testing.assert_allclose(result.summary["tpt"][key], reference[key], atol=1e-6)
    if settings.run.error_feedback:  # the residual stays on the node, in its context
        assert all(common.RECORD in c.state.config_records for c in grid.contexts.values())


def _first_round_updates(settings):
    """The reference federation and simulation and its clients' round-1 updates, by client id (before encoding)."""
    fed, sim = _reference(settings)
    state, controls = sim.init()
    ids, _ = sim.sample(0)
    deltas = jax.device_get(sim.train_clients(state, controls, ids, 0).delta)
    return fed, sim, {int(c): jax.tree.map(lambda x, s=slot: x[s], deltas) for slot, c in enumerate(ids)}


def _noise_std(deployed, reference) -> float:
    diffs = [np.asarray(a, np.float64) - np.asarray(b, np.float64)
             for a, b in zip(jax.tree.leaves(deployed), jax.tree.leaves(jax.device_get(reference)), strict=True)]
    return float(np.std(np.concatenate([d.ravel() for d in diffs])))


def test_deployed_central_dp_noise_has_its_scale_and_comes_from_the_server_alone(tmp_path, flower_task):
    z, clip = 2.0, 0.05
    extra = {"algorithm": "fedavg", "rounds": 1, "dp": "central", "dp-clip": clip, "dp-noise-multiplier": z}
    overrides, settings = _settings(tmp_path / "out", **extra)
    result = server_app.run_federation(InProcessGrid(_app_config(overrides), NODES), settings, log=lambda text: None)
    fed, sim = _reference(settings)
    state, _, expected = run_rounds(sim, 1, fed.test_set())
    # Both runs add N(0, (z C)^2) to the same clipped sum, then divide by the cohort; the noises
    # are independent (the deployment's is not the seed's), so the difference has twice the variance.
    want = np.sqrt(2) * z * clip / NODES
    assert 0.8 * want < _noise_std(result.state.server.params, state.server.params) < 1.2 * want
    np.testing.assert_allclose(result.metrics[0]["epsilon"], expected[0]["epsilon"], rtol=1e-12)
    assert result.metrics[0]["dp_noise_std"] == pytest.approx(z * clip)


def test_deployed_local_dp_noise_is_added_on_the_node_at_its_scale(tmp_path, flower_task):
    z, clip = 1.5, 0.05
    extra = {"rounds": 1, "dp": "local", "dp-clip": clip, "dp-noise-multiplier": z}
    overrides, settings = _settings(tmp_path / "out", **extra)
    grid = InProcessGrid(_app_config(overrides), NODES)
    sent = {}

    def keep(client, reply):
        if reply.metadata.message_type == "train":
            sent[client] = codec.decode(reply.content.config_records[common.RECORD]["update"]).tree["delta"]
        return reply

    grid.tamper = keep
    result = server_app.run_federation(grid, settings, log=lambda text: None)
    _, sim, clean = _first_round_updates(settings)
    for client, update in clean.items():
        clipped, _ = dp.clip_update(update, clip)
        assert 0.8 * z * clip < _noise_std(sent[client], clipped) < 1.2 * z * clip
    assert result.metrics[0]["epsilon"] == pytest.approx(
        accounting.local_epsilon(z, 1, sim.plan.privacy.ledger.delta), rel=1e-12)


def test_secure_aggregation_deployed_sees_only_masked_vectors_and_recovers_a_node_that_died(tmp_path, flower_task):
    overrides, settings = _settings(tmp_path / "out", rounds=2, secagg=True)
    grid = InProcessGrid(_app_config(overrides), NODES)
    masked = {}

    def tamper(client, reply):
        kind = reply.metadata.message_type
        if kind == "train.secagg":
            masked[(int(reply.metadata.group_id), client)] = codec.decode(
                reply.content.config_records[common.RECORD]["update"]).tree["masked"]
        if kind == "query.secagg_unmask" and client == 2:
            return None  # client 2 dies after sending its masked input, every round
        return reply

    grid.tamper = tamper
    result = server_app.run_federation(grid, settings, log=lambda text: None)
    fed, sim, plain = _first_round_updates(settings)
    secure = SecureRound.of(NODES, sim.plan.secagg, sim.plan.privacy)
    for client, update in plain.items():  # what the server saw is not the client's input
        ints, _ = secure.client_input(update)
        assert np.mean(masked[(0, client)] == ints) < 0.01
    # Client 2's input is in the sum although it never unmasked: the run equals the simulation's.
    final, _, expected = run_rounds(sim, 2, fed.test_set())
    _assert_close(result.state.server.params, final.server.params)
    assert [m["participants"] for m in result.metrics] == [list(range(NODES))] * 2
    assert all(m["secagg_bytes"] > 0 and m["bytes_up"] == e["bytes_up"] for m, e in zip(result.metrics, expected))


def test_secure_aggregation_deployed_with_fewer_than_t_survivors_publishes_nothing(tmp_path, flower_task):
    overrides, settings = _settings(tmp_path / "out", rounds=2, secagg=True)
    grid = InProcessGrid(_app_config(overrides), NODES)
    grid.tamper = lambda client, reply: (None if reply.metadata.message_type == "train.secagg" and client > 0
                                         and reply.metadata.group_id == "1" else reply)
    result = server_app.run_federation(grid, settings, log=lambda text: None)
    first, second = result.metrics
    assert first["clients"] == NODES and second["clients"] == 0 and second["secagg_failed"]
    assert "fewer than the threshold" in second["secagg_error"]
    fed, sim = _reference(settings)
    after_one, _, _ = run_rounds(sim, 1, fed.test_set())
    _assert_close(result.state.server.params, after_one.server.params)  # round 2 published nothing


def test_a_node_sending_garbage_or_going_silent_is_left_out(tmp_path, flower_task):
    overrides, settings = _settings(tmp_path / "out")
    grid = InProcessGrid(_app_config(overrides), NODES)

    def with_update(reply, data):
        metrics = reply.content.metric_records[common.METRICS]
        content = RecordDict({common.RECORD: ConfigRecord({"update": data}), common.METRICS: metrics})
        return Message(content, reply_to=_sent(grid, reply))

    def tamper(client, reply):
        if reply.metadata.message_type != "train":
            return reply
        round_index = int(reply.metadata.group_id)
        if client == 0 and round_index == 1:  # a corrupted update
            return with_update(reply, b"\x93garbage")
        if client == 1 and round_index == 2:  # an update for another round
            stale = codec.decode(reply.content.config_records[common.RECORD]["update"])
            return with_update(reply, codec.encode(stale.tree, kind=rounds.UPDATE_KIND, round=0,
                                                   fingerprint=stale.fingerprint))
        return reply

    grid.tamper = tamper
    original = grid.push_messages

    def push_messages(messages):
        messages = list(messages)
        if messages and messages[0].metadata.group_id == "2":
            grid.silent = {2}  # client 2 goes silent in round 3
        return original(messages)

    grid.push_messages = push_messages
    result = server_app.run_federation(grid, settings, log=lambda text: None)
    metrics = result.metrics
    assert metrics[0]["participants"] == [0, 1, 2] and metrics[0]["rejected"] == 0
    assert metrics[1]["participants"] == [1, 2] and metrics[1]["rejections"] == {"not a valid msgpack message": 1}
    assert metrics[2]["participants"] == [0] and metrics[2]["timeouts"] == 1
    assert metrics[2]["rejections"] == {"update is for another round or backbone": 1}
    fed, sim = _reference(settings)
    _assert_close(result.state.params, _replay(fed, sim, metrics, settings).params)


def _sent(grid: InProcessGrid, reply: Message) -> Message:
    return next(m for m in grid.sent if m.metadata.message_id == reply.metadata.reply_to_message_id)


# -- the class-means head, set once before round one --------------------------------------------

CLASS_MEANS = {"head-init": "class_means", "head-init-examples": 8}
STATISTICS_QUERY = f"query.{common.CLASS_STATISTICS}"


def _initial_params(grid: InProcessGrid):
    """The global params the server sent in round 1 (the head it set before it)."""
    first = next(m for m in grid.sent if m.metadata.message_type == "train")
    return codec.decode(first.content.config_records[common.RECORD]["global"]).tree["params"]


@pytest.mark.parametrize("head_init", ["class_means", "lda"])
def test_class_means_head_over_flower_equals_the_simulation(tmp_path, flower_task, head_init):
    # (LDA from 8 rows a client would be singular in 32 dimensions, where rounding is magnified)
    lda = {"head-init-examples": 64} if head_init == "lda" else {}
    overrides, settings = _settings(tmp_path / "out", rounds=2, **{**CLASS_MEANS, "head-init": head_init, **lda})
    grid = InProcessGrid(_app_config(overrides), NODES)
    result = server_app.run_federation(grid, settings, log=lambda text: None)
    kinds = [m.metadata.message_type for m in grid.sent]
    assert kinds[NODES:2 * NODES] == [STATISTICS_QUERY] * NODES  # after the hellos, before round 1
    assert STATISTICS_QUERY not in kinds[2 * NODES:]

    fed, sim = _reference(settings, client_block=1)
    start, controls = sim.init()  # every client's statistics, one client per program as on a node
    # LDA inverts the pooled covariance of 64 rows a client in 32 dimensions: its condition
    # number magnifies the statistics' float rounding (summed in another order on the server)
    atol = 3e-3 if head_init == "lda" else 1e-5
    _assert_close(_initial_params(grid), start.server.params, atol=atol)
    state, _, expected = run_rounds(sim, settings.run.rounds, fed.test_set(), state=start, client_states=controls)
    _assert_close(result.state.server.params, state.server.params, atol=atol)
    for got, want in zip(result.metrics, expected, strict=True):
        for key in ("bytes_up", "bytes_down", "clients", "participants"):
            assert got[key] == want[key], key
        np.testing.assert_allclose(got["eval_accuracy"], want["eval_accuracy"], atol=1e-6)
    setup = result.summary["setup"]
    assert {k: setup[k] for k in ("head_init", "clients", "bytes_up", "bytes_down")} == {
        "head_init": head_init, "clients": NODES, **sim.setup_bytes()}
    assert setup["rejected"] == setup["missing"] == 0 and setup["contributors"] == list(range(NODES))
    np.testing.assert_allclose(setup["initial_accuracy"],
                               sim.evaluate(start.server.params, fed.test_set())["eval_accuracy"], atol=1e-6)
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["setup"] == setup


def _with_statistics(grid: InProcessGrid, reply: Message, change) -> Message:
    """The class-statistics reply with its statistics changed by ``change(tree)`` (a hostile node)."""
    message = codec.decode(reply.content.config_records[common.RECORD]["statistics"])
    tree = change(message.tree)
    data = tree if isinstance(tree, bytes) else codec.encode(tree, kind=message.kind, fingerprint=message.fingerprint)
    fields = {**reply.content.config_records[common.RECORD], "statistics": data}  # its binding kept
    return Message(RecordDict({common.RECORD: ConfigRecord(fields)}), reply_to=_sent(grid, reply))


def _set(tree, name, index, value):
    tree[name][index] = value
    return tree


HOSTILE_STATISTICS = {
    "nan": (lambda t: _set(t, "sums", (0, 0), np.nan), "non-finite class statistics"),
    "counts-of-a-billion": (lambda t: _set(t, "counts", 0, 1e9), "bad class counts"),
}


@pytest.mark.parametrize("name", sorted(HOSTILE_STATISTICS))
def test_hostile_class_statistics_are_left_out_of_the_head(tmp_path, flower_task, name):
    change, reason = HOSTILE_STATISTICS[name]
    overrides, settings = _settings(tmp_path / "out", rounds=1, **CLASS_MEANS)
    grid = InProcessGrid(_app_config(overrides), NODES)
    grid.tamper = lambda client, reply: (_with_statistics(grid, reply, change) if client == 1
                                         and reply.metadata.message_type == STATISTICS_QUERY else reply)
    logs = []
    result = server_app.run_federation(grid, settings, log=logs.append)
    setup = result.summary["setup"]
    assert setup["clients"] == NODES - 1 and setup["contributors"] == [0, 2] and setup["rejected"] == 1
    assert setup["rejections"] == {reason: 1}
    assert any("client 1's class statistics are refused" in text for text in logs)
    # The head is the one the other clients' statistics alone define.
    fed, sim = _reference(settings)
    random_start = sim.plan.init_params()
    others = jax.tree.map(lambda x: x[np.array([0, 2])], sim.class_statistics(random_start))
    want = sim.plan.with_class_means_head(random_start, class_means.combine(others))
    _assert_close(_initial_params(grid), want)
    assert result.metrics[0]["participants"] == [0, 1, 2]  # statistics refused, its updates are not


def test_a_hostile_covariance_is_refused(tmp_path):
    _, settings = _settings(tmp_path / "out", **{"head-init": "lda", "head-init-examples": 8})
    fed, sim = _reference(settings)
    fingerprint = fed.backbone.fingerprint
    template = dict(fed.plan.class_statistics_template()._asdict())
    limit = common.message_limit(template, kind=class_means.STATISTICS_KIND, fingerprint=fingerprint)
    honest = jax.tree.map(lambda x: np.asarray(x[0]), sim.class_statistics(sim.plan.init_params()))
    check = lambda tree: server_app.check_class_statistics(
        codec.encode(tree, kind=class_means.STATISTICS_KIND, fingerprint=fingerprint), template,
        fingerprint=fingerprint, limit=limit, max_examples=8)
    check(dict(honest._asdict()))  # what a node sends passes
    scatter = honest.scatter
    asymmetric, shifted, large = scatter.copy(), scatter.copy(), scatter.copy()
    asymmetric[0, 1] += 10.0
    shifted[0, 0] += 10.0
    large[0, 1] = large[1, 0] = 10 * np.sqrt(scatter[0, 0] * scatter[1, 1]) + 1.0
    for bad, reason in ((asymmetric, "bad covariance: not symmetric"), (shifted, "covariance's trace"),
                        (large, "larger than its variances allow")):
        with pytest.raises(WireError, match=reason):
            check({**honest._asdict(), "scatter": bad})


def test_without_any_valid_class_statistics_the_run_fails_clearly(tmp_path, flower_task):
    overrides, settings = _settings(tmp_path / "out", rounds=1, **CLASS_MEANS)
    grid = InProcessGrid(_app_config(overrides), NODES)

    def tamper(client, reply):  # client 0 never answers, the others send negative squared norms
        if reply.metadata.message_type != STATISTICS_QUERY:
            return reply
        return None if client == 0 else _with_statistics(grid, reply, lambda t: _set(t, "squares", 0, -1.0))

    grid.tamper = tamper
    with pytest.raises(common.FederationError, match=r"no client sent valid class statistics.*3 asked, 2 refused "
                                                     r"\(bad squared norms: 2\), 1 without an answer"):
        server_app.run_federation(grid, settings, log=lambda text: None)
    assert not any(m.metadata.message_type == "train" for m in grid.sent)


def test_a_reply_over_the_message_limit_is_a_counted_rejection(tmp_path, flower_task):
    overrides, settings = _settings(tmp_path / "out", rounds=1)
    grid = InProcessGrid(_app_config(overrides), NODES)
    fed = common.build_federation(settings, common.load_run_backbone(settings))
    fingerprint = fed.backbone.fingerprint
    limit = common.message_limit(fed.plan.update_template(fed.template_rows()), kind=rounds.UPDATE_KIND, round=0,
                                 fingerprint=fingerprint)
    sizes = {}

    def padded(reply, total):
        """The reply's update with meta padding to ``total`` bytes (a valid update, just large)."""
        update = codec.decode(reply.content.config_records[common.RECORD]["update"])
        blob = lambda n: codec.encode(update.tree, kind=update.kind, round=update.round,
                                      fingerprint=update.fingerprint, meta={"pad": b"\0" * n})
        n = total - len(blob(0))
        while len(data := blob(n)) != total:  # the blob's own length header grows with it
            n -= len(data) - total
        sizes[len(data)] = True
        record = {**reply.content.config_records[common.RECORD], "update": data}  # its binding kept
        content = RecordDict({common.RECORD: ConfigRecord(record),
                              common.METRICS: reply.content.metric_records[common.METRICS]})
        return Message(content, reply_to=_sent(grid, reply))

    def tamper(client, reply):
        if reply.metadata.message_type == "train" and client < 2:
            honest = len(reply.content.config_records[common.RECORD]["update"])
            assert limit == 2 * honest + common.MESSAGE_SLACK  # an honest update is the template's size
            return padded(reply, limit + 1 if client == 0 else limit)
        return reply

    grid.tamper = tamper
    (line,) = server_app.run_federation(grid, settings, log=lambda text: None).metrics
    assert sorted(sizes) == [limit, limit + 1]
    assert line["participants"] == [1, 2] and line["rejections"] == {server_app.OVER_LIMIT: 1}
    # The class statistics have their own limit, from their template: one byte more is refused.
    template = dict(fed.plan.class_statistics_template()._asdict())
    kwargs = {"kind": class_means.STATISTICS_KIND, "fingerprint": fingerprint}
    stats_limit = common.message_limit(template, **kwargs)
    zeros = jax.tree.map(lambda t: np.zeros(t.shape, t.dtype), template)
    big = codec.encode(zeros, meta={"pad": b"\0" * stats_limit}, **kwargs)
    with pytest.raises(WireError, match=server_app.OVER_LIMIT):
        server_app.check_class_statistics(big, template, fingerprint=fingerprint, limit=stats_limit, max_examples=8)


# -- each SuperNode its own data; a server that holds none -------------------------------------

LABELS = ("neg", "neu", "pos")
NODE_RUN = {**RUN, "synthetic-examples": 0, "node-data": True, "label-names": ",".join(LABELS), "rounds": 2,
            "eval-examples": ""}


def _texts(rng, count):
    """Word-level texts ("w3".."w99") labelled by their first word: a learnable toy task."""
    ids = rng.integers(3, 100, (count, 6))
    return [(" ".join(f"w{i}" for i in row), LABELS[row[0] % 3]) for row in ids]


@pytest.fixture(scope="module")
def node_files(tmp_path_factory):
    """The tiny BERT with a word-level tokenizer, each node's own JSONL file, node 1's held-out
    CSV file and the server operator's held-out JSONL file.

    The largest node has as many rows as the largest client of RUN's demo partition: its client
    update and the simulation's block of clients are then the very programs the tests above
    compiled (one XLA cache per test session), which keeps these tests fast."""
    root = tmp_path_factory.mktemp("node-data")
    _, demo = _settings(root / "demo")
    sizes = (common.build_federation(demo, common.load_run_backbone(demo)).capacity, 9, 6)
    rng = np.random.default_rng(7)
    train = []
    for i, size in enumerate(sizes):
        train.append(root / f"node-{i}.jsonl")
        train[-1].write_text("".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in _texts(rng, size)))
    held_out = root / "node-1-test.csv"
    held_out.write_text("text,label\n" + "".join(f"{t},{y}\n" for t, y in _texts(rng, 7)))
    server_test = root / "server-test.jsonl"
    server_test.write_text("".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in _texts(rng, 10)))
    return {"backbone": with_word_tokenizer(FIXTURES / "bert", root / "bert"), "train": train, "sizes": sizes,
            "node_test": {1: held_out}, "server_test": server_test}


def _node_run(out: Path, files, **extra) -> tuple[InProcessGrid, common.FlowerSettings]:
    """A run whose nodes read their own files (node 1 evaluates on its own held-out file)."""
    overrides = {**NODE_RUN, "backbone": str(files["backbone"]), "out": str(out),
                 "node-capacity": max(files["sizes"]), **extra}
    config = _app_config(overrides)
    assert len(config) == len(_app_config({})), "flwr run refuses keys the app's config does not have"

    def node_config(i):
        test = files["node_test"].get(i)
        return {"data-path": str(files["train"][i]), **({"test-path": str(test)} if test else {})}

    return InProcessGrid(config, NODES, node_config), common.settings_from_run_config(config)


def _encoded_file(settings, backbone, path):
    cfg = settings.run
    return loading.encode_dataset(backbone, datasets.load_text_file(path, label_names=LABELS), cfg.max_length,
                                  cfg.num_virtual_tokens)


def _node_simulation(settings, files):
    """The simulation of the same per-client rows as a node-data run: each node's file, stacked
    and padded to the largest; its plan, the rows, the engine and the server's test rows."""
    plan = common.build_federation(settings, common.load_run_backbone(settings)).plan
    rows = [_encoded_file(settings, plan.backbone, path) for path in files["train"]]
    columns = {name: np.concatenate([r[name] for r in rows]) for name in rows[0]}
    bounds = np.cumsum([0, *files["sizes"]])
    parts = [np.arange(a, b) for a, b in zip(bounds[:-1], bounds[1:])]
    sim = FederatedSimulation(plan, build_client_data(columns, parts, len(LABELS)))
    return plan, rows, sim, _encoded_file(settings, plan.backbone, files["server_test"])


def test_nodes_with_their_own_files_and_a_server_without_data_equal_the_simulation(
        tmp_path, flower_task, node_files, monkeypatch):
    def no_shared_data(*args, **kwargs):
        raise AssertionError("no one loads or partitions a shared data set")

    monkeypatch.setattr(loading, "load_data", no_shared_data)
    monkeypatch.setattr(loading, "partition_clients", no_shared_data)
    grid, settings = _node_run(tmp_path / "out", node_files, **{"test-data": str(node_files["server_test"]),
                                                                "federated-eval": True})
    result = server_app.run_federation(grid, settings, log=lambda text: None)

    plan, rows, sim, test = _node_simulation(settings, node_files)
    state, _, expected = run_rounds(sim, settings.run.rounds, test)
    _assert_close(result.state.server.params, state.server.params)
    for got, want in zip(result.metrics, expected, strict=True):
        for key in ("participants", "clients", "bytes_up", "bytes_down"):
            assert got[key] == want[key], key
        np.testing.assert_allclose(got["eval_accuracy"], want["eval_accuracy"], atol=1e-6)
        np.testing.assert_allclose(got["train_loss"], want["train_loss"], rtol=1e-4)
    assert result.summary["client_sizes"] == list(node_files["sizes"])

    # Federated evaluation: each node's own evaluation (node 1 on its held-out file), weighted by its count.
    node_rows = [rows[0], _encoded_file(settings, plan.backbone, node_files["node_test"][1]), rows[2]]
    own = [plan.evaluate(result.state.server.params, r) for r in node_rows]
    counts = np.array([len(r["labels"]) for r in node_rows])
    last = result.metrics[-1]
    assert last["federated_eval_clients"] == NODES and last["federated_eval_examples"] == counts.sum()
    for key in ("accuracy", "loss"):
        want = np.sum([m[f"eval_{key}"] * n for m, n in zip(own, counts)]) / counts.sum()
        np.testing.assert_allclose(last[f"federated_eval_{key}"], want, rtol=1e-5)
    assert result.summary["final_federated_accuracy"] == last["federated_eval_accuracy"]
    lines = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [line["federated_eval_accuracy"] for line in lines] == [m["federated_eval_accuracy"] for m in result.metrics]


def _with_metrics(grid: InProcessGrid, reply: Message, **changes) -> Message:
    """The reply with some of its metrics replaced (what a lying node sends)."""
    content = reply.content
    metrics = MetricRecord({**dict(content.metric_records[common.METRICS]), **changes})
    records = {name: record for name, record in content.config_records.items()}
    return Message(RecordDict({**records, common.METRICS: metrics}), reply_to=_sent(grid, reply))


@pytest.mark.parametrize("weighting", ["reported", "uniform"])
def test_reported_counts_are_capped_uniform_weighs_equally_and_bad_counts_are_rejections(
        tmp_path, flower_task, node_files, weighting):
    cap = 10
    grid, settings = _node_run(tmp_path / "out", node_files, rounds=1, **{
        "client-weighting": weighting, "max-client-examples": cap, "federated-eval": True})
    bad_count = -3 if weighting == "reported" else 2.5
    deltas, evaluations = {}, {}

    def tamper(client, reply):
        kind = reply.metadata.message_type
        if kind == "train":
            deltas[client] = codec.decode(reply.content.config_records[common.RECORD]["update"]).tree["delta"]
            if client == 0:  # claims 10^9 examples (it has more than the cap, not that many)
                return _with_metrics(grid, reply, **{"num-examples": 10**9})
            if client == 1:
                return _with_metrics(grid, reply, **{"num-examples": bad_count})
        if kind == "evaluate":
            metrics = reply.content.metric_records[common.METRICS]
            evaluations[client] = (metrics["eval-accuracy"], metrics["num-examples"])
            if client == 0:
                return _with_metrics(grid, reply, **{"num-examples": 10**9})
            if client == 1:
                return _with_metrics(grid, reply, **{"eval-accuracy": 1.5})
        return reply

    grid.tamper = tamper
    result = server_app.run_federation(grid, settings, log=lambda text: None)
    (line,) = result.metrics
    assert line["participants"] == [0, 2] and line["rejections"] == {"bad example count": 1}
    assert line["eval_accuracy"] is None  # the server holds no test set

    # FedAvg (server lr 1): the new global is the initial one plus the weighted mean of the deltas.
    weights = {0: cap, 2: node_files["sizes"][2]} if weighting == "reported" else {0: 1, 2: 1}
    initial = jax.device_get(common.build_federation(settings, common.load_run_backbone(settings)).plan.init().params)
    total = sum(weights.values())
    want = jax.tree.map(lambda p, a, b: p + (weights[0] * a.astype(np.float64) + weights[2] * b) / total,
                        initial, deltas[0], deltas[2])
    _assert_close(result.state.server.params, want)
    # The evaluations: client 1's accuracy of 1.5 is refused, client 0 counts at most the cap.
    assert line["federated_eval_rejected"] == 1 and line["federated_eval_clients"] == 2
    assert line["federated_eval_examples"] == cap + evaluations[2][1]
    eval_weights = {0: cap, 2: evaluations[2][1]} if weighting == "reported" else {0: 1, 2: 1}
    np.testing.assert_allclose(line["federated_eval_accuracy"], sum(
        eval_weights[c] * evaluations[c][0] for c in (0, 2)) / sum(eval_weights.values()), rtol=1e-6)


def test_node_data_settings_and_a_node_whose_file_has_an_unknown_label(tmp_path, flower_task, node_files):
    with pytest.raises(ConfigError, match="node-data needs label-names"):
        common.settings_from_run_config(_app_config({"node-data": True}))
    with pytest.raises(ConfigError, match="unset data"):
        common.settings_from_run_config(_app_config({"node-data": True, "label-names": "a,b",
                                                     "data": str(node_files["server_test"])}))
    with pytest.raises(ConfigError, match="label-names must be distinct"):
        common.settings_from_run_config(_app_config({"node-data": True, "label-names": "a,a"}))
    with pytest.raises(ConfigError, match="client-weighting must be one of"):
        common.settings_from_run_config(_app_config({"client-weighting": "claimed"}))
    with pytest.raises(ConfigError, match="max-client-examples must be >= 1"):
        common.settings_from_run_config(_app_config({"max-client-examples": 0}))
    bad = tmp_path / "node-2.jsonl"
    bad.write_text(json.dumps({"text": "w3 w4", "label": "neg"}) + "\n" + json.dumps({"text": "w5", "label": "bird"}))
    files = {**node_files, "train": [*node_files["train"][:2], bad]}
    grid, settings = _node_run(tmp_path / "out", files)
    assert settings.label_names == LABELS and settings.test_data is None
    fed = common.build_federation(settings, common.load_run_backbone(settings))
    assert fed.test_set() is None and fed.client_sizes is None
    with pytest.raises(common.FederationError, match=rf"{bad}, line 2: label 'bird' is not in"):
        fed.node_rows(common.node_settings(grid.contexts[1002].node_config))
    with pytest.raises(common.FederationError, match="node-data = true: start this SuperNode with"):
        common.check_node(settings, common.node_settings({"partition-id": 0}))
    # The bad node fails its hello (an error reply naming the file and the label) and is left out.
    logs = []
    nodes = server_app.NodeDirectory(grid, fed.backbone.fingerprint, NODES, log=logs.append)
    nodes.refresh(timeout=10)
    assert sorted(nodes.node_of) == [0, 1] and nodes.examples == dict(enumerate(node_files["sizes"][:2]))
    assert any("could not say which client" in text and str(bad) in text and "'bird'" in text for text in logs)


# -- a hostile client costs the round one client, never the server -------------------------------

ATTACK = 1e6
BOUND = 0.5


def _with_record(grid: InProcessGrid, reply: Message, **fields) -> Message:
    """A train reply with fields of its record replaced (its update, its binding), metrics kept."""
    record = dict(reply.content.config_records[common.RECORD])
    content = RecordDict({common.RECORD: ConfigRecord({**record, **fields}),
                          common.METRICS: reply.content.metric_records[common.METRICS]})
    return Message(content, reply_to=_sent(grid, reply))


def _container_bomb(limit: int, fingerprint: str, round_index: int) -> bytes:
    """A well-formed update message whose tree is a list of empty msgpack maps, ``limit - 1`` bytes
    long: decoded (it is not over the limit) into about ``limit`` Python dicts."""
    encode = lambda n: codec.encode({"delta": [{}] * n}, kind=rounds.UPDATE_KIND, round=round_index,
                                    fingerprint=fingerprint)
    n = limit - 1 - (len(encode(100)) - 100)
    while len(data := encode(n)) != limit - 1:
        n -= len(data) - (limit - 1)
    return data


def test_a_1e6_attacker_is_clipped_and_a_container_bomb_refused_alike_deployed_and_simulated(
        tmp_path, flower_task, monkeypatch):
    """Round 1: client 0 sends values of 1e6, client 1 a message of empty maps just under the
    message limit. The ServerApp clips client 0 to the bound (the plan's stage, the simulation's
    very numbers), refuses client 1 (counted) and decodes it within a small multiple of its size."""
    import tracemalloc

    overrides, settings = _settings(tmp_path / "out", rounds=1, **{"update-clip": BOUND})
    grid = InProcessGrid(_app_config(overrides), NODES)
    fed = common.build_federation(settings, common.load_run_backbone(settings))
    fingerprint = fed.backbone.fingerprint
    template = fed.plan.update_template(fed.template_rows())
    limit = common.message_limit(template, kind=rounds.UPDATE_KIND, round=0, fingerprint=fingerprint)
    objects = common.object_limit(template, kind=rounds.UPDATE_KIND, round=0, fingerprint=fingerprint)
    attacker = codec.encode({"delta": jax.tree.map(lambda t: np.full(t.shape, ATTACK, np.float32), template["delta"])},
                            kind=rounds.UPDATE_KIND, round=0, fingerprint=fingerprint)
    bomb = _container_bomb(limit, fingerprint, 0)
    hostile = {0: attacker, 1: bomb}
    grid.tamper = lambda client, reply: (_with_record(grid, reply, update=hostile[client])
                                         if reply.metadata.message_type == "train" and client in hostile else reply)
    peaks = []
    receive = rounds.receive_updates

    def measured(messages, **kwargs):  # the server's decode and validation of the round's replies
        tracemalloc.start()
        try:
            return receive(messages, **kwargs)
        finally:
            peaks.append(tracemalloc.get_traced_memory()[1])
            tracemalloc.stop()

    monkeypatch.setattr(rounds, "receive_updates", measured)
    result = server_app.run_federation(grid, settings, log=lambda text: None)
    monkeypatch.setattr(rounds, "receive_updates", receive)
    (line,) = result.metrics
    assert line["participants"] == [0, 2] and line["rejections"] == {"too many msgpack objects": 1}
    assert line["update_clip"] == BOUND and line["clipped"] >= 1
    # The memory of decoding the round's three replies, the bomb's included: a few times the
    # bomb (without the template's object limit, msgpack would build ~6,000 dicts: ~140x).
    (peak,) = peaks
    assert len(bomb) == limit - 1 and codec.object_count(bomb) > 10 * objects
    assert peak <= 4 * len(bomb), (peak, len(bomb))
    print(f"container bomb of {len(bomb)} bytes: decode peak {peak} bytes (x{peak / len(bomb):.1f})")

    # The simulation's server round on the same messages: the same numbers.
    _, sim = _reference(settings)
    state, controls = sim.init()
    ids, _ = sim.sample(0)
    host = jax.device_get(sim.train_clients(state, controls, ids, 0))
    messages = [hostile.get(int(client)) or codec.encode(
        client_message(jax.tree.map(lambda x, s=slot: x[s], host), False), kind=rounds.UPDATE_KIND, round=0,
        fingerprint=fingerprint) for slot, client in enumerate(ids)]
    received = receive(messages, round_index=0, fingerprint=fingerprint, template=template, max_bytes=limit,
                       max_objects=objects)
    sizes = sim.client_data.sizes[ids]
    expected, outcome = sim.plan.server.apply(state, received, sizes, key=sim.plan.keys.round_noise(0),
                                              participants=ids)
    _assert_close(result.state.server.params, expected.server.params)
    assert outcome.metrics["clipped"] == line["clipped"] and received.rejections == line["rejections"]
    # FedAvg moves by sum_i share_i clip(delta_i): the attacker's term has norm BOUND x its share.
    def flat(tree):
        return np.concatenate([np.asarray(x, np.float64).ravel() for x in jax.tree.leaves(tree)])

    weights = np.where(received.accepted, sizes, 0)
    share = weights / weights.sum()
    slot = {int(client): s for s, client in enumerate(ids)}
    delta = flat(jax.tree.map(lambda x: x[slot[2]], host.delta))
    honest = share[slot[2]] * delta * min(1.0, BOUND / np.linalg.norm(delta))
    move = flat(result.state.server.params) - flat(state.server.params)
    np.testing.assert_allclose(np.linalg.norm(move - honest), BOUND * share[slot[0]], rtol=1e-4)
    assert np.linalg.norm(move) <= BOUND * (1 + 1e-6)


def test_a_replayed_or_readdressed_update_is_a_counted_rejection(tmp_path, flower_task):
    """Every train message carries a fresh nonce; a reply must echo it with its round and the
    client the message went to. Round 1: client 2 answers as client 1 (another client's binding).
    Round 2: client 0 re-sends its round-1 update re-headed for round 2 with its round-1 binding
    (another round), client 1 the same with round 2's number but round 1's nonce (another
    nonce); client 2's honest reply is accepted. The content of all of them is valid."""
    overrides, settings = _settings(tmp_path / "out", rounds=2)
    grid = InProcessGrid(_app_config(overrides), NODES)
    first: dict[int, dict] = {}

    def rehead(record, round_index):
        old = codec.decode(record["update"])
        return codec.encode(old.tree, kind=old.kind, round=round_index, fingerprint=old.fingerprint)

    def tamper(client, reply):
        if reply.metadata.message_type != "train":
            return reply
        record = dict(reply.content.config_records[common.RECORD])
        if reply.metadata.group_id == "0":
            first[client] = record
            return _with_record(grid, reply, **{"client-id": 1}) if client == 2 else reply
        if client == 0:  # its own old update and binding, re-headed for this round
            return _with_record(grid, reply, update=rehead(first[0], 1), round=0, nonce=first[0]["nonce"])
        if client == 1:  # this round's number, last round's nonce
            return _with_record(grid, reply, update=rehead(first[1], 1), nonce=first[1]["nonce"])
        return reply

    grid.tamper = tamper
    result = server_app.run_federation(grid, settings, log=lambda text: None)
    sent = [m for m in grid.sent if m.metadata.message_type == "train"]
    nonces = {m.metadata.group_id: m.content.config_records[common.RECORD]["nonce"] for m in sent}
    assert len(set(nonces.values())) == 2 and all(len(n) == common.NONCE_BYTES for n in nonces.values())
    one, two = result.metrics
    assert one["participants"] == [0, 1] and one["rejections"] == {"update bound to another client": 1}
    assert two["participants"] == [2]
    assert two["rejections"] == {"update bound to another round": 1, "update bound to another nonce": 1}
    fed, sim = _reference(settings)
    _assert_close(result.state.params, _replay(fed, sim, result.metrics, settings).params)
    # The binding check on its own: exactly what was sent passes.
    binding = common.update_binding(1, 2, nonces["1"])
    common.check_binding(binding, round_index=1, client_id=2, nonce=nonces["1"])
    with pytest.raises(WireError, match="without its binding"):
        common.check_binding({**binding, "nonce": b"short"}, round_index=1, client_id=2, nonce=nonces["1"])


def test_replayed_evaluations_and_class_statistics_are_refused(tmp_path, flower_task, node_files):
    """Evaluation and class-statistics replies are bound to their message as updates are:
    client 1 re-sends its round-1 evaluation (that round's binding) in round 2, client 2 answers
    the class-statistics query with another nonce; both are refused and counted, the rest is
    used."""
    grid, settings = _node_run(tmp_path / "out", node_files, rounds=2, **{"federated-eval": True}, **CLASS_MEANS)
    first: dict[int, Message] = {}

    def tamper(client, reply):
        kind = reply.metadata.message_type
        if kind == STATISTICS_QUERY and client == 2:
            record = {**reply.content.config_records[common.RECORD], "nonce": bytes(common.NONCE_BYTES)}
            return Message(RecordDict({common.RECORD: ConfigRecord(record)}), reply_to=_sent(grid, reply))
        if kind == "evaluate" and client == 1:
            if reply.metadata.group_id == "0":
                first[client] = reply
            else:  # last round's evaluation and binding, replayed
                old = first[client].content
                return Message(RecordDict({name: record for name, record in {**old.config_records,
                                                                          **old.metric_records}.items()}),
                               reply_to=_sent(grid, reply))
        return reply

    grid.tamper = tamper
    result = server_app.run_federation(grid, settings, log=lambda text: None)
    setup = result.summary["setup"]
    assert setup["contributors"] == [0, 1] and setup["rejections"] == {"update bound to another nonce": 1}
    one, two = result.metrics
    assert one["federated_eval_rejected"] == 0 and one["federated_eval_clients"] == NODES
    assert two["federated_eval_rejected"] == 1 and two["federated_eval_clients"] == NODES - 1


@pytest.fixture(scope="module")
def instruction_files(tmp_path_factory):
    """The tiny GPT-2 with a word-level tokenizer and a grouped instruction set (tests/test_generate_task.py's)."""
    from test_generate_task import _rows

    root = tmp_path_factory.mktemp("instructions")
    rng = np.random.default_rng(1)
    paths = {}
    for name, n in (("train", 60), ("test", 12)):
        paths[name] = root / f"{name}.jsonl"
        paths[name].write_text("".join(json.dumps(r) + "\n" for r in _rows(rng, n)))
    return {"backbone": with_word_tokenizer(FIXTURES / "gpt2", root / "gpt2"), **paths}


def generative_settings(out: Path, files, **extra) -> tuple[dict, common.FlowerSettings]:
    """A 2-round `task = "generate"` run on :func:`instruction_files` (the demo partition of its train file)."""
    return _settings(out, backbone=str(files["backbone"]), data=str(files["train"]), **{
        "test-data": str(files["test"]), "synthetic-examples": 0, "task": "generate", "label-key": "category",
        "max-length": 10, "max-new-tokens": 3, "generate-examples": 4, "eval-examples": 12, "rounds": 2, **extra})


GENERATIVE = {
    "prompt": {}, "zo": {"method": "zo"}, "prefix-int8-trimmed-mean": {"method": "prefix", "compress": "int8",
                                                                     "aggregator": "trimmed_mean", "trim-beta": 0.34},
    "central-dp": {"dp": "central", "dp-clip": 0.05, "dp-noise-multiplier": 0.0},
}


@pytest.mark.parametrize("name", sorted(GENERATIVE))
def test_a_generative_task_deployed_equals_the_simulation(tmp_path, flower_task, instruction_files, name):
    method = GENERATIVE[name].get("method", "prompt")
    overrides, settings = generative_settings(tmp_path / "out", instruction_files,
                                              **{"update-clip": 0.2, **GENERATIVE[name]})
    grid = InProcessGrid(_app_config(overrides), NODES)
    result = server_app.run_federation(grid, settings, log=lambda text: None)
    fed, sim = _reference(settings)
    state, _, expected = run_rounds(sim, settings.run.rounds, fed.test_set())
    _assert_close(result.state.params, state.params, atol=1e-4 if method == "zo" else 1e-5)
    for got, want in zip(result.metrics, expected, strict=True):
        np.testing.assert_allclose(got["eval_loss"], want["eval_loss"], rtol=1e-4)
        np.testing.assert_allclose(got["eval_perplexity"], want["eval_perplexity"], rtol=1e-4)
    reference = generation_summary(settings.run, fed.plan, fed.plan.trainable(state.params), fed.test_examples)
    summary = result.summary
    assert summary["generation"]["samples"] == reference["generation"]["samples"]
    assert (summary["final_exact_match"], summary["final_rouge_l"]) == pytest.approx(
        (reference["final_exact_match"], reference["final_rouge_l"]))
    assert artifact.load_prompt(tmp_path / "out" / "prompt.fpp").task.type == "causal_lm"


def test_the_server_app_never_destroys_a_run_it_did_not_make(tmp_path, flower_task):
    """A ServerApp whose out folder holds a finished run refuses before loading anything and
    leaves every file as it was; with overwrite it replaces the run."""
    from fedprompt.errors import RunFolderError

    out = tmp_path / "out"
    overrides, settings = _settings(out, rounds=1)
    server_app.run_federation(InProcessGrid(_app_config(overrides), NODES), settings, log=lambda text: None)
    before = {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.is_file()}
    assert "metrics.jsonl" in before and "summary.json" in before
    with pytest.raises(RunFolderError, match="overwrite"):
        server_app.run_federation(InProcessGrid(_app_config(overrides), NODES), settings, log=lambda text: None)
    assert {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.is_file()} == before
    overrides, settings = _settings(out, rounds=2, overwrite=True)
    result = server_app.run_federation(InProcessGrid(_app_config(overrides), NODES), settings, log=lambda text: None)
    assert [m["round"] for m in result.metrics] == [1, 2]
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2
