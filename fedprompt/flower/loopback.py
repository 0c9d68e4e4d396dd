"""A whole Flower deployment on one machine: a SuperLink and SuperNodes on 127.0.0.1.

:class:`LoopbackDeployment` starts ``flower-superlink`` and one ``flower-supernode`` per client as
child processes (free ports, logs in ``<workdir>/logs``, Flower's home in
``<workdir>/flwr-home``), launches Flower Apps on it with ``flwr run`` and stops every process it
started. It is how the test suite and the measurements of ``examples/results`` run real
deployments, and a quick way to try the deployment's settings before spreading it over machines:

    with LoopbackDeployment(Path("trial"), nodes=3, app=Path("examples/flower_app")) as local:
        local.wait(local.run({"rounds": 2, "clients": 3, "clients-per-round": 3, "out": "out"}, timeout=600))

With ``credentials`` (a folder of ``python -m fedprompt.flower.credentials``) everything runs over
TLS with SuperNode authentication, as ``examples/flower_app/README.md`` section 2 describes: the
SuperLink serves its CA-signed certificate and admits only registered keys, :meth:`start`
registers ``node-<i>.pub`` for every node (``flwr supernode register``), each SuperNode checks
the SuperLink against ``ca.pem`` and signs with ``node-<i>.key``, and the ``flwr`` CLI's
connection names ``root-certificates``. Without it every process runs ``--insecure``: a trusted
loopback only.

The executables are those beside the running Python (its virtual environment's ``bin``). Every
process starts in its own session; :meth:`stop` ends each group with SIGTERM, then SIGKILLs
whatever is left, children included (found through ``/proc`` on Linux; elsewhere only the
process groups are signalled).
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from fedprompt.flower.common import FederationError

CONNECTION = "local-deployment"
"""The name of the ``flwr`` CLI's connection to the loopback SuperLink."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, process: subprocess.Popen, timeout: float, *, what: Callable[[], str]) -> None:
    """Waits until something listens on 127.0.0.1:``port``.

    Raises:
      FederationError: ``what()`` when ``process`` exited or ``timeout`` seconds passed first.
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline or process.poll() is not None:
                raise FederationError(what()) from None
            time.sleep(0.5)


def toml_value(value: Any) -> str:
    """``value`` (a bool, number or string) as a TOML value, for run-config files."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, (int, float)):
        return repr(value)
    raise FederationError(f"a run-config value must be a bool, number or string, got {value!r}")


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    proc = Path("/proc")
    if not proc.is_dir():
        return tree
    for entry in proc.iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            tree.setdefault(ppid, []).append(int(entry.name))
    return tree


def descendants(pid: int) -> set[int]:
    """Every process below ``pid`` (children, their children, ...), from ``/proc``; empty elsewhere."""
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


def kill_leftovers(family: set[int], deadline: float) -> None:
    """Waits until ``deadline`` (``time.monotonic``) for the processes ``family`` to end, then
    SIGKILLs the rest."""
    while any(_running(pid) for pid in family) and time.monotonic() < deadline:
        time.sleep(0.2)
    for pid in family:
        if _running(pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


class LoopbackDeployment:
    """A SuperLink and ``nodes`` SuperNodes on 127.0.0.1, started as child processes.

    Args:
      workdir: an existing folder for logs, Flower's home and run-config files; the processes
        run in it (a ServerApp's relative ``out`` lands there).
      nodes: SuperNodes; node ``i`` says it is client ``i`` (``partition-id``) of ``nodes``.
      app: the Flower App folder ``flwr run`` launches (``examples/flower_app``).
      credentials: a folder of ``python -m fedprompt.flower.credentials`` (TLS + authentication);
        None: ``--insecure``.
      jax_cache: a persistent XLA compilation cache for every process (Flower starts a ClientApp
        process per message: without it every message compiles the client update again).
      env: more environment variables for every process.
      node_config: more node config for every SuperNode (``{"test-path": ...}``), or a function
        of the node's index giving each its own (``lambda i: {"data-path": f"node-{i}.jsonl"}``);
        :meth:`start_node` adds more.
    """

    def __init__(self, workdir: Path, nodes: int, *, app: Path, credentials: Path | None = None,
                 jax_cache: Path | None = None, env: Mapping[str, str] | None = None,
                 node_config: Mapping[str, Any] | Callable[[int], Mapping[str, Any]] | None = None):
        if nodes < 1:
            raise FederationError(f"a loopback deployment needs at least one SuperNode, got {nodes}")
        self.tmp = Path(workdir).resolve()
        self.app = Path(app).resolve()
        self.credentials = None if credentials is None else Path(credentials).resolve()
        self.nodes = nodes
        self.node_config = node_config if callable(node_config) else dict(node_config or {})
        self.node_ids: dict[int, int] = {}  # key i -> the node id the SuperLink registered node-<i>.pub under
        self.bin = Path(sys.executable).parent
        self.home = self.tmp / "flwr-home"
        self.home.mkdir(exist_ok=True)
        self.logs = self.tmp / "logs"
        self.logs.mkdir(exist_ok=True)
        self.port = free_port()
        self.env = {
            **os.environ,
            "FLWR_HOME": str(self.home),
            "FLWR_TELEMETRY_ENABLED": "0",
            "FLWR_DISABLE_UPDATE_CHECK": "1",
            # each SuperNode's SuperExec looks for a message to start a ClientApp for every
            # second by default; on one machine a tenth of that costs nothing
            "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.1",
            **({} if jax_cache is None else {"JAX_COMPILATION_CACHE_DIR": str(jax_cache),
                                              "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}),
            **dict(env or {}),
        }
        self.processes: dict[str, subprocess.Popen] = {}
        self.run_name = "run"
        self.deadline = time.monotonic()
        channel = ("insecure = true\n" if self.credentials is None
                   else f'root-certificates = "{self.credentials / "ca.pem"}"\n')
        (self.home / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
            f'address = "127.0.0.1:{self.port}"\n{channel}'
        )

    def __enter__(self) -> LoopbackDeployment:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _start(self, name: str, args: list[str]) -> subprocess.Popen:
        with open(self.logs / f"{name}.log", "wb") as log:
            self.processes[name] = subprocess.Popen(
                [str(self.bin / args[0]), *args[1:]], cwd=self.tmp, env=self.env, stdout=log,
                stderr=subprocess.STDOUT, start_new_session=True,
            )
        return self.processes[name]

    def start(self, timeout: float = 60.0) -> None:
        """Starts the SuperLink, waits until it listens, registers the node keys (with
        credentials) and starts every SuperNode.

        Raises:
          FederationError: the SuperLink did not listen within ``timeout`` seconds, or a key
            was not registered.
        """
        if self.credentials is None:
            channel = ["--insecure"]
        else:
            channel = ["--ssl-ca-certfile", str(self.credentials / "ca.pem"),
                       "--ssl-certfile", str(self.credentials / "superlink.pem"),
                       "--ssl-keyfile", str(self.credentials / "superlink.key"), "--enable-supernode-auth"]
        self._start("superlink", ["flower-superlink", *channel, "--host", "127.0.0.1", "--port", str(self.port),
                                  "--disable-runtime-dependency-installation"])
        wait_for_port(self.port, self.processes["superlink"], timeout,
                      what=lambda: f"the SuperLink did not start:\n{self.log('superlink')}")
        if self.credentials is not None:
            for i in range(self.nodes):
                self.register(i)
        for i in range(self.nodes):
            self.start_node(i)

    def register(self, i: int) -> int:
        """``flwr supernode register node-<i>.pub local-deployment --format json``: the node id
        the SuperLink gives that key (kept in ``node_ids``). Flower exits 0 on a refusal too, so
        its answer's ``success`` is what counts.

        Raises:
          FederationError: the key was not registered.
        """
        if self.credentials is None:
            raise FederationError("register needs credentials (the deployment runs --insecure)")
        done = subprocess.run(
            [str(self.bin / "flwr"), "supernode", "register", str(self.credentials / f"node-{i}.pub"), CONNECTION,
             "--format", "json"],
            cwd=self.tmp, env=self.env, capture_output=True, text=True, timeout=120,
        )
        try:
            answer = json.loads(done.stdout)
        except json.JSONDecodeError:
            answer = {}
        if done.returncode != 0 or not answer.get("success"):
            raise FederationError(f"node-{i}.pub was not registered:\n{done.stdout}\n{done.stderr}\n"
                                  f"{self.log('superlink')}")
        self.node_ids[i] = int(answer["node-id"])
        return self.node_ids[i]

    def start_node(self, i: int, *, partition: int | None = None, node_config: Mapping[str, Any] | None = None) -> None:
        """Starts (or restarts) SuperNode ``i``: the node of client ``i``, or one that says it is
        client ``partition``; with credentials it authenticates with ``node-<i>.key``.
        ``node_config`` adds to (or overrides) the deployment's node config for this node."""
        if self.credentials is None:
            channel = ["--insecure"]
        else:
            channel = ["--root-certificates", str(self.credentials / "ca.pem"),
                       "--auth-supernode-private-key", str(self.credentials / f"node-{i}.key")]
        shared = self.node_config(i) if callable(self.node_config) else self.node_config
        config = {"partition-id": i if partition is None else partition, "num-partitions": self.nodes,
                  **shared, **dict(node_config or {})}
        self._start(f"supernode-{i}", [
            "flower-supernode", *channel, "--superlink", f"127.0.0.1:{self.port}",
            "--host", "127.0.0.1", "--port", str(free_port()),
            "--node-config", " ".join(f"{k}={toml_value(v)}" for k, v in config.items()),
        ])

    def wait_connected(self, i: int, timeout: float) -> int:
        """Waits until SuperNode ``i`` logs the node id the SuperLink activated it as; returns it.

        Raises:
          FederationError: the node exited, or logged no id within ``timeout`` seconds.
        """
        deadline = time.monotonic() + timeout
        while True:
            log = self.logs / f"supernode-{i}.log"
            found = re.search(r"SuperNode ID: (\d+)", log.read_text(errors="replace") if log.exists() else "")
            if found:
                return int(found.group(1))
            if self.processes[f"supernode-{i}"].poll() is not None or time.monotonic() > deadline:
                raise FederationError(f"SuperNode {i} did not connect:\n{self.log(f'supernode-{i}')}")
            time.sleep(0.5)

    def run(self, run_config: Mapping[str, Any], *, timeout: float, name: str = "run") -> subprocess.Popen:
        """Launches ``flwr run <app> local-deployment --run-config <toml> --stream``; returns its process.

        ``run_config``: the app's run-config settings (dashed names, bools, numbers, strings),
        written to ``run-config-<name>.toml``; :meth:`wait` waits at most ``timeout`` seconds.
        """
        self.run_name = name
        toml = self.tmp / f"run-config-{name}.toml"
        toml.write_text("".join(f"{k} = {toml_value(v)}\n" for k, v in run_config.items()))
        proc = self._start(f"flwr-run-{name}", [
            "flwr", "run", str(self.app), CONNECTION, "--run-config", str(toml), "--stream"])
        self.processes["flwr-run"] = proc
        self.deadline = time.monotonic() + timeout
        return proc

    def wait(self, proc: subprocess.Popen) -> int:
        """Waits for a :meth:`run` until its deadline; returns its exit status.

        Raises:
          FederationError: it did not finish in time (the end of its log says where it was).
        """
        try:
            return proc.wait(timeout=max(1.0, self.deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            raise FederationError(f"the run did not finish in time:\n{self.run_log()}") from None

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Kills one of the processes (``superlink``, ``supernode-<i>``, ``flwr-run``) with
        everything it started; waits until they are gone."""
        proc = self.processes[name]
        family = descendants(proc.pid)
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
        kill_leftovers(family, time.monotonic() + 10)

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM to every process group at once; SIGKILL to whatever is left after ``grace`` s."""
        family = set().union(*(descendants(p.pid) for p in self.processes.values()))
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
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait(timeout=10)
        kill_leftovers(family, deadline + 5)

    def log(self, name: str, tail: int | None = 6000) -> str:
        """The log of process ``name`` (its last ``tail`` characters; None: all of it)."""
        path = self.logs / f"{name}.log"
        text = path.read_text(errors="replace") if path.exists() else ""
        return text if tail is None else text[-tail:]

    def run_log(self) -> str:
        """The end of the last :meth:`run`'s log."""
        return self.log(f"flwr-run-{self.run_name}")
