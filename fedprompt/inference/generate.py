"""Text generation from a decoder backbone with a trained prompt, using a key/value cache.

Decoding is autoregressive: each new token is predicted from everything before it. Rather than
recomputing the whole sequence for every token, the keys and values of past positions are kept
in a cache (the standard incremental decoding of Transformer decoders, Vaswani et al. 2017), so
each step runs one token through the model.

The prompt fits this naturally:

* a deep prefix (Li and Liang 2021, P-tuning v2) *is* the initial cache: its per-layer keys and
  values fill slots ``0..P-1`` and are never recomputed, and the text starts at position ``P``
  (exactly the semantics of :meth:`fedprompt.Backbone.forward` and of PEFT prefix tuning);
* a soft prompt (Lester et al. 2021) is prefilled: its ``P`` virtual tokens run through the
  model once, with the input text, and stay in the cache like any other tokens.

The result equals the naive loop that calls :meth:`~fedprompt.Backbone.forward` on the whole
growing sequence at every step (the tests check this token for token, greedy, on GPT-2, Llama
and Mistral, with and without a prompt).

Example:
  >>> tokens = generate(backbone, prompt, input_ids, max_new_tokens=20)  # doctest: +SKIP
  >>> backbone.tokenizer.decode(tokens[0])  # doctest: +SKIP
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fedprompt.backbones.backbone import Backbone
from fedprompt.backbones.base import KVCache
from fedprompt.errors import ConfigError, InputError, SequenceTooLongError
from fedprompt.backbones.prompt_inputs import Prefix, SoftPrompt

__all__ = ["generate"]


def generate(
    backbone: Backbone,
    prompt: SoftPrompt | Prefix | None,
    input_ids: Any,
    *,
    max_new_tokens: int,
    attention_mask: Any = None,
    temperature: float = 0.0,
    top_k: int | None = None,
    key: jax.Array | None = None,
    eos_token_id: int | None = None,
) -> np.ndarray:
    """Generates tokens after ``input_ids`` with a decoder backbone and an optional prompt.

    Args:
      backbone: a decoder backbone (GPT-2, Llama, Qwen2, Mistral).
      prompt: a :class:`SoftPrompt` ``[P, D]``, a :class:`Prefix` ``[L, P, H_kv, hd]`` (one
        for the whole batch) or None.
      input_ids: ``[B, T]`` token ids. Rows of different lengths should be left-padded (with
        ``attention_mask`` 0 on the padding): generation continues after the last column.
        Positions count every column, as in :meth:`fedprompt.Backbone.forward`.
      max_new_tokens: how many tokens to generate at most (>= 1).
      attention_mask: ``[B, T]``, 1 for real tokens (default all 1).
      temperature: 0 for greedy decoding (argmax); above 0, sample from
        ``softmax(logits / temperature)``.
      top_k: when sampling, keep only the ``top_k`` most likely tokens.
      key: a PRNG key; required when sampling.
      eos_token_id: stop a row once it emits this token; it then emits only this token, and
        generation ends early when every row has stopped.

    Returns:
      ``[B, N]`` int32 new token ids, ``N <= max_new_tokens`` (fewer only when every row
      stopped at ``eos_token_id``).

    Raises:
      ConfigError: an encoder backbone, or bad sampling settings.
      InputError, EmptyBatchError, PromptMismatchError: malformed inputs or prompt.
      SequenceTooLongError: the prompt, the input and the new tokens exceed the positions.
    """
    if not backbone.is_decoder:
        raise ConfigError(f"generation needs a decoder backbone; {backbone.name!r} is an encoder")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    if not isinstance(temperature, (int, float)) or not np.isfinite(temperature) or temperature < 0:
        raise ConfigError(f"temperature must be a finite number >= 0, got {temperature!r}")
    sampling = temperature > 0
    if sampling and key is None:
        raise ConfigError("sampling (temperature > 0) needs a PRNG key")
    vocab = backbone.config.vocab_size
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= vocab):
        raise ConfigError(f"top_k must be an integer in [1, {vocab}], got {top_k!r}")
    if eos_token_id is not None and not 0 <= int(eos_token_id) < vocab:
        raise ConfigError(f"eos_token_id {eos_token_id} is outside the vocabulary of {vocab}")
    input_ids = np.asarray(input_ids)
    if input_ids.ndim != 2 or not np.issubdtype(input_ids.dtype, np.integer):
        raise InputError(f"input_ids must be [batch, tokens] integers, got {input_ids.dtype} of shape {input_ids.shape}")
    if input_ids.size and (input_ids.min() < 0 or input_ids.max() >= vocab):
        raise InputError(f"input_ids must be token ids in [0, {vocab})")
    mask = np.ones(input_ids.shape, np.int32) if attention_mask is None else np.asarray(attention_mask, np.int32)
    if isinstance(prompt, (SoftPrompt, Prefix)) and np.ndim(prompt[0]) != (2 if isinstance(prompt, SoftPrompt) else 4):
        raise InputError("generate takes one prompt for the whole batch: SoftPrompt [P, D] or Prefix [L, P, H_kv, hd]")
    backbone.check_inputs(input_ids, mask, prompt)
    n_virtual = 0 if prompt is None else (prompt.embeddings.shape[0] if isinstance(prompt, SoftPrompt) else prompt.keys.shape[1])
    total = n_virtual + input_ids.shape[1] + max_new_tokens
    limit = backbone.config.max_positions
    if limit is not None and total > limit:
        raise SequenceTooLongError(
            f"{n_virtual} virtual + {input_ids.shape[1]} input + {max_new_tokens} new tokens = {total} exceeds the "
            f"{limit} positions of backbone {backbone.name!r}"
        )

    static = dict(graphdef=backbone.graphdef, compute_dtype=jnp.dtype(backbone.compute_dtype))
    logits, cache, start = _prefill(backbone.weights, jnp.asarray(input_ids, jnp.int32), jnp.asarray(mask), prompt,
                                    capacity=total, **static)
    key = jax.random.key(0) if key is None else key
    finished = jnp.zeros((input_ids.shape[0],), bool)
    eos = -1 if eos_token_id is None else int(eos_token_id)
    out = []
    for step in range(max_new_tokens):
        token = _select(logits, jax.random.fold_in(key, step), temperature=float(temperature), top_k=top_k)
        if eos_token_id is not None:
            token = jnp.where(finished, eos, token)
            finished = finished | (token == eos)
        out.append(token)
        if eos_token_id is not None and bool(jnp.all(finished)):
            break
        if step + 1 < max_new_tokens:
            logits, cache = _decode_step(backbone.weights, token, cache, jnp.int32(start + step), **static)
    return np.asarray(jnp.stack(out, axis=1), np.int32)


@functools.partial(jax.jit, static_argnames=("graphdef", "compute_dtype", "capacity"))
def _prefill(weights, input_ids, mask, prompt, *, graphdef, compute_dtype, capacity):
    """Runs the prompt and the input through the model; returns (last logits [B, V], cache, next position)."""
    module = nnx.merge(graphdef, weights)
    cfg = module.config
    b, t = input_ids.shape
    embeds = module.embed_tokens(input_ids).astype(compute_dtype)
    valid = mask.astype(bool)
    n_prefix = 0
    if isinstance(prompt, SoftPrompt):
        virtual = jnp.asarray(prompt.embeddings).astype(compute_dtype)
        embeds = jnp.concatenate([jnp.broadcast_to(virtual[None], (b, *virtual.shape)), embeds], axis=1)
        valid = jnp.concatenate([jnp.ones((b, virtual.shape[0]), bool), valid], axis=1)
    cache_shape = (cfg.num_layers, b, capacity, cfg.num_kv_heads, cfg.head_dim)
    keys = jnp.zeros(cache_shape, compute_dtype)
    values = jnp.zeros(cache_shape, compute_dtype)
    slots = jnp.zeros((b, capacity), bool)
    if isinstance(prompt, Prefix):
        n_prefix = prompt.keys.shape[1]
        pk = jnp.broadcast_to(jnp.asarray(prompt.keys).astype(compute_dtype)[:, None], (cfg.num_layers, b, *prompt.keys.shape[1:]))
        pv = jnp.broadcast_to(jnp.asarray(prompt.values).astype(compute_dtype)[:, None], (cfg.num_layers, b, *prompt.values.shape[1:]))
        keys = keys.at[:, :, :n_prefix].set(pk)
        values = values.at[:, :, :n_prefix].set(pv)
        slots = slots.at[:, :n_prefix].set(True)
    length = embeds.shape[1]
    slots = slots.at[:, n_prefix : n_prefix + length].set(valid)
    hidden, cache = module.forward_cached(embeds, KVCache(keys, values, slots), n_prefix)
    logits = module.lm_head(hidden[:, -1]).astype(jnp.float32)
    return logits, cache, n_prefix + length


@functools.partial(jax.jit, static_argnames=("graphdef", "compute_dtype"), donate_argnames=("cache",))
def _decode_step(weights, token, cache: KVCache, position, *, graphdef, compute_dtype):
    """One new token per row at ``position``; returns (logits [B, V], updated cache)."""
    module = nnx.merge(graphdef, weights)
    b = token.shape[0]
    valid = jax.lax.dynamic_update_slice(cache.valid, jnp.ones((b, 1), bool), (jnp.int32(0), position))
    embeds = module.embed_tokens(token[:, None]).astype(compute_dtype)
    hidden, cache = module.forward_cached(embeds, KVCache(cache.keys, cache.values, valid), position)
    return module.lm_head(hidden[:, -1]).astype(jnp.float32), cache


@functools.partial(jax.jit, static_argnames=("temperature", "top_k"))
def _select(logits, key, *, temperature: float, top_k: int | None):
    """The next token per row: argmax, or a sample from the tempered (top-k) distribution."""
    if temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    scaled = logits / jnp.float32(temperature)
    if top_k is not None:
        kth = jax.lax.top_k(scaled, top_k)[0][:, -1:]
        scaled = jnp.where(scaled < kth, -jnp.inf, scaled)
    return jax.random.categorical(key, scaled, axis=-1).astype(jnp.int32)
