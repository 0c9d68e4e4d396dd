"""Pallas kernels against their pure-jnp references (interpret mode on CPU), and the references
against NumPy and closed forms: aggregation, robust statistics, quantization."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedprompt import kernels
from fedprompt.errors import ConfigError, InputError
from fedprompt.server import aggregators
from fedprompt.wire import codec

SHAPES = [(1, 1), (3, 100), (37, 1), (37, 1031), (1000, 130)]
DTYPES = [jnp.float32, jnp.bfloat16]
IMPLEMENTATIONS = ["xla", "pallas"]
# Every shape in float32; bf16 inputs on the smallest and the odd-sized shapes.
CASES = [(k, n, jnp.float32) for k, n in SHAPES] + [(1, 1, jnp.bfloat16), (37, 1031, jnp.bfloat16)]
CASE_IDS = [f"K{k}-N{n}-{'f32' if d == jnp.float32 else 'bf16'}" for k, n, d in CASES]


def _copied_sq(leaves):
    """Each client's sum of squares over its leaves, as a server takes it while copying the rows."""
    return [sum(kernels.copy_row(np.empty_like(x[i]), x[i]) for x in leaves) for i in range(leaves[0].shape[0])]


def _pallas(**kw):
    return {"implementation": "pallas", "interpret": True, **kw}


def _inputs(k, n, dtype, seed=0):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((k, n)) * rng.uniform(0.1, 3.0, (k, 1)), dtype)
    weights = jnp.asarray(rng.uniform(0.5, 5.0, k), jnp.float32)
    mask = jnp.asarray(rng.random(k) < 0.7).at[0].set(True)
    if k > 2:
        weights = weights.at[2].set(0.0)  # a left-out client
    return x, weights, mask


# name -> (kernel(x, w, mask, **impl), reference(x, w, mask))
KERNELS = {
    "weighted_sum": (
        lambda x, w, m, **kw: kernels.weighted_sum(x, w, **kw),
        lambda x, w, m: kernels.weighted_sum_reference(x, w),
    ),
    "clipped_weighted_sum": (
        lambda x, w, m, **kw: kernels.clipped_weighted_sum(x, w, 2.0, **kw),
        lambda x, w, m: kernels.clipped_weighted_sum_reference(x, w, 2.0),
    ),
    "median": (
        lambda x, w, m, **kw: kernels.coordinate_median(x, m, **kw),
        lambda x, w, m: kernels.coordinate_median_reference(x, m),
    ),
    "trimmed_mean": (
        lambda x, w, m, **kw: kernels.trimmed_mean(x, 0.2, m, **kw),
        lambda x, w, m: kernels.trimmed_mean_reference(x, 0.2, m),
    ),
    "quantize_int8": (
        lambda x, w, m, **kw: kernels.quantize(x, 8, **kw),
        lambda x, w, m: kernels.quantize_reference(x, 8),
    ),
    "quantize_int4_stochastic": (
        lambda x, w, m, **kw: kernels.quantize(x, 4, key=jax.random.key(3), **kw),
        lambda x, w, m: kernels.quantize_reference(x, 4, key=jax.random.key(3)),
    ),
    "dequantize_int4": (
        lambda x, w, m, **kw: kernels.dequantize(kernels.quantize_reference(x, 4), x.shape, 4, **kw),
        lambda x, w, m: kernels.dequantize_reference(kernels.quantize_reference(x, 4), x.shape, 4),
    ),
}


def _numpy_order_mean(x, mask, trim):
    """Trimmed mean (trim=None: median) of the masked rows of x, one column at a time."""
    rows = np.asarray(x, np.float64)[np.asarray(mask)]
    m = len(rows)
    if m == 0:
        return np.zeros(x.shape[1])
    if trim is None:
        return np.median(rows, axis=0)
    t = int(np.floor(np.float32(trim) * np.float32(m)))
    return np.sort(rows, axis=0)[t : m - t].mean(axis=0)


class TestKernels:
    """Every kernel (Pallas in interpret mode, and the XLA path) against its reference, plus
    the references' own numbers."""

    # -- kernel == reference -----------------------------------------------------------------

    @pytest.mark.parametrize(
        "name,k,n,dtype",
        [
            pytest.param(name, k, n, dtype, id=f"{name}-{case_id}")
            for name in KERNELS
            for (k, n, dtype), case_id in zip(CASES, CASE_IDS)
            # quantization has no client axis: the other shapes cover the 1000-row case
            if not (k == 1000 and name in ("quantize_int8", "dequantize_int4"))
        ],
    )
    def test_kernel_matches_reference(self, name, k, n, dtype):
        x, w, mask = _inputs(k, n, dtype)
        kernel, reference = KERNELS[name]
        want = reference(x, w, mask)
        for impl in (_pallas(), {"implementation": "xla"}):
            got = kernel(x, w, mask, **impl)
            for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
                assert a.shape == b.shape and a.dtype == b.dtype
                if jnp.issubdtype(a.dtype, jnp.integer):
                    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
                else:
                    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=2e-6 * k)  # float32 sums in another order

    @pytest.mark.parametrize("block", [128, 256])
    def test_partial_last_block(self, block):
        x, w, mask = _inputs(5, 1031, jnp.float32)
        np.testing.assert_allclose(
            kernels.weighted_sum(x, w, block_size=block, **_pallas()), kernels.weighted_sum_reference(x, w), rtol=2e-6, atol=2e-6
        )
        np.testing.assert_allclose(
            kernels.coordinate_median(x, mask, block_size=block, **_pallas()), kernels.coordinate_median_reference(x, mask), atol=1e-6
        )

    # -- references against NumPy and closed forms ------------------------------------------

    @pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "bf16"])
    @pytest.mark.parametrize("k,n", [(1, 7), (37, 100)])
    def test_references_match_numpy(self, k, n, dtype):
        x, w, mask = _inputs(k, n, dtype)
        x64 = np.asarray(x.astype(jnp.float32), np.float64)
        w64 = np.asarray(w, np.float64)
        norms = np.linalg.norm(x64, axis=1)
        clipped = sum(w64[i] * min(1.0, 2.0 / norms[i]) * x64[i] for i in range(k))
        np.testing.assert_allclose(kernels.clipped_weighted_sum_reference(x, w, 2.0), clipped, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(kernels.weighted_sum_reference(x, w), w64 @ x64, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(kernels.coordinate_median_reference(x, mask), _numpy_order_mean(x64, mask, None), atol=1e-6)
        for trim in (0.0, 0.1, 0.25, 0.45):
            np.testing.assert_allclose(kernels.trimmed_mean_reference(x, trim, mask), _numpy_order_mean(x64, mask, trim), atol=1e-5)

    def test_robust_statistics_ignore_outliers_and_masked_clients(self):
        x = jnp.array([[1.0, -1.0], [2.0, -2.0], [1e6, 1e6], [3.0, -3.0], [jnp.nan, 5.0]])
        mask = jnp.array([True, True, True, True, False])
        for impl in (dict(), _pallas()):
            np.testing.assert_allclose(kernels.coordinate_median(x, mask, **impl), [2.5, -1.5])
            np.testing.assert_allclose(kernels.trimmed_mean(x, 0.25, mask, **impl), [2.5, -1.5])
            np.testing.assert_array_equal(kernels.coordinate_median(x, jnp.zeros(5, bool), **impl), [0.0, 0.0])

    def test_weighted_sum_skips_left_out_rows_even_when_nan(self):
        x = jnp.array([[1.0, 2.0], [jnp.nan, jnp.inf], [3.0, 4.0]])
        w = jnp.array([1.0, 0.0, 2.0])
        for impl in (dict(), _pallas()):
            np.testing.assert_allclose(kernels.clipped_weighted_sum(x, w, None, **impl), [7.0, 10.0])

    def test_one_pass_clipped_mean_of_finite_rows_matches_numpy(self):
        """The fused pass (CPU: one loop over client rows; elsewhere the array form) and its host
        form (NumPy + BLAS, on host float32 rows) against a NumPy float64 reference: NaN, Inf and overflowing rows, zero, negative and NaN weights,
        norms above and below the bound, two leaves of one update."""
        rng = np.random.default_rng(5)
        a = rng.standard_normal((9, 4, 6)).astype(np.float32)
        b = rng.standard_normal((9, 5)).astype(np.float32)
        a[1, 0, 0] = np.nan                 # dropped
        b[2, 3] = np.inf                    # dropped
        a[3] *= 1e30                        # finite; its sum of squares overflows float32
        a[4] *= 100                         # clipped
        weights = np.array([1, 2, 3, 4, 5, 0, -1, np.nan, 2], np.float32)
        kept = np.array([True, False, False, True, True, False, False, False, True])
        rows = np.concatenate([a.reshape(9, -1), b], axis=1).astype(np.float64)
        rows[~np.isfinite(rows).all(axis=1)] = 0.0  # weight 0 below: a dropped row adds nothing
        norms = np.sqrt(np.sum(np.square(rows), axis=1))
        for bound in (None, 3.0):
            factor = np.ones(9) if bound is None else np.minimum(1.0, bound / np.maximum(norms, 1e-30))
            w = np.where(kept, weights, 0).astype(np.float64)
            expected = (w * factor) @ rows / w.sum()
            for fn in (jax.jit(lambda r, v, c=bound: kernels.clipped_mean_of_finite(r, v, c)),
                       jax.jit(lambda r, v, c=bound: kernels.clipped_mean_of_finite_reference(r, v, c)),
                       lambda r, v, c=bound: kernels.clipped_mean_of_finite_host(r, v, c),
                       lambda r, v, c=bound: kernels.clipped_mean_of_finite_host(r, v, c, sq_norms=_copied_sq(r))):
                means, accepted, clipped = fn([a, b], weights)
                np.testing.assert_allclose(np.concatenate([np.ravel(means[0]), means[1]]), expected, rtol=1e-5, atol=1e-6)
                assert means[0].shape == (4, 6) and means[0].dtype == jnp.float32
                np.testing.assert_array_equal(accepted, kept)
                assert int(clipped) == (0 if bound is None else int(np.sum(kept & (norms > bound))))
        for fn in (kernels.clipped_mean_of_finite, kernels.clipped_mean_of_finite_host):
            none = fn([a], np.zeros(9, np.float32), 1.0)
            np.testing.assert_array_equal(none[0][0], np.zeros((4, 6)))
            assert not bool(none[1].any())
            with pytest.raises(InputError, match="leading axis"):
                fn([a, b[:3]], weights)
        # what the host form leaves to the compiled pass: device arrays, other dtypes, strided views
        for other in (jnp.asarray(a), np.ones(a.shape, np.float16), a[:, :, ::2]):
            assert kernels.clipped_mean_of_finite_host([other], weights) is None

    def test_copy_row_returns_the_sum_of_squares_of_what_it_wrote(self):
        """Against a float64 reference; not finite where a value is not finite or the squares
        overflow float32."""
        rng = np.random.default_rng(7)
        n = 200_003
        src = rng.standard_normal(n).astype(np.float32)
        dst = np.full(n, 9.0, np.float32)
        sq = kernels.copy_row(dst, src)
        np.testing.assert_array_equal(dst, src)
        np.testing.assert_allclose(sq, np.sum(np.square(src, dtype=np.float64)), rtol=1e-5)
        grid = np.empty((3, 4), np.float32)
        assert kernels.copy_row(grid, np.arange(12, dtype=np.float32).reshape(3, 4)) == float(np.sum(np.arange(12.0) ** 2))
        big = src.copy()
        big[-1] = 1e30
        assert kernels.copy_row(dst, big) == np.inf
        big[5] = np.nan
        assert np.isnan(kernels.copy_row(dst, big))
        with pytest.raises(InputError, match="cannot copy"):
            kernels.copy_row(dst, src[:-1])
        stack = np.zeros(3, np.float32)  # a stack of scalars: its row is a slice, not stack[i]
        assert kernels.copy_row(stack[1:2], np.float32(-3.0)) == 9.0 and stack.tolist() == [0.0, -3.0, 0.0]
        for wrong in (stack[1], dst[::2], dst.astype(np.float64)):
            with pytest.raises(InputError, match="writable float32"):
                kernels.copy_row(wrong, src[: np.size(wrong)])

    def test_bitonic_network_sorts(self):
        x = jnp.asarray(np.random.default_rng(1).standard_normal((64, 9)), jnp.float32)
        np.testing.assert_array_equal(kernels.bitonic_sort_rows(x), jnp.sort(x, axis=0))

    # -- aggregators inside fedprompt.server.aggregators.Aggregation -------------------------

    @pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
    def test_aggregators_in_aggregation(self, implementation):
        impl = {"implementation": implementation, "interpret": implementation == "pallas"}
        rng = np.random.default_rng(2)
        updates = [{"prompt": rng.standard_normal((4, 6)).astype(np.float32), "head": {"b": rng.standard_normal(3).astype(np.float32)}} for _ in range(5)]
        updates[3] = jax.tree.map(lambda x: np.full_like(x, np.nan), updates[3])
        weights = [1.0, 2.0, 3.0, 4.0, 5.0]
        plain = aggregators.Aggregation()(updates, weights).aggregate
        mean = aggregators.Aggregation(kernels.make_clipped_mean(None, **impl))(updates, weights)
        assert int(mean.num_aggregated) == 4
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6), mean.aggregate, plain)
        # With clipping: the norm is over the whole update, all leaves together.
        ok = [u for i, u in enumerate(updates) if i != 3]
        wk = np.array([1.0, 2.0, 3.0, 5.0])
        norms = np.array([np.sqrt(sum(np.sum(np.square(v)) for v in jax.tree.leaves(u))) for u in ok])
        factors = wk * np.minimum(1.0, 1.5 / norms) / wk.sum()
        expected = jax.tree.map(lambda *xs: sum(f * x for f, x in zip(factors, xs)), *ok)
        clipped = aggregators.Aggregation(kernels.make_clipped_mean(1.5, **impl))(updates, weights).aggregate
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), clipped, expected)
        # Padding (5 clients -> bucket 8, weight 0) and the NaN client do not count.
        median = aggregators.Aggregation(kernels.make_median(**impl))(updates, weights).aggregate
        stacked = jax.tree.map(lambda *xs: np.stack(xs), *ok)
        jax.tree.map(lambda a, s: np.testing.assert_allclose(a, np.median(s, axis=0), atol=1e-6), median, stacked)
        trimmed = aggregators.Aggregation(kernels.make_trimmed_mean(0.25, **impl))(updates, weights).aggregate
        jax.tree.map(lambda a, s: np.testing.assert_allclose(a, np.sort(s, axis=0)[1:3].mean(0), atol=1e-6), trimmed, stacked)

    def test_robust_kernels_agree_with_server_robust_aggregators(self):
        robust = pytest.importorskip("fedprompt.server.robust")
        rng = np.random.default_rng(11)
        stacked = {"prompt": jnp.asarray(rng.standard_normal((9, 5, 7)), jnp.float32), "b": jnp.asarray(rng.standard_normal((9, 3)), jnp.float32)}
        weights = jnp.asarray([1.0, 0.0, 2.0, 3.0, 1.0, 0.0, 5.0, 1.0, 1.0])
        pairs = [
            (robust.coordinate_median, kernels.make_median(**_pallas())),
            (robust.trimmed_mean(0.2), kernels.make_trimmed_mean(0.2, **_pallas())),
            (robust.trimmed_mean(0.34), kernels.make_trimmed_mean(0.34)),
        ]
        for peer, ours in pairs:
            jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), ours(stacked, weights), peer(stacked, weights))

    # -- quantization: error bounds, unbiasedness, packing, wire payloads --------------------

    @pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "bf16"])
    @pytest.mark.parametrize("bits", [8, 4])
    @pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
    def test_quantization_error_bounds(self, implementation, bits, dtype):
        impl = {"implementation": implementation, "interpret": implementation == "pallas"}
        rng = np.random.default_rng(4)
        x = jnp.asarray(rng.standard_normal((7, 131)) * np.logspace(-3, 1, 131), dtype)
        x32 = np.asarray(x.astype(jnp.float32)).reshape(-1)
        for key, bound in ((None, 0.5), (jax.random.key(5), 1.0)):
            q = kernels.quantize(x, bits, key=key, block_size=32, **impl)
            back = np.asarray(kernels.dequantize(q, x.shape, bits, **impl)).reshape(-1)
            scale = np.repeat(np.asarray(q.scale), 32)[: x32.size]
            np.testing.assert_array_less(np.abs(back - x32), bound * scale * (1 + 1e-5) + 1e-30)
            amax = np.abs(np.pad(x32, (0, scale.size * 0 + (-x32.size) % 32)).reshape(-1, 32)).max(1)
            np.testing.assert_allclose(np.asarray(q.scale), amax / (2 ** (bits - 1) - 1), rtol=1e-6)
            assert np.abs(back).max() <= np.abs(x32).max() * (1 + 1e-6)

    @pytest.mark.parametrize("bits", [8, 4])
    @pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
    def test_stochastic_rounding_is_unbiased(self, implementation, bits):
        impl = {"implementation": implementation, "interpret": implementation == "pallas"}
        qmax = 2 ** (bits - 1) - 1
        # Each block: one value fixing the scale at 1/qmax, the rest at fractional steps.
        frac = np.linspace(0.05, 0.95, 63)
        block = np.concatenate([[1.0], frac / qmax]).astype(np.float32)
        x = jnp.asarray(np.tile(block, 4))
        trials = 200
        keys = jax.random.split(jax.random.key(6), trials)
        deq = jax.vmap(lambda k: kernels.dequantize(kernels.quantize(x, bits, key=k, **impl), x.shape, bits, **impl))(keys)
        mean = np.asarray(deq).mean(0)
        step = 1.0 / qmax
        sigma = step * np.sqrt(np.tile(np.concatenate([[0.0], frac * (1 - frac)]), 4) / trials)
        assert np.all(np.abs(mean - np.asarray(x)) <= 5 * sigma + 1e-7)
        assert abs(float(np.mean(mean - np.asarray(x)))) < 3 * step * 0.5 / np.sqrt(trials * x.size)
        # Round-to-nearest is biased on the same data: every value below half a step becomes 0.
        nearest = kernels.dequantize(kernels.quantize(x, bits, **impl), x.shape, bits, **impl)
        assert np.abs(np.asarray(nearest) - np.asarray(x)).mean() > 10 * np.abs(mean - np.asarray(x)).mean()

    def test_int4_packing_round_trip(self):
        q = jnp.asarray(np.random.default_rng(7).integers(-8, 8, (9, 64)), jnp.int8)
        packed = kernels.pack_int4(q)
        assert packed.dtype == jnp.uint8 and packed.shape == (9, 32)
        np.testing.assert_array_equal(kernels.unpack_int4(packed), q)
        # Byte j holds value j (low nibble) and value j + 32 (high nibble).
        assert int(packed[0, 0]) == (int(q[0, 0]) & 0xF) | ((int(q[0, 32]) & 0xF) << 4)
        blocks = kernels.QuantizedBlocks(packed, jnp.ones(9, jnp.float32))
        np.testing.assert_array_equal(kernels.dequantize(blocks, (9 * 64,), 4, **_pallas()), q.reshape(-1).astype(jnp.float32))

    @pytest.mark.parametrize("kind", ["int8", "int4"])
    def test_compressed_payload_through_the_wire_codec(self, kind):
        rng = np.random.default_rng(8)
        tree = {"prompt": rng.standard_normal((20, 384)).astype(np.float32), "head": {"w": rng.standard_normal((384, 26)).astype(np.float32), "b": np.zeros(26, np.float32)}}
        payload = kernels.compress(tree, kind, jax.random.key(9))
        message = codec.encode(jax.device_get(payload), kind="update", round=0)
        received = codec.decode(message)
        checked = codec.check_template(received.tree, kernels.payload_template(tree, kind))
        back = kernels.decompress(checked, tree, kind)
        floats = sum(x.size for x in jax.tree.leaves(tree))
        bytes_per_value = {"int8": 1.0, "int4": 0.5}[kind] + 4 / 64
        assert floats * bytes_per_value <= len(message) <= floats * bytes_per_value + 1024
        assert len(message) < codec.encoded_size(tree, kind="update") / (3.5 if kind == "int8" else 6.5)
        bits = 8 if kind == "int8" else 4
        for a, b, p in zip(jax.tree.leaves(back), jax.tree.leaves(tree), jax.tree.leaves(payload, is_leaf=lambda x: isinstance(x, dict) and "q" in x)):
            assert a.shape == b.shape
            assert np.max(np.abs(np.asarray(a) - b)) <= np.max(np.abs(b)) / (2 ** (bits - 1) - 1) * (1 + 1e-5)
        with pytest.raises(InputError):
            kernels.decompress(payload, {"prompt": tree["prompt"]}, kind)
        with pytest.raises(InputError):
            kernels.decompress({**payload, "prompt": {"q": payload["prompt"]["q"][:3], "scale": payload["prompt"]["scale"][:3]}}, tree, kind)
        with pytest.raises(ConfigError):
            kernels.compress(tree, "int2")

    @pytest.mark.parametrize("kind", ["int8", "int4"])
    def test_error_feedback_tracks_the_true_sum(self, kind):
        rng = np.random.default_rng(10)
        ef = kernels.error_feedback(kind, block_size=64)
        template = {"w": np.zeros(640, np.float32)}
        state = ef.init(template)
        compress = jax.jit(ef.compress)
        # Updates with one large value per block: the small ones fall below half a step.
        base = rng.uniform(-0.02, 0.02, 640).astype(np.float32)
        base[::64] = 1.0
        true_sum = np.zeros(640)
        sent_sum = np.zeros(640)
        plain_sum = np.zeros(640)
        rounds = 40
        for t in range(rounds):
            u = {"w": base * np.float32(1 + 0.1 * np.sin(t))}
            payload, state = compress(u, state, None)
            sent_sum += np.asarray(kernels.decompress(payload, template, kind)["w"])
            plain_sum += np.asarray(kernels.decompress(kernels.compress(u, kind), template, kind)["w"])
            true_sum += u["w"]
        residual = np.asarray(state.residual["w"])
        np.testing.assert_allclose(true_sum - sent_sum, residual, atol=1e-4)
        step = 1.1 / (2 ** (COMPRESSION_BITS[kind] - 1) - 1)
        assert np.abs(residual).max() <= 0.5 * step + 1e-5  # bounded, does not grow with rounds
        assert np.abs(true_sum - plain_sum).max() > 0.2 * rounds * 0.01  # without feedback the loss accumulates

    def test_bad_arguments(self):
        x = jnp.ones((3, 4))
        with pytest.raises(ConfigError):
            kernels.weighted_sum(x, jnp.ones(3), implementation="triton")
        with pytest.raises(InputError):
            kernels.weighted_sum(x, jnp.ones(2))
        with pytest.raises(ConfigError):
            kernels.trimmed_mean(x, 0.5)
        with pytest.raises(ConfigError):
            kernels.quantize(x, 8, block_size=7)


COMPRESSION_BITS = kernels.COMPRESSION_KINDS
