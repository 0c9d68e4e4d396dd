"""BBT / FedBPT: the seeded projection, the payload, FedBPT's aggregation and learning."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import tiny_backbone

from fedprompt import PromptConfig, SequenceClassification
from fedprompt.client import bbt
from fedprompt.errors import ConfigError
from fedprompt.server import algorithms
from fedprompt.simulation.engine import FederatedSimulation, build_client_data, run_rounds
from fedprompt.data.partition import dirichlet_partition
from fedprompt.wire import codec

LABELS = 3
DIM, POP, GENERATIONS = 16, 8, 3


@pytest.fixture(scope="module")
def federation():
    backbone = tiny_backbone("bert")
    config = PromptConfig(num_virtual_tokens=2)
    task = SequenceClassification(LABELS)
    rng = np.random.default_rng(0)
    ids = rng.integers(5, 100, (64, 8)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[::4, -3:] = 0
    data = {"input_ids": ids, "attention_mask": mask, "labels": (ids[:, 0] % LABELS).astype(np.int32)}
    parts = dirichlet_partition(data["labels"], 4, 1.0, seed=0)

    cache = {}

    def simulation(head="gradient"):
        if head in cache:
            return cache[head]
        program = bbt.make_bbt_program(
            backbone, config, task, dim=DIM, popsize=POP, local_steps=GENERATIONS, batch_size=8, sigma=1.0, seed=3, head=head
        )
        cache[head] = FederatedSimulation.build(
            backbone, config, task, algorithms.fedavg(), optax.sgd(0.1), build_client_data(data, parts, LABELS),
            clients_per_round=4, local_steps=1, batch_size=1, program=program, seed=1,
        )
        return cache[head]

    return simulation, data


def test_projection_and_p0_are_regenerated_identically_from_the_seed():
    backbone = tiny_backbone("bert")
    config = PromptConfig(num_virtual_tokens=2)
    one = bbt.Subspace(backbone, config, dim=DIM, sigma=0.5, seed=3)
    two = bbt.Subspace(backbone, config, dim=DIM, sigma=0.5, seed=3)
    a = one.matrix()
    np.testing.assert_array_equal(a, two.matrix())
    np.testing.assert_array_equal(a, jax.jit(one.matrix)())  # the same bits inside a program
    np.testing.assert_array_equal(one.p0["embeddings"], two.p0["embeddings"])
    assert a.shape == (DIM, 2 * backbone.width)
    other = bbt.Subspace(backbone, config, dim=DIM, sigma=0.5, seed=4)
    assert not np.array_equal(a, other.matrix())
    z = jnp.linspace(-1, 1, DIM)
    expected = one.p0["embeddings"].reshape(-1) + z @ a
    np.testing.assert_allclose(one.prompt(z)["embeddings"].reshape(-1), expected, rtol=1e-5, atol=1e-6)
    # Clients draw A block by block and never hold it whole; the result is the same.
    projected = jax.jit(one.project)(jnp.stack([z, 2 * z]))[1]
    np.testing.assert_allclose(projected, one.p0["embeddings"].reshape(-1) + 2 * z @ a, rtol=1e-5, atol=1e-6)


def test_projection_scale_follows_bbt():
    backbone = tiny_backbone("bert")
    table = np.asarray(backbone.word_embeddings(jnp.arange(backbone.config.vocab_size)))
    assert math.isclose(bbt.embedding_std(backbone), float(table.std()), rel_tol=1e-5)
    dim, sigma = 500, 0.5
    space = bbt.Subspace(backbone, PromptConfig(num_virtual_tokens=8), dim=dim, sigma=sigma, seed=0)
    a = np.asarray(space.matrix(), np.float64)
    assert math.isclose(space.std, table.std() / (math.sqrt(dim) * sigma), rel_tol=1e-6)
    assert math.isclose(a.std(), space.std, rel_tol=0.02)
    # A CMA-ES candidate z ~ N(0, sigma^2 I) moves the prompt on the scale of the embeddings.
    z = sigma * np.random.default_rng(0).normal(size=(200, dim))
    assert math.isclose((z @ a).std(), table.std(), rel_tol=0.05)


def test_payload_is_z_sigma_and_head_and_counted_exactly(federation):
    simulation, data = federation
    sim = simulation("gradient")
    state, controls = sim.init()
    _, _, result = sim.run_round(state, controls, 0)
    head = {"w": np.zeros((32, LABELS), np.float32), "b": np.zeros(LABELS, np.float32)}
    payload = {"z": np.zeros(DIM, np.float32), "sigma": np.zeros((), np.float32), "head": head}
    one = len(codec.encode({"delta": payload}, kind="update", round=0, fingerprint=sim.backbone.fingerprint))
    counted = bbt.payload_bytes(state.params, "gradient", 0, sim.backbone.fingerprint)
    assert result.bytes_up == result.clients * one == result.clients * counted
    # A frozen head is not sent: z and sigma only.
    frozen = bbt.make_bbt_program(sim.backbone, sim.plan.prompt_config, sim.plan.task, dim=DIM, popsize=POP, local_steps=1, head="frozen")
    shapes = jax.eval_shape(frozen.update, state.params, sim.backbone.weights, data, 64, jax.random.key(0)).delta
    assert jax.tree.map(lambda x: (x.shape, x.dtype), shapes) == {"z": ((DIM,), jnp.float32), "sigma": ((), jnp.float32)}
    delta = jax.jit(frozen.to_delta)(state.params, {"z": jnp.ones(DIM), "sigma": jnp.float32(0.1)})
    assert all(float(jnp.abs(x).max()) == 0 for x in jax.tree.leaves(delta["head"]))
    # MiniLM-sized defaults: z of 500 floats and sigma are 2 KB; a 384 x 26 head adds 40 KB.
    minilm_like = {"z": np.zeros(500, np.float32), "head": {"w": np.zeros((384, 26), np.float32), "b": np.zeros(26, np.float32)}}
    assert 2000 < bbt.payload_bytes(minilm_like, "frozen") < 2200
    assert 42_000 < bbt.payload_bytes(minilm_like, "gradient") < 42_400


def test_server_averages_client_distributions_as_fedbpt(federation):
    simulation, _ = federation
    sim = simulation()
    state, controls = sim.init()
    ids, _ = sim.sample(0)
    results = sim.train_clients(state, controls, ids, 0)
    new_state, _, _ = sim.run_round(state, controls, 0)
    sizes = sim.client_data.sizes[ids].astype(np.float64)
    w = sizes / sizes.sum()
    client_z = np.asarray(state.params["z"]) + np.asarray(results.delta["z"])
    client_sigma = float(state.params["sigma"]) + np.asarray(results.delta["sigma"])
    np.testing.assert_allclose(new_state.params["z"], w @ client_z, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(float(new_state.params["sigma"]), w @ client_sigma, rtol=1e-5)
    assert np.all(np.abs(client_z[1:] - client_z[0]) > 0)  # the clients searched differently


def test_black_box_federation_lowers_the_loss(federation):
    simulation, data = federation
    sim = simulation("gradient")
    state, controls = sim.init()
    before = sim.evaluate(state.params, data)["eval_loss"]
    _, _, history = run_rounds(sim, 5, data, eval_every=5, state=state, client_states=controls)
    assert history[-1]["eval_loss"] < before - 0.03, (before, history[-1]["eval_loss"])


@pytest.mark.parametrize(
    "kwargs, match", [({"dim": 0}, "dim"), ({"popsize": 1}, "popsize"), ({"sigma": -1.0}, "sigma"), ({"head": "zo"}, "head")]
)
def test_bad_settings_are_refused(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        bbt.make_bbt_program(tiny_backbone("bert"), PromptConfig(num_virtual_tokens=2), SequenceClassification(LABELS), **kwargs)
