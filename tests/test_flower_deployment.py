"""The Flower apps on a real deployment: one ``flower-superlink`` and three ``flower-supernode``
processes on 127.0.0.1 (free ports chosen at run time, ``--insecure``), shared by every test of
this module; ``examples/flower_app`` is launched with ``flwr run`` and what the ServerApp wrote
is compared with the in-process simulation (the settings and references of test_flower.py).
Every process is killed in a ``finally`` block.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import json
import subprocess
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from test_flower import APP, BIN, NODES, _assert_close, _read_run, _reference, _replay, _settings

from fedprompt.federation.evaluation import evaluate_tpt
from fedprompt.server import rounds
from fedprompt.simulation.engine import run_rounds
from fedprompt.wire import codec

def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return json.dumps(value) if isinstance(value, str) else repr(value)


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            tree.setdefault(ppid, []).append(int(entry.name))
    return tree


def _descendants(pid: int) -> set[int]:
    tree, found, todo = _children(), set(), [pid]
    while todo:
        for child in tree.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def _kill_leftovers(family: set[int], deadline: float) -> None:
    """Waits until ``deadline`` for the processes ``family`` to end, then SIGKILLs the rest."""
    while any(_running(pid) for pid in family) and time.monotonic() < deadline:
        time.sleep(0.2)
    for pid in family:
        if _running(pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


class LocalDeployment:
    """A SuperLink and SuperNodes on 127.0.0.1, started as subprocesses of this test.

    ``credentials``: a folder written by ``python -m fedprompt.flower.credentials`` (absolute).
    Then the deployment runs over TLS with SuperNode authentication: the SuperLink serves its
    CA-signed certificate (``--ssl-*``) and accepts only registered node keys
    (``--enable-supernode-auth``), :meth:`start` registers ``node-<i>.pub`` of every client i
    (``flwr supernode register``, :meth:`register`), each SuperNode verifies the SuperLink
    against ``ca.pem`` and authenticates with its ``node-<i>.key``, and the ``flwr`` CLI's
    connection names ``root-certificates``. Without it: ``--insecure`` everywhere.
    """

    def __init__(self, tmp: Path, nodes: int, jax_cache: Path, *, credentials: Path | None = None):
        self.tmp = tmp
        self.credentials = credentials
        self.node_ids: dict[int, int] = {}  # key i -> the node id the SuperLink registered node-<i>.pub under
        self.home = tmp / "flwr-home"
        self.home.mkdir()
        self.logs = tmp / "logs"
        self.logs.mkdir()
        self.port = _free_port()
        self.env = {
            **os.environ,
            "FLWR_HOME": str(self.home),
            "FLWR_TELEMETRY_ENABLED": "0",
            "FLWR_DISABLE_UPDATE_CHECK": "1",
            # Flower starts a ClientApp process per message: cache compiled XLA programs.
            "JAX_COMPILATION_CACHE_DIR": str(jax_cache),
            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
            "JAX_PLATFORMS": "cpu",
        }
        self.processes: dict[str, subprocess.Popen] = {}
        self.nodes = nodes
        channel = 'insecure = true\n' if credentials is None else f'root-certificates = "{credentials / "ca.pem"}"\n'
        (self.home / "config.toml").write_text(
            '[superlink]\ndefault = "local-deployment"\n\n[superlink.local-deployment]\n'
            f'address = "127.0.0.1:{self.port}"\n{channel}'
        )

    def _start(self, name: str, args: list[str]) -> None:
        log = open(self.logs / f"{name}.log", "wb")
        self.processes[name] = subprocess.Popen(
            [str(BIN / args[0]), *args[1:]], cwd=self.tmp, env=self.env, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def start(self, timeout: float = 60.0) -> None:
        if self.credentials is None:
            channel = ["--insecure"]
        else:
            channel = ["--ssl-ca-certfile", str(self.credentials / "ca.pem"),
                       "--ssl-certfile", str(self.credentials / "superlink.pem"),
                       "--ssl-keyfile", str(self.credentials / "superlink.key"), "--enable-supernode-auth"]
        self._start("superlink", ["flower-superlink", *channel, "--host", "127.0.0.1", "--port", str(self.port),
                                  "--disable-runtime-dependency-installation"])
        deadline = time.monotonic() + timeout
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or self.processes["superlink"].poll() is not None:
                    raise RuntimeError(f"the SuperLink did not start:\n{self.log('superlink')}") from None
                time.sleep(0.5)
        if self.credentials is not None:
            for i in range(self.nodes):
                self.register(i)
        for i in range(self.nodes):
            self.start_node(i)

    def register(self, i: int) -> int:
        """``flwr supernode register node-<i>.pub local-deployment --format json``: the node id
        the SuperLink gives that key (kept in ``node_ids``)."""
        done = subprocess.run(
            [str(BIN / "flwr"), "supernode", "register", str(self.credentials / f"node-{i}.pub"), "local-deployment",
             "--format", "json"],
            cwd=self.tmp, env=self.env, capture_output=True, text=True, timeout=120,
        )
        try:
            answer = json.loads(done.stdout)
        except json.JSONDecodeError:
            answer = {}
        if done.returncode != 0 or not answer.get("success"):
            raise RuntimeError(f"node-{i}.pub was not registered:\n{done.stdout}\n{done.stderr}\n"
                               f"{self.log('superlink')}")
        self.node_ids[i] = int(answer["node-id"])
        return self.node_ids[i]

    def start_node(self, i: int, *, partition: int | None = None) -> None:
        """Starts (or restarts) SuperNode ``i``, the node of client ``i``, or one that says it is
        client ``partition``; with credentials it authenticates with ``node-<i>.key``."""
        if self.credentials is None:
            channel = ["--insecure"]
        else:
            channel = ["--root-certificates", str(self.credentials / "ca.pem"),
                       "--auth-supernode-private-key", str(self.credentials / f"node-{i}.key")]
        self._start(f"supernode-{i}", [
            "flower-supernode", *channel, "--superlink", f"127.0.0.1:{self.port}",
            "--host", "127.0.0.1", "--port", str(_free_port()),
            "--node-config", f"partition-id={i if partition is None else partition} num-partitions={self.nodes}",
        ])

    def wait_connected(self, i: int, timeout: float) -> int:
        """Waits until SuperNode ``i`` logs the node id the SuperLink activated it as; returns it.

        Raises:
          RuntimeError: the node exited, or logged no id within ``timeout`` seconds.
        """
        deadline = time.monotonic() + timeout
        while True:
            log = self.logs / f"supernode-{i}.log"
            found = re.search(r"SuperNode ID: (\d+)", log.read_text(errors="replace") if log.exists() else "")
            if found:
                return int(found.group(1))
            if self.processes[f"supernode-{i}"].poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"SuperNode {i} did not connect:\n{self.log(f'supernode-{i}')}")
            time.sleep(0.5)

    def run(self, overrides: dict, *, timeout: float, name: str = "run") -> subprocess.Popen:
        """``flwr run examples/flower_app local-deployment --run-config <toml> --stream``."""
        self.run_name = name
        toml = self.tmp / f"run-config-{name}.toml"
        toml.write_text("".join(f"{k} = {_toml_value(v)}\n" for k, v in overrides.items()))
        log = open(self.logs / f"flwr-run-{name}.log", "wb")
        proc = subprocess.Popen(
            [str(BIN / "flwr"), "run", str(APP), "local-deployment", "--run-config", str(toml), "--stream"],
            cwd=self.tmp, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        self.processes["flwr-run"] = proc
        self.deadline = time.monotonic() + timeout
        return proc

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Kills one of the processes, with everything it started; waits until they are gone."""
        proc = self.processes[name]
        family = _descendants(proc.pid)
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                pass
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        _kill_leftovers(family, time.monotonic() + 10)

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM to every process group at once; SIGKILL to whatever is left after ``grace`` s."""
        family = set().union(*(_descendants(p.pid) for p in self.processes.values()))
        for proc in self.processes.values():
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + grace
        for proc in self.processes.values():
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        _kill_leftovers(family, deadline + 5)

    def log(self, name: str) -> str:
        path = self.logs / f"{name}.log"
        return path.read_text(errors="replace")[-6000:] if path.exists() else ""

    def wait(self, proc: subprocess.Popen) -> None:
        try:
            proc.wait(timeout=max(1.0, self.deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            raise AssertionError(f"the run did not finish in time:\n{self.run_log()}") from None

    def run_log(self) -> str:
        return self.log(f"flwr-run-{self.run_name}")


@pytest.fixture(scope="module")
def jax_cache(tmp_path_factory) -> Path:
    """One persistent XLA cache for every node of every test here (Flower starts a process per
    message): the test session's (conftest.py), so the nodes find what the in-process tests of
    the same settings compiled."""
    session = os.environ.get("JAX_COMPILATION_CACHE_DIR")
    return Path(session) if session else tmp_path_factory.mktemp("jax-cache")


@pytest.fixture(scope="module")
def deployment(tmp_path_factory, jax_cache):
    """One SuperLink and its SuperNodes on 127.0.0.1, shared by every deployed run of this module."""
    tmp = tmp_path_factory.mktemp("deployment")
    local = LocalDeployment(tmp, NODES, jax_cache)
    try:
        local.start()
        yield local
    finally:
        local.stop()


def test_flower_deployment_equals_the_simulation_and_sends_only_the_prompt(deployment):
    out = deployment.tmp / "out-prompt"
    overrides, settings = _settings(out, rounds=2, **{"round-timeout": 120.0})
    deployment.wait(deployment.run(overrides, timeout=170, name="prompt"))
    assert (out / "summary.json").exists(), deployment.run_log()
    metrics, summary, params, prompt = _read_run(out)

    fed, sim = _reference(settings)
    state, _, expected = run_rounds(sim, settings.run.rounds, fed.test_set())
    # The final prompt (and head) are the simulation's, and so is every round.
    _assert_close(params, state.params)
    assert [m["clients"] for m in metrics] == [NODES] * settings.run.rounds
    assert [m["participants"] for m in metrics] == [list(range(NODES))] * settings.run.rounds
    for got, want in zip(metrics, expected):
        assert got["bytes_up"] == want["bytes_up"] and got["bytes_down"] == want["bytes_down"]
        np.testing.assert_allclose(got["train_loss"], want["train_loss"], rtol=1e-4)
        np.testing.assert_allclose(got["eval_accuracy"], want["eval_accuracy"], atol=1e-6)
    assert summary["runtime"] == "flower" and prompt.backbone.fingerprint == summary["backbone"]["fingerprint"]
    _assert_close(prompt.params, state.params["prompt"], atol=1e-2)  # prompt.fpp may store float16

    # What crossed is the prompt: per client, one encoded prompt-sized message each way.
    encoded = codec.encode(jax.device_get({"params": state.params}), kind=rounds.GLOBAL_KIND, round=0,
                           fingerprint=fed.backbone.fingerprint)
    prompt_bytes = sum(np.asarray(x).nbytes for x in jax.tree.leaves(state.params))
    backbone_bytes = fed.backbone.weight_bytes()
    for m in metrics:
        assert m["bytes_down"] == len(encoded) * NODES
        assert prompt_bytes * NODES <= m["bytes_up"] <= (prompt_bytes + 400) * NODES
        # Flower's own envelope (records, metadata) adds a fixed ~1 KB per message.
        assert m["bytes_up"] < m["wire_bytes_up"] <= m["bytes_up"] + 2048 * NODES
        assert m["bytes_down"] < m["wire_bytes_down"] <= m["bytes_down"] + 2048 * NODES
        assert (m["wire_bytes_up"] + m["wire_bytes_down"]) / NODES < backbone_bytes / 20


# A real deployment of the protection whose protocol crosses the most messages (each run costs
# a minute or more of process starts: Flower starts a ClientApp process per message); every
# row of PARITY runs through the apps in-process above.
DEPLOYED = {
    "secagg-central-dp": {"secagg": True, "dp": "central", "dp-clip": 0.05, "dp-noise-multiplier": 0.0},
}


@pytest.mark.parametrize("name", list(DEPLOYED))
def test_deployed_protections_and_methods_equal_the_simulation(deployment, name):
    out = deployment.tmp / f"out-{name}"
    overrides, settings = _settings(out, rounds=1, **{"round-timeout": 120.0}, **DEPLOYED[name])
    deployment.wait(deployment.run(overrides, timeout=170, name=name))
    assert (out / "summary.json").exists(), deployment.run_log()
    metrics, summary, params, _ = _read_run(out)
    fed, sim = _reference(settings, **({"client_block": 1} if name == "zo" else {}))
    state, _, expected = run_rounds(sim, settings.run.rounds, fed.test_set())
    _assert_close(params, state.params)
    for got, want in zip(metrics, expected, strict=True):
        for key in ("bytes_up", "bytes_down", "clients", "participants", "epsilon"):
            assert got.get(key) == want.get(key), (key, got.get(key), want.get(key))
    if settings.run.tpt:
        reference = evaluate_tpt(settings.run, sim.plan, sim.plan.trainable(state.params), fed.test_set())
        np.testing.assert_allclose(summary["tpt"]["accuracy_after"], reference["accuracy_after"], atol=1e-6)
    if settings.run.dp:
        assert summary["privacy"]["dp_mode"] == settings.run.dp


def test_a_supernode_killed_mid_run_leaves_and_the_run_completes(deployment):
    # A round waits at most 40 s for a client; a cold round (compiling) takes ~15-30 s on 2 busy cores.
    out = deployment.tmp / "out-killed"
    overrides, settings = _settings(out, rounds=2, **{"round-timeout": 40.0})
    metrics_file = out / "metrics.jsonl"
    try:
        run = deployment.run(overrides, timeout=170, name="killed")
        while not (metrics_file.exists() and metrics_file.read_text().count("\n") >= 1):
            assert run.poll() is None and time.monotonic() < deployment.deadline, deployment.run_log()
            time.sleep(0.2)
        deployment.kill(f"supernode-{NODES - 1}")  # SIGKILL, after round 1
        deployment.wait(run)
        assert (out / "summary.json").exists(), deployment.run_log()
    finally:
        deployment.start_node(NODES - 1)  # the next test finds every node again
    metrics, summary, params, _ = _read_run(out)
    assert len(metrics) == settings.run.rounds
    assert NODES - 1 in metrics[0]["participants"]  # alive in round 1, dead from round 2 on
    for m in metrics[1:]:
        assert NODES - 1 not in m["participants"] and 1 <= m["clients"] <= NODES - 1
        assert m["dropped"] >= 1 and m["timeouts"] + m["errors"] + m["unreachable"] >= 1
        assert m["bytes_up"] < NODES * metrics[0]["bytes_up"] / metrics[0]["clients"]

    # The dead client is simply missing: the others' weights renormalize. Same result in-process.
    fed, sim = _reference(settings)
    state = _replay(fed, sim, metrics, settings)
    _assert_close(params, state.params)
    assert np.isfinite(summary["final_accuracy"])
