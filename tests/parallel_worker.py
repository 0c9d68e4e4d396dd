"""Run by tests/test_parallel.py in a subprocess with 8 forced host CPU devices.

Prints one JSON object: for every check, the largest absolute difference between the
device-parallel result and the single-device one (or between the two backends).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

if "--xla_force_host_platform_device_count=8" not in os.environ.get("XLA_FLAGS", ""):
    sys.exit("run me with XLA_FLAGS=--xla_force_host_platform_device_count=8")

sys.path.insert(0, str(Path(__file__).parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from conftest import tiny_backbone  # noqa: E402

from fedprompt import CausalLM, PromptConfig, SequenceClassification  # noqa: E402
from fedprompt.client.local import init_trainable, make_train_step  # noqa: E402
from fedprompt.parallel import DeviceAxis, make_parallel_train_clients, make_parallel_train_step  # noqa: E402
from fedprompt.server import algorithms  # noqa: E402
from fedprompt.simulation.engine import FederatedSimulation, build_client_data  # noqa: E402
from fedprompt.data.partition import dirichlet_partition  # noqa: E402

BACKENDS = ("shard_map", "pmap")


def max_diff(a, b) -> float:
    diffs = jax.tree.leaves(jax.tree.map(lambda x, y: float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64)))), a, b))
    return max(diffs)


def batch_for(bb, n, t, task, seed):
    rng = np.random.default_rng(seed)
    ids = rng.integers(5, bb.config.vocab_size, (n, t)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[::3, -2:] = 0
    batch = {"input_ids": ids, "attention_mask": mask}
    if isinstance(task, CausalLM):
        loss_mask = np.zeros_like(ids)
        for i in range(n):
            loss_mask[i, rng.integers(1, t - 1):] = 1  # completions of different lengths
        batch["loss_mask"] = loss_mask
    else:
        batch["labels"] = (ids[:, 0] % 3).astype(np.int32)
    return batch


def check_train_step(results, name, method, task, batch_size, steps=2):
    bb = tiny_backbone(name)
    config = PromptConfig(method=method, num_virtual_tokens=3, init="random", random_std=0.5)
    optimizer = optax.adam(0.05)
    trainable0 = init_trainable(bb, config, task, jax.random.key(0))
    batches = [batch_for(bb, batch_size, 8, task, seed) for seed in range(steps)]

    single = make_train_step(bb, config, task, optimizer)
    trainable = jax.tree.map(np.array, trainable0)
    opt_state = optimizer.init(trainable)
    reference = []
    for batch in batches:
        trainable, opt_state, metrics = single(trainable, opt_state, batch, bb.weights)
        reference.append((jax.tree.map(np.array, trainable), np.array(metrics.loss), np.array(metrics.examples)))

    outs = {}
    for backend in BACKENDS:
        step = make_parallel_train_step(bb, config, task, optimizer, backend=backend)
        replicated_weights = step.weights
        trainable = jax.tree.map(np.array, trainable0)
        opt_state = optimizer.init(trainable)
        diff = 0.0
        history = []
        for batch, (want, loss, examples) in zip(batches, reference):
            trainable, opt_state, metrics = step(trainable, opt_state, batch)
            diff = max(diff, max_diff(trainable, want), abs(float(metrics.loss) - float(loss)))
            assert float(metrics.examples) == float(examples), (metrics.examples, examples)
            history.append(jax.tree.map(np.array, trainable))
        if backend == "shard_map":
            # No implicit transfer at all in a step (the batch is placed explicitly): the
            # backbone is not copied again, to any device.
            with jax.transfer_guard("disallow"):
                jax.block_until_ready(step(trainable, opt_state, batches[0]))
        # The backbone stayed where it was put: the same replicated buffers, on every device.
        assert step.weights is replicated_weights
        leaf = jax.tree.leaves(step.weights)[0]
        assert len(leaf.sharding.device_set) == 8 and leaf.sharding.is_fully_replicated
        results[f"train_step/{name}-{method}-B{batch_size}/{backend}"] = diff
        outs[backend] = history
    results[f"train_step/{name}-{method}-B{batch_size}/backends"] = max_diff(outs["shard_map"], outs["pmap"])


def check_client_blocks(results, k, algorithm, scaffold_lr=None, hook_backend="shard_map"):
    rng = np.random.default_rng(0)
    n = 96
    ids = rng.integers(5, 100, (n, 8)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[::4, -3:] = 0
    encoded = {"input_ids": ids, "attention_mask": mask, "labels": (ids[:, 0] % 3).astype(np.int32)}
    clients = 12
    parts = dirichlet_partition(encoded["labels"], clients, 0.5, seed=0)
    optimizer = optax.sgd(0.5) if scaffold_lr else optax.adam(0.05)
    backbone = tiny_backbone("bert")

    def simulation(**kw):
        return FederatedSimulation.build(
            backbone, PromptConfig(num_virtual_tokens=2, init="random", random_std=0.5),
            SequenceClassification(3), algorithm, optimizer, build_client_data(encoded, parts, 3),
            clients_per_round=k, local_steps=3, batch_size=4, seed=0, scaffold_lr=scaffold_lr, **kw,
        )

    sim = simulation()
    state, controls = sim.init()
    if scaffold_lr:  # non-zero control variates, so the control path is exercised
        state = state._replace(server=state.server._replace(control=jax.tree.map(lambda x: x + 0.01, state.control)))
        controls = jax.tree.map(lambda c: c - 0.02 * np.arange(clients).reshape(-1, *[1] * (c.ndim - 1)), controls)
    round_index = 2
    chosen, _ = sim.sample(round_index)
    reference = sim.train_clients(state, controls, chosen, round_index)
    keys = sim.client_keys(round_index)
    label = f"clients/K{k}-{algorithm.name}"
    outs = {}
    for backend in BACKENDS:
        trainer = make_parallel_train_clients(sim.plan.program.update, axis=DeviceAxis(backend))
        direct = trainer.train_block(
            state.params, sim.backbone.weights, sim.client_data.columns, jnp.asarray(sim.client_data.sizes),
            chosen, keys[chosen], state.control, jax.tree.map(lambda c: c[chosen], controls),
        )
        assert jax.tree.leaves(direct)[0].shape[0] == k
        results[f"{label}/{backend}"] = max_diff(direct, reference)
        if backend == hook_backend:
            # The engine's own option: blocks of 8 / 16 clients spread over 8 (or 3) devices,
            # then a whole round (encode, validate, aggregate, server step).
            for devices in (None, 3):
                parallel = simulation(parallel=backend, devices=devices)
                hooked = parallel.train_clients(state, controls, chosen, round_index)
                results[f"{label}/{backend}/engine-hook-{devices or 8}"] = max_diff(hooked, reference)
            want_state, want_controls, _ = sim.run_round(state, controls, round_index)
            got_state, got_controls, _ = parallel.run_round(state, controls, round_index)
            results[f"{label}/{backend}/engine-round"] = max(
                max_diff(got_state.params, want_state.params), max_diff(got_controls, want_controls)
            )
        outs[backend] = direct
    results[f"{label}/backends"] = max_diff(outs["shard_map"], outs["pmap"])


def check_supernode_devices(results: dict[str, float]) -> None:
    """A SuperNode with ``devices = 4`` splits its client's local batches over 4 devices; its
    ClientApp reply equals the one-device reply."""
    from flwr.app import ConfigRecord, Context, Message, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from fedprompt.flower import client_app, common
    from fedprompt.server.rounds import GLOBAL_KIND
    from fedprompt.wire import codec

    for name in ("_run_id", "_node_id", "_task_id"):  # the identity Flower gives a process
        setattr(TaskIdentity, name, 1)
    base = {"backbone": str(Path(__file__).parent / "fixtures" / "bert"), "synthetic-examples": 48,
            "synthetic-labels": 3, "eval-examples": 16, "train-examples": "", "clients": 2, "clients-per-round": 2,
            "partition": "iid", "rounds": 1, "local-steps": 3, "batch-size": 4, "max-length": 8,
            "num-virtual-tokens": 2, "local-lr": 0.05, "seed": 3}
    replies = {}
    for devices in (1, 4):
        run_config = {**base, "devices": devices}
        settings = common.settings_from_run_config(run_config)
        fed = common.build_federation(settings, common.load_run_backbone(settings), client=True)
        state = fed.plan.init()
        payload = codec.encode(jax.device_get(fed.plan.broadcast(state)), kind=GLOBAL_KIND, round=0,
                               fingerprint=fed.backbone.fingerprint)
        record = ConfigRecord({"global": payload, "round": 0, "client-id": 0})
        message = Message(RecordDict({common.RECORD: record}), dst_node_id=1, message_type="train")
        context = Context(run_id=1, node_id=1, node_config={"partition-id": 0, "num-partitions": 2},
                          state=RecordDict(), run_config=run_config)
        reply = client_app.app(message, context)
        replies[devices] = codec.decode(reply.content.config_records[common.RECORD]["update"]).tree["delta"]
        rows, size = fed.client_rows(0)
        params = state.params
        hlo = jax.jit(fed.plan.program.update).lower(
            params, fed.backbone.weights, rows, np.int32(size), fed.plan.client_keys(0)[0], params, params,
        ).compile().as_text()
        results[f"supernode/all-reduce-{devices}"] = float("all-reduce" in hlo)
    results["supernode/devices-4-vs-1"] = max_diff(replies[4], replies[1])


def main() -> None:
    assert jax.device_count() == 8, jax.devices()
    results: dict[str, float] = {}
    check_train_step(results, "bert", "prefix", SequenceClassification(3), 13)  # padded: 13 -> 16 rows
    check_train_step(results, "gpt2", "prompt", CausalLM(), 12)  # token-weighted loss, padded
    check_client_blocks(results, 5, algorithms.fedavg(), hook_backend="shard_map")
    check_client_blocks(results, 11, algorithms.scaffold(), scaffold_lr=0.5, hook_backend="pmap")
    check_supernode_devices(results)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
