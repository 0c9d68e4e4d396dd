"""The Flower apps under Flower's simulation runtime with its Ray backend.

One ``flower-superlink --simulation`` on 127.0.0.1 (a free port, ``--insecure``) and one
``flwr run examples/flower_app ... --federation-config <examples/flower_app/simulation.toml>``:
8 virtual SuperNodes (node config ``partition-id`` 0..7, ``num-partitions`` 8, given by Flower)
served by a pool of 2 Ray actors (``init-args-num-cpus = 2``, ``client-resources-num-cpus =
1``), 3 clients a round, 2 rounds, with the tiny settings of test_flower.py. The apps are the
unchanged ``fedprompt.flower.server_app:app`` and ``fedprompt.flower.client_app:app``; what the
ServerApp wrote must equal the in-process simulation. The run is SCAFFOLD: two clients (1 and 4) train
in both rounds, so their control variate must travel with the virtual node's context from one
actor process to whichever serves it next.

The whole module shares that one run (Ray's start is slow); the reference is computed while it
goes. Every process the run starts carries a marker in its environment (Ray's processes inherit
it); the fixture ends them all by process id in a ``finally`` block, never by name, so a Ray
instance of anyone else on the machine is left alone. ``RAY_ADDRESS=local`` keeps the
simulation off any Ray cluster that runs here, and ``RAY_TMPDIR`` keeps its session files in a
folder of this test.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import tomllib
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from test_flower import APP, BIN, _assert_close, _read_run, _reference, _settings

from fedprompt.flower import server_app
from fedprompt.flower.loopback import free_port, toml_value, wait_for_port
from fedprompt.simulation.engine import run_rounds
from fedprompt.wire import codec

SUPERNODES = 8
"""Virtual SuperNodes: ``num-supernodes`` of examples/flower_app/simulation.toml."""

ACTORS = 2
"""Ray actors in the pool: ``init-args-num-cpus`` (set here) / ``client-resources-num-cpus`` (1)."""

CLIENTS_PER_ROUND = 3
ROUNDS = 2
MARK = "FEDPROMPT_RAY_TEST"
"""The environment variable every process of this module's run carries (a fresh value per run)."""

XLA_ENV = {"XLA_PYTHON_CLIENT_PREALLOCATE": "false", "JAX_PLATFORMS": "cpu"}
"""What the README asks for in the SuperLink's environment, so that JAX in several actors shares a device."""


def _write_toml(path: Path, values: dict[str, Any]) -> Path:
    """A flat TOML file of ``values``, for ``--run-config`` / ``--federation-config``."""
    path.write_text("".join(f"{key} = {toml_value(value)}\n" for key, value in values.items()))
    return path


@dataclasses.dataclass(frozen=True)
class _Process:
    """One live process as /proc shows it: its id, command line and initial environment."""

    pid: int
    cmdline: bytes
    environ: dict[bytes, bytes]


def _marked(token: str) -> list[_Process]:
    """The live processes whose environment carries ``MARK=token`` (this run's, and only those)."""
    wanted = f"{MARK}={token}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            raw = (entry / "environ").read_bytes().split(b"\0")
            if wanted not in raw:
                continue
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").strip()
        except OSError:  # gone, or another user's
            continue
        environ = dict(item.split(b"=", 1) for item in raw if b"=" in item)
        found.append(_Process(int(entry.name), cmdline, environ))
    return found


def _is_flower_service(process: _Process) -> bool:
    """The SuperLink or its SuperExec: what stays up between runs (everything else ends with a run)."""
    return any(name in process.cmdline for name in (b"flower-superlink", b"flower-superexec"))


class _ActorWatch(threading.Thread):
    """Polls /proc while the run goes: the Ray actor processes (``ray::ClientAppActor``) that
    served the virtual SuperNodes, and the XLA variables each one started with."""

    def __init__(self, token: str):
        super().__init__(daemon=True)
        self.token = token
        self.actors: dict[int, dict[str, str]] = {}
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            for process in _marked(self.token):
                if process.cmdline.startswith(b"ray::ClientAppActor") and process.pid not in self.actors:
                    self.actors[process.pid] = {
                        key: process.environ.get(key.encode(), b"").decode() for key in XLA_ENV
                    }
            self.done.wait(0.25)


class LocalSimulation:
    """A SuperLink in simulation mode on 127.0.0.1 and the ``flwr`` CLI pointed at it, started
    as subprocesses of this test with a marked environment."""

    def __init__(self, tmp: Path, ray_tmp: Path):
        self.tmp = tmp
        self.logs = tmp / "logs"
        self.logs.mkdir()
        home = tmp / "flwr-home"
        home.mkdir()
        self.port = free_port()
        self.token = uuid.uuid4().hex
        self.env = {
            **os.environ,
            **XLA_ENV,
            "FLWR_HOME": str(home),
            "FLWR_TELEMETRY_ENABLED": "0",
            "FLWR_DISABLE_UPDATE_CHECK": "1",
            "RAY_ADDRESS": "local",  # a new Ray instance, never a cluster that runs on this machine
            "RAY_TMPDIR": str(ray_tmp),
            "RAY_USAGE_STATS_ENABLED": "0",
            MARK: self.token,
        }
        (home / "config.toml").write_text(
            '[superlink]\ndefault = "local-simulation"\n\n[superlink.local-simulation]\n'
            f'address = "127.0.0.1:{self.port}"\ninsecure = true\n'
        )
        self.processes: dict[str, subprocess.Popen] = {}
        self._log_files: list[Any] = []

    def _start(self, name: str, args: list[str]) -> subprocess.Popen:
        log = open(self.logs / f"{name}.log", "wb")
        self._log_files.append(log)
        proc = subprocess.Popen([str(BIN / args[0]), *args[1:]], cwd=self.tmp, env=self.env, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        self.processes[name] = proc
        return proc

    def start(self, timeout: float = 60.0) -> None:
        """The SuperLink, in simulation mode, installing nothing at run time; waits for its port."""
        self._start("superlink", ["flower-superlink", "--insecure", "--simulation", "--host", "127.0.0.1",
                                  "--port", str(self.port), "--disable-runtime-dependency-installation"])
        wait_for_port(self.port, self.processes["superlink"], timeout,
                      what=lambda: f"the SuperLink did not start:\n{self.log('superlink')}")

    def run(self, overrides: dict[str, Any], federation: dict[str, Any]) -> subprocess.Popen:
        """``flwr run examples/flower_app local-simulation --run-config <toml> --federation-config <toml> --stream``."""
        run_config = _write_toml(self.tmp / "run-config.toml", overrides)
        federation_config = _write_toml(self.tmp / "federation-config.toml", federation)
        return self._start("flwr-run", ["flwr", "run", str(APP), "local-simulation", "--run-config", str(run_config),
                                        "--federation-config", str(federation_config), "--stream"])

    def log(self, name: str) -> str:
        path = self.logs / f"{name}.log"
        return path.read_text(errors="replace")[-8000:] if path.exists() else ""

    def run_processes(self) -> list[_Process]:
        """The marked processes other than the SuperLink and its SuperExec: the simulation
        process and its Ray instance (raylet, GCS, workers, agents) while a run goes."""
        return [p for p in _marked(self.token) if not _is_flower_service(p)]

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM to every marked process, SIGKILL to whatever is left after ``grace`` s; reaps
        this test's own children."""
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
            for process in _marked(self.token):
                try:
                    os.kill(process.pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + wait
            while _marked(self.token) and time.monotonic() < deadline:
                for proc in self.processes.values():
                    proc.poll()  # reap
                time.sleep(0.2)
        for proc in self.processes.values():
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        for log in self._log_files:
            log.close()


@dataclasses.dataclass
class RayRun:
    """What the module's one run left: its output folder and log, the reference it must equal,
    the actors seen, the processes of the run (other than the SuperLink's) still alive after
    it ended, and its timings."""

    out: Path
    returncode: int | None
    log: str
    sim: Any
    state: Any
    expected: list[dict]
    actors: dict[int, dict[str, str]]
    left: list[bytes]
    seconds: dict[str, float]


@pytest.fixture(scope="module")
def ray_run(tmp_path_factory) -> Iterator[RayRun]:
    """Runs the app once under the simulation runtime and, meanwhile, the in-process reference."""
    assert importlib.util.find_spec("ray") is not None, 'Ray is missing: pip install -e ".[test]"'
    tmp = tmp_path_factory.mktemp("ray-simulation")
    # Ray's socket paths (session folder + sockets/plasma_store) must stay under 107 bytes.
    ray_tmp = Path(tempfile.mkdtemp(prefix="fp-ray-"))
    local = LocalSimulation(tmp, ray_tmp)
    watch = _ActorWatch(local.token)
    out = tmp / "out"
    overrides, settings = _settings(out, rounds=ROUNDS, clients=SUPERNODES, algorithm="scaffold",
                                    **{"clients-per-round": CLIENTS_PER_ROUND, "round-timeout": 120.0})
    federation = {**tomllib.loads((APP / "simulation.toml").read_text()), "init-args-num-cpus": ACTORS}
    assert federation["num-supernodes"] == SUPERNODES and federation["client-resources-num-cpus"] == 1
    seconds: dict[str, float] = {}
    try:
        started = time.monotonic()
        local.start()
        seconds["superlink"] = time.monotonic() - started
        proc = local.run(overrides, federation)
        watch.start()
        fed, sim = _reference(settings)  # while the simulation starts Ray
        state, _, expected = run_rounds(sim, ROUNDS, fed.test_set())
        seconds["reference"] = time.monotonic() - started - seconds["superlink"]
        try:
            proc.wait(timeout=300)
        except subprocess.TimeoutExpired:
            pass
        seconds["run"] = time.monotonic() - started - seconds["superlink"]
        # The simulation process shuts its Ray instance down after the run: give it a moment.
        deadline = time.monotonic() + 30
        while local.run_processes() and time.monotonic() < deadline:
            time.sleep(0.5)
        left = [p.cmdline[:120] for p in local.run_processes()]
        seconds["shutdown"] = time.monotonic() - started - seconds["superlink"] - seconds["run"]
        watch.done.set()
        watch.join(timeout=5)
        yield RayRun(out, proc.poll(), local.log("flwr-run"), sim, state, expected, dict(watch.actors), left,
                     seconds)
    finally:
        watch.done.set()
        local.stop()
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert not _marked(local.token), "processes of the run survived the fixture"


def test_ray_simulation_equals_the_in_process_simulation(ray_run):
    assert ray_run.returncode == 0 and (ray_run.out / "summary.json").exists(), ray_run.log
    metrics, summary, params, prompt = _read_run(ray_run.out)
    sim, state = ray_run.sim, ray_run.state
    # The final prompt, head and server control variate are the simulation's, and so is every round.
    _assert_close(params, state.params)
    final = codec.decode((ray_run.out / server_app.FINAL_STATE_FILE).read_bytes())
    _assert_close(final.tree["control"], state.control)
    assert len(metrics) == ROUNDS
    for r, (got, want) in enumerate(zip(metrics, ray_run.expected, strict=True)):
        assert got["participants"] == sorted(int(i) for i in sim.sample(r)[0])
        assert got["clients"] == want["clients"] == CLIENTS_PER_ROUND
        assert got["bytes_up"] == want["bytes_up"] and got["bytes_down"] == want["bytes_down"]
        np.testing.assert_allclose(got["train_loss"], want["train_loss"], rtol=1e-4)
        np.testing.assert_allclose(got["eval_accuracy"], want["eval_accuracy"], atol=1e-6)
    twice = set(metrics[0]["participants"]) & set(metrics[1]["participants"])
    assert twice, "no client trained twice: the node state across actors went unchecked"
    # Every virtual SuperNode said which client it is: partition-id 0..7, one node each.
    assert sorted(summary["nodes"], key=int) == [str(i) for i in range(SUPERNODES)]
    assert len(set(summary["nodes"].values())) == SUPERNODES
    assert summary["client_sizes"] == [int(n) for n in sim.client_data.sizes]
    assert summary["runtime"] == "flower" and prompt.backbone.fingerprint == summary["backbone"]["fingerprint"]
    _assert_close(prompt.params, state.params["prompt"], atol=1e-2)  # prompt.fpp may store float16


def test_virtual_supernodes_share_a_pool_of_ray_actors_with_xla_preallocation_off(ray_run):
    assert ray_run.returncode == 0, ray_run.log
    # 8 virtual SuperNodes, 2 actor processes: each actor ran the ClientApp for several nodes.
    assert len(ray_run.actors) == ACTORS, ray_run.actors
    # The actors inherit the SuperLink's environment: XLA preallocates nothing, JAX on the CPU.
    for env in ray_run.actors.values():
        assert env == XLA_ENV


def test_the_simulation_shuts_its_ray_instance_down(ray_run):
    assert ray_run.returncode == 0, ray_run.log
    # After the run only Flower's SuperLink (and its SuperExec) remain: no simulation process,
    # raylet, GCS or worker.
    assert ray_run.left == [], ray_run.left
    print("ray simulation seconds:", {k: round(v, 1) for k, v in ray_run.seconds.items()})
