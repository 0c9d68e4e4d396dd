"""Prompt semantics, initialization and the prefix reparameterization fold."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors import safe_open
from conftest import TINY, tiny_backbone

from fedprompt import Prefix, PromptConfig, SoftPrompt, fold_prompt, init_prompt, materialize
from fedprompt.errors import ConfigError, PromptMismatchError
from fedprompt.prompts import check_prompt_params, prefix_from_flat, prefix_to_flat


def _ids(bb, shape, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(5, bb.config.vocab_size, size=shape).astype(np.int32)


@pytest.mark.parametrize("name", TINY)
def test_soft_prompt_equals_extra_token_embeddings(name):
    """Prepending P vectors == feeding them as the word embeddings of P extra leading tokens."""
    bb = tiny_backbone(name)
    ids = _ids(bb, (2, 7))
    mask = np.ones_like(ids)
    mask[1, -2:] = 0
    extra = _ids(bb, (3,), seed=1)
    prompt = SoftPrompt(bb.word_embeddings(extra))
    with_prompt = bb.forward(ids, mask, prompt)
    full_ids = np.concatenate([np.broadcast_to(extra, (2, 3)), ids], axis=1)
    full_mask = np.concatenate([np.ones((2, 3), np.int32), mask], axis=1)
    reference = bb.forward(full_ids, full_mask)
    keep = full_mask.astype(bool)
    np.testing.assert_allclose(np.asarray(with_prompt.hidden)[keep], np.asarray(reference.hidden)[keep], atol=1e-5, rtol=1e-5)
    if bb.is_decoder:
        np.testing.assert_allclose(np.asarray(with_prompt.logits)[keep], np.asarray(reference.logits)[keep], atol=1e-5, rtol=1e-5)
    assert with_prompt.num_virtual == 3
    np.testing.assert_array_equal(np.asarray(with_prompt.attention_mask), full_mask)


@pytest.mark.parametrize("name", ["bert", "roberta", "gpt2"])
def test_apply_without_virtual_outputs_is_the_real_tokens_slice(name):
    """``virtual_outputs=False`` returns the real tokens' rows of the full forward pass (hidden,
    logits, mask) with ``num_virtual == 0``, and the prompt's gradient of a loss over them is
    the same."""
    bb = tiny_backbone(name)
    ids = _ids(bb, (2, 6))
    mask = np.ones_like(ids)
    mask[1, -2:] = 0
    prompt = jnp.asarray(np.random.default_rng(2).normal(size=(3, bb.width)), jnp.float32)
    cot = jnp.asarray(np.random.default_rng(3).normal(size=(2, 6, bb.width)), jnp.float32)

    def loss(prompt, virtual_outputs):
        out = bb.apply(bb.weights, ids, mask, SoftPrompt(prompt), virtual_outputs=virtual_outputs)
        hidden = out.hidden[:, out.num_virtual:]
        return jnp.sum(hidden * cot * mask[..., None]), out

    (_, full), full_grad = jax.value_and_grad(loss, has_aux=True)(prompt, True)
    (_, real), real_grad = jax.value_and_grad(loss, has_aux=True)(prompt, False)
    assert real.num_virtual == 0 and real.hidden.shape == (2, 6, bb.width)
    np.testing.assert_array_equal(np.asarray(real.attention_mask), mask)
    np.testing.assert_allclose(np.asarray(real.hidden), np.asarray(full.hidden[:, 3:]), atol=1e-5, rtol=1e-5)
    if bb.is_decoder:
        np.testing.assert_allclose(np.asarray(real.logits), np.asarray(full.logits[:, 3:]), atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(real_grad), np.asarray(full_grad), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", ["bert", "llama"])
def test_prefix_fold_is_exact(name):
    bb = tiny_backbone(name)
    cfg = PromptConfig(method="prefix", num_virtual_tokens=4, reparameterize=True, reparam_hidden=16)
    params = init_prompt(cfg, bb, jax.random.key(3))
    folded_cfg, folded = fold_prompt(cfg, params, bb.config)
    assert not folded_cfg.reparameterize and set(folded) == {"keys", "values"}
    assert folded["keys"].shape == (bb.config.num_layers, 4, bb.config.num_kv_heads, bb.config.head_dim)
    check_prompt_params(folded_cfg, folded, bb)
    ids = _ids(bb, (2, 6))
    a = bb.forward(ids, prompt=materialize(cfg, params, bb.config))
    b = bb.forward(ids, prompt=materialize(folded_cfg, folded, bb.config))
    np.testing.assert_array_equal(np.asarray(a.hidden), np.asarray(b.hidden))
    # The fold evaluates exactly the MLP of Li & Liang: tanh(E W1 + b1) W2 + b2, checked in NumPy.
    e, w1, b1 = (np.asarray(x, np.float64) for x in (params["embedding"], params["mlp_in"]["w"], params["mlp_in"]["b"]))
    w2, b2 = (np.asarray(x, np.float64) for x in (params["mlp_out"]["w"], params["mlp_out"]["b"]))
    flat = np.tanh(e @ w1 + b1) @ w2 + b2
    np.testing.assert_allclose(np.asarray(prefix_to_flat(Prefix(folded["keys"], folded["values"]))), flat, atol=1e-5)


def test_prefix_flat_layout_matches_peft_order():
    """PEFT views the flat prefix as [P, L * 2, H, hd] with key/value interleaved per layer."""
    layers, p, heads, hd = 3, 2, 2, 4
    flat = jnp.arange(p * layers * 2 * heads * hd, dtype=jnp.float32).reshape(p, -1)
    prefix = prefix_from_flat(flat, layers, heads, hd)
    view = np.asarray(flat).reshape(p, layers * 2, heads, hd)
    for layer in range(layers):
        np.testing.assert_array_equal(np.asarray(prefix.keys[layer]), view[:, 2 * layer])
        np.testing.assert_array_equal(np.asarray(prefix.values[layer]), view[:, 2 * layer + 1])
    np.testing.assert_array_equal(np.asarray(prefix_to_flat(prefix)), np.asarray(flat))


@pytest.mark.slow
@pytest.mark.parametrize("p", [3, 20])
def test_text_init_equals_tokenized_text_embeddings(minilm, p):
    text = "classify the meaning of this gloss"
    cfg = PromptConfig(num_virtual_tokens=p, init="text", init_text=text)
    params = init_prompt(cfg, minilm, jax.random.key(0))
    ids = minilm.tokenizer(text)["input_ids"]  # with [CLS]/[SEP], as PEFT does
    ids = (ids * (p // len(ids) + 1))[:p]  # repeated, then truncated
    with safe_open(str(minilm.path / "model.safetensors"), "numpy") as f:
        rows = f.get_tensor("embeddings.word_embeddings.weight")[np.asarray(ids)]
    np.testing.assert_array_equal(np.asarray(params["embeddings"]), rows)
    assert len(set(map(tuple, rows.round(6)))) == min(p, len(set(ids)))


def test_sample_vocab_init_uses_embedding_rows():
    bb = tiny_backbone("gpt2")
    params = init_prompt(PromptConfig(num_virtual_tokens=5, init="sample_vocab"), bb, jax.random.key(1))
    table = np.asarray(bb.word_embeddings(jnp.arange(bb.config.vocab_size)))
    for row in np.asarray(params["embeddings"]):
        assert np.any(np.all(table == row, axis=1)), "every virtual token must be a vocabulary row"


def test_random_init_has_configured_std():
    bb = tiny_backbone("bert")
    params = init_prompt(PromptConfig(num_virtual_tokens=64, init="random", random_std=0.5), bb, jax.random.key(2))
    assert params["embeddings"].shape == (64, bb.width)
    assert abs(float(np.std(params["embeddings"])) - 0.5) < 0.05


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"method": "lora"}, "method"),
        ({"num_virtual_tokens": 0}, "num_virtual_tokens"),
        ({"init": "zeros"}, "init"),
        ({"init": "text"}, "init_text"),
        ({"random_std": -1.0}, "random_std"),
        ({"reparameterize": True}, "prefix"),
        ({"method": "prefix", "init": "sample_vocab"}, "reparameterize"),
    ],
)
def test_prompt_config_rejects_bad_values(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        PromptConfig(**kwargs)


def test_prompt_that_does_not_fit_is_rejected():
    bb = tiny_backbone("bert")
    ids = _ids(bb, (1, 4))
    with pytest.raises(PromptMismatchError, match="width"):
        bb.forward(ids, prompt=SoftPrompt(jnp.zeros((3, bb.width + 1))))
    wrong = jnp.zeros((bb.config.num_layers + 1, 2, bb.config.num_kv_heads, bb.config.head_dim))
    with pytest.raises(PromptMismatchError, match="layers"):
        bb.forward(ids, prompt=Prefix(wrong, wrong))
    other = tiny_backbone("gpt2")
    params = init_prompt(PromptConfig(num_virtual_tokens=2), bb, jax.random.key(0))
    params["embeddings"] = jnp.zeros((2, other.width + 8))
    with pytest.raises(PromptMismatchError):
        check_prompt_params(PromptConfig(num_virtual_tokens=2), params, bb)
