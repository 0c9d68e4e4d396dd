"""Federated algorithms and the simulation engine, checked against closed forms and loops."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import tiny_backbone

from fedprompt import PromptConfig, SequenceClassification
from fedprompt.client.federated import make_client_update
from fedprompt.client.program import ClientProgram, identity_delta
from fedprompt.federation.keys import KeySchedule
from fedprompt.errors import ConfigError, OutOfMemoryError
from fedprompt.server import algorithms
from fedprompt.simulation.engine import (
    CPU_BLOCK_FLOPS,
    ClientData,
    FederatedSimulation,
    build_client_data,
    choose_client_block,
    run_rounds,
)
from fedprompt.data.partition import dirichlet_partition

LABELS = 3


def _encoded(n=72, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(5, 100, (n, 8)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[::4, -3:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": (ids[:, 0] % LABELS).astype(np.int32)}


def _simulation(algorithm, *, clients=6, per_round=4, dropout=0.0, seed=0, block=None, optimizer=None, scaffold_lr=None,
                program=None, block_memory=None):
    encoded = _encoded()
    parts = dirichlet_partition(encoded["labels"], clients, 0.5, seed=0)
    return FederatedSimulation.build(
        tiny_backbone("bert"), PromptConfig(num_virtual_tokens=2, init="random", random_std=0.5),
        SequenceClassification(LABELS), algorithm, optimizer or optax.adam(0.05),
        build_client_data(encoded, parts, LABELS), clients_per_round=per_round, local_steps=3, batch_size=4,
        dropout=dropout, client_block=block, seed=seed, scaffold_lr=scaffold_lr, program=program,
        client_block_memory=block_memory,
    ), encoded


def _np(tree):
    return jax.tree.map(lambda x: np.asarray(x, np.float64), tree)


def test_fedavg_round_is_the_example_weighted_mean_of_client_deltas():
    sim, _ = _simulation(algorithms.fedavg())
    state, controls = sim.init()
    ids, _ = sim.sample(0)
    results = _np(sim.train_clients(state, controls, ids, 0))
    sizes = sim.client_data.sizes[ids].astype(np.float64)
    expected = jax.tree.map(lambda p, d: p + np.tensordot(sizes, d, axes=1) / sizes.sum(), _np(state.params), results.delta)
    new_state, _, result = sim.run_round(state, controls, 0)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), b, rtol=1e-5, atol=1e-6), new_state.params, expected)
    assert result.clients == len(ids) and result.rejected == 0 and int(new_state.server.round) == 1


@pytest.mark.parametrize("block", [1, 2])
def test_vmapped_engine_equals_per_client_loop(block):
    sim, _ = _simulation(algorithms.fedavg())
    state, controls = sim.init()
    ids, _ = sim.sample(3)
    batched = sim.train_clients(state, controls, ids, 3)
    keys = sim.client_keys(3)
    single = jax.jit(sim.plan.program.update)
    for slot, client in enumerate(ids):
        data = {k: v[client] for k, v in sim.client_data.columns.items()}
        one = single(state.params, sim.backbone.weights, data, int(sim.client_data.sizes[client]), keys[client])
        jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a)[slot], np.asarray(b), atol=2e-5), batched.delta, one.delta)
    blocked, _ = _simulation(algorithms.fedavg(), block=block)
    other = blocked.train_clients(state, controls, ids, 3)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5), batched.delta, other.delta)


def test_fedprox_with_mu_zero_equals_fedavg_and_mu_shrinks_drift():
    runs = {}
    for name, algo in {"avg": algorithms.fedavg(), "prox0": algorithms.fedprox(0.0), "prox": algorithms.fedprox(10.0)}.items():
        sim, encoded = _simulation(algo)
        state, controls = sim.init()
        ids, _ = sim.sample(0)
        runs[name] = (sim.train_clients(state, controls, ids, 0), run_rounds(sim, 2, encoded)[0])
    jax.tree.map(np.testing.assert_array_equal, runs["avg"][1].params, runs["prox0"][1].params)

    def drift(result):
        return float(sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(result.delta)))

    assert drift(runs["prox"][0]) < drift(runs["avg"][0])


def test_dropouts_and_rejections_renormalize():
    sim, _ = _simulation(algorithms.fedavg(), clients=8, per_round=6, dropout=0.4, seed=3)
    state, controls = sim.init()
    r = next(r for r in range(20) if 0 < sim.sample(r)[1].sum() < 5)
    ids, dropped = sim.sample(r)
    results = _np(sim.train_clients(state, controls, ids, r))
    # Make one reporting client's update non-finite: it must be rejected, not averaged.
    bad_slot = int(np.flatnonzero(~dropped)[0])
    original = sim.train_clients

    def poisoned(*args):
        out = original(*args)
        return out._replace(delta=jax.tree.map(lambda x: x.at[bad_slot].set(jnp.nan), out.delta))

    sim.train_clients = poisoned
    new_state, _, result = sim.run_round(state, controls, r)
    keep = ~dropped
    keep[bad_slot] = False
    sizes = np.where(keep, sim.client_data.sizes[ids], 0).astype(np.float64)
    expected = jax.tree.map(lambda p, d: p + np.tensordot(sizes, d, axes=1) / sizes.sum(), _np(state.params), results.delta)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), b, rtol=1e-5, atol=1e-6), new_state.params, expected)
    assert result.dropped == int(dropped.sum()) and result.rejected == 1 and result.clients == int(keep.sum())
    assert result.bytes_up > 0 and result.bytes_down > 0


def test_same_seed_gives_identical_metrics_and_no_recompiles():
    def metrics(seed):
        sim, encoded = _simulation(algorithms.fedadam(0.05), dropout=0.3, seed=seed)
        _, _, history = run_rounds(sim, 4, encoded)
        return [{k: v for k, v in m.items() if k != "seconds"} for m in history], sim

    first, sim = metrics(0)
    second, _ = metrics(0)
    assert first == second
    assert metrics(1)[0] != first
    assert len({m["clients"] for m in first}) > 1, "dropouts should vary the number of clients"
    # Varying numbers of clients within one bucket compile no new programs after round 1.
    compiles = []
    listener = lambda event, seconds, **kw: compiles.append(event) if "backend_compile" in event else None  # noqa: E731
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        sim, encoded = _simulation(algorithms.fedadam(0.05), dropout=0.3, seed=5)
        state, controls, _ = run_rounds(sim, 1, encoded)
        before = len(compiles)
        run_rounds(sim, 5, encoded, state=state, client_states=controls, start_round=1)
        assert len(compiles) == before, compiles[before:]
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


def test_fedadam_server_step_is_reddi_algorithm_2():
    algo = algorithms.fedadam(server_lr=0.1, b1=0.9, b2=0.99, tau=1e-3)
    x0 = {"w": jnp.array([0.5, -1.0, 2.0])}
    state = algo.init(x0)
    x, m, v = np.array([0.5, -1.0, 2.0]), np.zeros(3), np.full(3, 1e-6)
    rng = np.random.default_rng(0)
    for _ in range(4):
        delta = rng.normal(size=3)
        state = jax.jit(algo.apply)(state, {"w": jnp.asarray(delta, jnp.float32)})
        m = 0.9 * m + 0.1 * delta
        v = 0.99 * v + 0.01 * delta**2
        x = x + 0.1 * m / (np.sqrt(v) + 1e-3)
    np.testing.assert_allclose(np.asarray(state.params["w"]), x, rtol=1e-5)
    assert int(state.round) == 4


_H = np.array([[1.0, 10.0], [10.0, 1.0], [4.0, 0.5], [0.5, 4.0]], np.float32)
_C = np.array([[3.0, -1.0], [-2.0, 2.0], [1.0, 4.0], [-3.0, -2.0]], np.float32)


def _quadratic_loss(params, weights, batch):
    """Client i minimizes 0.5 * sum_j h_ij (x_j - c_ij)^2, with very different h_i and c_i."""
    return 0.5 * jnp.mean(jnp.sum(batch["h"] * jnp.square(params["x"] - batch["c"]), -1)), {}


def _quadratic_hand_loop(algorithm, scaffold_lr, lr=0.05, steps=20, rounds=30, seed=0):
    """FedAvg / SCAFFOLD on the quadratic clients, written out by hand (every client, every round)."""
    update = make_client_update(_quadratic_loss, optax.sgd(lr), local_steps=steps, batch_size=2, scaffold_lr=scaffold_lr)
    batched = jax.jit(jax.vmap(update, in_axes=(None, None, 0, 0, 0, None, 0)))
    data = {"h": jnp.asarray(np.repeat(_H[:, None], 4, 1)), "c": jnp.asarray(np.repeat(_C[:, None], 4, 1))}
    state = algorithm.init({"x": jnp.zeros(2)})
    client_controls = {"x": jnp.zeros((4, 2))}
    keys = KeySchedule(seed)
    for r in range(rounds):
        out = batched(state.params, None, data, jnp.full(4, 4), keys.client_keys(r, 4), state.control, client_controls)
        mean = jax.tree.map(lambda d: d.mean(0), out.delta)
        state = algorithm.apply(state, mean, jax.tree.map(lambda d: d.mean(0), out.control_delta), 1.0)
        client_controls = out.control if scaffold_lr else client_controls
    return state


def test_scaffold_beats_fedavg_on_heterogeneous_quadratics():
    optimum = (_H * _C).sum(0) / _H.sum(0)

    def error(state):
        return float(np.linalg.norm(np.asarray(state.params["x"]) - optimum))

    fedavg_error = error(_quadratic_hand_loop(algorithms.fedavg(), None))
    scaffold_error = error(_quadratic_hand_loop(algorithms.scaffold(), 0.05))
    assert fedavg_error > 0.3, fedavg_error  # client drift biases FedAvg's fixed point
    assert scaffold_error < 0.1 * fedavg_error, (scaffold_error, fedavg_error)


@pytest.mark.parametrize("name", ["fedavg", "scaffold"])
def test_the_engine_runs_the_quadratic_clients_as_the_hand_loop(name):
    """The same clients through the engine's public client-program seam: equal to the hand loop."""
    scaffold_lr = 0.05 if name == "scaffold" else None
    algorithm = algorithms.from_name(name)
    update = make_client_update(_quadratic_loss, optax.sgd(0.05), local_steps=20, batch_size=2,
                                scaffold_lr=scaffold_lr)
    program = ClientProgram(update=update, to_delta=identity_delta, init=lambda key: {"x": jnp.zeros(2)},
                            client_state=scaffold_lr is not None)
    clients = ClientData(
        columns={"h": jnp.asarray(np.repeat(_H[:, None], 4, 1)), "c": jnp.asarray(np.repeat(_C[:, None], 4, 1))},
        sizes=np.full(4, 4, np.int32), label_histograms=np.zeros((4, 1), np.int64),
    )
    sim = FederatedSimulation.build(tiny_backbone("bert"), PromptConfig(num_virtual_tokens=1), SequenceClassification(LABELS),
                                    algorithm, None, clients, clients_per_round=4, program=program, seed=0)
    state, client_states = sim.init()
    for r in range(30):
        state, client_states, record = sim.run_round(state, client_states, r)
        assert record.clients == 4
    expected = _quadratic_hand_loop(algorithm, scaffold_lr)
    np.testing.assert_allclose(np.asarray(state.params["x"]), np.asarray(expected.params["x"]), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(state.control["x"]), np.asarray(expected.control["x"]), rtol=1e-5, atol=1e-5)


def test_scaffold_runs_in_the_engine():
    sim, encoded = _simulation(algorithms.scaffold(), optimizer=optax.sgd(0.5), scaffold_lr=0.5)
    state, controls, history = run_rounds(sim, 3, encoded)
    assert all(np.isfinite(m["train_loss"]) for m in history)
    assert any(float(jnp.abs(x).max()) > 0 for x in jax.tree.leaves(state.control))
    assert sum(float(jnp.abs(x).sum()) > 0 for x in jax.tree.leaves(controls)) > 0


def _failing_program(message):
    """A client program whose compiled update fails on the device with ``message``."""

    def fail(loss):
        raise RuntimeError(message)

    def update(*args):
        result = inner.update(*args)
        loss = jax.pure_callback(fail, jax.ShapeDtypeStruct(result.loss.shape, result.loss.dtype), result.loss,
                                 vmap_method="sequential")
        return result._replace(loss=loss)

    inner = _simulation(algorithms.fedavg())[0].plan.program
    return inner._replace(update=update)


def test_a_block_that_does_not_fit_says_to_lower_client_block():
    for message, error in (("RESOURCE_EXHAUSTED: Out of memory allocating 28488728704 bytes.", OutOfMemoryError),
                           ("INTERNAL: something else", jax.errors.JaxRuntimeError)):
        sim, _ = _simulation(algorithms.fedavg(), program=_failing_program(message))
        state, controls = sim.init()
        ids, _ = sim.sample(0)
        with pytest.raises(error, match="client_block" if error is OutOfMemoryError else "something else"):
            sim.train_clients(state, controls, ids, 0)


def test_auto_client_blocks_follow_the_work_on_a_cpu_and_a_memory_budget():
    sim, _ = _simulation(algorithms.fedavg(), per_round=4, block="auto")
    one, two = sim.block_cost(1), sim.block_cost(2)
    assert one["flops"] > 0 and two["flops"] == pytest.approx(2 * one["flops"], rel=0.1)
    assert two["temporaries"] > one["temporaries"] and one["peak"] >= one["arguments"]
    # a tiny model's client is far below CPU_BLOCK_FLOPS: the whole round in one block
    assert one["flops"] < CPU_BLOCK_FLOPS / 4 and sim.block == 4
    assert choose_client_block(4, cpu=True, flops_per_client=CPU_BLOCK_FLOPS) == 1
    assert choose_client_block(4, cpu=True, flops_per_client=CPU_BLOCK_FLOPS / 2) == 2
    assert choose_client_block(3, cpu=False) == 4  # an accelerator without a budget: the round, padded
    # a budget between what blocks of one and two need beyond their arguments: blocks of one,
    # with the same results
    need = [cost["peak"] - cost["arguments"] for cost in (one, two)]
    budget = need[0] + 0.5 * (need[1] - need[0])
    tight, _ = _simulation(algorithms.fedavg(), per_round=4, block="auto", block_memory=budget)
    assert tight.block == 1
    state, controls = sim.init()
    ids, _ = sim.sample(0)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                 tight.train_clients(state, controls, ids, 0).delta, sim.train_clients(state, controls, ids, 0).delta)
    for bad in (0, "8", True, 2.5):
        with pytest.raises(ConfigError, match="client_block"):
            _simulation(algorithms.fedavg(), block=bad)


def test_run_config_reads_client_block_as_auto_or_a_number():
    from fedprompt.config import RunConfig

    assert RunConfig().client_block == "auto"
    assert RunConfig(client_block="16").client_block == 16 and RunConfig(client_block=4).client_block == 4
    for bad in ("sixteen", "0", 0, -2):
        with pytest.raises(ConfigError, match="client_block"):
            RunConfig(client_block=bad)
    with pytest.raises(ConfigError, match="client_block_memory"):
        RunConfig(client_block_memory=0.0)
