"""The server's update bound: one clip stage of the plan's server round, the same in both runtimes.

A hostile client that sends an update of values 1e6 moves the global state by about 1e6 x its
weight share per coordinate without a bound (the mean is linear); with ``update_clip = B`` its
delta is scaled to norm B before the weighted mean, so it moves the global state by exactly
``B x share`` (FedAvg, server learning rate 1): the closed forms asserted here. The
deployment's side (the ServerApp applies the very same stage; replayed and oversized replies)
is in tests/test_flower.py.

The backbone is the tiny BERT fixture with seeded synthetic token ids.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import FIXTURES, tiny_backbone

from fedprompt.config import UPDATE_CLIP, RunConfig
from fedprompt.data import loading
from fedprompt.errors import ConfigError
from fedprompt.federation import plan as plan_module
from fedprompt.federation.records import client_message
from fedprompt.privacy import dp
from fedprompt.server import algorithms, rounds
from fedprompt.server.robust import clip_clients
from fedprompt.simulation.engine import FederatedSimulation, build_client_data
from fedprompt.wire import codec

ATTACK = 1e6
CLIENTS = 4
BASE = dict(backbone=str(FIXTURES / "bert"), algorithm="fedavg", clients=CLIENTS, clients_per_round=CLIENTS,
            partition="dirichlet", alpha=1.0, rounds=2, local_steps=2, batch_size=4, max_length=8,
            num_virtual_tokens=4, local_lr=0.05, seed=5, eval_examples=32, out="unused")


def _simulation(**overrides) -> FederatedSimulation:
    config = RunConfig(**{**BASE, **overrides})
    backbone = tiny_backbone("bert")
    train = loading.synthetic_token_data(64, max_length=8, vocab_size=backbone.config.vocab_size, num_labels=3, seed=1)
    plan = plan_module.make_plan(config, backbone, 3)
    return FederatedSimulation(plan, build_client_data(train, loading.partition_clients(config, train["labels"]), 3))


class FirstRound(NamedTuple):
    """A simulation, its initial state and its clients' round-1 payloads (trained once)."""

    sim: FederatedSimulation
    state: Any
    ids: np.ndarray
    host: Any


@pytest.fixture(scope="module", params=["prompt", "zo"])
def first_round(request) -> FirstRound:
    sim = _simulation(**({"method": "zo", "local_steps": 3} if request.param == "zo" else {}))
    state, controls = sim.init()
    ids, _ = sim.sample(0)
    return FirstRound(sim, state, ids, jax.device_get(sim.train_clients(state, controls, ids, 0)))


def _flat(tree) -> np.ndarray:
    return np.concatenate([np.asarray(x, np.float64).ravel() for x in jax.tree.leaves(tree)])


def _apply(first: FirstRound, server: rounds.ServerRound, attacker_payload=None):
    """Round 1 through the plan's public round functions and ``server`` (the plan's own, or one
    with another bound), slot 0's payload replaced by ``attacker_payload`` if given: the move of
    the global state, every slot's delta (after ``to_delta``), the weight shares, the outcome."""
    sim, state, ids, host = first
    plan = sim.plan
    fingerprint = sim.backbone.fingerprint
    payloads = [jax.tree.map(lambda x, s=slot: x[s], host.delta) for slot in range(len(ids))]
    if attacker_payload is not None:
        payloads[0] = attacker_payload
    messages = [codec.encode(client_message(host._replace(delta=p), False), kind=rounds.UPDATE_KIND, round=0,
                             fingerprint=fingerprint) for p in payloads]
    template = plan.update_template({name: column[0, :1] for name, column in sim.client_data.columns.items()})
    received = rounds.receive_updates(messages, round_index=0, fingerprint=fingerprint, template=template)
    assert received.accepted.all()  # finite, well-formed: only a norm bound can stop it
    sizes = sim.client_data.sizes[ids]
    new, outcome = server.apply(state, received, sizes, key=plan.keys.round_noise(0), participants=ids)
    params = state.server.params
    deltas = [_flat(plan.program.to_delta(params, p)) for p in payloads]
    return _flat(new.server.params) - _flat(params), deltas, sizes / sizes.sum(), outcome


def _unbounded(plan) -> rounds.ServerRound:
    """The plan's server round without the bound (``update_clip = 0``)."""
    server = plan.server
    return rounds.ServerRound(server.algorithm, num_clients=server.num_clients, to_delta=plan.program.to_delta,
                              update_clip=None, seeds=server.seeds)


def _clip(v: np.ndarray, bound: float | None) -> np.ndarray:
    norm = np.linalg.norm(v)
    return v if bound is None or norm <= bound else v * (bound / norm)


def test_a_1e6_attacker_moves_the_global_by_the_bound_times_its_share(first_round):
    """FedAvg (server lr 1): the global moves by sum_i share_i clip(delta_i); the attacker's term
    has norm exactly B x share_0 with the bound, about 1e6 x share_0 x sqrt(D) without. A
    gradient client's 1e6 is its delta; a zeroth-order client's, its scalars (replayed)."""
    plan = first_round.sim.plan
    zo = "scalars" in first_round.host.delta
    assert plan.server.update_clip == UPDATE_CLIP  # the default: on
    if not zo:  # prompt: every value of the delta 1e6
        template = jax.eval_shape(plan.init_params)
        attacker = jax.tree.map(lambda t: np.full(t.shape, ATTACK, np.float32), template)
    else:  # zo: seeds and scalars travel; scalars of 1e6 replay to a huge delta
        attacker = {"indices": np.arange(3, dtype=np.int32), "scalars": np.full(3, ATTACK, np.float32)}

    move, deltas, share, outcome = _apply(first_round, plan.server, attacker)
    honest = sum(s * _clip(d, UPDATE_CLIP) for s, d in zip(share[1:], deltas[1:]))
    assert np.linalg.norm(deltas[0]) > 1e3 * UPDATE_CLIP  # the attacker's delta
    assert max(np.linalg.norm(d) for d in deltas[1:]) < UPDATE_CLIP  # honest clients are not clipped
    np.testing.assert_allclose(np.linalg.norm(move - honest), UPDATE_CLIP * share[0], rtol=1e-4)
    assert np.linalg.norm(move) <= UPDATE_CLIP * (1 + 1e-6)
    assert outcome.metrics["clipped"] == 1 and outcome.metrics["update_clip"] == UPDATE_CLIP

    move, deltas, share, outcome = _apply(first_round, _unbounded(plan), attacker)
    np.testing.assert_allclose(np.linalg.norm(move), share[0] * np.linalg.norm(deltas[0]), rtol=1e-3)
    assert np.linalg.norm(move) > 100 * UPDATE_CLIP and "clipped" not in outcome.metrics
    if not zo:  # every coordinate of the global moved by 1e6 x share: the issue's ~3e5
        np.testing.assert_allclose(np.abs(move).max(), ATTACK * share[0], rtol=1e-3)


def test_the_default_bound_leaves_honest_updates_unchanged(first_round):
    plan = first_round.sim.plan
    bounded, _, _, outcome = _apply(first_round, plan.server)
    free, _, _, _ = _apply(first_round, _unbounded(plan))
    np.testing.assert_array_equal(bounded, free)
    assert {k: outcome.metrics[k] for k in ("update_clip", "clipped")} == {"update_clip": UPDATE_CLIP, "clipped": 0}


def test_the_clip_stage_scales_only_present_rows_above_the_bound():
    stacked = {"a": jnp.array([[3.0, 0.0], [30.0, 0.0], [0.0, 0.0], [1e30, 0.0]]),
               "b": jnp.array([[4.0], [40.0], [0.0], [1e30]])}
    weights = np.array([1.0, 1.0, 0.0, 2.0], np.float32)
    stage = rounds.update_clip_stage(rounds.mean_stage(), 5.0)
    mean, _, metrics = stage.apply((), stacked, weights, None)
    # rows of norm 5, 50 (-> 5) and ~1.4e30 (-> 5, overflow-safe); the padding row weighs 0
    expected = (np.array([3, 0, 4]) + np.array([3, 0, 4]) + 2 * np.array([5 / np.sqrt(2), 0, 5 / np.sqrt(2)])) / 4
    np.testing.assert_allclose(np.concatenate([mean["a"], mean["b"]]), expected, rtol=1e-6)
    assert metrics == {"update_clip": 5.0, "clipped": 2}
    clipped, norms = clip_clients(stacked, 5.0)
    np.testing.assert_allclose(norms[:3], [5.0, 50.0, 0.0], rtol=1e-6)
    assert bool(jnp.isfinite(norms[3])) and float(dp.global_norm(jax.tree.map(lambda x: x[3], clipped))) == \
        pytest.approx(5.0, rel=1e-6)
    with pytest.raises(ConfigError, match="update_clip"):
        rounds.update_clip_stage(rounds.mean_stage(), 0.0)
    with pytest.raises(ConfigError, match="update_clip"):
        RunConfig(update_clip=-1.0)


def test_secure_aggregation_bounds_the_released_mean():
    """The server sees only the unmasked sum: the mean it releases is clipped (the round's move)."""
    server = rounds.ServerRound(algorithms.fedavg(), num_clients=3, update_clip=2.0)
    state = server.init({"w": np.zeros(4, np.float32)})
    state, outcome = server.apply_mean(state, {"w": np.full(4, ATTACK / 3, np.float32)}, count=3, train_loss=0.0,
                                       participants=np.arange(3))
    np.testing.assert_allclose(state.server.params["w"], np.full(4, 1.0), rtol=1e-6)  # norm 2
    assert outcome.metrics == {"update_clip": 2.0, "clipped": 1}
    small = {"w": np.array([0.1, 0.0, 0.0, 0.0], np.float32)}
    state, outcome = server.apply_mean(state, small, count=3, train_loss=0.0, participants=np.arange(3))
    np.testing.assert_allclose(state.server.params["w"], [1.1, 1.0, 1.0, 1.0], rtol=1e-6)
    assert outcome.metrics["clipped"] == 0


def test_with_dp_the_dp_clip_sets_the_bound():
    privacy = plan_module.make_privacy
    central = privacy(RunConfig(dp="central", dp_clip=0.5, dp_noise_multiplier=1.0).dp_config(), num_clients=4,
                      clients_per_round=4, rounds=2)
    local = privacy(RunConfig(dp="local", dp_clip=0.5, dp_noise_multiplier=1.0).dp_config(), num_clients=4,
                    clients_per_round=4, rounds=2)
    none = privacy(None, num_clients=4, clients_per_round=4, rounds=2)
    size = 227  # the tiny prompt and head
    assert plan_module.resolve_update_clip(10.0, central, size) is None  # the DP stage's own clip only
    assert plan_module.resolve_update_clip(10.0, none, size) == 10.0
    assert plan_module.resolve_update_clip(0.0, none, size) is None
    bound = plan_module.resolve_update_clip(10.0, local, size)
    assert bound == pytest.approx(0.5 * (1 + 1.0 * (np.sqrt(size) + plan_module.LOCAL_DP_TAIL)))
    # An honest local-DP update (clipped to C, plus N(0, (zC)^2)) is never scaled by it.
    noise = np.random.default_rng(0).normal(0.0, 0.5, (2000, size))
    update = np.zeros(size)
    update[0] = 0.5
    assert np.linalg.norm(update + noise, axis=1).max() < bound
    backbone = tiny_backbone("bert")
    local_plan = plan_module.make_plan(RunConfig(**{**BASE, "dp": "local", "dp_clip": 0.5, "dp_noise_multiplier": 1.0}),
                                       backbone, 3)
    assert local_plan.server.update_clip == pytest.approx(bound)
    central_plan = plan_module.make_plan(
        RunConfig(**{**BASE, "dp": "central", "dp_clip": 0.5, "dp_noise_multiplier": 1.0}), backbone, 3)
    assert central_plan.server.update_clip is None


def test_the_bound_is_a_run_setting_of_both_runtimes():
    config = RunConfig(**{**BASE, "update_clip": 3.0})
    assert config.resolved_update_clip == 3.0 and dataclasses.replace(config, update_clip=0).resolved_update_clip is None
    assert RunConfig().update_clip == UPDATE_CLIP
