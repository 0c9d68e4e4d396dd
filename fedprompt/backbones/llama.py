"""The Llama family (Llama 2/3, Qwen2, Mistral) as a frozen Flax NNX backbone.

All three are pre-RMSNorm decoder-only transformers with rotary position embeddings, grouped-
query attention and a SwiGLU MLP; they differ only in small switches, which
:class:`LlamaConfig` records:

* Llama 2/3 (Touvron et al., 2023, "LLaMA: Open and Efficient Foundation Language Models" and
  "Llama 2: Open Foundation and Fine-Tuned Chat Models"): optional biases (``attention_bias``,
  ``mlp_bias``) and, for Llama 3.1+, the "llama3" frequency-dependent rotary rescaling.
* Qwen2 (Qwen Team, 2024, "Qwen2 Technical Report"): biases on the query/key/value
  projections only, usually tied input/output embeddings, and an optional sliding window on
  the upper layers (``use_sliding_window``/``max_window_layers``, off in released models).
* Mistral (Jiang et al., 2023, "Mistral 7B"): sliding-window attention on every layer.

Rotary embeddings follow Su et al. (2021), "RoFormer: Enhanced Transformer with Rotary Position
Embedding", in Hugging Face's rotate-half layout (the two halves of each head are the two
coordinates of each rotated pair). Grouped-query attention is Ainslie et al. (2023), "GQA:
Training Generalized Multi-Query Transformer Models from Multi-Head Checkpoints".

Positions: the real (and soft-prompt) tokens sit at ``P + arange(S)`` where ``P`` is the length
of the optional deep prefix. Rotary embeddings rotate only the queries and keys of those tokens;
prefix keys are used as given, like a pre-filled key/value cache (PEFT prefix tuning). With a
sliding window ``W``, a query at position ``P + i`` sees the keys at positions
``P + i - W + 1 .. P + i`` only, prefix keys included, which is what Hugging Face's
sliding-window causal mask does when the prefix sits in a ``DynamicCache``.
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
    linear,
    prefix_length,
    rms_norm,
    run_block,
    split_prefix,
    take,
    value,
    write_cache,
)
from fedprompt.errors import ConfigError

#: ``model_type`` values this module reads.
MODEL_TYPES = ("llama", "qwen2", "mistral")
#: Rotary scaling types implemented.
ROPE_TYPES = ("default", "linear", "llama3")
_LAYER_TYPES = ("full_attention", "sliding_attention")


def _require(cfg: Mapping[str, Any], key: str) -> Any:
    if key not in cfg or cfg[key] is None:
        raise ConfigError(f"{cfg.get('model_type', 'llama')} config is missing {key!r}")
    return cfg[key]


def _rope_settings(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """Normalize the rotary settings of a config written by transformers v4 or v5.

    transformers v4 wrote ``rope_theta`` at the top level and an optional ``rope_scaling`` dict
    (its type under ``"type"`` or ``"rope_type"``); v5 writes a single ``rope_parameters`` dict
    holding ``rope_type`` and ``rope_theta``. As in transformers, a ``rope_scaling`` dict wins
    over ``rope_parameters``, and a ``rope_theta`` inside the dict wins over the top-level one.
    """
    params = cfg.get("rope_scaling") or cfg.get("rope_parameters") or {}
    if not isinstance(params, Mapping):
        raise ConfigError(f"rope parameters must be a dict, got {params!r}")
    params = dict(params)
    nested = [k for k in params if k in _LAYER_TYPES]
    if nested:  # per-layer-type parameters: accept them only when they all agree
        variants = [params[k] for k in nested if params[k] is not None]
        if any(v != variants[0] for v in variants[1:]):
            raise ConfigError("different rotary parameters per layer type are not supported")
        params = dict(variants[0]) if variants else {}
    rope_type = params.get("rope_type", params.get("type", "default")) or "default"
    if rope_type not in ROPE_TYPES:
        raise ConfigError(f"unsupported rope type {rope_type!r}; expected one of {list(ROPE_TYPES)}")
    theta = params.get("rope_theta")
    if theta is None:
        theta = cfg.get("rope_theta")
    if theta is None:
        theta = 10000.0
    partial = params.get("partial_rotary_factor", cfg.get("partial_rotary_factor"))
    if partial is not None and float(partial) != 1.0:
        raise ConfigError(f"partial rotary embeddings (partial_rotary_factor={partial}) are not supported")
    out: dict[str, Any] = {
        "rope_type": rope_type,
        "rope_theta": float(theta),
        "rope_factor": None,
        "rope_low_freq_factor": None,
        "rope_high_freq_factor": None,
        "rope_original_max_positions": None,
    }
    if rope_type in ("linear", "llama3"):
        if params.get("factor") is None:
            raise ConfigError(f"rope type {rope_type!r} needs a 'factor'")
        out["rope_factor"] = float(params["factor"])
    if rope_type == "llama3":
        for key in ("low_freq_factor", "high_freq_factor"):
            if params.get(key) is None:
                raise ConfigError(f"rope type 'llama3' needs {key!r}")
        out["rope_low_freq_factor"] = float(params["low_freq_factor"])
        out["rope_high_freq_factor"] = float(params["high_freq_factor"])
        if out["rope_low_freq_factor"] == out["rope_high_freq_factor"]:
            raise ConfigError("rope type 'llama3' needs low_freq_factor != high_freq_factor")
        original = params.get("original_max_position_embeddings")
        if original is None:
            original = cfg.get("original_max_position_embeddings", cfg.get("max_position_embeddings"))
        if original is None:
            raise ConfigError("rope type 'llama3' needs 'original_max_position_embeddings'")
        out["rope_original_max_positions"] = int(original)
    return out


def _sliding_windows(cfg: Mapping[str, Any], model_type: str, num_layers: int) -> tuple[int | None, ...]:
    """The attention window of each layer (``None``: full causal attention), as transformers v5 sets it."""
    if model_type == "llama":
        return (None,) * num_layers
    if cfg.get("use_sliding_window") is False:
        return (None,) * num_layers
    if model_type == "mistral":
        # MistralConfig defaults to 4096 when the key is absent; an explicit null disables it.
        window = cfg["sliding_window"] if "sliding_window" in cfg else 4096
        if window is None:
            return (None,) * num_layers
        return (_window(window),) * num_layers  # Mistral applies it to every layer
    # qwen2: the window is on only with use_sliding_window, and only on the layers it names
    if not cfg.get("use_sliding_window", False):
        return (None,) * num_layers
    window = cfg["sliding_window"] if "sliding_window" in cfg else 4096
    if window is None:
        return (None,) * num_layers
    layer_types = cfg.get("layer_types")
    if layer_types is None:
        first = int(cfg.get("max_window_layers", 28))
        layer_types = ["sliding_attention" if i >= first else "full_attention" for i in range(num_layers)]
    if len(layer_types) != num_layers or any(t not in _LAYER_TYPES for t in layer_types):
        raise ConfigError(f"layer_types {layer_types!r} must give one of {list(_LAYER_TYPES)} per layer")
    w = _window(window)
    return tuple(w if t == "sliding_attention" else None for t in layer_types)


def _window(window: Any) -> int:
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ConfigError(f"sliding_window must be a positive integer, got {window!r}")
    return int(window)


@dataclasses.dataclass(frozen=True)
class LlamaConfig(ArchConfig):
    """Hyper-parameters of a Llama-family checkpoint.

    Attributes:
      intermediate_size: SwiGLU width.
      rms_norm_eps: RMSNorm epsilon.
      tie_word_embeddings: the LM head reuses the embedding matrix.
      qkv_bias: the query/key/value projections have biases (Qwen2, Llama ``attention_bias``).
      o_bias: the output projection has a bias (Llama ``attention_bias``).
      mlp_bias: the MLP projections have biases (Llama ``mlp_bias``).
      rope_type: ``"default"``, ``"linear"`` or ``"llama3"``.
      rope_theta: rotary base.
      rope_factor: scaling factor (``linear``/``llama3``).
      rope_low_freq_factor, rope_high_freq_factor, rope_original_max_positions: ``llama3`` only.
      sliding_windows: per layer, the attention window or ``None`` for full causal attention.
    """

    intermediate_size: int = 0
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    rope_type: str = "default"
    rope_theta: float = 10000.0
    rope_factor: float | None = None
    rope_low_freq_factor: float | None = None
    rope_high_freq_factor: float | None = None
    rope_original_max_positions: int | None = None
    sliding_windows: tuple[int | None, ...] = ()

    @classmethod
    def from_hf(cls, cfg: Mapping[str, Any]) -> LlamaConfig:
        """Read a Hugging Face ``config.json`` dict of model_type ``llama``, ``qwen2`` or ``mistral``.

        Raises:
          ConfigError: unknown model type, missing field, activation other than SiLU, unknown
            rotary type, inconsistent head counts.
        """
        model_type = cfg.get("model_type")
        if model_type not in MODEL_TYPES:
            raise ConfigError(f"LlamaConfig reads model_type {list(MODEL_TYPES)}, got {model_type!r}")
        hidden = int(_require(cfg, "hidden_size"))
        layers = int(_require(cfg, "num_hidden_layers"))
        heads = int(_require(cfg, "num_attention_heads"))
        kv_heads = cfg.get("num_key_value_heads")
        kv_heads = heads if kv_heads is None else int(kv_heads)
        if heads % kv_heads != 0:
            raise ConfigError(f"num_attention_heads={heads} is not a multiple of num_key_value_heads={kv_heads}")
        head_dim = cfg.get("head_dim")
        if head_dim is None:
            if hidden % heads != 0:
                raise ConfigError(f"hidden_size={hidden} is not divisible by num_attention_heads={heads}")
            head_dim = hidden // heads
        head_dim = int(head_dim)
        if head_dim % 2 != 0:
            raise ConfigError(f"rotary embeddings need an even head_dim, got {head_dim}")
        act = cfg.get("hidden_act", "silu")
        if act not in ("silu", "swish"):
            raise ConfigError(f"unsupported hidden_act {act!r}; the Llama family uses 'silu'")
        if model_type == "qwen2":
            qkv_bias, o_bias, mlp_bias = True, False, False
        elif model_type == "mistral":
            qkv_bias, o_bias, mlp_bias = False, False, False
        else:
            qkv_bias = o_bias = bool(cfg.get("attention_bias", False))
            mlp_bias = bool(cfg.get("mlp_bias", False))
        pad = cfg.get("pad_token_id")
        max_pos = cfg.get("max_position_embeddings")
        return cls(
            model_type=model_type,
            vocab_size=int(_require(cfg, "vocab_size")),
            hidden_size=hidden,
            num_layers=layers,
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            max_positions=None if max_pos is None else int(max_pos),
            is_decoder=True,
            pad_token_id=None if pad is None else int(pad),
            intermediate_size=int(_require(cfg, "intermediate_size")),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            qkv_bias=qkv_bias,
            o_bias=o_bias,
            mlp_bias=mlp_bias,
            sliding_windows=_sliding_windows(cfg, model_type, layers),
            **_rope_settings(cfg),
        )


def rope_inv_freq(config: LlamaConfig) -> np.ndarray:
    """Inverse rotary frequencies ``[head_dim // 2]`` (float32), with the configured scaling."""
    dim = config.head_dim
    exponents = np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)
    inv_freq = (np.float32(1.0) / (np.float32(config.rope_theta) ** exponents)).astype(np.float32)
    if config.rope_type == "linear":
        inv_freq = inv_freq / np.float32(config.rope_factor)
    elif config.rope_type == "llama3":
        factor = config.rope_factor
        low, high = config.rope_low_freq_factor, config.rope_high_freq_factor
        old_len = config.rope_original_max_positions
        low_wavelen = old_len / low
        high_wavelen = old_len / high
        inv = inv_freq.astype(np.float64)
        wavelen = 2 * math.pi / inv
        # Long wavelengths (low frequencies) are divided by the factor, short ones kept, and the
        # band in between interpolated smoothly (Llama 3.1's long-context recipe).
        scaled = np.where(wavelen > low_wavelen, inv / factor, inv)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        inv_freq = np.where(medium, smoothed, scaled).astype(np.float32)
    return inv_freq


def rotary_tables(config: LlamaConfig, start: int, length: int) -> tuple[jax.Array, jax.Array]:
    """``cos, sin`` tables ``[length, head_dim]`` (float32) for positions ``start + arange(length)``."""
    return rotary_tables_at(config, jnp.arange(start, start + length, dtype=jnp.float32))


def rotary_tables_at(config: LlamaConfig, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``cos, sin`` tables ``[len(positions), head_dim]`` (float32) for any (possibly traced) positions."""
    inv_freq = jnp.asarray(rope_inv_freq(config))
    positions = jnp.asarray(positions).astype(jnp.float32)
    freqs = positions[:, None] * inv_freq[None, :]
    angles = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def apply_rotary(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate ``x`` ``[B, S, H, hd]`` in the rotate-half convention; computed in float32."""
    xf = x.astype(jnp.float32)
    half = xf.shape[-1] // 2
    rotated = jnp.concatenate([-xf[..., half:], xf[..., :half]], axis=-1)
    out = xf * cos[None, :, None, :] + rotated * sin[None, :, None, :]
    return out.astype(x.dtype)


def _linears(config: LlamaConfig) -> dict[str, tuple[tuple[int, int], bool]]:
    """Each layer's projections: name -> (shape ``[in, out]`` as stored here, has a bias)."""
    d, f = config.hidden_size, config.intermediate_size
    h, kv, hd = config.num_heads, config.num_kv_heads, config.head_dim
    return {
        "self_attn.q_proj": ((d, h * hd), config.qkv_bias),
        "self_attn.k_proj": ((d, kv * hd), config.qkv_bias),
        "self_attn.v_proj": ((d, kv * hd), config.qkv_bias),
        "self_attn.o_proj": ((h * hd, d), config.o_bias),
        "mlp.gate_proj": ((d, f), config.mlp_bias),
        "mlp.up_proj": ((d, f), config.mlp_bias),
        "mlp.down_proj": ((f, d), config.mlp_bias),
    }


def checkpoint_shapes(config: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """The tensors of a Hugging Face checkpoint of ``config``: name -> shape as stored there.

    ``Linear`` weights are PyTorch's ``[out, in]``; names carry the ``model.`` prefix of a
    ``*ForCausalLM`` checkpoint. :func:`fedprompt.backbones.abstract.abstract_backbone` builds
    an abstract model from these shapes, and :meth:`Llama.from_hf` checks them.
    """
    d, v = config.hidden_size, config.vocab_size
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (v, d), "model.norm.weight": (d,)}
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (v, d)
    for layer in range(config.num_layers):
        base = f"model.layers.{layer}."
        shapes[base + "input_layernorm.weight"] = (d,)
        shapes[base + "post_attention_layernorm.weight"] = (d,)
        for name, ((fan_in, fan_out), bias) in _linears(config).items():
            shapes[base + name + ".weight"] = (fan_out, fan_in)
            if bias:
                shapes[base + name + ".bias"] = (fan_out,)
    return shapes


class LlamaBlock(nnx.Module):
    """One decoder layer: ``x + attn(norm(x))`` then ``x + swiglu(norm(x))``."""

    def __init__(self, config: LlamaConfig, layer: int, weights: dict[str, FrozenWeight | None]):
        self.config = config
        self.layer = layer
        self.sliding_window = config.sliding_windows[layer] if config.sliding_windows else None
        self.input_norm = weights["input_layernorm.weight"]
        self.post_norm = weights["post_attention_layernorm.weight"]
        self.q_w = weights["self_attn.q_proj.weight"]
        self.k_w = weights["self_attn.k_proj.weight"]
        self.v_w = weights["self_attn.v_proj.weight"]
        self.o_w = weights["self_attn.o_proj.weight"]
        self.q_b = weights.get("self_attn.q_proj.bias")
        self.k_b = weights.get("self_attn.k_proj.bias")
        self.v_b = weights.get("self_attn.v_proj.bias")
        self.o_b = weights.get("self_attn.o_proj.bias")
        self.gate_w = weights["mlp.gate_proj.weight"]
        self.up_w = weights["mlp.up_proj.weight"]
        self.down_w = weights["mlp.down_proj.weight"]
        self.gate_b = weights.get("mlp.gate_proj.bias")
        self.up_b = weights.get("mlp.up_proj.bias")
        self.down_b = weights.get("mlp.down_proj.bias")

    def __call__(
        self,
        x: jax.Array,
        key_mask: jax.Array,
        cos: jax.Array,
        sin: jax.Array,
        prefix: tuple[jax.Array, jax.Array] | None,
    ) -> jax.Array:
        q, k, v = self._qkv(x, cos, sin)
        a = attention(q, k, v, key_mask, causal=True, prefix=prefix, sliding_window=self.sliding_window)
        return self._finish(x, a)

    def step(
        self,
        x: jax.Array,
        cos: jax.Array,
        sin: jax.Array,
        cache_k: jax.Array,
        cache_v: jax.Array,
        key_valid: jax.Array,
        start: jax.Array,
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Incremental decoding: ``x`` ``[B, T, D]`` at positions ``start..start+T-1`` (``cos``/``sin`` for them).

        Writes the new (rotated) keys and values into ``cache_k``/``cache_v`` ``[B, S, H_kv, hd]``
        and attends over the cache with this layer's sliding window. Returns ``(x, cache_k, cache_v)``.
        """
        q, k, v = self._qkv(x, cos, sin)
        cache_k = write_cache(cache_k, k, start)
        cache_v = write_cache(cache_v, v, start)
        positions = jnp.asarray(start, jnp.int32) + jnp.arange(x.shape[1], dtype=jnp.int32)
        a = cached_attention(q, cache_k, cache_v, key_valid, positions, sliding_window=self.sliding_window)
        return self._finish(x, a), cache_k, cache_v

    def _qkv(self, x: jax.Array, cos: jax.Array, sin: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Rotated queries ``[B, S, H, hd]``, rotated keys and values ``[B, S, H_kv, hd]``."""
        cfg = self.config
        b, s, _ = x.shape
        h, kv, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        y = rms_norm(x, self.input_norm, cfg.rms_norm_eps)
        q = linear(y, self.q_w, self.q_b).reshape(b, s, h, hd)
        k = linear(y, self.k_w, self.k_b).reshape(b, s, kv, hd)
        v = linear(y, self.v_w, self.v_b).reshape(b, s, kv, hd)
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v

    def _finish(self, x: jax.Array, a: jax.Array) -> jax.Array:
        """The output projection and the SwiGLU MLP, each with its residual."""
        cfg = self.config
        b, s, _ = x.shape
        x = x + linear(a.reshape(b, s, cfg.num_heads * cfg.head_dim), self.o_w, self.o_b)
        y = rms_norm(x, self.post_norm, cfg.rms_norm_eps)
        gated = jax.nn.silu(linear(y, self.gate_w, self.gate_b)) * linear(y, self.up_w, self.up_b)
        return x + linear(gated, self.down_w, self.down_b)


class Llama(nnx.Module):
    """Frozen Llama/Qwen2/Mistral body plus LM head (see :class:`~fedprompt.backbones.base.BackboneModule`)."""

    def __init__(
        self,
        config: LlamaConfig,
        embed: FrozenWeight,
        norm: FrozenWeight,
        head: FrozenWeight | None,
        blocks: list[LlamaBlock],
    ):
        self.config = config
        self.embed = embed
        self.norm = norm
        self.head = head  # [D, vocab]; None when tied to ``embed``
        self.blocks = nnx.List(blocks)

    @classmethod
    def from_hf(
        cls,
        config: LlamaConfig,
        tensors: Mapping[str, np.ndarray],
        dtype: Any = jnp.float32,
    ) -> Llama:
        """Build the model from a Hugging Face ``state_dict``.

        Args:
          config: the architecture (from :meth:`LlamaConfig.from_hf`).
          tensors: tensor name -> array; body names with or without the leading ``"model."``.
            PyTorch ``Linear`` weights (``[out, in]``) are transposed to ``[in, out]``.
          dtype: storage dtype of the weights.

        Raises:
          CheckpointError: a tensor is missing or misshapen (including ``lm_head.weight`` when
            the embeddings are not tied).
        """
        outer = "model." if any(k.startswith("model.") for k in tensors) else ""
        d, v = config.hidden_size, config.vocab_size

        def get(name: str, shape: tuple[int, ...], transpose: bool = False) -> FrozenWeight:
            return take(tensors, outer + name, shape, transpose=transpose, dtype=dtype)

        embed = get("embed_tokens.weight", (v, d))
        norm = get("norm.weight", (d,))
        head = None
        if not config.tie_word_embeddings:  # the LM head is outside the ``model.`` body
            head = take(tensors, "lm_head.weight", (d, v), transpose=True, dtype=dtype)
        linears = _linears(config)
        blocks = []
        for layer in range(config.num_layers):
            base = f"layers.{layer}."
            weights: dict[str, FrozenWeight | None] = {
                "input_layernorm.weight": get(base + "input_layernorm.weight", (d,)),
                "post_attention_layernorm.weight": get(base + "post_attention_layernorm.weight", (d,)),
            }
            for name, (shape, bias) in linears.items():
                weights[name + ".weight"] = get(base + name + ".weight", shape, transpose=True)
                if bias:
                    weights[name + ".bias"] = get(base + name + ".bias", (shape[1],))
            blocks.append(LlamaBlock(config, layer, weights))
        return cls(config, embed, norm, head, blocks)

    def embed_tokens(self, input_ids: jax.Array) -> jax.Array:
        """Word embeddings ``[B, T, D]`` of ``input_ids`` ``[B, T]``."""
        return jnp.take(value(self.embed), jnp.asarray(input_ids), axis=0)

    def __call__(
        self,
        inputs_embeds: jax.Array,
        attention_mask: jax.Array,
        *,
        prefix: tuple[jax.Array, jax.Array] | None = None,
        token_type_ids: jax.Array | None = None,
        remat: bool = False,
    ) -> jax.Array:
        """Run the decoder on word-space embeddings.

        Args:
          inputs_embeds: ``[B, S, D]`` (soft prompt included); sets the compute dtype.
          attention_mask: ``[B, S]``, nonzero where a real token is.
          prefix: optional per-layer ``(keys, values)``, each ``[L, B, P, H_kv, head_dim]``,
            used as a pre-filled cache (not rotated).
          token_type_ids: ignored (the Llama family has no token types).
          remat: recompute each decoder layer's activations in the backward pass instead of
            keeping them (see :func:`~fedprompt.backbones.base.run_block`).

        Returns:
          ``[B, S, D]`` hidden states after the final RMSNorm, in ``inputs_embeds``' dtype.
        """
        del token_type_ids
        cfg = self.config
        s = inputs_embeds.shape[1]
        cos, sin = rotary_tables(cfg, prefix_length(prefix), s)
        key_mask = jnp.asarray(attention_mask).astype(bool)
        x = inputs_embeds
        for layer, block in enumerate(self.blocks):
            x = run_block(block, x, key_mask, cos, sin, split_prefix(prefix, layer), remat=remat)
        return rms_norm(x, self.norm, cfg.rms_norm_eps)

    def forward_cached(
        self, inputs_embeds: jax.Array, cache: KVCache, start: jax.Array | int
    ) -> tuple[jax.Array, KVCache]:
        """Run new tokens through the decoder against a key/value cache (incremental decoding).

        Args:
          inputs_embeds: ``[B, T, D]`` word embeddings of the new tokens (soft-prompt vectors
            included when prefilling), at absolute positions ``start..start+T-1``.
          cache: the :class:`~fedprompt.backbones.base.KVCache`; ``cache.valid`` must already
            mark the new tokens' slots. A deep prefix sits, unrotated, in slots ``0..P-1``.
          start: the first new token's position (may be traced).

        Returns:
          ``(hidden [B, T, D] after the final RMSNorm, updated cache)``. Equal to
          :meth:`__call__` on the whole sequence, restricted to the new tokens.
        """
        t = inputs_embeds.shape[1]
        positions = jnp.asarray(start, jnp.int32) + jnp.arange(t, dtype=jnp.int32)
        cos, sin = rotary_tables_at(self.config, positions)
        x = inputs_embeds
        keys, values = [], []
        for layer, block in enumerate(self.blocks):
            x, k, v = block.step(x, cos, sin, cache.keys[layer], cache.values[layer], cache.valid, start)
            keys.append(k)
            values.append(v)
        hidden = rms_norm(x, self.norm, self.config.rms_norm_eps)
        return hidden, KVCache(jnp.stack(keys), jnp.stack(values), cache.valid)

    def lm_head(self, hidden: jax.Array) -> jax.Array:
        """Logits ``[B, S, vocab]`` in ``hidden``'s dtype (tied to the embeddings when configured)."""
        if self.head is None:
            return hidden @ value(self.embed, hidden.dtype).T
        return linear(hidden, self.head)
