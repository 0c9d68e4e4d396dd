"""The backbones' shared blocks (layer norm, GELU, attention) against plain-jnp references.

The blocks write their gradients out (``jax.custom_vjp``) for speed; each reference here is the
textbook formula, differentiated by JAX, so values and gradients are both checked.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedprompt.backbones.base import attention, gelu, layer_norm, linear, linear_rows

F32 = dict(atol=2e-5, rtol=2e-5)


def _ln_reference(x, scale, bias, eps):
    xf = x.astype(jnp.float32)
    mean = xf.mean(-1, keepdims=True)
    var = ((xf - mean) ** 2).mean(-1, keepdims=True)
    return ((xf - mean) / jnp.sqrt(var + eps) * scale + bias).astype(x.dtype)


def _vjp(fn, args, cotangent):
    out, pullback = jax.vjp(fn, *args)
    return out, pullback(cotangent)


@pytest.mark.parametrize("shape", [(7, 16), (3, 5, 24)])
def test_layer_norm_values_and_gradients_match_the_formula(shape):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(2.0, 3.0, shape), jnp.float32)
    scale = jnp.asarray(rng.normal(1.0, 0.3, shape[-1]), jnp.float32)
    bias = jnp.asarray(rng.normal(0.0, 0.3, shape[-1]), jnp.float32)
    cot = jnp.asarray(rng.normal(size=shape), jnp.float32)
    got, got_grads = _vjp(lambda x, s, b: layer_norm(x, s, b, 1e-5), (x, scale, bias), cot)
    want, want_grads = _vjp(lambda x, s, b: _ln_reference(x, s, b, 1e-5), (x, scale, bias), cot)
    np.testing.assert_allclose(got, want, **F32)
    for g, w in zip(got_grads, want_grads):
        np.testing.assert_allclose(g, w, atol=1e-4, rtol=1e-4)


def test_layer_norm_in_bfloat16_returns_bfloat16_computed_in_float32():
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(4, 32)), jnp.bfloat16)
    scale, bias = jnp.ones(32, jnp.bfloat16), jnp.zeros(32, jnp.bfloat16)
    got = layer_norm(x, scale, bias, 1e-6)
    assert got.dtype == jnp.bfloat16
    want = _ln_reference(x.astype(jnp.float32), 1.0, 0.0, 1e-6)
    np.testing.assert_allclose(np.asarray(got, np.float32), want, atol=2e-2, rtol=2e-2)
    grad = jax.grad(lambda x: layer_norm(x, scale, bias, 1e-6).astype(jnp.float32).sum())(x)
    assert grad.dtype == jnp.bfloat16


@pytest.mark.parametrize("approximate", [False, True])
def test_gelu_values_and_gradients_match_jax(approximate):
    x = jnp.linspace(-9.0, 9.0, 2001, dtype=jnp.float32)
    cot = jnp.cos(x)
    got, (g,) = _vjp(lambda x: gelu(x, approximate), (x,), cot)
    want, (w,) = _vjp(lambda x: jax.nn.gelu(x, approximate=approximate), (x,), cot)
    np.testing.assert_allclose(got, want, atol=1e-6, rtol=1e-6)
    np.testing.assert_allclose(g, w, atol=1e-6, rtol=1e-5)


def _attention_reference(q, k, v, key_mask, *, causal, prefix, window):
    """Masked softmax attention from the definition: explicit visibility per (query, key)."""
    b, t, h, hd = q.shape
    n_kv = k.shape[2]
    p = 0 if prefix is None else prefix[0].shape[1]
    if prefix is not None:
        k = jnp.concatenate([prefix[0], k], axis=1)
        v = jnp.concatenate([prefix[1], v], axis=1)
    k = jnp.repeat(k, h // n_kv, axis=2)
    v = jnp.repeat(v, h // n_kv, axis=2)
    visible = np.zeros((b, t, p + t), bool)
    km = np.asarray(key_mask)
    for bi in range(b):
        for i in range(t):
            for j in range(p + t):
                ok = j < p or (km[bi, j - p] and (not causal or j - p <= i))
                if window is not None:
                    ok = ok and j > p + i - window
                visible[bi, i, j] = ok
    scores = jnp.einsum("bthd,bshd->bhts", q, k) / np.sqrt(hd)
    scores = jnp.where(jnp.asarray(visible)[:, None], scores, jnp.finfo(jnp.float32).min)
    return jnp.einsum("bhts,bshd->bthd", jax.nn.softmax(scores, axis=-1), v)


def _attention_inputs(seed, heads, kv_heads, prefix_len, b=2, t=7, hd=8):
    """Random q, k, v, a key mask (first key real), an optional prefix and an output cotangent."""
    rng = np.random.default_rng(seed)

    def normal(*shape):
        return jnp.asarray(rng.normal(size=shape), jnp.float32)

    q, k, v = normal(b, t, heads, hd), normal(b, t, kv_heads, hd), normal(b, t, kv_heads, hd)
    key_mask = jnp.asarray(rng.random((b, t)) > 0.3).at[:, 0].set(True)
    prefix = (normal(b, prefix_len, kv_heads, hd), normal(b, prefix_len, kv_heads, hd)) if prefix_len else None
    return q, k, v, key_mask, prefix, normal(b, t, heads, hd)


def _attention_pair(key_mask, causal, window, **options):
    """(ours, reference) as functions of (q, k, v, prefix)."""

    def ours(q, k, v, prefix):
        return attention(q, k, v, key_mask, causal=causal, prefix=prefix, sliding_window=window, **options)

    def reference(q, k, v, prefix):
        return _attention_reference(q, k, v, key_mask, causal=causal, prefix=prefix, window=window)

    return ours, reference


@pytest.mark.parametrize(
    "heads, kv_heads, causal, prefix_len, window",
    [(4, 4, False, 0, None), (4, 4, False, 3, None), (4, 2, True, 0, None), (6, 2, True, 2, 4), (4, 1, True, 0, 3)],
)
def test_attention_values_and_gradients_match_the_definition(heads, kv_heads, causal, prefix_len, window):
    q, k, v, key_mask, prefix, cot = _attention_inputs(heads * 10 + kv_heads, heads, kv_heads, prefix_len)
    ours, reference = _attention_pair(key_mask, causal, window)

    got, got_grads = _vjp(ours, (q, k, v, prefix), cot)
    want, want_grads = _vjp(reference, (q, k, v, prefix), cot)
    np.testing.assert_allclose(got, want, **F32)
    for g, w in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads)):
        np.testing.assert_allclose(g, w, atol=5e-5, rtol=5e-5)


@pytest.mark.parametrize(
    "heads, kv_heads, causal, prefix_len, window, rows",
    [(4, 4, False, 0, None, 3), (4, 4, False, 3, None, 2), (6, 2, True, 2, 4, 3), (4, 1, True, 0, 3, 7)],
)
def test_attention_gradient_of_the_first_rows_only(heads, kv_heads, causal, prefix_len, window, rows):
    """``grad_rows=n``: the prefix's and the first n positions' gradients are the full ones, the
    other positions' are zero, and the values do not change."""
    q, k, v, key_mask, prefix, cot = _attention_inputs(rows * 7 + heads, heads, kv_heads, prefix_len)
    ours, reference = _attention_pair(key_mask, causal, window, grad_rows=rows)

    got, (gq, gk, gv, gprefix) = _vjp(ours, (q, k, v, prefix), cot)
    want, (wq, wk, wv, wprefix) = _vjp(reference, (q, k, v, prefix), cot)
    np.testing.assert_allclose(got, want, **F32)
    for g, w in ((gq, wq), (gk, wk), (gv, wv)):
        np.testing.assert_allclose(g[:, :rows], w[:, :rows], atol=5e-5, rtol=5e-5)
        assert not np.asarray(g[:, rows:]).any()
    for g, w in zip(jax.tree.leaves(gprefix), jax.tree.leaves(wprefix)):
        np.testing.assert_allclose(g, w, atol=5e-5, rtol=5e-5)
    with pytest.raises(ValueError, match="grad_rows"):
        attention(q, k, v, key_mask, causal=causal, grad_rows=q.shape[1] + 1)


def test_linear_rows_gradient_of_the_first_rows_only():
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.normal(size=(2, 6, 5)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(5, 4)), jnp.float32)
    b = jnp.asarray(rng.normal(size=4), jnp.float32)
    cot = jnp.asarray(rng.normal(size=(2, 6, 4)), jnp.float32)
    got, (gx, *_) = _vjp(lambda x: linear_rows(x, w, b, 2), (x,), cot)
    want, (wx,) = _vjp(lambda x: linear(x, w, b), (x,), cot)
    np.testing.assert_allclose(got, want, **F32)
    np.testing.assert_allclose(gx[:, :2], wx[:, :2], **F32)
    assert not np.asarray(gx[:, 2:]).any()
    with pytest.raises(ValueError):
        linear_rows(x, w, b, 0)


def test_attention_of_a_query_that_sees_no_key_is_finite():
    """A padding query of a causal model whose own key is padding sees nothing: uniform, finite."""
    q = k = v = jnp.ones((1, 3, 2, 4), jnp.float32)
    key_mask = jnp.asarray([[False, True, True]])
    out = attention(q, k, v, key_mask, causal=True)
    grads = jax.grad(lambda q: attention(q, k, v, key_mask, causal=True).sum())(q)
    assert np.isfinite(np.asarray(out)).all() and np.isfinite(np.asarray(grads)).all()
