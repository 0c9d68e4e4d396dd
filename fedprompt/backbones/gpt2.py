"""GPT-2 as a frozen Flax NNX backbone.

GPT-2 (Radford et al., 2019, "Language Models are Unsupervised Multitask Learners") is a
decoder-only transformer with learned absolute position embeddings, pre-LayerNorm blocks, a
GELU MLP and an output projection tied to the token embedding matrix.

Weights are read from a Hugging Face ``GPT2Model``/``GPT2LMHeadModel`` ``state_dict``. GPT-2
stores its projections as ``Conv1D`` weights, which are already laid out ``[in, out]``, so no
transpose is needed. The attention buffers ``attn.bias``/``attn.masked_bias`` of old
checkpoints are ignored, and so is ``lm_head.weight`` (after checking that it equals ``wte``).

Positions: the real (and soft-prompt) tokens sit at positions ``P + arange(S)`` where ``P`` is
the length of the optional deep prefix, exactly as a Hugging Face model called with a
key/value cache of length ``P`` (PEFT prefix tuning).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fedprompt.backbones.base import (
    ArchConfig,
    FrozenWeight,
    KVCache,
    attention,
    cached_attention,
    layer_norm,
    linear,
    prefix_length,
    run_block,
    split_prefix,
    take,
    value,
    write_cache,
)
from fedprompt.errors import CheckpointError, ConfigError, SequenceTooLongError

#: Activation names (Hugging Face ``ACT2FN`` keys) meaning GELU with the tanh approximation.
_TANH_GELUS = frozenset({"gelu_new", "gelu_pytorch_tanh", "gelu_fast"})
#: Activation names meaning the exact (erf) GELU.
_EXACT_GELUS = frozenset({"gelu", "gelu_python"})


def _require(cfg: Mapping[str, Any], key: str, *alternatives: str) -> Any:
    for name in (key, *alternatives):
        if name in cfg and cfg[name] is not None:
            return cfg[name]
    raise ConfigError(f"GPT-2 config is missing {key!r}")


@dataclasses.dataclass(frozen=True)
class GPT2Config(ArchConfig):
    """GPT-2 architecture hyper-parameters.

    Attributes:
      intermediate_size: width of the MLP (``n_inner``, default ``4 * n_embd``).
      layer_norm_eps: LayerNorm epsilon.
      gelu_approximate: True for the tanh approximation (``gelu_new``), False for exact GELU.
      scale_attn_weights: divide attention scores by ``sqrt(head_dim)`` (always True in GPT-2).
      scale_attn_by_inverse_layer_idx: additionally divide layer ``l``'s scores by ``l + 1``.
    """

    intermediate_size: int = 0
    layer_norm_eps: float = 1e-5
    gelu_approximate: bool = True
    scale_attn_weights: bool = True
    scale_attn_by_inverse_layer_idx: bool = False

    @classmethod
    def from_hf(cls, cfg: Mapping[str, Any]) -> GPT2Config:
        """Read a Hugging Face GPT-2 ``config.json`` dict.

        Raises:
          ConfigError: a required field is missing or a value is unsupported (activation other
            than GELU, hidden size not divisible by the number of heads, cross-attention).
        """
        model_type = cfg.get("model_type", "gpt2")
        if model_type != "gpt2":
            raise ConfigError(f"GPT2Config cannot read a config of model_type {model_type!r}")
        hidden = int(_require(cfg, "n_embd", "hidden_size"))
        layers = int(_require(cfg, "n_layer", "num_hidden_layers"))
        heads = int(_require(cfg, "n_head", "num_attention_heads"))
        positions = int(_require(cfg, "n_positions", "max_position_embeddings"))
        vocab = int(_require(cfg, "vocab_size"))
        if hidden % heads != 0:
            raise ConfigError(f"n_embd={hidden} is not divisible by n_head={heads}")
        act = cfg.get("activation_function", "gelu_new")
        if act in _TANH_GELUS:
            approximate = True
        elif act in _EXACT_GELUS:
            approximate = False
        else:
            raise ConfigError(
                f"unsupported GPT-2 activation_function {act!r}; expected one of "
                f"{sorted(_TANH_GELUS | _EXACT_GELUS)}"
            )
        if cfg.get("add_cross_attention", False):
            raise ConfigError("GPT-2 checkpoints with cross-attention are not supported")
        inner = cfg.get("n_inner")
        pad = cfg.get("pad_token_id")
        return cls(
            model_type="gpt2",
            vocab_size=vocab,
            hidden_size=hidden,
            num_layers=layers,
            num_heads=heads,
            num_kv_heads=heads,
            head_dim=hidden // heads,
            max_positions=positions,
            is_decoder=True,
            pad_token_id=None if pad is None else int(pad),
            intermediate_size=int(inner) if inner is not None else 4 * hidden,
            layer_norm_eps=float(cfg.get("layer_norm_epsilon", 1e-5)),
            gelu_approximate=approximate,
            scale_attn_weights=bool(cfg.get("scale_attn_weights", True)),
            scale_attn_by_inverse_layer_idx=bool(cfg.get("scale_attn_by_inverse_layer_idx", False)),
        )


def _block_shapes(config: GPT2Config) -> dict[str, tuple[int, ...]]:
    """One block's tensors: name (under ``h.{layer}.``) -> shape (``Conv1D`` weights are ``[in, out]``)."""
    d, f = config.hidden_size, config.intermediate_size
    return {
        "ln_1.weight": (d,),
        "ln_1.bias": (d,),
        "attn.c_attn.weight": (d, 3 * d),
        "attn.c_attn.bias": (3 * d,),
        "attn.c_proj.weight": (d, d),
        "attn.c_proj.bias": (d,),
        "ln_2.weight": (d,),
        "ln_2.bias": (d,),
        "mlp.c_fc.weight": (d, f),
        "mlp.c_fc.bias": (f,),
        "mlp.c_proj.weight": (f, d),
        "mlp.c_proj.bias": (d,),
    }


def checkpoint_shapes(config: GPT2Config) -> dict[str, tuple[int, ...]]:
    """The tensors of a Hugging Face GPT-2 checkpoint of ``config``: name -> shape as stored there.

    Names carry the ``transformer.`` prefix of a ``GPT2LMHeadModel`` checkpoint; the tied LM
    head is left out. :func:`fedprompt.backbones.abstract.abstract_backbone` builds an abstract
    model from these shapes, and :meth:`GPT2.from_hf` checks them.
    """
    d, v = config.hidden_size, config.vocab_size
    shapes: dict[str, tuple[int, ...]] = {
        "transformer.wte.weight": (v, d),
        "transformer.wpe.weight": (config.max_positions, d),
        "transformer.ln_f.weight": (d,),
        "transformer.ln_f.bias": (d,),
    }
    for layer in range(config.num_layers):
        for name, shape in _block_shapes(config).items():
            shapes[f"transformer.h.{layer}.{name}"] = shape
    return shapes


class GPT2Block(nnx.Module):
    """One pre-LayerNorm GPT-2 block: ``x + attn(ln_1(x))`` then ``x + mlp(ln_2(x))``."""

    def __init__(self, config: GPT2Config, layer: int, weights: dict[str, FrozenWeight]):
        self.config = config
        self.layer = layer
        self.ln_1_scale = weights["ln_1.weight"]
        self.ln_1_bias = weights["ln_1.bias"]
        self.c_attn_w = weights["attn.c_attn.weight"]
        self.c_attn_b = weights["attn.c_attn.bias"]
        self.attn_proj_w = weights["attn.c_proj.weight"]
        self.attn_proj_b = weights["attn.c_proj.bias"]
        self.ln_2_scale = weights["ln_2.weight"]
        self.ln_2_bias = weights["ln_2.bias"]
        self.c_fc_w = weights["mlp.c_fc.weight"]
        self.c_fc_b = weights["mlp.c_fc.bias"]
        self.mlp_proj_w = weights["mlp.c_proj.weight"]
        self.mlp_proj_b = weights["mlp.c_proj.bias"]

    def __call__(
        self, x: jax.Array, key_mask: jax.Array, prefix: tuple[jax.Array, jax.Array] | None
    ) -> jax.Array:
        q, k, v = self._qkv(x)
        a = attention(q, k, v, key_mask, causal=True, prefix=prefix)
        return self._finish(x, a)

    def step(
        self, x: jax.Array, cache_k: jax.Array, cache_v: jax.Array, key_valid: jax.Array, start: jax.Array
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Incremental decoding: ``x`` ``[B, T, D]`` at positions ``start..start+T-1``.

        Writes this block's keys/values for the new tokens into ``cache_k``/``cache_v``
        (``[B, S, H, hd]``) and attends over the whole cache (see
        :func:`~fedprompt.backbones.base.cached_attention`). Returns ``(x, cache_k, cache_v)``.
        """
        q, k, v = self._qkv(x)
        cache_k = write_cache(cache_k, k, start)
        cache_v = write_cache(cache_v, v, start)
        positions = jnp.asarray(start, jnp.int32) + jnp.arange(x.shape[1], dtype=jnp.int32)
        a = cached_attention(q, cache_k, cache_v, key_valid, positions)
        return self._finish(x, a), cache_k, cache_v

    def _qkv(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Queries, keys and values ``[B, S, H, hd]``; GPT-2's extra score scalings folded into the queries."""
        cfg = self.config
        b, s, _ = x.shape
        h, hd = cfg.num_heads, cfg.head_dim
        y = layer_norm(x, self.ln_1_scale, self.ln_1_bias, cfg.layer_norm_eps)
        qkv = linear(y, self.c_attn_w, self.c_attn_b)
        q, k, v = jnp.split(qkv, 3, axis=-1)
        q = q.reshape(b, s, h, hd)
        k = k.reshape(b, s, h, hd)
        v = v.reshape(b, s, h, hd)
        # ``attention`` divides by sqrt(head_dim); fold any other GPT-2 scaling into the queries.
        extra = 1.0
        if not cfg.scale_attn_weights:
            extra *= math.sqrt(hd)
        if cfg.scale_attn_by_inverse_layer_idx:
            extra /= float(self.layer + 1)
        if extra != 1.0:
            q = q * jnp.asarray(extra, dtype=q.dtype)
        return q, k, v

    def _finish(self, x: jax.Array, a: jax.Array) -> jax.Array:
        """The attention output projection and the MLP, each with its residual."""
        cfg = self.config
        b, s, d = x.shape
        x = x + linear(a.reshape(b, s, d), self.attn_proj_w, self.attn_proj_b)
        y = layer_norm(x, self.ln_2_scale, self.ln_2_bias, cfg.layer_norm_eps)
        y = jax.nn.gelu(linear(y, self.c_fc_w, self.c_fc_b), approximate=cfg.gelu_approximate)
        return x + linear(y, self.mlp_proj_w, self.mlp_proj_b)


class GPT2(nnx.Module):
    """Frozen GPT-2 body plus tied LM head (see :class:`~fedprompt.backbones.base.BackboneModule`)."""

    def __init__(
        self,
        config: GPT2Config,
        embeddings: dict[str, FrozenWeight],
        blocks: list[GPT2Block],
    ):
        self.config = config
        self.wte = embeddings["wte.weight"]
        self.wpe = embeddings["wpe.weight"]
        self.ln_f_scale = embeddings["ln_f.weight"]
        self.ln_f_bias = embeddings["ln_f.bias"]
        self.blocks = nnx.List(blocks)

    @classmethod
    def from_hf(
        cls,
        config: GPT2Config,
        tensors: Mapping[str, np.ndarray],
        dtype: Any = jnp.float32,
    ) -> GPT2:
        """Build the model from a Hugging Face GPT-2 ``state_dict``.

        Args:
          config: the architecture (from :meth:`GPT2Config.from_hf`).
          tensors: tensor name -> array, with or without the leading ``"transformer."``.
          dtype: storage dtype of the weights.

        Raises:
          CheckpointError: a tensor is missing or misshapen, or an untied ``lm_head.weight``
            differs from ``wte.weight``.
        """
        outer = "transformer." if any(k.startswith("transformer.") for k in tensors) else ""
        d, v = config.hidden_size, config.vocab_size

        def get(name: str, shape: tuple[int, ...]) -> FrozenWeight:
            return take(tensors, outer + name, shape, dtype=dtype)

        embeddings = {
            "wte.weight": get("wte.weight", (v, d)),
            "wpe.weight": get("wpe.weight", (config.max_positions, d)),
            "ln_f.weight": get("ln_f.weight", (d,)),
            "ln_f.bias": get("ln_f.bias", (d,)),
        }
        head = tensors.get("lm_head.weight")
        if head is not None:
            head = np.asarray(head)
            if head.shape != (v, d) or not np.array_equal(
                head.astype(np.float32), np.asarray(tensors[outer + "wte.weight"]).astype(np.float32)
            ):
                raise CheckpointError(
                    "tensor 'lm_head.weight' differs from 'wte.weight'; GPT-2's LM head must be tied"
                )
        shapes = _block_shapes(config)
        blocks = []
        for layer in range(config.num_layers):
            weights = {name: get(f"h.{layer}.{name}", shape) for name, shape in shapes.items()}
            blocks.append(GPT2Block(config, layer, weights))
        return cls(config, embeddings, blocks)

    def embed_tokens(self, input_ids: jax.Array) -> jax.Array:
        """Word embeddings ``[B, T, D]`` (no position embeddings) of ``input_ids`` ``[B, T]``."""
        return jnp.take(value(self.wte), jnp.asarray(input_ids), axis=0)

    def __call__(
        self,
        inputs_embeds: jax.Array,
        attention_mask: jax.Array,
        *,
        prefix: tuple[jax.Array, jax.Array] | None = None,
        token_type_ids: jax.Array | None = None,
        remat: bool = False,
    ) -> jax.Array:
        """Run the transformer on word-space embeddings.

        Args:
          inputs_embeds: ``[B, S, D]`` word embeddings (soft prompt included); sets the compute dtype.
          attention_mask: ``[B, S]``, nonzero where a real token is.
          prefix: optional per-layer ``(keys, values)``, each ``[L, B, P, H, head_dim]``.
          token_type_ids: optional ``[B, S]`` ids; as in Hugging Face's GPT-2, their ``wte``
            embeddings are added to the input.
          remat: recompute each block's activations in the backward pass instead of
            keeping them (see :func:`~fedprompt.backbones.base.run_block`).

        Returns:
          ``[B, S, D]`` hidden states after the final LayerNorm, in ``inputs_embeds``' dtype.

        Raises:
          SequenceTooLongError: ``P + S`` exceeds the position table.
        """
        cfg = self.config
        dt = inputs_embeds.dtype
        s = inputs_embeds.shape[1]
        p = prefix_length(prefix)
        if p + s > cfg.max_positions:
            raise SequenceTooLongError(
                f"sequence of {s} tokens after a prefix of {p} exceeds GPT-2's {cfg.max_positions} positions"
            )
        pos = value(self.wpe)[p : p + s].astype(dt)
        x = inputs_embeds + pos[None]
        if token_type_ids is not None:
            x = x + jnp.take(value(self.wte), jnp.asarray(token_type_ids), axis=0).astype(dt)
        key_mask = jnp.asarray(attention_mask).astype(bool)
        for layer, block in enumerate(self.blocks):
            x = run_block(block, x, key_mask, split_prefix(prefix, layer), remat=remat)
        return layer_norm(x, self.ln_f_scale, self.ln_f_bias, cfg.layer_norm_eps)

    def forward_cached(
        self, inputs_embeds: jax.Array, cache: KVCache, start: jax.Array | int
    ) -> tuple[jax.Array, KVCache]:
        """Run new tokens through the model against a key/value cache (incremental decoding).

        Args:
          inputs_embeds: ``[B, T, D]`` word embeddings of the new tokens (soft-prompt vectors
            included when prefilling), at absolute positions ``start..start+T-1``.
          cache: the :class:`~fedprompt.backbones.base.KVCache`; ``cache.valid`` must already
            mark the new tokens' slots (a deep prefix sits in slots ``0..P-1``).
          start: the first new token's position (may be traced); the caller keeps
            ``start + T`` within the position table.

        Returns:
          ``(hidden [B, T, D] after the final LayerNorm, updated cache)``. Equal to
          :meth:`__call__` on the whole sequence, restricted to the new tokens.
        """
        dt = inputs_embeds.dtype
        t = inputs_embeds.shape[1]
        pos = jax.lax.dynamic_slice_in_dim(value(self.wpe), jnp.asarray(start, jnp.int32), t, axis=0).astype(dt)
        x = inputs_embeds + pos[None]
        keys, values = [], []
        for layer, block in enumerate(self.blocks):
            x, k, v = block.step(x, cache.keys[layer], cache.values[layer], cache.valid, start)
            keys.append(k)
            values.append(v)
        hidden = layer_norm(x, self.ln_f_scale, self.ln_f_bias, self.config.layer_norm_eps)
        return hidden, KVCache(jnp.stack(keys), jnp.stack(values), cache.valid)

    def lm_head(self, hidden: jax.Array) -> jax.Array:
        """Logits ``[B, S, vocab]`` from the tied embedding matrix, in ``hidden``'s dtype."""
        return hidden @ value(self.wte, hidden.dtype).T

