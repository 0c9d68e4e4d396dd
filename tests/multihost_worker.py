"""One of two processes of a CPU "cluster" (run by tests/test_parallel.py).

``python multihost_worker.py PROCESS_ID PORT``: joins a 2-process JAX cluster through
``jax.distributed.initialize`` (2 host CPU devices per process, Gloo collectives), runs the
device-parallel train step (each process passing its half of the batch) and the device-parallel
client trainer, and prints one JSON line: the largest differences from the single-device results.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

process_id, port = int(sys.argv[1]), sys.argv[2]
os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=2".strip()
sys.path.insert(0, str(Path(__file__).parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(coordinator_address=f"localhost:{port}", num_processes=2, process_id=process_id)

import numpy as np  # noqa: E402
import optax  # noqa: E402
from conftest import tiny_backbone  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402

from fedprompt import PromptConfig, SequenceClassification  # noqa: E402
from fedprompt.client.local import init_trainable, make_train_step  # noqa: E402
from fedprompt.parallel import DeviceAxis, make_parallel_train_clients, make_parallel_train_step  # noqa: E402
from fedprompt.server import algorithms  # noqa: E402
from fedprompt.simulation.engine import FederatedSimulation, build_client_data  # noqa: E402


def max_diff(a, b) -> float:
    return max(jax.tree.leaves(jax.tree.map(lambda x, y: float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64)))), a, b)))


def main() -> None:
    assert jax.process_count() == 2 and jax.device_count() == 4 and jax.local_device_count() == 2
    bb = tiny_backbone("bert")
    config = PromptConfig(num_virtual_tokens=3, init="random", random_std=0.5)
    task = SequenceClassification(3)
    optimizer = optax.adam(0.05)
    rng = np.random.default_rng(0)
    ids = rng.integers(5, bb.config.vocab_size, (16, 8)).astype(np.int32)
    batch = {"input_ids": ids, "attention_mask": np.ones_like(ids), "labels": (ids[:, 0] % 3).astype(np.int32)}
    trainable = init_trainable(bb, config, task, jax.random.key(0))
    reference, _, metrics = make_train_step(bb, config, task, optimizer)(
        jax.tree.map(np.array, trainable), optimizer.init(trainable), batch, bb.weights
    )
    axis = DeviceAxis("shard_map")
    step = make_parallel_train_step(bb, config, task, optimizer, axis=axis)
    mine = {k: v[process_id * 8 : (process_id + 1) * 8] for k, v in batch.items()}  # this process's half
    got, _, got_metrics = step(trainable, optimizer.init(trainable), mine)
    results = {
        "train_step": max_diff(multihost_utils.process_allgather(got, tiled=True), reference),
        "loss": abs(float(multihost_utils.process_allgather(got_metrics.loss, tiled=True)) - float(metrics.loss)),
    }

    n = 60
    ids = rng.integers(5, 100, (n, 8)).astype(np.int32)
    encoded = {"input_ids": ids, "attention_mask": np.ones_like(ids), "labels": (ids[:, 0] % 3).astype(np.int32)}
    parts = np.array_split(np.arange(n), 6)
    sim = FederatedSimulation.build(
        bb, PromptConfig(num_virtual_tokens=2, init="random", random_std=0.5), task, algorithms.fedavg(), optimizer,
        build_client_data(encoded, parts, 3), clients_per_round=5, local_steps=2, batch_size=4, seed=0,
    )
    state, controls = sim.init()
    chosen, _ = sim.sample(1)
    expected = sim.train_clients(state, controls, chosen, 1)
    trainer = make_parallel_train_clients(sim.plan.program.update, axis=axis)
    out = trainer.train_block(
        state.params, bb.weights, sim.client_data.columns, jnp.asarray(sim.client_data.sizes), chosen, sim.client_keys(1)[chosen],
        state.control, jax.tree.map(lambda c: c[chosen], controls),
    )
    results["clients"] = max_diff(multihost_utils.process_allgather(out.delta, tiled=True), expected.delta)
    print(json.dumps(results), flush=True)


if __name__ == "__main__":
    main()
