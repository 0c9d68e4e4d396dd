"""BERT-family encoders (BERT, RoBERTa, MiniLM) as frozen Flax NNX backbones.

BERT (Devlin et al., 2019, "BERT: Pre-training of Deep Bidirectional Transformers for Language
Understanding") is a bidirectional post-LayerNorm transformer encoder: word + learned absolute
position + token-type embeddings, an embedding LayerNorm, then blocks of
``x = LN(x + attn(x)); x = LN(x + mlp(x))`` with a GELU MLP. RoBERTa (Liu et al., 2019,
"RoBERTa: A Robustly Optimized BERT Pretraining Approach") has the same body; its position
table is offset by ``pad_token_id + 1`` (the first rows are reserved for padding), so the
first real token uses row ``pad_token_id + 1``. Sentence-embedding models such as
all-MiniLM-L6-v2 are plain BERT checkpoints.

Weights are read from a Hugging Face ``BertModel``/``RobertaModel`` ``state_dict``, with or
without the ``bert.``/``roberta.``/``model.`` name prefix that task-head checkpoints
(``*ForSequenceClassification``...) carry. The pooler, task heads and buffers such as
``embeddings.position_ids`` are ignored.

Prompts (see :mod:`fedprompt.backbones.base`):

* soft prompts are prepended to the word embeddings by the caller; the whole sequence then
  gets position embeddings ``offset + arange(S)`` like any input (PEFT prompt tuning);
* a deep prefix of length ``P`` is prepended to every layer's keys/values and is seen by every
  query; the real tokens then sit at positions ``offset + P + arange(S)``, which is what a
  Hugging Face BERT does when it is called with a pre-filled cache of length ``P``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fedprompt.backbones.base import (
    ArchConfig,
    FrozenWeight,
    attention,
    gelu,
    layer_norm,
    linear,
    linear_rows,
    prefix_length,
    run_block,
    split_prefix,
    take,
    value,
)
from fedprompt.errors import ConfigError, SequenceTooLongError, UnsupportedArchitectureError

#: Hugging Face activation names meaning the exact (erf) GELU.
_EXACT_GELU = frozenset({"gelu"})
#: Hugging Face activation names meaning GELU with the tanh approximation.
_TANH_GELU = frozenset({"gelu_new", "gelu_pytorch_tanh"})
#: Name prefixes under which a BERT body may sit in a checkpoint (tried in this order).
_NAME_PREFIXES = ("", "bert.", "roberta.", "model.")
#: Hugging Face defaults for a missing ``pad_token_id``.
_DEFAULT_PAD = {"bert": 0, "roberta": 1}


def _required(cfg: Mapping[str, Any], key: str) -> Any:
    """``cfg[key]``, or a ConfigError naming the missing key."""
    if cfg.get(key) is None:
        raise ConfigError(f"BERT config is missing {key!r}")
    return cfg[key]


def _gelu_is_approximate(act: Any) -> bool:
    """Map a Hugging Face ``hidden_act`` to ``approximate`` of :func:`jax.nn.gelu`.

    Raises:
      ConfigError: the activation is not a GELU variant fedprompt implements.
    """
    if act in _EXACT_GELU:
        return False
    if act in _TANH_GELU:
        return True
    raise ConfigError(
        f"unsupported BERT hidden_act {act!r}; expected one of {sorted(_EXACT_GELU | _TANH_GELU)}"
    )


@dataclasses.dataclass(frozen=True)
class BertConfig(ArchConfig):
    """BERT/RoBERTa architecture hyper-parameters.

    Attributes:
      intermediate_size: width of the MLP.
      hidden_act: the Hugging Face activation name (a GELU variant).
      gelu_approximate: True for the tanh approximation, False for the exact erf GELU.
      layer_norm_eps: epsilon of every LayerNorm.
      type_vocab_size: number of token-type (segment) embeddings.
      max_position_embeddings: rows of the position table (including RoBERTa's reserved rows).
      position_offset: row of the position table used by the first token (RoBERTa:
        ``pad_token_id + 1``; BERT: 0). ``max_positions`` is the table size minus this offset.
    """

    intermediate_size: int = 0
    hidden_act: str = "gelu"
    gelu_approximate: bool = False
    layer_norm_eps: float = 1e-12
    type_vocab_size: int = 2
    max_position_embeddings: int = 512
    position_offset: int = 0

    @classmethod
    def from_hf(cls, cfg: Mapping[str, Any]) -> BertConfig:
        """Read a Hugging Face BERT or RoBERTa ``config.json`` dict.

        Raises:
          UnsupportedArchitectureError: ``model_type`` is neither ``"bert"`` nor ``"roberta"``.
          ConfigError: a required field is missing or a value is unsupported (activation,
            non-absolute position embeddings, decoder/cross-attention configs, sizes).
        """
        model_type = cfg.get("model_type", "bert")
        if model_type not in _DEFAULT_PAD:
            raise UnsupportedArchitectureError(f"BertConfig cannot read a config of model_type {model_type!r}")
        hidden = int(_required(cfg, "hidden_size"))
        heads = int(_required(cfg, "num_attention_heads"))
        if heads <= 0 or hidden % heads != 0:
            raise ConfigError(f"hidden_size={hidden} is not divisible by num_attention_heads={heads}")
        act = cfg.get("hidden_act", "gelu")
        approximate = _gelu_is_approximate(act)
        kind = cfg.get("position_embedding_type", "absolute")
        if kind != "absolute":
            raise ConfigError(f"unsupported position_embedding_type {kind!r}; only 'absolute' is implemented")
        if cfg.get("is_decoder", False) or cfg.get("add_cross_attention", False):
            raise ConfigError("BERT decoder/cross-attention configs are not supported; BERT is used as an encoder")
        pad = cfg.get("pad_token_id", _DEFAULT_PAD[model_type])
        offset = 0
        if model_type == "roberta":
            if pad is None:
                raise ConfigError("a RoBERTa config needs pad_token_id (its position table is offset by it)")
            offset = int(pad) + 1
        table = int(_required(cfg, "max_position_embeddings"))
        if table <= offset:
            raise ConfigError(f"max_position_embeddings={table} leaves no usable position after offset {offset}")
        return cls(
            model_type=model_type,
            vocab_size=int(_required(cfg, "vocab_size")),
            hidden_size=hidden,
            num_layers=int(_required(cfg, "num_hidden_layers")),
            num_heads=heads,
            num_kv_heads=heads,
            head_dim=hidden // heads,
            max_positions=table - offset,
            is_decoder=False,
            pad_token_id=None if pad is None else int(pad),
            intermediate_size=int(_required(cfg, "intermediate_size")),
            hidden_act=str(act),
            gelu_approximate=approximate,
            layer_norm_eps=float(cfg.get("layer_norm_eps", 1e-12)),
            type_vocab_size=int(cfg.get("type_vocab_size", 2)),
            max_position_embeddings=table,
            position_offset=offset,
        )


def _find_name_prefix(tensors: Mapping[str, np.ndarray]) -> str:
    """The name prefix under which the encoder's tensors are stored ("" when none matches)."""
    for prefix in _NAME_PREFIXES:
        if f"{prefix}embeddings.word_embeddings.weight" in tensors:
            return prefix
    return ""


class BertLayer(nnx.Module):
    """One post-LayerNorm encoder block: ``x = LN(x + attn(x)); x = LN(x + mlp(x))``."""

    def __init__(self, config: BertConfig, tensors: Mapping[str, np.ndarray], name: str, dtype: Any):
        """Load block weights named ``{name}attention.self.query.weight`` and so on."""
        self.config = config
        d, f = config.hidden_size, config.intermediate_size

        def w(suffix: str, shape: tuple[int, ...], transpose: bool = False) -> FrozenWeight:
            return take(tensors, name + suffix, shape, transpose=transpose, dtype=dtype)

        # The query, key and value projections as one [D, 3D] matrix (and [3D] bias): one
        # matrix product instead of three narrow ones, which a CPU runs below its matmul rate.
        parts = ("query", "key", "value")
        weights = [value(w(f"attention.self.{n}.weight", (d, d), True)) for n in parts]
        self.qkv_w = FrozenWeight(jnp.concatenate(weights, axis=1))
        self.qkv_b = FrozenWeight(jnp.concatenate([value(w(f"attention.self.{n}.bias", (d,))) for n in parts]))
        self.attn_out_w = w("attention.output.dense.weight", (d, d), True)
        self.attn_out_b = w("attention.output.dense.bias", (d,))
        self.attn_ln_scale = w("attention.output.LayerNorm.weight", (d,))
        self.attn_ln_bias = w("attention.output.LayerNorm.bias", (d,))
        self.mlp_in_w = w("intermediate.dense.weight", (d, f), True)
        self.mlp_in_b = w("intermediate.dense.bias", (f,))
        self.mlp_out_w = w("output.dense.weight", (f, d), True)
        self.mlp_out_b = w("output.dense.bias", (d,))
        self.mlp_ln_scale = w("output.LayerNorm.weight", (d,))
        self.mlp_ln_bias = w("output.LayerNorm.bias", (d,))

    def __call__(
        self,
        x: jax.Array,
        key_mask: jax.Array,
        prefix: tuple[jax.Array, jax.Array] | None,
        *,
        grad_rows: int | None = None,
        output_from: int = 0,
    ) -> jax.Array:
        """Apply the block.

        Args:
          x: ``[B, S, D]`` hidden states.
          key_mask: ``[B, S]`` boolean, True on real tokens.
          prefix: this layer's ``(keys, values)``, each ``[B, P, H, head_dim]``, or None.
          grad_rows: compute the gradient w.r.t. ``x`` for its first ``grad_rows`` rows only
            (the others are treated as constants: zero gradient). None: all rows.
          output_from: return rows ``output_from:`` only (``[B, S - output_from, D]``); the
            rows before it are still seen as keys and values.
        """
        cfg = self.config
        b, s, d = x.shape
        heads = (b, s, cfg.num_heads, cfg.head_dim)
        # One [D, 3D] product for all rows (even the queries output_from drops: narrower products
        # run below the matmul rate), split (not sliced three times: the gradient of a split is
        # one concatenation, not three padded sums).
        if grad_rows is None or output_from:
            qkv = linear(x, self.qkv_w, self.qkv_b)
        else:
            qkv = linear_rows(x, self.qkv_w, self.qkv_b, grad_rows)
        q, k, v = (part.reshape(heads) for part in jnp.split(qkv, 3, axis=-1))
        if output_from:
            # The dropped rows are keys and values only, seen by every query like a prefix.
            seen = (k[:, :output_from], v[:, :output_from])
            if prefix is not None:
                seen = tuple(jnp.concatenate([pre, new], axis=1) for pre, new in zip(prefix, seen))
            a = attention(q[:, output_from:], k[:, output_from:], v[:, output_from:], key_mask[:, output_from:],
                          causal=False, prefix=seen)
            return self._finish(a.reshape(b, s - output_from, d), x[:, output_from:])
        a = attention(q, k, v, key_mask, causal=False, prefix=prefix, grad_rows=grad_rows).reshape(b, s, d)
        return self._finish(a, x)

    def _finish(self, a: jax.Array, x: jax.Array) -> jax.Array:
        """The rest of the block after attention: output projection, residual, norm and MLP."""
        cfg = self.config
        a = linear(a, self.attn_out_w, self.attn_out_b)
        x = layer_norm(a + x, self.attn_ln_scale, self.attn_ln_bias, cfg.layer_norm_eps)
        h = linear(x, self.mlp_in_w, self.mlp_in_b)
        h = gelu(h, cfg.gelu_approximate)
        h = linear(h, self.mlp_out_w, self.mlp_out_b)
        return layer_norm(h + x, self.mlp_ln_scale, self.mlp_ln_bias, cfg.layer_norm_eps)


class Bert(nnx.Module):
    """Frozen BERT/RoBERTa encoder (see :class:`~fedprompt.backbones.base.BackboneModule`)."""

    #: takes ``grad_rows`` and ``output_from`` (see :meth:`__call__`).
    row_options = True

    def __init__(self, config: BertConfig, tensors: Mapping[str, np.ndarray], *, dtype: Any = jnp.float32):
        """Load every weight from a ``state_dict``; prefer :meth:`from_hf`."""
        self.config = config
        d = config.hidden_size
        base = _find_name_prefix(tensors)
        emb = base + "embeddings."
        self.word_embeddings = take(tensors, emb + "word_embeddings.weight", (config.vocab_size, d), dtype=dtype)
        self.position_embeddings = take(
            tensors, emb + "position_embeddings.weight", (config.max_position_embeddings, d), dtype=dtype
        )
        self.token_type_embeddings = take(
            tensors, emb + "token_type_embeddings.weight", (config.type_vocab_size, d), dtype=dtype
        )
        self.emb_ln_scale = take(tensors, emb + "LayerNorm.weight", (d,), dtype=dtype)
        self.emb_ln_bias = take(tensors, emb + "LayerNorm.bias", (d,), dtype=dtype)
        self.layers = nnx.List(
            [BertLayer(config, tensors, f"{base}encoder.layer.{i}.", dtype) for i in range(config.num_layers)]
        )

    @classmethod
    def from_hf(cls, config: BertConfig, tensors: Mapping[str, np.ndarray], dtype: Any = jnp.float32) -> Bert:
        """Build the encoder from a Hugging Face BERT/RoBERTa ``state_dict``.

        Args:
          config: the architecture (from :meth:`BertConfig.from_hf`).
          tensors: tensor name -> array, optionally under a ``bert.``/``roberta.``/``model.`` prefix.
          dtype: storage dtype of the weights.

        Raises:
          CheckpointError: a tensor is missing or misshapen (the message names it).
        """
        return cls(config, tensors, dtype=dtype)

    def embed_tokens(self, input_ids: jax.Array) -> jax.Array:
        """Word embeddings alone, ``[B, T] -> [B, T, D]`` in the weights' dtype."""
        return jnp.take(value(self.word_embeddings), input_ids, axis=0)

    def __call__(
        self,
        inputs_embeds: jax.Array,
        attention_mask: jax.Array,
        *,
        prefix: tuple[jax.Array, jax.Array] | None = None,
        token_type_ids: jax.Array | None = None,
        remat: bool = False,
        grad_rows: int | None = None,
        output_from: int = 0,
    ) -> jax.Array:
        """Encode word-space embeddings.

        Args:
          inputs_embeds: ``[B, S, D]`` word embeddings (soft prompts already prepended); the
            computation runs in their dtype (norms and softmax in float32).
          attention_mask: ``[B, S]``, nonzero on real tokens.
          prefix: optional deep prefix ``(keys, values)``, each ``[L, B, P, H, head_dim]``.
          token_type_ids: optional ``[B, S]`` segment ids (zeros when omitted).
          remat: recompute each layer's activations in the backward pass instead of
            keeping them (see :func:`~fedprompt.backbones.base.run_block`).
          grad_rows: only the first ``grad_rows`` rows of ``inputs_embeds`` can have a gradient
            (a soft prompt's; the others are the frozen word embeddings): the first layer then
            computes its input gradient for those rows only. Other rows get a zero gradient.
          output_from: return the final hidden states of rows ``output_from:`` only; the last
            layer computes its queries, MLP and norms for those rows (the rows before still
            serve as its keys and values, and must be real tokens, as a soft prompt's are).

        Returns:
          ``[B, S - output_from, D]`` final hidden states in ``inputs_embeds``' dtype.

        Raises:
          SequenceTooLongError: ``P + S`` exceeds ``config.max_positions``.
          ConfigError: ``grad_rows`` or ``output_from`` is outside ``[0, S)``.
        """
        cfg = self.config
        dtype = inputs_embeds.dtype
        _, s, _ = inputs_embeds.shape
        if not 0 <= output_from < s or (grad_rows is not None and not 0 < grad_rows <= s):
            raise ConfigError(f"grad_rows={grad_rows} and output_from={output_from} must lie within the {s} rows")
        p = prefix_length(prefix)
        if p + s > cfg.max_positions:
            raise SequenceTooLongError(
                f"{s} tokens after a prefix of {p} exceed the {cfg.max_positions} positions of this model"
            )
        x = inputs_embeds + self._token_type_embeddings(token_type_ids, inputs_embeds.shape[:2], dtype)
        x = x + self._position_embeddings(p, s, dtype)[None]
        x = layer_norm(x, self.emb_ln_scale, self.emb_ln_bias, cfg.layer_norm_eps)
        key_mask = attention_mask.astype(bool)
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            rows = {}
            if i == last and output_from:
                rows["output_from"] = output_from
            elif i == 0 and grad_rows is not None:
                rows["grad_rows"] = grad_rows
            x = run_block(layer, x, key_mask, split_prefix(prefix, i), remat=remat, **rows)
        return x

    def _position_embeddings(self, prefix_len: int, seq_len: int, dtype: Any) -> jax.Array:
        """``[S, D]`` rows ``offset + P + arange(S)`` of the position table."""
        start = self.config.position_offset + prefix_len
        return jax.lax.dynamic_slice_in_dim(value(self.position_embeddings, dtype), start, seq_len, axis=0)

    def _token_type_embeddings(
        self, token_type_ids: jax.Array | None, shape: tuple[int, int], dtype: Any
    ) -> jax.Array:
        """``[B, S, D]`` token-type embeddings (type 0 everywhere when ids are not given)."""
        table = value(self.token_type_embeddings, dtype)
        if token_type_ids is None:
            return jnp.broadcast_to(table[0], (*shape, table.shape[-1]))
        return jnp.take(table, token_type_ids, axis=0)
