"""The seed-only downlink of zeroth-order federations (FedKSeed): both directions carry seeds.

References: a float64 reference of FedAvg's weighted mean of the replayed client deltas (the
state downlink's rule), brute-force merging of pairs, and each client's own copy of the state,
caught up message by message as a SuperNode does, against the server's state bit for bit.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import tiny_backbone

from fedprompt.client import zeroth_order as zo
from fedprompt.data.partition import dirichlet_partition
from fedprompt.errors import ConfigError, WireError
from fedprompt.federation import seeds
from fedprompt.prompts import PromptConfig
from fedprompt.server import algorithms
from fedprompt.simulation.engine import FederatedSimulation, build_client_data, run_rounds
from fedprompt.tasks import SequenceClassification
from fedprompt.wire import codec

LABELS, STEPS, LR, SEED, ROUNDS = 3, 4, 0.05, 7, 6
PROMPT = PromptConfig(num_virtual_tokens=2, init="random", random_std=0.5)


def _data():
    rng = np.random.default_rng(0)
    ids = rng.integers(5, 100, (60, 8)).astype(np.int32)
    return {"input_ids": ids, "attention_mask": np.ones_like(ids), "labels": (ids[:, 0] % LABELS).astype(np.int32)}


def _simulation(downlink: str, *, head_init: str = "random", update_clip: float | None = None, server_lr=1.0,
                dropout: float = 0.0):
    backbone = tiny_backbone("bert")
    task = SequenceClassification(LABELS)
    program = zo.make_zo_program(backbone, PROMPT, task, local_steps=STEPS, batch_size=4, lr=LR, seed=SEED,
                                 num_seeds=64)
    data = _data()
    parts = dirichlet_partition(data["labels"], 5, 1.0, seed=0)
    return FederatedSimulation.build(
        backbone, PROMPT, task, algorithms.fedavg(server_lr), optax.sgd(0.1), build_client_data(data, parts, LABELS),
        clients_per_round=2, program=program, seed=3, total_rounds=ROUNDS, downlink=downlink, head_init=head_init,
        head_init_examples=8, update_clip=update_clip, dropout=dropout, client_block=1,
    )


def test_merge_pairs_sums_each_index_over_clients():
    indices = np.array([[3, 1, 3], [1, 9, 0]])
    scalars = np.array([[1.0, 2.0, 0.5], [4.0, -1.0, 2.0]], np.float32)
    got_i, got_s = seeds.merge_pairs(indices, scalars, np.array([0.25, 0.5]))
    expected = {}
    for k, c in enumerate([0.25, 0.5]):
        for i, g in zip(indices[k], scalars[k]):
            expected[int(i)] = expected.get(int(i), 0.0) + c * float(g)
    assert got_i.tolist() == sorted(expected) and got_i.dtype == np.int32
    np.testing.assert_allclose(got_s, [expected[i] for i in sorted(expected)], rtol=1e-7)
    # a client of coefficient 0 adds nothing; exact zeros are left out
    got_i, got_s = seeds.merge_pairs(np.array([[5, 6]]), np.array([[1.0, 0.0]], np.float32), np.array([1.0]))
    assert got_i.tolist() == [5] and got_s.tolist() == [1.0]


@pytest.mark.parametrize("update_clip, server_lr", [(None, 1.0), (0.02, 0.5)])
def test_the_seed_round_is_fedavgs_weighted_mean_of_the_replayed_deltas(update_clip, server_lr):
    sim = _simulation("seeds", update_clip=update_clip, server_lr=server_lr)
    plan = sim.plan
    state, controls = sim.init()
    start = jax.device_get(state.server.params)
    new_state, _, metrics = run_rounds(sim, 1, {k: np.asarray(v[0]) for k, v in sim.client_data.columns.items()},
                                       state=state, client_states=controls)
    ids, _ = sim.sample(0)
    payload = jax.device_get(sim.train_clients(state, controls, ids, 0).delta)
    weights = sim.client_data.sizes[ids].astype(np.float64)
    expected = np.asarray(start["prompt"]["embeddings"], np.float64).copy()
    for slot in range(len(ids)):  # float64: each client's delta, clipped, weighted
        delta = np.zeros_like(expected)
        for i, g in zip(payload["indices"][slot], payload["scalars"][slot]):
            delta -= LR * float(g) * np.asarray(zo.direction(SEED, int(i), start)["prompt"]["embeddings"], np.float64)
        full = jax.device_get(plan.program.to_delta(start, jax.tree.map(lambda x, s=slot: x[s], payload)))
        norm = np.sqrt(sum(float(np.sum(np.square(np.asarray(x, np.float64)))) for x in jax.tree.leaves(full)))
        factor = min(1.0, update_clip / norm) if update_clip else 1.0
        expected += server_lr * weights[slot] / weights.sum() * factor * delta
    np.testing.assert_allclose(np.asarray(new_state.server.params["prompt"]["embeddings"]), expected, atol=2e-6)
    if update_clip:
        assert metrics[0]["clipped"] >= 1
    assert 0 < metrics[0]["seed_pairs"] <= 2 * STEPS


@pytest.mark.parametrize("head_init", ["random", "class_means"])
def test_clients_that_replay_their_messages_hold_the_servers_state_bit_for_bit(head_init):
    sim = _simulation("seeds", head_init=head_init)
    plan = sim.plan
    fingerprint = sim.backbone.fingerprint
    state, controls = sim.init()
    template = plan.broadcast_template()["params"]
    held = {c: (0, jax.device_get(state.server.params)) for c in range(sim.client_data.num_clients)}
    kinds = []
    for r in range(ROUNDS):
        ids, _ = sim.sample(r)
        sent = plan.seeds.messages(state.downlink, ids.tolist(), r, state.server.params, fingerprint=fingerprint)
        for c, data in zip(ids, sent, strict=True):  # each sampled client catches up from what it is sent
            message = codec.decode(data)
            kinds.append(message.kind)
            params = plan.seeds.catch_up(message, held[int(c)], template)
            jax.tree.map(np.testing.assert_array_equal, params, jax.device_get(state.server.params))
            held[int(c)] = (r, params)
        state, controls, _ = sim.run_round(state, controls, r)
    assert kinds.count(seeds.SEEDS_KIND) == len(kinds)  # a tiny prompt: seeds are always fewer bytes here
    # missed rounds are caught up in one message, round by round
    assert any(codec.decode(data).tree["counts"].shape[0] > 1
               for data in plan.seeds.messages(state.downlink, range(sim.client_data.num_clients), ROUNDS - 1,
                                               state.server.params, fingerprint=fingerprint))


def _started():
    """A seed-downlink simulation before its first round: it, its plan, state, client states,
    the params' template and the initial params on the host."""
    sim = _simulation("seeds")
    state, controls = sim.init()
    return (sim, sim.plan, state, controls, sim.plan.broadcast_template()["params"],
            jax.device_get(state.server.params))


def test_a_client_off_step_or_with_a_damaged_copy_refuses_the_message():
    sim, plan, state, controls, template, start = _started()
    for r in range(2):
        state, controls, _ = sim.run_round(state, controls, r)
    client = int(np.flatnonzero(np.asarray(state.downlink.held) == 0)[0])  # still holds the initial state
    message = codec.decode(plan.seeds.messages(state.downlink, [client], 2, state.server.params, fingerprint=None)[0])
    assert message.kind == seeds.SEEDS_KIND and message.meta["base"] == 0
    with pytest.raises(seeds.SeedDownlinkError, match="holds the state after 1 rounds"):
        plan.seeds.catch_up(message, (1, start), template)
    with pytest.raises(seeds.SeedDownlinkError, match="holds nothing"):
        plan.seeds.catch_up(message, None, template)
    damaged = jax.tree.map(lambda x: x + 1e-7, start)
    with pytest.raises(seeds.SeedDownlinkError, match="did not reach the server's state"):
        plan.seeds.catch_up(message, (0, damaged), template)
    tree = message.tree

    def forged(**changes):
        return codec.decode(codec.encode({**tree, **changes}, kind=seeds.SEEDS_KIND, round=2, meta=message.meta))

    bad = [
        forged(counts=np.array([100, 0], np.int32)),  # more pairs than a round can have
        forged(counts=np.array([1], np.int32)),  # not one count per round
        forged(indices=np.full_like(tree["indices"], 64)),  # outside the seed pool
        forged(scalars=np.full_like(tree["scalars"], np.inf)),
        codec.decode(codec.encode(tree, kind=seeds.SEEDS_KIND, round=2, meta={"base": 3, "digest": "x"})),
        codec.decode(codec.encode(tree, kind="update", round=2)),
    ]
    for hostile in bad:
        with pytest.raises(WireError):
            plan.seeds.catch_up(hostile, (0, start), template)


def test_the_simulation_counts_each_clients_real_downlink_bytes_and_a_dropout_gets_the_state():
    seeded, broadcast = _simulation("seeds", dropout=0.3), _simulation("state", dropout=0.3)
    test = {k: np.asarray(v[0]) for k, v in seeded.client_data.columns.items()}
    state, _, metrics = run_rounds(seeded, ROUNDS, test)
    reference_state, _, reference = run_rounds(broadcast, ROUNDS, test)
    # the same federation up to float rounding (which ZO's 1 / (2 eps) magnifies round by round)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=5e-4),
                 state.server.params, reference_state.server.params)
    # recount: each sampled client's message from the log as it stood, choosing by bytes
    plan = seeded.plan
    fingerprint = seeded.backbone.fingerprint
    replay_state, controls = seeded.init()
    resent = 0
    for r, m in enumerate(metrics):
        ids, dropped = seeded.sample(r)
        full = codec.encode(jax.device_get(plan.broadcast(replay_state)), kind="global", round=r,
                            fingerprint=fingerprint)
        sent = plan.seeds.messages(replay_state.downlink, ids.tolist(), r, replay_state.server.params,
                                   fingerprint=fingerprint)
        assert m["bytes_down"] == sum(map(len, sent)) and reference[r]["bytes_down"] == len(full) * len(ids)
        for c, data in zip(ids, sent):  # one that dropped out before holds nothing known: the state
            nothing = np.asarray(replay_state.downlink.held)[c] == seeds.NOTHING
            assert (codec.decode(data).kind == "global") == nothing
            resent += int(nothing)
        replay_state, controls, _ = seeded.run_round(replay_state, controls, r)
        held = np.asarray(replay_state.downlink.held)
        assert np.all(held[ids[dropped]] == seeds.NOTHING) and np.all(held[ids[~dropped]] == r)
    assert resent >= 1
    assert sum(m["bytes_down"] for m in metrics) < sum(m["bytes_down"] for m in reference) / 2


def test_a_seed_downlink_needs_fedavgs_mean_of_a_zo_client():
    from fedprompt.config import RunConfig

    for bad in ({"method": "prompt"}, {"method": "zo", "algorithm": "fedadam"},
                {"method": "zo", "algorithm": "fedavg", "aggregator": "median"}):
        with pytest.raises(ConfigError, match="zo_downlink = 'seeds' needs"):
            RunConfig(zo_downlink="seeds", **bad)
        assert RunConfig(**bad).resolved_zo_downlink == "state"
    assert RunConfig(method="zo", algorithm="fedavg").resolved_zo_downlink == "seeds"
    assert RunConfig(method="zo", algorithm="fedavg", zo_downlink="state").resolved_zo_downlink == "state"
    with pytest.raises(ConfigError, match="seed downlink needs a zeroth-order client"):
        _simulation_with(algorithm=algorithms.fedadam())


def _simulation_with(algorithm):
    backbone = tiny_backbone("bert")
    task = SequenceClassification(LABELS)
    program = zo.make_zo_program(backbone, PROMPT, task, local_steps=STEPS, batch_size=4, lr=LR, seed=SEED)
    data = _data()
    return FederatedSimulation.build(backbone, PROMPT, task, algorithm, optax.sgd(0.1),
                                     build_client_data(data, [np.arange(30), np.arange(30, 60)], LABELS),
                                     clients_per_round=2, program=program, total_rounds=2, downlink="seeds")


def test_index_dtype_is_the_narrowest_that_holds_the_pool():
    sim = _simulation("seeds")
    assert sim.plan.seeds.index_dtype == np.uint16
    assert jnp.dtype(seeds.SeedDownlink(sim.plan.seeds.apply, num_seeds=1 << 17, pairs_per_round=1, rounds=1,
                                        num_clients=1).index_dtype) == jnp.int32


def test_a_checkpoint_keeps_the_seed_log_and_a_resumed_run_sends_the_same_bytes(tmp_path):
    from fedprompt.simulation import checkpoint

    sim = _simulation("seeds", dropout=0.3)
    test = {k: np.asarray(v[0]) for k, v in sim.client_data.columns.items()}
    straight, _, expected = run_rounds(sim, 4, test)
    state, controls, first = run_rounds(sim, 2, test)
    checkpoint.save_checkpoint(tmp_path, completed_rounds=2, config={"k": 1}, state=(state, controls))
    done, (state, controls) = checkpoint.load_checkpoint(tmp_path, template=sim.init(), config={"k": 1})
    assert done == 2
    resumed, _, rest = run_rounds(sim, 2, test, state=state, client_states=controls, start_round=2)
    assert [m["bytes_down"] for m in first + rest] == [m["bytes_down"] for m in expected]
    jax.tree.map(np.testing.assert_array_equal, resumed.server.params, straight.server.params)
    jax.tree.map(np.testing.assert_array_equal, resumed.downlink, straight.downlink)


def test_a_round_without_updates_leaves_the_state_and_clients_replay_it_as_nothing():
    from fedprompt.server import rounds

    sim, plan, state, controls, template, start = _started()
    state, controls, _ = sim.run_round(state, controls, 0)
    after_one = jax.device_get(state.server.params)
    nothing = rounds.receive_updates([None, None], round_index=1, fingerprint=sim.backbone.fingerprint,
                                     template=plan.update_template({k: v[0, :1] for k, v in
                                                                    sim.client_data.columns.items()}))
    state, outcome = plan.server.apply(state, nothing, [1.0, 1.0])
    assert outcome.num_aggregated == 0 and int(state.server.round) == 2
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.server.params), after_one)
    message = codec.decode(plan.seeds.messages(state.downlink, [0], 2, state.server.params, fingerprint=None)[0])
    assert message.tree["counts"].tolist()[1] == 0
    caught_up = plan.seeds.catch_up(message, (0, start), template)
    jax.tree.map(np.testing.assert_array_equal, caught_up, after_one)
