"""Benchmarks that users can run (``fedprompt bench ...``).

Numbers are measured side by side in one process; nothing here is a pass/fail test.
"""

from __future__ import annotations

import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedprompt.backbones.backbone import Backbone
from fedprompt.client.local import compiled_memory, init_trainable, make_train_step
from fedprompt.prompts import PromptConfig
from fedprompt.tasks import SequenceClassification


def train_step(
    backbone: Backbone,
    *,
    methods: tuple[str, ...] = ("prompt", "prefix"),
    batch_size: int = 16,
    tokens: int = 64,
    virtual_tokens: int = 20,
    steps: int = 10,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Time one compiled prompt-tuning train step per method and report XLA's memory analysis.

    Returns one dict per method: median and min step seconds over ``steps`` timed steps (after
    one warm-up), and the compiled step's argument/output/temporary/peak bytes next to the
    frozen weights' bytes.
    """
    rng = np.random.default_rng(seed)
    batch = {
        "input_ids": rng.integers(1000, min(backbone.config.vocab_size, 20000), (batch_size, tokens)).astype(np.int32),
        "attention_mask": np.ones((batch_size, tokens), np.int32),
        "labels": rng.integers(0, 4, batch_size).astype(np.int32),
    }
    task = SequenceClassification(num_labels=4)
    optimizer = optax.adam(1e-3)
    rows = []
    for method in methods:
        config = PromptConfig(method=method, num_virtual_tokens=virtual_tokens, init="random", random_std=0.02)
        trainable = init_trainable(backbone, config, task, jax.random.key(seed))
        opt_state = optimizer.init(trainable)
        step = make_train_step(backbone, config, task, optimizer)
        memory = compiled_memory(step, trainable, opt_state, batch, backbone.weights)
        trainable, opt_state, metrics = step(trainable, opt_state, batch, backbone.weights)
        jax.block_until_ready(metrics)
        times = []
        for _ in range(steps):
            start = time.perf_counter()
            trainable, opt_state, metrics = step(trainable, opt_state, batch, backbone.weights)
            jax.block_until_ready(metrics)
            times.append(time.perf_counter() - start)
        rows.append(
            {
                "method": method,
                "batch_size": batch_size,
                "tokens": tokens,
                "virtual_tokens": virtual_tokens,
                "trainable_floats": int(sum(np.size(x) for x in jax.tree.leaves(trainable))),
                "step_seconds_median": float(np.median(times)),
                "step_seconds_min": float(np.min(times)),
                "weights_bytes": backbone.weight_bytes(),
                **{f"compiled_{k}_bytes": v for k, v in memory.items()},
            }
        )
    return rows


def simulate_round(
    backbone: Backbone,
    *,
    clients_per_round: int = 8,
    local_steps: int = 4,
    batch_size: int = 16,
    tokens: int = 32,
    virtual_tokens: int = 20,
    examples_per_client: int = 64,
    repeats: int = 3,
    seed: int = 0,
) -> dict[str, Any]:
    """One round's local training three ways, side by side, on the same clients and data.

    * ``vmapped``: the engine's program, all clients of the round in one vmapped XLA program;
    * ``per_client``: a Python loop over clients, each running the same jitted client update;
    * ``per_step``: a Python loop over clients and local steps of the jitted local train step.

    Returns median seconds per round for each and the speed-ups of ``vmapped`` over the loops.
    """
    from fedprompt.server import algorithms
    from fedprompt.simulation.engine import FederatedSimulation, build_client_data

    rng = np.random.default_rng(seed)
    n = clients_per_round * examples_per_client
    encoded = {
        "input_ids": rng.integers(1000, min(backbone.config.vocab_size, 20000), (n, tokens)).astype(np.int32),
        "attention_mask": np.ones((n, tokens), np.int32),
        "labels": rng.integers(0, 4, n).astype(np.int32),
    }
    parts = [np.arange(i * examples_per_client, (i + 1) * examples_per_client) for i in range(clients_per_round)]
    config = PromptConfig(num_virtual_tokens=virtual_tokens)
    task = SequenceClassification(num_labels=4)
    optimizer = optax.adam(1e-2)
    sim = FederatedSimulation(
        backbone, config, task, algorithms.fedavg(), optimizer, build_client_data(encoded, parts, 4),
        clients_per_round=clients_per_round, local_steps=local_steps, batch_size=batch_size, seed=seed,
    )
    state, controls = sim.init()
    ids = np.arange(clients_per_round)
    keys = sim.client_keys(0)
    single = jax.jit(sim._client_update)
    step = make_train_step(backbone, config, task, optimizer)

    def vmapped():
        jax.block_until_ready(sim.train_clients(state, controls, ids, 0))

    def per_client():
        for c in ids:
            data = {k: v[c] for k, v in sim.client_data.columns.items()}
            jax.block_until_ready(single(state.params, backbone.weights, data, examples_per_client, keys[c]))

    def per_step():
        for c in ids:
            params = jax.tree.map(jnp.array, state.params)
            opt_state = optimizer.init(params)
            for s in range(local_steps):
                rows = parts[c][(s * batch_size + np.arange(batch_size)) % examples_per_client]
                params, opt_state, m = step(params, opt_state, {k: v[rows] for k, v in encoded.items()}, backbone.weights)
            jax.block_until_ready(m)

    timings = {}
    for name, fn in (("vmapped", vmapped), ("per_client", per_client), ("per_step", per_step)):
        fn()  # compile
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        timings[name] = float(np.median(times))
    return {
        "clients_per_round": clients_per_round,
        "local_steps": local_steps,
        "batch_size": batch_size,
        "tokens": tokens,
        "virtual_tokens": virtual_tokens,
        "seconds": timings,
        "clients_per_second": {k: clients_per_round / v for k, v in timings.items()},
        "speedup_vs_per_client": timings["per_client"] / timings["vmapped"],
        "speedup_vs_per_step": timings["per_step"] / timings["vmapped"],
    }
