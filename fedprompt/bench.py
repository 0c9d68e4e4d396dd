"""Benchmarks that users can run (``fedprompt bench ...``).

Numbers are measured side by side in one process; nothing here is a pass/fail test.
"""

from __future__ import annotations

import time
from typing import Any

import jax
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
