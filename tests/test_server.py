"""Server side: aggregation against closed-form NumPy means, FedOpt against Algorithm 2 by hand."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedprompt.errors import ConfigError, InputError
from fedprompt.server import aggregators
from fedprompt.server.aggregators import (
    Aggregation,
    bucket_size,
    finite_clients,
    pad_clients,
    stack_clients,
    weighted_mean,
)
from fedprompt.server.optimizers import (
    ScaleByFedOptState,
    fedadagrad_optimizer,
    fedadam_optimizer,
    fedavg_optimizer,
    fedavgm_optimizer,
    fedyogi_optimizer,
    make_server_optimizer,
    scale_by_fedopt,
    server_update,
)

SHAPES = {"prompt": (4, 3), "head": {"w": (5,), "b": ()}}


def random_tree(rng: np.random.Generator, lead: tuple[int, ...] = (), scale: float = 1.0):
    """A small pytree with the structure of SHAPES, float64 NumPy leaves."""
    return jax.tree.map(lambda s: scale * rng.standard_normal(lead + s), SHAPES, is_leaf=lambda s: isinstance(s, tuple))


def np_weighted_mean(stacked, weights):
    """The closed form in float64: sum_k w_k x_k / sum_k w_k over clients with w_k > 0."""
    w = np.asarray(weights, np.float64)
    keep = w > 0

    def leaf(x):
        x = np.asarray(x, np.float64)[keep]
        return np.tensordot(w[keep], x, axes=1) / w[keep].sum() if keep.any() else np.zeros(x.shape[1:])

    return jax.tree.map(leaf, stacked)


def assert_tree_close(actual, expected, rtol=1e-5, atol=1e-6):
    assert jax.tree.structure(actual) == jax.tree.structure(expected)
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
        np.testing.assert_allclose(np.asarray(a, np.float64), e, rtol=rtol, atol=atol)


# ---------------------------------------------------------------- aggregation


@pytest.mark.parametrize("seed", range(4))
def test_weighted_mean_matches_closed_form(seed):
    rng = np.random.default_rng(seed)
    k = int(rng.integers(1, 9))
    stacked = random_tree(rng, (k,))
    weights = rng.uniform(0.1, 10.0, k) * (rng.uniform(size=k) > 0.3)
    weights[0] = max(weights[0], 0.5)  # at least one client counts
    out = weighted_mean(jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), stacked), jnp.asarray(weights, jnp.float32))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(out))
    assert_tree_close(out, np_weighted_mean(stacked, weights))


def test_weighted_mean_zero_weight_clients_may_hold_nan():
    stacked = {"w": jnp.array([[1.0, 2.0], [jnp.nan, jnp.inf], [3.0, 4.0]])}
    out = jax.jit(weighted_mean)(stacked, jnp.array([1.0, 0.0, 3.0]))
    np.testing.assert_allclose(out["w"], [2.5, 3.5])


def test_weighted_mean_all_zero_weights_gives_zeros():
    stacked = {"w": jnp.array([[1.0, jnp.nan], [2.0, 3.0]], jnp.bfloat16)}
    out = weighted_mean(stacked, jnp.zeros(2))
    assert out["w"].dtype == jnp.float32
    np.testing.assert_array_equal(out["w"], [0.0, 0.0])


def test_weighted_mean_bf16_leaves_accumulate_in_float32():
    rng = np.random.default_rng(7)
    stacked = jax.tree.map(lambda x: jnp.asarray(x, jnp.bfloat16), random_tree(rng, (6,)))
    weights = rng.uniform(0.5, 3.0, 6)
    out = weighted_mean(stacked, jnp.asarray(weights, jnp.float32))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(out))
    # The reference sees exactly the bf16-rounded inputs; only float32 accumulation error is left.
    expected = np_weighted_mean(jax.tree.map(lambda x: np.asarray(x.astype(jnp.float32)), stacked), weights)
    assert_tree_close(out, expected, rtol=1e-5, atol=1e-6)


def test_aggregation_drops_padding_and_nonfinite_clients_and_renormalizes():
    rng = np.random.default_rng(1)
    clients = [random_tree(rng) for _ in range(5)]
    clients[1]["prompt"][2, 1] = np.nan
    clients[3]["head"]["b"] = np.float64(np.inf)
    weights = np.array([2.0, 5.0, 1.0, 7.0, 3.0])
    result = Aggregation()([jax.tree.map(jnp.float32, c) for c in clients], weights)
    keep = np.array([True, False, True, False, True])
    expected = np_weighted_mean(stack_clients(clients), weights * keep)
    assert_tree_close(result.aggregate, expected)
    assert int(result.num_aggregated) == 3
    np.testing.assert_array_equal(result.accepted, keep)  # padding (clients 5..7) not reported
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(result.aggregate))


def test_aggregation_zero_weight_and_all_failed_clients():
    agg = Aggregation()
    clients = [{"w": jnp.array([1.0, 2.0])}, {"w": jnp.array([3.0, 5.0])}, {"w": jnp.array([jnp.nan, 0.0])}]
    result = agg(clients, [0.0, 1.0, 1.0])
    np.testing.assert_allclose(result.aggregate["w"], [3.0, 5.0])
    assert int(result.num_aggregated) == 1
    result = agg(clients, [0.0, 0.0, 4.0])  # the only weighted client is NaN
    np.testing.assert_array_equal(result.aggregate["w"], [0.0, 0.0])
    assert int(result.num_aggregated) == 0
    result = agg(clients, [1.0, np.nan, 1.0])  # a non-finite weight drops its client too
    np.testing.assert_allclose(result.aggregate["w"], [1.0, 2.0])
    assert int(result.num_aggregated) == 1


def test_aggregation_stacked_input_equals_list_input():
    rng = np.random.default_rng(2)
    clients = [jax.tree.map(jnp.float32, random_tree(rng)) for _ in range(3)]
    weights = [1.0, 2.0, 3.0]
    agg = Aggregation()
    a = agg(clients, weights)
    b = agg(stack_clients(clients), weights)
    assert_tree_close(a.aggregate, jax.tree.map(np.asarray, b.aggregate), rtol=0, atol=0)
    # A stacked pytree whose top level is a tuple needs stacked=True.
    c = agg((jnp.ones((3, 2)), jnp.zeros((3,))), weights, stacked=True)
    np.testing.assert_allclose(c.aggregate[0], [1.0, 1.0])
    assert agg.num_compilations == 2


def test_bucket_sizes_and_padding():
    assert [bucket_size(k) for k in range(10)] == [1, 1, 2, 4, 4, 8, 8, 8, 8, 16]
    assert bucket_size(1000) == 1024
    with pytest.raises(ConfigError):
        bucket_size(-1)
    stacked, w = pad_clients({"w": jnp.ones((3, 2), jnp.bfloat16)}, jnp.ones(3), 8)
    assert stacked["w"].shape == (8, 2) and stacked["w"].dtype == jnp.bfloat16
    np.testing.assert_array_equal(w, [1, 1, 1, 0, 0, 0, 0, 0])
    np.testing.assert_array_equal(stacked["w"][3:], 0)
    with pytest.raises(InputError):
        pad_clients({"w": jnp.ones((3, 2))}, jnp.ones(3), 2)


def test_client_counts_share_compilations_within_a_bucket():
    agg = Aggregation()
    for k in (3, 4, 5, 7, 8):
        result = agg([{"w": jnp.full((2,), float(i))} for i in range(k)], np.ones(k))
        np.testing.assert_allclose(result.aggregate["w"], [(k - 1) / 2] * 2)
        assert int(result.num_aggregated) == k and result.accepted.shape == (k,)
    assert agg.num_compilations == 2  # buckets 4 (K = 3, 4) and 8 (K = 5, 7, 8)
    if hasattr(agg._run, "_cache_size"):  # jax's own count of compiled programs agrees
        assert agg._run._cache_size() == 2
    agg([{"w": jnp.zeros(2)}] * 9)
    assert agg.num_compilations == 3


def test_finite_clients_over_all_leaves():
    stacked = {"a": jnp.array([[1.0], [jnp.nan], [0.0]]), "b": jnp.array([1.0, 2.0, -jnp.inf]), "n": jnp.arange(3)}
    np.testing.assert_array_equal(finite_clients(stacked), [True, False, False])


def test_aggregation_bad_inputs():
    agg = Aggregation()
    with pytest.raises(InputError, match="no client"):
        agg([])
    with pytest.raises(InputError, match="client 1"):
        agg([{"w": jnp.ones(2)}, {"v": jnp.ones(2)}])
    with pytest.raises(InputError, match="client 1"):
        agg([{"w": jnp.ones(2)}, {"w": jnp.ones(3)}])
    with pytest.raises(InputError, match="shape"):
        agg([{"w": jnp.ones(2)}] * 2, [1.0, 2.0, 3.0])
    with pytest.raises(InputError, match=">= 0"):
        agg([{"w": jnp.ones(2)}] * 2, [1.0, -1.0])
    with pytest.raises(InputError, match="leading client axis"):
        agg({"w": jnp.ones((2, 3)), "v": jnp.ones((3, 3))})


# ---------------------------------------------------------------- server optimizers


def algorithm2_by_hand(kind, x0, deltas, *, lr, b1=0.9, b2=0.99, tau=1e-3, momentum=0.9, v0=None):
    """Reddi et al. 2021, Algorithm 2 (and FedAvg / FedAvgM), float64, one leaf at a time.

    Returns the params after every round and the final (m, v).
    """
    x = np.asarray(x0, np.float64)
    m = np.zeros_like(x)
    v = np.full_like(x, tau**2 if v0 is None else v0)
    history = []
    for d in deltas:
        if kind == "fedavg":
            x = x + lr * d
        elif kind == "fedavgm":
            m = momentum * m + d
            x = x + lr * m
        else:
            m = b1 * m + (1 - b1) * d
            if kind == "fedadagrad":
                v = v + d**2
            elif kind == "fedadam":
                v = b2 * v + (1 - b2) * d**2
            elif kind == "fedyogi":
                v = v - (1 - b2) * d**2 * np.sign(v - d**2)
            x = x + lr * m / (np.sqrt(v) + tau)
        history.append(x)
    return history, m, v


CASES = {
    "fedavg": (lambda: fedavg_optimizer(0.7), dict(lr=0.7)),
    "fedavgm": (lambda: fedavgm_optimizer(0.5, momentum=0.8), dict(lr=0.5, momentum=0.8)),
    "fedadagrad": (lambda: fedadagrad_optimizer(0.1), dict(lr=0.1, b1=0.0, tau=1e-3)),
    "fedadagrad_momentum": (lambda: fedadagrad_optimizer(0.1, b1=0.5, tau=1e-2), dict(lr=0.1, b1=0.5, tau=1e-2)),
    "fedadam": (lambda: fedadam_optimizer(0.03), dict(lr=0.03, b1=0.9, b2=0.99, tau=1e-3)),
    "fedadam_v0": (lambda: fedadam_optimizer(0.03, b1=0.5, b2=0.9, tau=1e-2, initial_accumulator=0.3), dict(lr=0.03, b1=0.5, b2=0.9, tau=1e-2, v0=0.3)),
    "fedyogi": (lambda: fedyogi_optimizer(0.03), dict(lr=0.03, b1=0.9, b2=0.99, tau=1e-3)),
    "fedyogi_v0": (lambda: fedyogi_optimizer(0.05, tau=1e-2, initial_accumulator=0.02), dict(lr=0.05, tau=1e-2, v0=0.02)),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_server_optimizer_is_algorithm_2(name):
    make, hyper = CASES[name]
    kind = name.split("_")[0]
    optimizer = make()
    rng = np.random.default_rng(sorted(CASES).index(name))
    x0 = random_tree(rng)
    # Round scales vary by 100x so that Yogi's sign(v - Δ²) takes both signs.
    deltas = [random_tree(rng, scale=s) for s in (0.3, 0.01, 0.5, 0.02, 0.2)]
    step = jax.jit(lambda p, s, d: server_update(p, s, d, optimizer))
    params = jax.tree.map(jnp.float32, x0)
    state = optimizer.init(params)
    got = []
    for d in deltas:
        params, state = step(params, state, jax.tree.map(jnp.float32, d))
        got.append(params)
    flat_x0, treedef = jax.tree.flatten(x0)
    per_leaf = [
        algorithm2_by_hand(kind, x, [jax.tree.leaves(d)[i] for d in deltas], **hyper) for i, x in enumerate(flat_x0)
    ]
    for t in range(len(deltas)):
        expected = jax.tree.unflatten(treedef, [h[0][t] for h in per_leaf])
        assert_tree_close(got[t], expected, rtol=1e-5, atol=1e-5)
    if kind in ("fedadagrad", "fedadam", "fedyogi"):
        fedopt_state = state[0]
        assert isinstance(fedopt_state, ScaleByFedOptState)
        # mu accumulates the pseudo-gradient -Δ, so it is -m_t; nu is v_t itself.
        assert_tree_close(fedopt_state.mu, jax.tree.unflatten(treedef, [-h[1] for h in per_leaf]), rtol=1e-5, atol=1e-7)
        assert_tree_close(fedopt_state.nu, jax.tree.unflatten(treedef, [h[2] for h in per_leaf]), rtol=1e-5, atol=1e-9)


def test_fedadam_first_round_has_no_bias_correction():
    params = {"w": jnp.zeros(3)}
    delta = {"w": jnp.array([0.1, -0.2, 0.3])}
    p_adam, _ = server_update(params, fedadam_optimizer(1.0).init(params), delta, fedadam_optimizer(1.0))
    # First round, no bias correction: m = 0.1 Δ, v = 0.99 τ² + 0.01 Δ², x = m / (sqrt(v) + τ).
    d = np.array([0.1, -0.2, 0.3])
    np.testing.assert_allclose(p_adam["w"], 0.1 * d / (np.sqrt(0.99e-6 + 0.01 * d**2) + 1e-3), rtol=1e-6)
    optax_adam, _ = server_update(params, optax.adam(1.0).init(params), delta, optax.adam(1.0))
    assert not np.allclose(p_adam["w"], optax_adam["w"], rtol=1e-2)


def test_any_optax_transformation_works_through_server_update():
    params = {"prompt": jnp.ones((2, 3)), "head": jnp.zeros(2)}
    delta = {"prompt": jnp.full((2, 3), 2.0), "head": jnp.array([1.0, -4.0])}
    sgd = optax.sgd(0.5)
    new, _ = server_update(params, sgd.init(params), delta, sgd)
    np.testing.assert_allclose(new["prompt"], 2.0)
    np.testing.assert_allclose(new["head"], [0.5, -2.0])
    # A schedule as server_lr behaves like the constant.
    a, _ = server_update(params, fedyogi_optimizer(0.1).init(params), delta, fedyogi_optimizer(0.1))
    b, _ = server_update(params, fedyogi_optimizer(optax.constant_schedule(0.1)).init(params), delta, fedyogi_optimizer(optax.constant_schedule(0.1)))
    assert_tree_close(a, jax.tree.map(np.asarray, b), rtol=1e-7, atol=0)


def test_server_update_keeps_param_dtypes():
    params = {"w": jnp.ones(4, jnp.bfloat16)}
    opt = fedadam_optimizer(0.1)
    new, state = server_update(params, opt.init(params), {"w": jnp.full(4, 0.5)}, opt)
    assert new["w"].dtype == jnp.bfloat16
    assert state[0].nu["w"].dtype == jnp.float32


@pytest.mark.parametrize(
    "make",
    [
        lambda: fedavg_optimizer(0.0),
        lambda: fedavg_optimizer(-1.0),
        lambda: fedavgm_optimizer(1.0, momentum=1.0),
        lambda: fedavgm_optimizer(1.0, momentum=-0.1),
        lambda: fedadagrad_optimizer(0.0),
        lambda: fedadagrad_optimizer(0.1, b1=1.0),
        lambda: fedadagrad_optimizer(0.1, tau=0.0),
        lambda: fedadam_optimizer(-0.1),
        lambda: fedadam_optimizer(float("nan")),
        lambda: fedadam_optimizer(0.1, b1=-0.5),
        lambda: fedadam_optimizer(0.1, b2=1.0),
        lambda: fedadam_optimizer(0.1, tau=-1e-3),
        lambda: fedyogi_optimizer(0.1, b2=1.5),
        lambda: fedyogi_optimizer(0.1, initial_accumulator=-1.0),
        lambda: fedyogi_optimizer("fast"),
        lambda: scale_by_fedopt("sgd", b1=0.9),
        lambda: make_server_optimizer("fedsgd"),
        lambda: make_server_optimizer("fedadam", lr=0.1),
        lambda: make_server_optimizer("fedadam"),
    ],
)
def test_bad_hyperparameters_raise_config_error(make):
    with pytest.raises(ConfigError):
        make()


def test_make_server_optimizer_by_name():
    params = {"w": jnp.zeros(2)}
    delta = {"w": jnp.array([0.3, -0.1])}
    a, _ = server_update(params, fedyogi_optimizer(0.2, b1=0.5).init(params), delta, fedyogi_optimizer(0.2, b1=0.5))
    opt = make_server_optimizer("fedyogi", server_lr=0.2, b1=0.5)
    b, _ = server_update(params, opt.init(params), delta, opt)
    np.testing.assert_array_equal(a["w"], b["w"])


def test_row_buffers_are_reused_aligned_and_zero_their_padding():
    buffers = aggregators.RowBuffers()
    first = [{"p": np.full((2, 3), i + 1.0, np.float32), "b": np.full(4, -1.0 - i, np.float32)} for i in range(5)]
    stacked = buffers.stack(first, 8)
    assert stacked["p"].shape == (8, 2, 3) and stacked["p"].ctypes.data % 64 == 0
    np.testing.assert_array_equal(stacked["p"][:5, 0, 0], [1, 2, 3, 4, 5])
    again = buffers.stack(first[:2], 8)  # the same memory, the rows of the clients now absent zeroed
    assert np.shares_memory(again["p"], stacked["p"]) and np.shares_memory(again["b"], stacked["b"])
    np.testing.assert_array_equal(again["p"][2:], 0)
    np.testing.assert_array_equal(again["b"][:2, 0], [-1, -2])
    fresh = aggregators.stack_clients(first, 8)
    assert not np.shares_memory(fresh["p"], again["p"]) and fresh["b"].ctypes.data % 64 == 0


def test_the_default_mean_stage_equals_the_unfused_composition():
    """The plain mean runs fused (finite rows, clip, mean in one pass); the same aggregator
    through the generic path (:class:`Aggregation` after :func:`clip_clients`) agrees."""
    from fedprompt.server import rounds

    rng = np.random.default_rng(3)
    stacked = {"prompt": rng.standard_normal((8, 5, 4)).astype(np.float32) * 3,
               "head": rng.standard_normal((8, 7)).astype(np.float32)}
    stacked["prompt"][2, 1, 1] = np.nan
    weights = np.array([3, 1, 4, 1, 5, 9, 0, 0], np.float32)
    generic = rounds.mean_stage(lambda s, w: aggregators.weighted_mean(s, w))  # not the fused path
    for bound in (None, 4.0):
        fused = rounds.mean_stage() if bound is None else rounds.update_clip_stage(rounds.mean_stage(), bound)
        other = generic if bound is None else rounds.update_clip_stage(generic, bound)
        got, _, metrics = fused.apply((), stacked, weights, None)
        want, _, want_metrics = other.apply((), stacked, weights, None)
        jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6), got, want)
        assert metrics == want_metrics


def test_updates_received_into_row_buffers_are_the_stacked_updates():
    """``ServerRound.receive`` decodes straight into its reused rows: the stack equals stacking
    the accepted trees (zeros for refused, missing and padding slots), a later refusal zeroes
    its row, and the round's result equals the one from a plain ``receive_updates``."""
    from fedprompt.server import algorithms, rounds
    from fedprompt.wire import codec

    rng = np.random.default_rng(4)
    template = {"delta": {"w": np.zeros((3, 2), np.float32), "b": np.zeros(4, np.float32),
                          "s": np.zeros((), np.float32)}}

    def message(scale, round_index=0):
        tree = {"delta": {"w": scale * rng.standard_normal((3, 2)).astype(np.float32),
                          "b": scale * rng.standard_normal(4).astype(np.float32),
                          "s": np.float32(scale * rng.standard_normal())}}
        return codec.encode(tree, kind=rounds.UPDATE_KIND, round=round_index, fingerprint="fp")

    messages = [message(1.0), b"junk", None, message(50.0), message(1.0, round_index=7)]
    server = rounds.ServerRound(algorithms.fedavg(), num_clients=5, update_clip=10.0)
    state = server.init({"w": np.zeros((3, 2), np.float32), "b": np.zeros(4, np.float32), "s": np.zeros((), np.float32)})
    options = dict(round_index=0, fingerprint="fp", template=template)
    rows = server.receive(messages, **options)
    plain = rounds.receive_updates(messages, **options)
    assert rows.accepted.tolist() == plain.accepted.tolist() == [True, False, False, True, False]
    assert rows.rejections == plain.rejections and plain.stacked is None
    expected = aggregators.stack_clients([t["delta"] for t in plain.trees], 8)
    jax.tree.map(np.testing.assert_array_equal, rows.stacked, expected)
    assert rows.stacked["w"].shape == (8, 3, 2) and rows.stacked["w"].ctypes.data % 64 == 0
    # each row's sum of squares over the whole delta, taken while it was written; 0 for zero rows
    flat = np.concatenate([np.reshape(x, (8, -1)) for x in jax.tree.leaves(expected)], axis=1).astype(np.float64)
    np.testing.assert_allclose(rows.sq_norms, np.sum(np.square(flat), axis=1), rtol=1e-6)
    assert plain.sq_norms is None and rows.sq_norms[1] == 0.0
    weights = [3, 1, 1, 2, 1]
    got, outcome = server.apply(state, rows, weights)
    want, want_outcome = server.apply(state, plain, weights)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), got.server.params, want.server.params)
    assert outcome.metrics == want_outcome.metrics == {"update_clip": 10.0, "clipped": 1}
    refused = rounds.refuse(server.receive(messages, **options), {3: "unbound"})
    assert refused.accepted.tolist() == [True, False, False, False, False] and refused.rejections["unbound"] == 1
    np.testing.assert_array_equal(refused.stacked["b"][3], 0)
    assert refused.sq_norms[3] == 0.0 and refused.sq_norms[0] == rows.sq_norms[0]
    np.testing.assert_array_equal(refused.stacked["b"][0], expected["b"][0])


def test_the_default_mean_of_large_host_rows_equals_the_compiled_pass():
    """Host rows of at least HOST_PASS_MIN_FLOATS floats a client take the NumPy + BLAS pass;
    device arrays take the compiled one: the same mean, kept clients and clipped count."""
    from fedprompt.server import rounds as server_rounds

    rng = np.random.default_rng(3)
    n = server_rounds.HOST_PASS_MIN_FLOATS + 7
    rows = rng.standard_normal((5, n)).astype(np.float32)
    rows[1, 4] = np.nan
    rows[2] *= 1e-4  # under the bound
    weights = np.array([3, 1, 2, 5, 0], np.float32)
    stage = server_rounds.update_clip_stage(server_rounds.mean_stage(), 10.0)
    host, _, host_metrics = stage.apply((), {"p": rows}, weights, None)
    device, _, device_metrics = stage.apply((), {"p": jnp.asarray(rows)}, jnp.asarray(weights), None)
    assert isinstance(host["p"], np.ndarray) and not isinstance(device["p"], np.ndarray)
    np.testing.assert_allclose(host["p"], device["p"], rtol=1e-5, atol=1e-8)
    assert host_metrics == device_metrics == {"update_clip": 10.0, "clipped": 2}
    # with the rows' sums of squares from receiving: one product; below the size, compiled
    small = rows[:, :50].copy()
    small[3] *= 1e3
    for x in (rows, small):
        sq = np.sum(np.square(x, dtype=np.float64), axis=1)
        given, _, given_metrics = stage.apply((), {"p": x}, weights, None, sq_norms=sq)
        device, _, device_metrics = stage.apply((), {"p": jnp.asarray(x)}, jnp.asarray(weights), None)
        assert isinstance(given["p"], np.ndarray) == (x is rows)
        np.testing.assert_allclose(given["p"], device["p"], rtol=1e-5, atol=1e-8)
        assert given_metrics == device_metrics


def test_rows_refuse_what_the_plain_receive_refuses_and_keep_overflowing_norms():
    """Into row buffers the delta's finiteness comes from its sum of squares: the same slots
    are refused for the same reasons as by the value-by-value check (NaN or Inf in the delta,
    or in a control delta that is not squared), a finite delta whose squares overflow float32
    is kept, and refused rows are zero with a zero sum of squares."""
    from fedprompt.server import aggregators, rounds
    from fedprompt.wire import codec

    rng = np.random.default_rng(11)
    template = {"delta": {"p": np.zeros((4, 5), np.float32)}, "control_delta": {"p": np.zeros((4, 5), np.float32)}}

    def message(delta=None, control=None):
        tree = {"delta": {"p": rng.standard_normal((4, 5)).astype(np.float32) if delta is None else delta},
                "control_delta": {"p": np.zeros((4, 5), np.float32) if control is None else control}}
        return codec.encode(tree, kind=rounds.UPDATE_KIND, round=0, fingerprint="fp")

    nan, inf = np.ones((4, 5), np.float32), np.ones((4, 5), np.float32)
    nan[1, 2], inf[3, 4] = np.nan, -np.inf
    huge = np.full((4, 5), 1e30, np.float32)
    messages = [message(), message(delta=nan), message(delta=huge), message(control=inf), message(delta=inf), message()]
    options = dict(round_index=0, fingerprint="fp", template=template)
    rows = rounds.receive_updates(messages, buffers=aggregators.RowBuffers(), rows=8, **options)
    plain = rounds.receive_updates(messages, **options)
    assert rows.accepted.tolist() == plain.accepted.tolist() == [True, False, True, False, False, True]
    assert rows.rejections == plain.rejections == {"delta/p": 2, "control_delta/p": 1}
    assert rows.sq_norms[2] == np.inf and rows.sq_norms[[1, 3, 4, 6, 7]].tolist() == [0.0] * 5
    np.testing.assert_array_equal(rows.stacked["p"][[1, 3, 4]], 0)
    np.testing.assert_array_equal(rows.stacked["p"][2], huge)
    stage = rounds.update_clip_stage(rounds.mean_stage(), 1.0)
    weights = np.pad(rows.accepted.astype(np.float32), (0, 2))
    got, _, metrics = stage.apply((), rows.stacked, weights, None, sq_norms=rows.sq_norms)
    want, _, want_metrics = stage.apply((), jax.tree.map(jnp.asarray, rows.stacked), jnp.asarray(weights), None)
    np.testing.assert_allclose(got["p"], want["p"], rtol=1e-5, atol=1e-7)
    assert metrics == want_metrics == {"update_clip": 1.0, "clipped": 3}
