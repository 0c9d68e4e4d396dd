"""Device-parallel training on 8 forced host CPU devices equals single-device training.

The 8-device checks run in a subprocess (tests/parallel_worker.py) with
``XLA_FLAGS=--xla_force_host_platform_device_count=8`` set before jax is imported, so the rest
of the suite keeps its one device.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import xla_flags

from fedprompt.errors import ConfigError, InputError
from fedprompt.parallel import REPLICATED, SHARDED, DeviceAxis, pad_batch

WORKER = Path(__file__).parent / "parallel_worker.py"
TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def eight_devices() -> dict[str, float]:
    env = {**os.environ, "XLA_FLAGS": xla_flags("--xla_force_host_platform_device_count=8"), "JAX_PLATFORMS": "cpu"}
    done = subprocess.run([sys.executable, str(WORKER)], env=env, capture_output=True, text=True, timeout=1200)
    if done.returncode != 0:
        pytest.fail(f"the 8-device worker failed:\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _pick(results, prefix):
    picked = {k: v for k, v in results.items() if k.startswith(prefix)}
    assert picked, f"no results for {prefix}"
    return picked


@pytest.mark.parametrize("case", ["bert-prefix-B13", "gpt2-prompt-B12"])
@pytest.mark.parametrize("backend", ["shard_map", "pmap"])
def test_parallel_train_step_equals_single_device_step(eight_devices, case, backend):
    # Batches of 13 and 12 rows are padded to 16 with masked rows; the causal LM loss is a
    # token mean, so the parts are weighted by their completion tokens, not their examples.
    assert eight_devices[f"train_step/{case}/{backend}"] <= TOLERANCE


def test_a_supernode_with_several_devices_splits_its_batches_and_equals_one_device(eight_devices):
    # devices = 4 in a deployment's run config: the ClientApp's gradient steps run data-parallel
    # (the compiled update sums gradients across devices) and its reply equals one device's.
    assert eight_devices["supernode/all-reduce-4"] == 1.0 and eight_devices["supernode/all-reduce-1"] == 0.0
    assert eight_devices["supernode/devices-4-vs-1"] <= TOLERANCE


@pytest.mark.parametrize("k", [5, 11])
@pytest.mark.parametrize("backend", ["shard_map", "pmap"])
def test_device_parallel_client_blocks_equal_the_engine(eight_devices, k, backend):
    results = _pick(eight_devices, f"clients/K{k}-")
    for name, diff in results.items():
        if f"/{backend}" in name:
            assert diff <= TOLERANCE, name


def test_backends_are_identical(eight_devices):
    backends = {k: v for k, v in eight_devices.items() if k.endswith("/backends")}
    assert len(backends) == 4
    assert all(v == 0.0 for v in backends.values()), backends


def test_engine_parallel_option_equals_one_device(eight_devices):
    # FederatedSimulation.build(parallel=backend, devices=None | 3): client blocks and whole rounds.
    hooks = {k: v for k, v in eight_devices.items() if "/engine-" in k}
    assert {k.split("/")[2] for k in hooks} == {"shard_map", "pmap"}
    assert {k.split("/")[3] for k in hooks} == {"engine-hook-8", "engine-hook-3", "engine-round"}
    assert all(v <= TOLERANCE for v in hooks.values()), hooks


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_process_cluster_equals_single_device():
    """The documented multi-host path: jax.distributed.initialize, 2 processes x 2 CPU devices."""
    worker = Path(__file__).parent / "multihost_worker.py"
    port = str(_free_port())
    env = {**os.environ, "XLA_FLAGS": xla_flags()}  # the worker adds its 2 devices
    procs = [
        subprocess.Popen([sys.executable, str(worker), str(i), port], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in range(2)
    ]
    outputs = [p.communicate(timeout=1200) for p in procs]
    for p, (out, err) in zip(procs, outputs):
        assert p.returncode == 0, err[-4000:]
        results = json.loads(out.strip().splitlines()[-1])
        assert results["train_step"] <= TOLERANCE and results["loss"] <= TOLERANCE and results["clients"] <= TOLERANCE, results


# -- one device, in process: the interface itself --------------------------------------------


@pytest.mark.parametrize("backend", ["shard_map", "pmap"])
def test_device_axis_on_one_device(backend):
    axis = DeviceAxis(backend)
    assert axis.size == jax.device_count() == 1

    def per_device(x, w):
        return x * w, axis.psum(jnp.sum(x * w))

    f = axis.map(per_device, (SHARDED, REPLICATED), (SHARDED, REPLICATED))
    w = axis.replicate(jnp.float32(3.0))
    assert axis.is_replicated(w)
    scaled, total = f(jnp.arange(6.0).reshape(3, 2), w)
    np.testing.assert_array_equal(scaled, 3 * np.arange(6.0).reshape(3, 2))
    assert float(total) == 45.0


def test_device_axis_rejects_bad_arguments():
    with pytest.raises(ConfigError):
        DeviceAxis("xmap")
    with pytest.raises(ConfigError):
        DeviceAxis().map(lambda x: x, ("split",), SHARDED)
    with pytest.raises(InputError):
        DeviceAxis().shard(jnp.float32(1.0))


def test_pad_batch_masks_added_rows():
    batch = {"input_ids": np.arange(10).reshape(5, 2), "labels": np.arange(5)}
    padded = pad_batch(batch, 4)
    assert padded["input_ids"].shape == (8, 2)
    np.testing.assert_array_equal(padded["example_mask"], [1, 1, 1, 1, 1, 0, 0, 0])
    np.testing.assert_array_equal(padded["input_ids"][5:], np.repeat(batch["input_ids"][:1], 3, axis=0))
    kept = pad_batch({**batch, "example_mask": np.array([1, 1, 1, 0, 1], np.float32)}, 5)
    np.testing.assert_array_equal(kept["example_mask"], [1, 1, 1, 0, 1])
    with pytest.raises(InputError):
        pad_batch({"a": np.zeros(3), "b": np.zeros(4)}, 2)


def test_run_config_devices_reach_the_engine():
    from conftest import tiny_backbone

    from fedprompt.config import RunConfig
    from fedprompt.data.loading import synthetic_token_data
    from fedprompt.federation.plan import make_plan
    from fedprompt.simulation.engine import FederatedSimulation, build_client_data

    data = synthetic_token_data(8, max_length=6, vocab_size=100, num_labels=3, seed=0)
    clients = build_client_data(data, [np.arange(4), np.arange(4, 8)], 3)
    bb = tiny_backbone("bert")
    for devices, backend, expected in ((1, "shard_map", None), (0, "pmap", len(jax.local_devices()))):
        config = RunConfig(clients=2, clients_per_round=2, num_virtual_tokens=2, devices=devices,
                           parallel_backend=backend)
        sim = FederatedSimulation.from_config(config, make_plan(config, bb, 3), clients)
        if expected is None:
            assert sim.parallel is None
        else:
            assert sim.parallel.backend == backend and sim.parallel.size == expected


def test_engine_refuses_more_devices_than_it_has():
    from conftest import tiny_backbone

    from fedprompt import PromptConfig, SequenceClassification
    from fedprompt.server import algorithms
    from fedprompt.simulation.engine import FederatedSimulation, build_client_data

    ids = np.arange(5, 53, dtype=np.int32).reshape(12, 4)
    encoded = {"input_ids": ids, "attention_mask": np.ones_like(ids), "labels": (ids[:, 0] % 2).astype(np.int32)}
    data = build_client_data(encoded, [np.arange(6), np.arange(6, 12)], 2)
    with pytest.raises(ConfigError, match="devices must be between 1 and the 1 local devices"):
        FederatedSimulation.build(
            tiny_backbone("bert"), PromptConfig(num_virtual_tokens=2), SequenceClassification(2), algorithms.fedavg(),
            optax.adam(0.01), data, clients_per_round=2, local_steps=1, batch_size=2, parallel="shard_map", devices=2,
        )
