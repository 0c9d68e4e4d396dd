"""Seed-based zeroth-order tuning: SPSA statistics, exact replay, byte accounting, learning."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import tiny_backbone

from fedprompt import PromptConfig, SequenceClassification
from fedprompt.client import zeroth_order as zo
from fedprompt.client.local import make_loss_fn
from fedprompt.errors import ConfigError
from fedprompt.server import algorithms
from fedprompt.simulation.engine import FederatedSimulation, build_client_data, run_rounds
from fedprompt.data.partition import dirichlet_partition
from fedprompt.wire import codec

LABELS = 3
FINGERPRINT = "0123456789abcdef0123456789abcdef"
CHI2_5_DOF_999 = 20.515  # 0.999 quantile of the chi-square distribution with 5 degrees of freedom


def _quadratic(dim=5, seed=0):
    rng = np.random.default_rng(seed)
    m = rng.normal(size=(dim, dim))
    h = jnp.asarray(m @ m.T / dim + np.eye(dim), jnp.float32)
    b = jnp.asarray(rng.normal(size=dim), jnp.float32)
    x = {"a": jnp.asarray(rng.normal(size=2), jnp.float32), "b": jnp.asarray(rng.normal(size=3), jnp.float32)}

    def loss(tree):
        v = jnp.concatenate([tree["a"], tree["b"]])
        return 0.5 * v @ h @ v + b @ v

    grad = np.concatenate([np.asarray(g) for g in jax.tree.leaves(jax.grad(loss)(x))])
    return loss, x, grad


def test_spsa_is_the_directional_derivative_on_a_quadratic():
    loss, x, grad = _quadratic()
    for k in range(5):
        g, z = zo.spsa_estimate(loss, x, jax.random.key(k), eps=1e-2)
        z = np.concatenate([np.asarray(v) for v in jax.tree.leaves(z)])
        # The central difference of a quadratic has no truncation error: g = z . grad exactly.
        np.testing.assert_allclose(float(g), z @ grad, rtol=2e-3, atol=2e-3)


def test_spsa_times_direction_is_an_unbiased_gradient_estimate():
    loss, x, grad = _quadratic()
    n = 20_000

    def one(key):
        g, z = zo.spsa_estimate(loss, x, key, eps=1e-2)
        return g * jnp.concatenate(jax.tree.leaves(z))

    samples = np.asarray(jax.jit(jax.vmap(one))(jax.random.split(jax.random.key(7), n)), np.float64)
    mean = samples.mean(0)
    # For z ~ N(0, I): Cov(z z^T grad) = |grad|^2 I + grad grad^T (Isserlis); the mean of n
    # estimates is then ~ N(grad, cov / n), so its Mahalanobis distance is chi-square(5).
    cov = (grad @ grad * np.eye(grad.size) + np.outer(grad, grad)) / n
    np.testing.assert_allclose(np.cov(samples.T) / n, cov, rtol=0.1, atol=0.05 * np.abs(cov).max())
    stat = (mean - grad) @ np.linalg.solve(cov, mean - grad)
    assert stat < CHI2_5_DOF_999, stat
    # The test has power: an estimator biased by 10% (stat ~ 0.01 n / 2 = 100) is rejected.
    biased = 1.1 * mean
    assert (biased - grad) @ np.linalg.solve(cov, biased - grad) > CHI2_5_DOF_999


STEPS, LR, EPS, SEED = 16, 0.05, 1e-3, 5


@pytest.fixture(scope="module")
def federation():
    """A tiny-BERT federation of 4 clients running the ZO program, and a client's own jitted run."""
    backbone = tiny_backbone("bert")
    config = PromptConfig(num_virtual_tokens=2, init="random", random_std=0.5)
    task = SequenceClassification(LABELS)
    rng = np.random.default_rng(0)
    ids = rng.integers(5, 100, (48, 8)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[::4, -3:] = 0
    data = {"input_ids": ids, "attention_mask": mask, "labels": (ids[:, 0] % LABELS).astype(np.int32)}
    program = zo.make_zo_program(backbone, config, task, local_steps=STEPS, batch_size=8, lr=LR, eps=EPS, seed=SEED)
    parts = dirichlet_partition(data["labels"], 4, 1.0, seed=0)
    sim = FederatedSimulation.build(
        backbone, config, task, algorithms.fedavg(), optax.sgd(0.1), build_client_data(data, parts, LABELS),
        clients_per_round=3, local_steps=1, batch_size=1, program=program, seed=1,
    )
    loss_fn = make_loss_fn(backbone, config, task)

    @jax.jit
    def client(params, weights, data, num_examples, key):  # a deployed client, on its own
        return zo.zo_local_train(
            lambda p, b: loss_fn(p, weights, b)[0], params, data, num_examples, key,
            local_steps=STEPS, batch_size=8, lr=LR, eps=EPS, seed=SEED,
        )

    return sim, client, data


def test_server_replay_is_bitwise_the_clients_own_result(federation):
    sim, client, _ = federation
    state, _ = sim.init()
    columns = {k: v[0] for k, v in sim.client_data.columns.items()}
    result = client(state.params, sim.backbone.weights, columns, int(sim.client_data.sizes[0]), jax.random.key(1))
    server = jax.jit(lambda p, i, g: zo.replay(p, i, g, LR, seed=SEED))
    jax.tree.map(np.testing.assert_array_equal, server(state.params, result.indices, result.scalars), result.params)
    assert not np.array_equal(np.asarray(result.params["prompt"]["embeddings"]), np.asarray(state.params["prompt"]["embeddings"]))
    # After the wire (encode, decode) the pairs, and so the rebuild, are unchanged.
    message = codec.decode(codec.encode({"indices": result.indices, "scalars": result.scalars}, kind="update", round=0))
    rebuilt = server(state.params, message.tree["indices"], message.tree["scalars"])
    jax.tree.map(np.testing.assert_array_equal, rebuilt, result.params)


def test_engine_replays_every_client_bitwise_inside_its_vmapped_programs(federation):
    sim, client, _ = federation
    state, controls = sim.init()
    ids, _ = sim.sample(0)
    payloads = sim.train_clients(state, controls, ids, 0).delta  # the engine's vmapped clients
    keys = sim.client_keys(0)
    own = []
    for slot, c in enumerate(ids):  # each client on its own, as a deployed client runs
        columns = {k: v[c] for k, v in sim.client_data.columns.items()}
        own.append(client(state.params, sim.backbone.weights, columns, int(sim.client_data.sizes[c]), keys[c]))
        # The same computation as inside the engine (up to float rounding of the batched forward).
        np.testing.assert_array_equal(np.asarray(payloads["indices"][slot]), np.asarray(own[-1].indices))
        np.testing.assert_allclose(np.asarray(payloads["scalars"][slot]), np.asarray(own[-1].scalars), rtol=1e-3, atol=5e-3)
    # The server's vmapped replay of the pairs each client sent gives that client's own bits.
    sent = {"indices": jnp.stack([o.indices for o in own]), "scalars": jnp.stack([o.scalars for o in own])}
    server_deltas = jax.jit(jax.vmap(sim.plan.program.to_delta, in_axes=(None, 0)))(state.params, sent)
    for slot, result in enumerate(own):
        own_delta = jax.tree.map(lambda a, b: a - b, result.params, state.params)
        server_delta = jax.tree.map(lambda s, i=slot: np.asarray(s)[i], server_deltas)
        jax.tree.map(np.testing.assert_array_equal, server_delta, own_delta)


def test_default_payload_is_under_one_kilobyte_and_counted_exactly(federation):
    sim, _, data = federation
    program = zo.make_zo_program(sim.backbone, sim.plan.prompt_config, sim.plan.task)  # the defaults: 64 steps
    state, _ = sim.init()
    shapes = jax.eval_shape(program.update, state.params, sim.backbone.weights, data, 48, jax.random.key(0)).delta
    assert (shapes["indices"].shape, shapes["indices"].dtype) == ((64,), jnp.int32)
    assert (shapes["scalars"].shape, shapes["scalars"].dtype) == ((64,), jnp.float32)
    payload = {"indices": np.arange(64, dtype=np.int32) * 61, "scalars": np.linspace(-3, 3, 64, dtype=np.float32)}
    size = len(codec.encode({"delta": payload}, kind="update", round=3, fingerprint=FINGERPRINT))
    assert size == zo.payload_bytes(64, 3, FINGERPRINT) == 8 * 64 + 192 == 704 <= 1024
    assert zo.payload_bytes(32, 3, FINGERPRINT) == 8 * 32 + 190
    assert zo.payload_bytes(104, 3, FINGERPRINT) <= 1024 < zo.payload_bytes(105, 3, FINGERPRINT)


def test_federated_zo_learns_and_counts_the_real_bytes(federation):
    sim, _, data = federation
    state, controls = sim.init()
    before = sim.evaluate(state.params, data)["eval_loss"]
    state, _, history = run_rounds(sim, 6, data, eval_every=6, state=state, client_states=controls)
    assert history[-1]["eval_loss"] < before - 0.05, (before, history[-1]["eval_loss"])
    fingerprint = sim.backbone.fingerprint
    assert all(h["bytes_up"] == h["clients"] * zo.payload_bytes(STEPS, h["round"] - 1, fingerprint) for h in history)


def test_frozen_head_moves_only_the_prompt(federation):
    sim, _, _ = federation
    program = zo.make_zo_program(sim.backbone, sim.plan.prompt_config, sim.plan.task, head="frozen", lr=LR, seed=SEED)
    state, _ = sim.init()
    payload = {"indices": jnp.array([3, 17, 3], jnp.int32), "scalars": jnp.array([0.5, -2.0, 1.0], jnp.float32)}
    delta = jax.jit(program.to_delta)(state.params, payload)
    assert all(float(jnp.abs(x).max()) == 0 for x in jax.tree.leaves(delta["head"]))
    expected = zo.replay({"prompt": state.params["prompt"]}, payload["indices"], payload["scalars"], LR, seed=SEED)
    np.testing.assert_allclose(
        delta["prompt"]["embeddings"], expected["prompt"]["embeddings"] - state.params["prompt"]["embeddings"], atol=1e-6
    )


@pytest.mark.parametrize(
    "kwargs, match", [({"lr": 0.0}, "lr"), ({"local_steps": 0}, "local_steps"), ({"head": "gradient"}, "head")]
)
def test_bad_settings_are_refused(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        zo.make_zo_program(tiny_backbone("bert"), PromptConfig(num_virtual_tokens=2), SequenceClassification(LABELS), **kwargs)


def test_run_config_local_lr_sets_the_zo_learning_rate():
    """``fedprompt run --method zo --local-lr X``: the replayed step is lr x the same scalars."""
    from fedprompt.config import RunConfig
    from fedprompt.federation.plan import make_program

    bb = tiny_backbone("bert")
    prompt_config = PromptConfig(num_virtual_tokens=2)
    task = SequenceClassification(3)
    programs = {lr: make_program(RunConfig(method="zo", local_steps=3, local_lr=lr), bb, prompt_config, task)
                for lr in (None, 0.05)}
    from fedprompt.client.local import init_trainable

    params = init_trainable(bb, prompt_config, task.resolve(bb), jax.random.key(0))
    payload = {"indices": jnp.array([3, 7, 11], jnp.int32), "scalars": jnp.array([0.5, -1.0, 2.0], jnp.float32)}
    steps = {lr: program.to_delta(params, payload) for lr, program in programs.items()}
    for default, fast in zip(jax.tree.leaves(steps[None]), jax.tree.leaves(steps[0.05])):
        np.testing.assert_allclose(fast, 5 * default, rtol=1e-5, atol=1e-7)  # default lr 0.01
    assert max(float(jnp.max(jnp.abs(x))) for x in jax.tree.leaves(steps[0.05])) > 0
