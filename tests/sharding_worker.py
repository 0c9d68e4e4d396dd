"""Run by tests/test_big_backbones.py in a subprocess with 8 forced host CPU devices.

Prints one JSON object of named numbers: for every check, the largest absolute difference
between the sharded result and the single-device one, and the bytes the devices hold.
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
import numpy as np  # noqa: E402
import optax  # noqa: E402
from conftest import tiny_backbone  # noqa: E402

from fedprompt import CausalLM, PromptConfig, SequenceClassification  # noqa: E402
from fedprompt.backbones.abstract import abstract_backbone  # noqa: E402
from fedprompt.client.local import init_trainable, make_train_step  # noqa: E402
from fedprompt.bench import step_memory_report  # noqa: E402
from fedprompt.sharding import make_mesh, make_sharded_train_step, weight_bytes_per_device  # noqa: E402

STEPS = 2


def max_diff(a, b) -> float:
    pairs = zip(jax.tree.leaves(a), jax.tree.leaves(b))
    return max(float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64)))) for x, y in pairs)


def batches(bb, n: int, task) -> list[dict[str, np.ndarray]]:
    out = []
    for seed in range(STEPS):
        rng = np.random.default_rng(seed)
        ids = rng.integers(5, bb.config.vocab_size, (n, 8)).astype(np.int32)
        mask = np.ones_like(ids)
        mask[::3, -2:] = 0
        batch = {"input_ids": ids, "attention_mask": mask}
        if isinstance(task, CausalLM):
            batch["loss_mask"] = (np.arange(8)[None] >= rng.integers(1, 7, (n, 1))).astype(np.int32)
        else:
            batch["labels"] = (ids[:, 0] % 3).astype(np.int32)
        out.append(batch)
    return out


def train(step, trainable, optimizer, data, *, weights=None):
    """``STEPS`` steps from ``trainable``; the trained state and the last loss."""
    trainable = jax.tree.map(np.array, trainable)
    opt_state = optimizer.init(trainable)
    loss = None
    for batch in data:
        if weights is None:
            trainable, opt_state, metrics = step(trainable, opt_state, batch)
        else:
            trainable, opt_state, metrics = step(trainable, opt_state, batch, weights)
        loss = float(metrics.loss)
    return jax.tree.map(np.array, trainable), loss


def check_sharded_step(results, name: str, method: str, task, batch_size: int, meshes) -> None:
    bb = tiny_backbone(name)
    config = PromptConfig(method=method, num_virtual_tokens=3, init="random", random_std=0.5)
    optimizer = optax.adam(0.05)
    trainable = init_trainable(bb, config, task, jax.random.key(0))
    data = batches(bb, batch_size, task)
    want, want_loss = train(make_train_step(bb, config, task, optimizer), trainable, optimizer, data, weights=bb.weights)
    for label, mesh, remat in meshes:
        step = make_sharded_train_step(bb, config, task, optimizer, mesh, remat=remat)
        got, loss = train(step, trainable, optimizer, data)
        key = f"step/{name}-{method}/{label}"
        results[key] = max(max_diff(got, want), abs(loss - want_loss))
        # What each device holds of the weights, from the placed arrays themselves.
        held = sum(leaf.addressable_shards[0].data.nbytes for leaf in jax.tree.leaves(step.weights))
        results[f"{key}/held_bytes"] = held
        results[f"{key}/closed_form_bytes"] = weight_bytes_per_device(bb, mesh)
        results[f"{key}/sharded_leaves"] = sum(not leaf.sharding.is_fully_replicated for leaf in jax.tree.leaves(step.weights))
    results[f"weights/{name}"] = bb.weight_bytes()


def check_abstract_memory(results) -> None:
    """The abstract bench path on the tiny Qwen2 config over 8 devices: XLA's per-device bytes.

    Qwen2 ties its LM head to the embeddings, so every weight is read by a classification step.
    """
    bb = abstract_backbone(json.loads((Path(__file__).parent / "fixtures" / "qwen2" / "config.json").read_text()))
    eight = step_memory_report(bb, batch_size=2, tokens=32, devices=8, num_virtual_tokens=4, remat=(True,))  # XLA_FLAGS: fast compile
    results["abstract/weight_bytes"] = bb.weight_bytes()
    results["abstract/closed_form_per_device"] = eight["weight_bytes_per_device"]
    results["abstract/arguments_8"] = eight["rows"]["remat"]["arguments"]
    results["abstract/peak_8"] = eight["rows"]["remat"]["peak"]


def main() -> None:
    assert jax.device_count() == 8, jax.devices()
    results: dict[str, float] = {}
    model8 = make_mesh(model=8)
    grid = make_mesh(model=4, data=2)
    check_sharded_step(results, "llama", "prompt", SequenceClassification(3), 4, [("model8", model8, False)])
    # 5 rows: padded to 6 (a masked row) for the data axis of 2.
    check_sharded_step(results, "qwen2", "prefix", CausalLM(), 5, [("data2-model4-remat", grid, True)])
    check_abstract_memory(results)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
