"""Compressed client updates through the simulation engine: real bytes, bounded error."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import tiny_backbone

from fedprompt import PromptConfig, SequenceClassification
from fedprompt.client.compressed import compressed_program
from fedprompt.client.federated import make_client_update
from fedprompt.client.local import make_loss_fn
from fedprompt.errors import ConfigError
from fedprompt.server import algorithms
from fedprompt.simulation.engine import FederatedSimulation, build_client_data
from fedprompt.data.partition import dirichlet_partition
from fedprompt.wire import codec

LABELS = 3


def _simulation(program_kind=None, **kw):
    rng = np.random.default_rng(0)
    ids = rng.integers(5, 100, (72, 8)).astype(np.int32)
    encoded = {"input_ids": ids, "attention_mask": np.ones_like(ids), "labels": (ids[:, 0] % LABELS).astype(np.int32)}
    parts = dirichlet_partition(encoded["labels"], 6, 0.5, seed=0)
    bb = tiny_backbone("bert")
    config = PromptConfig(num_virtual_tokens=2, init="random", random_std=0.5)
    task = SequenceClassification(LABELS)
    optimizer = optax.adam(0.05)
    program = None
    if program_kind is not None:
        update = make_client_update(make_loss_fn(bb, config, task.resolve(bb)), optimizer, local_steps=3, batch_size=4)
        program = compressed_program(update, program_kind, **kw)
    return FederatedSimulation.build(
        bb, config, task, algorithms.fedavg(), optimizer, build_client_data(encoded, parts, LABELS),
        clients_per_round=4, local_steps=3, batch_size=4, seed=0, program=program,
    )


@pytest.fixture(scope="module")
def plain():
    """The uncompressed simulation, its first round and its clients' true updates."""
    sim = _simulation()
    state, controls = sim.init()
    new_state, _, result = sim.run_round(state, controls, 0)
    ids, _ = sim.sample(0)
    return sim, state, controls, ids, new_state, result, sim.train_clients(state, controls, ids, 0).delta


def test_compressed_round_sends_the_payload_bytes_and_stays_close(plain):
    # int4 here; int8 payload sizes are checked in test_kernels (wire codec).
    _, state, controls, ids, plain_state, plain_result, deltas = plain
    sim = _simulation("int4")
    new_state, _, result = sim.run_round(state, controls, 0)
    assert result.rejected == 0 and result.clients == plain_result.clients
    # bytes_up counts the encoded payloads themselves
    payloads = jax.device_get(sim.train_clients(state, controls, ids, 0).delta)
    assert {x.dtype for x in jax.tree.leaves(payloads)} == {np.dtype(np.uint8), np.dtype(np.float32)}
    sent = sum(
        len(codec.encode({"delta": jax.tree.map(lambda x: x[i], payloads)}, kind="update", round=0, fingerprint=sim.backbone.fingerprint))
        for i in range(len(ids))
    )
    assert result.bytes_up == sent < plain_result.bytes_up
    # The aggregate differs from the uncompressed one by less than one quantization step of
    # the largest client update (stochastic rounding: |error| < scale per value).
    step = max(float(jnp.max(jnp.abs(x))) for x in jax.tree.leaves(deltas)) / 7
    diffs = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), new_state.params, plain_state.params)
    assert 0 < max(jax.tree.leaves(diffs)) < step


def test_error_feedback_carries_the_residual(plain):
    _, state, controls, ids, _, _, deltas = plain
    sim = _simulation("int4", error_feedback=True, stochastic=False)
    out = sim.train_clients(state, controls, ids, 0)
    payload = jax.tree.map(lambda x: x[0], out.delta)
    residual = jax.tree.map(lambda x: x[0], out.control)
    true = jax.tree.map(lambda x: x[0], deltas)
    sent = sim.plan.program.to_delta(state.params, payload)
    # what was sent + what is kept = the true update
    jax.tree.map(lambda s, r, t: np.testing.assert_allclose(s + r, t, atol=1e-6), sent, residual, true)


def test_unknown_kind():
    with pytest.raises(ConfigError):
        compressed_program(lambda *a: None, "int2")


def test_run_config_compression_keeps_each_clients_residual():
    """RunConfig(compress=..., error_feedback=True) through the one config->simulation path:
    the engine stores each reporting client's residual and hands it back next time."""
    from fedprompt.config import RunConfig
    from fedprompt.federation.plan import make_plan
    from fedprompt.data.loading import partition_clients

    rng = np.random.default_rng(0)
    ids = rng.integers(5, 100, (72, 8)).astype(np.int32)
    encoded = {"input_ids": ids, "attention_mask": np.ones_like(ids), "labels": (ids[:, 0] % LABELS).astype(np.int32)}
    config = RunConfig(clients=6, clients_per_round=4, local_steps=3, batch_size=4, algorithm="fedavg",
                       num_virtual_tokens=2, compress="int4", error_feedback=True)
    bb = tiny_backbone("bert")
    task = SequenceClassification(LABELS)
    parts = partition_clients(config, encoded["labels"])
    plan = make_plan(config, bb, LABELS)
    sim = FederatedSimulation.from_config(config, plan, build_client_data(encoded, parts, LABELS))
    assert sim.plan.program.client_state
    state, controls = sim.init()
    ids0, _ = sim.sample(0)
    sent = sim.train_clients(state, controls, ids0, 0)
    new_state, new_controls, result = sim.run_round(state, controls, 0)
    assert result.clients == 4
    for leaf, want in zip(jax.tree.leaves(new_controls), jax.tree.leaves(sent.control)):
        np.testing.assert_array_equal(np.asarray(leaf)[ids0], np.asarray(want))
        others = np.setdiff1d(np.arange(6), ids0)
        assert not np.asarray(leaf)[others].any()  # clients that did not train keep a zero residual
    assert max(float(jnp.max(jnp.abs(x))) for x in jax.tree.leaves(sent.control)) > 0
    # Next round (4 of 6 clients again, so some return), the stored residuals reach the
    # clients: the payloads differ from those of clients handed zero residuals.
    ids1, _ = sim.sample(1)
    again = sim.train_clients(new_state, new_controls, ids1, 1)
    zero = sim.train_clients(new_state, jax.tree.map(jnp.zeros_like, new_controls), ids1, 1)
    assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(again.delta), jax.tree.leaves(zero.delta)))
