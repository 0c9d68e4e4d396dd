"""Generation with a key/value cache equals the naive recompute-everything loop, token for token."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_backbone

from fedprompt.errors import ConfigError, InputError, SequenceTooLongError
from fedprompt.inference.generate import generate
from fedprompt.prompts import Prefix, SoftPrompt


def naive_greedy(backbone, prompt, ids, mask, steps):
    """Reference: the whole sequence through ``backbone.forward`` at every step, no cache.

    The sequence is kept at its final length with masked zeros after the tokens generated so
    far (causal attention never looks ahead), so the forward compiles once.
    """
    ids, mask = np.asarray(ids), np.asarray(mask)
    b, t = ids.shape
    seq = np.concatenate([ids, np.zeros((b, steps), ids.dtype)], 1)
    seq_mask = np.concatenate([mask, np.zeros((b, steps), mask.dtype)], 1)
    for step in range(steps):
        logits = backbone.forward(seq, seq_mask, prompt).logits
        offset = 0 if not isinstance(prompt, SoftPrompt) else prompt.embeddings.shape[0]
        seq[:, t + step] = np.asarray(jnp.argmax(logits[:, offset + t + step - 1], -1))
        seq_mask[:, t + step] = 1
    return seq[:, t:].astype(np.int32)


def _prompts(backbone, seed=0):
    cfg = backbone.config
    rng = np.random.default_rng(seed)
    soft = SoftPrompt(jnp.asarray(rng.normal(size=(3, cfg.hidden_size)), jnp.float32))
    shape = (cfg.num_layers, 4, cfg.num_kv_heads, cfg.head_dim)
    prefix = Prefix(*(jnp.asarray(rng.normal(size=shape), jnp.float32) for _ in range(2)))
    return {"none": None, "soft": soft, "prefix": prefix}


@pytest.mark.parametrize("name", ["gpt2", "llama", "mistral"])
@pytest.mark.parametrize("kind", ["none", "soft", "prefix"])
def test_cached_greedy_equals_naive_loop(name, kind):
    backbone = tiny_backbone(name)
    prompt = _prompts(backbone)[kind]
    rng = np.random.default_rng(1)
    # Short inputs so that Mistral's window of 4 still reaches back to the prompt at first.
    ids = rng.integers(3, 100, (2, 2)).astype(np.int32)
    mask = np.array([[1, 1], [0, 1]], np.int32)  # row 1 left-padded
    got = generate(backbone, prompt, ids, attention_mask=mask, max_new_tokens=10)
    want = naive_greedy(backbone, prompt, ids, mask, 10)
    assert got.shape == (2, 10) and got.dtype == np.int32
    np.testing.assert_array_equal(got, want)


def test_prompt_changes_what_is_generated():
    backbone = tiny_backbone("gpt2")
    ids = np.array([[5, 6, 7]], np.int32)
    outs = {k: tuple(generate(backbone, p, ids, max_new_tokens=8)[0]) for k, p in _prompts(backbone, seed=3).items()}
    assert len(set(outs.values())) == 3


def test_sampling_is_seeded_and_top_k_one_is_greedy():
    backbone = tiny_backbone("llama")
    prompt = _prompts(backbone)["prefix"]
    ids = np.array([[5, 6, 7], [8, 9, 10]], np.int32)
    a = generate(backbone, prompt, ids, max_new_tokens=12, temperature=1.5, key=jax.random.key(0))
    b = generate(backbone, prompt, ids, max_new_tokens=12, temperature=1.5, key=jax.random.key(0))
    c = generate(backbone, prompt, ids, max_new_tokens=12, temperature=1.5, key=jax.random.key(1))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    greedy = generate(backbone, prompt, ids, max_new_tokens=12)
    np.testing.assert_array_equal(generate(backbone, prompt, ids, max_new_tokens=12, temperature=0.7, top_k=1,
                                           key=jax.random.key(5)), greedy)
    # top_k=3: every sampled token is among the 3 most likely under the naive forward.
    tokens = generate(backbone, None, ids, max_new_tokens=1, temperature=5.0, top_k=3, key=jax.random.key(2))
    top3 = np.argsort(np.asarray(backbone.forward(ids).logits[:, -1]), -1)[:, -3:]
    assert all(tokens[i, 0] in top3[i] for i in range(2))


def test_eos_stops_rows_and_generation():
    backbone = tiny_backbone("gpt2")
    ids = np.array([[5, 6, 7], [8, 9, 10]], np.int32)
    free = generate(backbone, None, ids, max_new_tokens=6)
    eos = int(free[0, 1])  # the second token of row 0
    got = generate(backbone, None, ids, max_new_tokens=6, eos_token_id=eos)
    assert np.all(got[0, 1:] == eos)
    row1 = free[1]
    hits = np.flatnonzero(row1 == eos)
    cut = hits[0] + 1 if hits.size else 6
    np.testing.assert_array_equal(got[1, :cut], row1[:cut])
    assert np.all(got[1, cut:] == eos)
    assert got.shape[1] == max(2, cut)  # generation stops once every row has emitted eos


def test_bad_arguments_raise_library_errors():
    gpt2, bert = tiny_backbone("gpt2"), tiny_backbone("bert")
    ids = np.array([[5, 6]], np.int32)
    with pytest.raises(ConfigError, match="decoder"):
        generate(bert, None, ids, max_new_tokens=2)
    with pytest.raises(ConfigError, match="max_new_tokens"):
        generate(gpt2, None, ids, max_new_tokens=0)
    with pytest.raises(ConfigError, match="key"):
        generate(gpt2, None, ids, max_new_tokens=2, temperature=1.0)
    with pytest.raises(ConfigError, match="top_k"):
        generate(gpt2, None, ids, max_new_tokens=2, temperature=1.0, top_k=0, key=jax.random.key(0))
    with pytest.raises(InputError, match="token ids"):
        generate(gpt2, None, np.array([[500]]), max_new_tokens=2)
    with pytest.raises(InputError):
        generate(gpt2, None, np.array([5, 6]), max_new_tokens=2)
    with pytest.raises(SequenceTooLongError, match="64 positions"):
        generate(gpt2, _prompts(gpt2)["soft"], ids, max_new_tokens=60)
