"""The Flower apps over TLS with SuperNode authentication, and clients bound to node keys.

In this process: the credentials command (``python -m fedprompt.flower.credentials``) writes
what Flower's own loaders read and a certificate Python's TLS verifies for exactly its names;
the ``client-keys`` setting is read and checked like every run-config setting; and the
ServerApp, through test_flower.py's in-process grid with node keys, leaves out every node that
is not the key bound to the client it claims, and equals the simulation of the clients that
took part.

On a loopback deployment (one SuperLink with ``--ssl-*`` and ``--enable-supernode-auth``, shared
by this module's deployed tests, and its SuperNodes, all on 127.0.0.1; every process killed in
a ``finally`` block): the credentials come from the command itself, the clients' keys are
registered with ``flwr supernode register``, and one ``flwr run`` (two rounds, with
``client-keys``) serves three checks: (a) it equals the in-process simulation; (b) a SuperNode
whose key was never registered is refused by the SuperLink and takes no part; (c) a registered
node whose key is bound to no client, started with client 0's partition id, is left out by the
binding (logged and counted) and is sent nothing. A second ``flwr run`` on the same deployment
is the protected one of the README's walk-through: TLS, authenticated nodes and ``client-keys``,
each client's node restarted with its own data file (``node-data``, a server without training
data), secure aggregation and central DP; (d) it equals the in-process simulation of the same
per-client rows (noise multiplier 0, so the comparison is exact; the noise's scale and source
are checked in test_flower.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import signal
import ssl
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from flwr.cli.supernode.register import try_load_public_key
from flwr.proto.node_pb2 import NodeInfo
from flwr.supercore.primitives.asymmetric import generate_key_pairs, public_key_to_bytes
from flwr.supernode.cli.flower_supernode import _try_setup_client_authentication
from test_flower import (APP, BIN, NODE_RUN, NODES, RUN, InProcessGrid, _app_config, _assert_close, _node_simulation,
                         _read_run, _reference, _replay, _settings, flower_task,  # noqa: F401 - fixtures of
                         node_files)  # this module too
from test_flower_deployment import jax_cache  # noqa: F401 - a fixture

from fedprompt.errors import ConfigError
from fedprompt.flower import common, credentials, server_app
from fedprompt.flower.credentials import key_fingerprint
from fedprompt.flower.loopback import LoopbackDeployment
from fedprompt.simulation.engine import run_rounds

IMPOSTOR = NODES
"""Key ``node-3``: registered at the SuperLink, bound to no client; its node says it is client 0."""

UNREGISTERED = NODES + 1
"""Key ``node-4``: never registered; its node says it is client 1."""


# -- the credentials command ---------------------------------------------------------------------

def _handshake(creds: Path, server_name: str, ca: Path | None = None) -> None:
    """A TLS handshake in memory: the SuperLink's certificate and key against a client that
    trusts only ``ca`` (default: the credentials' own CA), verifies ``server_name`` and applies
    strict X.509 checks. Raises ``ssl.SSLCertVerificationError`` when the client refuses."""
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(creds / "superlink.pem", creds / "superlink.key")
    client = ssl.create_default_context(cafile=str(ca or creds / "ca.pem"))
    client.verify_flags |= ssl.VERIFY_X509_STRICT
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    ends = [client.wrap_bio(c_in, c_out, server_hostname=server_name),
            server.wrap_bio(s_in, s_out, server_side=True)]
    done = [False, False]
    for _ in range(10):
        for i, end in enumerate(ends):
            if not done[i]:
                try:
                    end.do_handshake()
                    done[i] = True
                except ssl.SSLWantReadError:
                    pass
        s_in.write(c_out.read())
        c_in.write(s_out.read())
        if all(done):
            return
    raise AssertionError("the handshake did not complete")


def test_credentials_command_writes_what_flower_reads_and_a_certificate_for_exactly_its_names(tmp_path, capsys):
    out = tmp_path / "creds"
    assert credentials.main([str(out), "--nodes", "2", "--host", "superlink.example.org", "--host", "10.0.0.7"]) == 0
    printed = capsys.readouterr().out
    names = sorted(path.name for path in out.iterdir())
    assert names == ["ca.key", "ca.pem", "client-keys.txt", "node-0.key", "node-0.pub", "node-1.key", "node-1.pub",
                     "superlink.key", "superlink.pem"]
    for name in ("ca.key", "superlink.key", "node-0.key", "node-1.key"):  # private keys: the owner's alone
        assert (out / name).stat().st_mode & 0o777 == 0o600, name

    # The SuperLink's certificate: signed by the CA, for localhost, 127.0.0.1 and each --host only.
    ca = x509.load_pem_x509_certificate((out / "ca.pem").read_bytes())
    cert = x509.load_pem_x509_certificate((out / "superlink.pem").read_bytes())
    cert.verify_directly_issued_by(ca)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost", "superlink.example.org"]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1", "10.0.0.7"]
    for name in ("localhost", "127.0.0.1", "superlink.example.org", "10.0.0.7"):
        _handshake(out, name)
    with pytest.raises(ssl.SSLCertVerificationError):
        _handshake(out, "other.example.org")
    other = tmp_path / "other"
    credentials.write_credentials(other, 1)
    with pytest.raises(ssl.SSLCertVerificationError):  # another CA's certificate is not this one's
        _handshake(out, "localhost", ca=other / "ca.pem")

    # The node keys, through Flower 1.42's own loaders: the private key of flower-supernode
    # --auth-supernode-private-key, the public key of flwr supernode register (P-384), and the
    # fingerprints of client-keys.txt are those of the PEM the SuperLink reports to the ServerApp.
    line = (out / credentials.CLIENT_KEYS_FILE).read_text().strip()
    assert f"client-keys ({credentials.CLIENT_KEYS_FILE}): {line}" in printed
    bindings = common.parse_client_keys(line)
    for i in range(2):
        private, public = _try_setup_client_authentication(argparse.Namespace(
            auth_supernode_private_key=str(out / f"node-{i}.key"), auth_supernode_public_key=None))
        assert isinstance(private, ec.EllipticCurvePrivateKey) and private.curve.name == "secp384r1"
        registered = try_load_public_key(out / f"node-{i}.pub")
        assert registered == public_key_to_bytes(public)
        assert bindings[i] == key_fingerprint(registered) == key_fingerprint((out / f"node-{i}.pub").read_bytes())
    assert bindings.keys() == {0, 1} and bindings[0] != bindings[1]


def test_credentials_command_refuses_bad_input_and_overwrites_only_when_asked(tmp_path, capsys):
    out = tmp_path / "creds"
    for argv, error in [
        (["--nodes", "0"], "--nodes must be an int >= 1, got 0"),
        (["--nodes", "2", "--host", "https://superlink:9093"], "--host must be an IP address or a DNS name"),
        (["--nodes", "2", "--host", "bad_name.org"], "--host must be an IP address or a DNS name"),
        (["--nodes", "2", "--days", "0"], "--days must be an int >= 1"),
    ]:
        assert credentials.main([str(out), *argv]) == 2
        err = capsys.readouterr().err
        assert err.startswith("fedprompt: error: ") and error in err and err.count("\n") == 1
    assert not out.exists()  # nothing written for bad input

    assert credentials.main([str(out), "--nodes", "1"]) == 0
    before = {path.name: path.read_bytes() for path in out.iterdir()}
    capsys.readouterr()
    assert credentials.main([str(out), "--nodes", "1"]) == 2
    assert "already holds files" in capsys.readouterr().err
    assert {path.name: path.read_bytes() for path in out.iterdir()} == before  # untouched
    (out / "notes.txt").write_text("kept")
    assert credentials.main([str(out), "--nodes", "1", "--overwrite"]) == 0
    after = {path.name: path.read_bytes() for path in out.iterdir()}
    assert after.pop("notes.txt") == b"kept" and after.keys() == before.keys()
    assert all(after[name] != before[name] for name in before)  # every credential is new
    assert (out / "node-0.key").stat().st_mode & 0o777 == 0o600
    afile = tmp_path / "a-file"
    afile.write_text("")
    assert credentials.main([str(afile), "--nodes", "1"]) == 2
    assert "is not a directory" in capsys.readouterr().err


# -- the client-keys setting ---------------------------------------------------------------------

def _fingerprints(n: int) -> list[str]:
    return [key_fingerprint(generate_key_pairs()[1]) for _ in range(n)]


def test_client_keys_are_read_and_checked_like_every_run_config_setting():
    fp = _fingerprints(3)
    settings = common.settings_from_run_config(_app_config({**RUN, "client-keys": f"0={fp[0]}, 1={fp[1]},2={fp[2]}"}))
    assert settings.client_keys == ((0, fp[0]), (1, fp[1]), (2, fp[2]))
    hash(settings)  # the ClientApp caches what it builds by the settings
    assert common.settings_from_run_config(_app_config(RUN)).client_keys == ()
    partial = common.settings_from_run_config(_app_config({**RUN, "min-nodes": 1, "client-keys": f"2={fp[2]}"}))
    assert partial.client_keys == ((2, fp[2]),)
    for value, error in [
        (3, "client-keys must be a string"),
        ("0=SHA256:short", "client-keys entries must be <client id>=SHA256:"),
        (f"zero={fp[0]}", "client-keys entries must be"),
        (f"0={fp[0]},", "client-keys entries must be"),
        (f"0={fp[0]},0={fp[1]}", "client-keys names client 0 twice"),
        (f"0={fp[0]},1={fp[0]}", "client-keys binds one key to two clients"),
        (f"0={fp[0]},1={fp[1]},3={fp[2]}", "client-keys binds client 3, not a client of a run with 3 clients"),
        (f"0={fp[0]}", r"client-keys binds 1 clients, the run needs 3 \(min-nodes"),
    ]:
        with pytest.raises(ConfigError, match=error):
            common.settings_from_run_config(_app_config({**RUN, "client-keys": value}))


class KeyedGrid(InProcessGrid):
    """The in-process grid whose nodes hold authentication keys: ``get_nodes`` reports each
    online node's public key as the SuperLink does (PEM; empty for a node without one).
    ``offline``: node ids the SuperLink does not list (stopped nodes)."""

    def __init__(self, run_config: dict, nodes: int, node_config, public_keys: dict[int, bytes]):
        super().__init__(run_config, nodes, node_config)
        self.public_keys = public_keys
        self.offline: set[int] = set()

    def get_node_ids(self):
        return [node for node in self.contexts if node not in self.offline]

    def get_nodes(self):
        return [NodeInfo(node_id=node, public_key=self.public_keys.get(node, b"")) for node in self.get_node_ids()]


def test_in_process_a_client_is_only_the_node_its_key_is_bound_to(tmp_path, flower_task):
    """Five nodes for three clients: node 1000 holds client 2's key but says it is client 1
    (and is asked first), 1001 and 1002 are clients 1 and 0, 1003 holds a key bound to no
    client and says it is client 0, 1004 has no key and says it is client 2. Only 1001 and 1002
    take part; client 2 is unreachable; the result is the simulation of clients 0 and 1."""
    keys = [public_key_to_bytes(generate_key_pairs()[1]) for _ in range(4)]  # what the SuperLink reports
    fp = [key_fingerprint(key) for key in keys]
    partitions = [1, 1, 0, 0, 2]
    holds = {1000: keys[2], 1001: keys[1], 1002: keys[0], 1003: keys[3]}
    value = ",".join(f"{client}={fp[client]}" for client in range(NODES))
    overrides, settings = _settings(tmp_path / "out", rounds=2, **{"min-nodes": 2, "client-keys": value})
    grid = KeyedGrid(_app_config(overrides), 5, lambda i: {"partition-id": partitions[i], "num-partitions": NODES},
                     holds)
    logs: list[str] = []
    result = server_app.run_federation(grid, settings, log=logs.append)

    assert result.summary["nodes"] == {"0": 1002, "1": 1001}
    assert result.summary["binding"] == {
        "clients": {str(client): fp[client] for client in range(NODES)},
        "refused": 3,
        "refused_nodes": [
            {"node": 1000, "claimed": 1, "key": fp[2],
             "reason": f"says it is client 1, but its key {fp[2]} is bound to client 2"},
            {"node": 1003, "claimed": None, "key": fp[3], "reason": f"holds key {fp[3]}, bound to no client"},
            {"node": 1004, "claimed": None, "key": None, "reason": "has no readable public key"},
        ],
    }
    assert f"node 1000 says it is client 1, but its key {fp[2]} is bound to client 2; left out" in logs
    assert f"node 1003 holds key {fp[3]}, bound to no client; left out" in logs
    # A node whose key is bound to no client is sent nothing; the impostor only the hello.
    sent = {}
    for message in grid.sent:
        sent.setdefault(message.metadata.dst_node_id, set()).add(message.metadata.message_type)
    assert sent.keys() == {1000, 1001, 1002} and sent[1000] == {"query"}
    for line in result.metrics:
        assert line["participants"] == [0, 1] and line["sampled"] == NODES and line["unreachable"] == 1
    fed, sim = _reference(settings)
    _assert_close(result.state.params, _replay(fed, sim, result.metrics, settings).params)

    # Without client-keys the same nodes are first come, first served: the impostor is client 1.
    open_directory = server_app.NodeDirectory(grid, result.summary["backbone"]["fingerprint"], NODES,
                                              log=lambda text: None)
    open_directory.refresh(timeout=10)
    assert open_directory.node_of == {0: 1002, 1: 1000, 2: 1004} and not open_directory.refused


def test_in_process_a_bound_node_that_restarts_is_its_client_again(tmp_path, flower_task):
    """With SuperNode authentication a node keeps its node id across restarts: the directory
    forgets it while it is offline (its client unreachable) and asks it again when it is back."""
    keys = [public_key_to_bytes(generate_key_pairs()[1]) for _ in range(NODES)]
    value = ",".join(f"{client}={key_fingerprint(key)}" for client, key in enumerate(keys))
    overrides, settings = _settings(tmp_path / "out", **{"client-keys": value})
    grid = KeyedGrid(_app_config(overrides), NODES, lambda i: {}, {1000 + i: key for i, key in enumerate(keys)})
    fed = common.build_federation(settings, common.load_run_backbone(settings))
    nodes = server_app.NodeDirectory(grid, fed.backbone.fingerprint, NODES, log=lambda text: None,
                                     client_keys=dict(settings.client_keys))
    nodes.refresh(timeout=10)
    assert nodes.node_of == {0: 1000, 1: 1001, 2: 1002}
    grid.offline.add(1001)
    nodes.refresh(timeout=10)
    assert nodes.node_of == {0: 1000, 2: 1002}
    grid.offline.clear()
    nodes.refresh(timeout=10)
    assert nodes.node_of == {0: 1000, 1: 1001, 2: 1002} and not nodes.refused
    hellos = [m.metadata.dst_node_id for m in grid.sent if m.metadata.message_type == "query"]
    assert sorted(hellos) == [1000, 1001, 1001, 1002]  # asked again once back, the others once


# -- a loopback deployment over TLS with SuperNode authentication --------------------------------

@dataclasses.dataclass
class SecureRun:
    """The module's deployment and what its one ``flwr run`` left."""

    local: LoopbackDeployment
    credentials: Path
    settings: common.FlowerSettings
    out: Path
    connected: dict[int, int]  # key i -> the node id its SuperNode logged
    listed: list[dict]  # flwr supernode ls --format json, after the run

    def text(self, name: str) -> str:
        """A whole log of the deployment."""
        return self.local.log(name, tail=None)


@pytest.fixture(scope="module")
def secure(tmp_path_factory, jax_cache):
    """One SuperLink (TLS, SuperNode authentication) and its SuperNodes on 127.0.0.1: the three
    clients' nodes, the impostor and the unregistered node; then one two-round run with
    ``client-keys`` binding client i to node-<i>.key. Every process is killed in ``finally``."""
    tmp = tmp_path_factory.mktemp("tls")
    creds = tmp / "credentials"
    made = subprocess.run([sys.executable, "-m", "fedprompt.flower.credentials", str(creds), "--nodes",
                           str(NODES + 2)], capture_output=True, text=True, timeout=300)
    assert made.returncode == 0, made.stderr
    local = LoopbackDeployment(tmp, NODES, app=APP, jax_cache=jax_cache, credentials=creds, env={"JAX_PLATFORMS": "cpu"})
    try:
        local.start()  # registers node-0..2.pub and starts the clients' nodes
        local.register(IMPOSTOR)
        local.start_node(IMPOSTOR, partition=0)
        local.start_node(UNREGISTERED, partition=1)
        # Every registered node is online before the run, so the ServerApp meets them all at once.
        connected = {i: local.wait_connected(i, timeout=180) for i in range(NODES + 1)}
        local.processes[f"supernode-{UNREGISTERED}"].wait(timeout=180)
        out = tmp / "out"
        bound = ",".join(f"{i}={key_fingerprint((creds / f'node-{i}.pub').read_bytes())}" for i in range(NODES))
        overrides, settings = _settings(out, rounds=2, **{"round-timeout": 120.0, "client-keys": bound})
        local.wait(local.run(overrides, timeout=300, name="tls"))
        assert (out / "summary.json").exists(), local.run_log()
        listed = subprocess.run([str(BIN / "flwr"), "supernode", "ls", "local-deployment", "--format", "json"],
                                cwd=tmp, env=local.env, capture_output=True, text=True, timeout=120)
        yield SecureRun(local, creds, settings, out, connected, json.loads(listed.stdout)["nodes"])
    finally:
        local.stop()


def test_a_run_over_tls_with_supernode_authentication_equals_the_simulation(secure):
    metrics, summary, params, prompt = _read_run(secure.out)
    settings = secure.settings
    fed, sim = _reference(settings)
    state, _, expected = run_rounds(sim, settings.run.rounds, fed.test_set())
    _assert_close(params, state.params)
    assert [m["participants"] for m in metrics] == [list(range(NODES))] * settings.run.rounds
    for got, want in zip(metrics, expected, strict=True):
        assert got["bytes_up"] == want["bytes_up"] and got["bytes_down"] == want["bytes_down"]
        np.testing.assert_allclose(got["train_loss"], want["train_loss"], rtol=1e-4)
        np.testing.assert_allclose(got["eval_accuracy"], want["eval_accuracy"], atol=1e-6)
    _assert_close(prompt.params, state.params["prompt"], atol=1e-2)  # prompt.fpp may store float16
    # Each client is the node the SuperLink registered its key as, and that node's own id.
    registered = secure.local.node_ids
    assert summary["nodes"] == {str(i): registered[i] for i in range(NODES)}
    assert all(secure.connected[i] == registered[i] for i in range(NODES + 1))
    keys = {str(i): key_fingerprint((secure.credentials / f"node-{i}.pub").read_bytes()) for i in range(NODES)}
    assert summary["binding"]["clients"] == keys


def test_b_a_supernode_whose_key_was_not_registered_is_refused_by_the_superlink(secure):
    node = secure.local.processes[f"supernode-{UNREGISTERED}"]
    log = secure.text(f"supernode-{UNREGISTERED}")
    assert node.returncode != 0 and "SuperNode ID" not in log
    assert "Failed to initialize the connection to the SuperLink" in log and "Failed to activate SuperNode" in log
    assert "No SuperNode found with the given public key" in secure.text("superlink")
    # The SuperLink knows the four registered keys' nodes and no other; the run saw no other.
    registered = secure.local.node_ids
    assert sorted(int(n["node-id"]) for n in secure.listed) == sorted(registered.values())
    summary = json.loads((secure.out / "summary.json").read_text())
    assert [n["node"] for n in summary["binding"]["refused_nodes"]] == [registered[IMPOSTOR]]
    assert summary["nodes"]["1"] == registered[1]  # the client it claimed is its own node's


def test_c_a_node_started_with_another_clients_partition_id_is_left_out_by_the_binding(secure):
    summary = json.loads((secure.out / "summary.json").read_text())
    impostor = secure.local.node_ids[IMPOSTOR]
    key = key_fingerprint((secure.credentials / f"node-{IMPOSTOR}.pub").read_bytes())
    assert summary["binding"]["refused"] == 1
    assert summary["binding"]["refused_nodes"] == [
        {"node": impostor, "claimed": None, "key": key, "reason": f"holds key {key}, bound to no client"}]
    assert f"node {impostor} holds key {key}, bound to no client; left out" in secure.text("flwr-run-tls")
    assert summary["nodes"]["0"] == secure.local.node_ids[0]
    # Sent nothing, not even the hello; the clients' nodes got every round's train message.
    assert "Receiving:" not in secure.text(f"supernode-{IMPOSTOR}")
    for i in range(NODES):
        assert secure.text(f"supernode-{i}").count("Receiving: train message") == secure.settings.run.rounds


SECURE = {"secagg": True, "dp": "central", "dp-clip": 0.05, "dp-noise-multiplier": 0.0}
"""The protections of (d): secure aggregation's whole protocol (four exchanges a round) and central DP."""


def test_d_the_protected_walk_through_equals_the_simulation(secure, node_files):
    """The README's protected deployment: TLS, authenticated nodes bound to their clients by key,
    each node restarted with its own file and a server with none, secure aggregation and central
    DP; it equals the simulation of the same per-client rows."""
    local = secure.local
    for i in range(NODES):  # SIGTERM: the node deactivates itself, so its key may activate again at once
        local.kill(f"supernode-{i}", signal.SIGTERM)
        local.start_node(i, node_config={"data-path": str(node_files["train"][i])})
    for i in range(NODES):
        local.wait_connected(i, timeout=180)
    out = secure.out.parent / "out-protected"
    bound = ",".join(f"{c}={k}" for c, k in secure.settings.client_keys)
    overrides = {**NODE_RUN, "backbone": str(node_files["backbone"]), "out": str(out), "rounds": 1,
                 "node-capacity": max(node_files["sizes"]), "test-data": str(node_files["server_test"]),
                 "round-timeout": 120.0, **SECURE, "client-keys": bound}
    config = _app_config(overrides)
    assert len(config) == len(_app_config({})), "flwr run refuses keys the app's config does not have"
    settings = common.settings_from_run_config(config)
    local.wait(local.run(overrides, timeout=300, name="protected"))
    assert (out / "summary.json").exists(), local.run_log()
    metrics, summary, params, _ = _read_run(out)
    _, _, sim, test = _node_simulation(settings, node_files)
    state, _, expected = run_rounds(sim, settings.run.rounds, test)
    _assert_close(params, state.params)
    for got, want in zip(metrics, expected, strict=True):
        for key in ("bytes_up", "bytes_down", "clients", "participants", "epsilon"):
            assert got.get(key) == want.get(key), (key, got.get(key), want.get(key))
        np.testing.assert_allclose(got["eval_accuracy"], want["eval_accuracy"], atol=1e-6)
        assert got["secagg_bytes"] > 0 and not got.get("secagg_failed")
    assert summary["privacy"]["dp_mode"] == "central"
    assert summary["client_sizes"] == list(node_files["sizes"])  # as each node reported
    assert summary["binding"]["refused"] == 1  # the impostor, again
    assert summary["nodes"] == {str(i): local.node_ids[i] for i in range(NODES)}
