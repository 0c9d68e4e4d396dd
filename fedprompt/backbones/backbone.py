"""The frozen backbone: one module split once into a graph definition and frozen weights.

``Backbone.apply(weights, ...)`` is a pure function (jit it, vmap it, pass ``weights`` as an
argument so they are never baked into a compiled program as constants).
``Backbone.forward(...)`` is the convenient, jit-compiled call with the backbone's own weights.

Rematerialisation: with ``remat`` on, every transformer block is rematerialised
(:func:`~fedprompt.backbones.base.run_block`), so a gradient w.r.t. the prompt keeps one
``[B, S, D]`` tensor per block (its input) instead of every block's activations, and
recomputes each block once during the backward pass. ``remat=None`` (the
default) turns it on for decoders of at least :data:`REMAT_MIN_PARAMETERS` parameters, where
activations rival the weights, and leaves it off for smaller models, where the recomputation
would cost time and save little.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fedprompt.backbones.base import ArchConfig, FrozenWeight
from fedprompt.errors import ConfigError, EmptyBatchError, InputError, PromptMismatchError, SequenceTooLongError
from fedprompt.backbones.prompt_inputs import Prefix, SoftPrompt


class BackboneOutput(NamedTuple):
    """What a backbone forward returns.

    Attributes:
      hidden: final hidden states ``[B, P_soft + T, D]`` (virtual tokens of a soft prompt
        come first; a deep prefix adds no positions).
      logits: ``[B, P_soft + T, vocab]`` for decoders when requested, else None.
      attention_mask: the mask over ``hidden``'s positions (virtual tokens are 1).
      num_virtual: how many leading positions of ``hidden`` are soft-prompt tokens.
    """

    hidden: jax.Array
    logits: jax.Array | None
    attention_mask: jax.Array
    num_virtual: int


Prompt = SoftPrompt | Prefix | None

#: ``remat=None`` rematerialises the blocks of decoders with at least this many parameters.
REMAT_MIN_PARAMETERS = 1_000_000_000


@dataclasses.dataclass(eq=False)
class Backbone:
    """A frozen, fingerprinted backbone with its tokenizer.

    Attributes:
      config: the architecture (:class:`~fedprompt.backbones.base.ArchConfig` subclass).
      name: short name (folder name, built-in name or hub id).
      fingerprint: stable hash of config and weights; a prompt is bound to it.
      tokenizer: a transformers tokenizer, or None.
      compute_dtype: dtype of activations.
      remat: rematerialise the blocks in the backward pass: True, False, or None for the
        default (on for decoders of at least :data:`REMAT_MIN_PARAMETERS` parameters).
      graphdef, weights: the module split into static structure and frozen weights. The
        weights of an abstract backbone (:mod:`fedprompt.backbones.abstract`) are
        ``jax.ShapeDtypeStruct`` leaves: it can be lowered and compiled, not run.
    """

    module: dataclasses.InitVar[nnx.Module]
    config: ArchConfig
    name: str
    fingerprint: str
    tokenizer: Any = None
    compute_dtype: Any = jnp.float32
    path: Path | None = None
    remat: bool | None = None
    graphdef: Any = dataclasses.field(init=False)
    weights: Any = dataclasses.field(init=False)

    def __post_init__(self, module: nnx.Module) -> None:
        _check_remat(self.remat)
        self.graphdef, self.weights = nnx.split(module, FrozenWeight)
        self._jit_apply = jax.jit(self.apply, static_argnames=("with_logits", "remat"))

    @property
    def is_decoder(self) -> bool:
        return bool(self.config.is_decoder)

    @property
    def width(self) -> int:
        return int(self.config.hidden_size)

    def weight_bytes(self) -> int:
        """Bytes held by the frozen weights."""
        return sum(int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(self.weights))

    def num_parameters(self) -> int:
        """How many numbers the frozen weights hold."""
        return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(self.weights))

    @property
    def is_abstract(self) -> bool:
        """Whether the weights are shapes only (``jax.ShapeDtypeStruct``): compile, do not run."""
        return any(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(self.weights))

    def resolve_remat(self, remat: bool | None = None) -> bool:
        """Whether the blocks are rematerialised: ``remat`` if given, else this backbone's
        ``remat``, else on for decoders of at least :data:`REMAT_MIN_PARAMETERS` parameters."""
        _check_remat(remat)
        choice = self.remat if remat is None else remat
        if choice is None:
            return self.is_decoder and self.num_parameters() >= REMAT_MIN_PARAMETERS
        return bool(choice)

    def _require_weights(self) -> None:
        if self.is_abstract:
            raise ConfigError(
                f"backbone {self.name!r} is abstract (shapes only, no weights): compile a step with "
                "jax.jit(...).lower(...).compile(), or load a checkpoint to run it"
            )

    def word_embeddings(self, token_ids: jax.Array) -> jax.Array:
        """Rows of the input word-embedding table (float32), e.g. for prompt initialization."""
        self._require_weights()
        module = nnx.merge(self.graphdef, self.weights)
        return module.embed_tokens(jnp.asarray(token_ids)).astype(jnp.float32)

    def check_prompt(self, prompt: Prompt) -> None:
        """Raise :class:`PromptMismatchError` if ``prompt`` does not fit this backbone."""
        if prompt is None:
            return
        cfg = self.config
        if isinstance(prompt, SoftPrompt):
            shape = tuple(prompt.embeddings.shape)
            if len(shape) not in (2, 3) or shape[-1] != cfg.hidden_size:
                raise PromptMismatchError(
                    f"soft prompt of shape {shape} does not fit backbone {self.name!r} of width {cfg.hidden_size}"
                )
        elif isinstance(prompt, Prefix):
            want = (cfg.num_layers, cfg.num_kv_heads, cfg.head_dim)
            for part in (prompt.keys, prompt.values):
                shape = tuple(part.shape)
                got = (shape[0], shape[-2], shape[-1]) if len(shape) in (4, 5) else None
                if got != want:
                    raise PromptMismatchError(
                        f"prefix of shape {shape} does not fit backbone {self.name!r}: expected "
                        f"[layers={want[0]}, (batch,) tokens, kv_heads={want[1]}, head_dim={want[2]}]"
                    )
        else:
            raise PromptMismatchError(f"prompt must be SoftPrompt, Prefix or None, got {type(prompt).__name__}")

    def check_inputs(self, input_ids, attention_mask, prompt: Prompt) -> None:
        """Validate shapes and lengths at the boundary; raises the library's errors."""
        shape = tuple(np.shape(input_ids))
        if len(shape) != 2:
            raise InputError(f"input_ids must be [batch, tokens], got shape {shape}")
        if shape[0] == 0 or shape[1] == 0:
            raise EmptyBatchError(f"empty batch: input_ids has shape {shape}")
        if attention_mask is not None and tuple(np.shape(attention_mask)) != shape:
            raise InputError(f"attention_mask shape {tuple(np.shape(attention_mask))} != input_ids shape {shape}")
        self.check_prompt(prompt)
        limit = self.config.max_positions
        extra = 0 if prompt is None else (
            prompt.embeddings.shape[-2] if isinstance(prompt, SoftPrompt) else prompt.keys.shape[-3]
        )
        if limit is not None and shape[1] + extra > limit:
            raise SequenceTooLongError(
                f"{shape[1]} tokens + {extra} virtual tokens = {shape[1] + extra} exceeds the maximum "
                f"{limit} positions of backbone {self.name!r}; truncate inputs to {limit - extra} tokens"
            )

    def apply(
        self,
        weights: Any,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        prompt: Prompt = None,
        token_type_ids: jax.Array | None = None,
        *,
        with_logits: bool = True,
        remat: bool | None = None,
        virtual_outputs: bool = True,
    ) -> BackboneOutput:
        """Pure forward pass with explicit ``weights`` (jit/vmap/grad friendly).

        Gradients never flow into ``weights`` (they pass through ``stop_gradient``). ``remat``
        overrides the backbone's rematerialisation setting (see :meth:`resolve_remat`); it
        changes the memory and compute of a gradient through this call, not its values.

        ``virtual_outputs=False``: the caller does not read the soft prompt's positions of the
        output, so they are left out: ``hidden`` (and ``logits``) cover the real tokens only,
        with ``num_virtual == 0`` and ``attention_mask`` the tokens' own. Encoders then skip the
        virtual tokens' rows in their last block (they stay keys and values there), which a
        loss over the real tokens (every task here) never needs. The real tokens' values are
        unchanged. With a soft prompt, encoders also compute the first block's input gradient
        for the virtual tokens only, the one part of the input that can have a gradient.
        """
        weights = jax.lax.stop_gradient(weights)
        module = nnx.merge(self.graphdef, weights)
        input_ids = jnp.asarray(input_ids)
        batch = input_ids.shape[0]
        mask = jnp.ones(input_ids.shape, jnp.int32) if attention_mask is None else jnp.asarray(attention_mask, jnp.int32)
        embeds = module.embed_tokens(input_ids).astype(self.compute_dtype)
        prefix = None
        num_virtual = 0
        if isinstance(prompt, SoftPrompt):
            virtual = jnp.asarray(prompt.embeddings).astype(self.compute_dtype)
            if virtual.ndim == 2:
                virtual = jnp.broadcast_to(virtual[None], (batch, *virtual.shape))
            num_virtual = virtual.shape[1]
            embeds = jnp.concatenate([virtual, embeds], axis=1)
            mask = jnp.concatenate([jnp.ones((batch, num_virtual), jnp.int32), mask], axis=1)
            if token_type_ids is not None:
                token_type_ids = jnp.concatenate(
                    [jnp.zeros((batch, num_virtual), jnp.asarray(token_type_ids).dtype), token_type_ids], axis=1
                )
        elif isinstance(prompt, Prefix):
            keys, values = (jnp.asarray(x).astype(self.compute_dtype) for x in (prompt.keys, prompt.values))
            if keys.ndim == 4:  # [L, P, H, hd] shared by the batch
                keys = jnp.broadcast_to(keys[:, None], (keys.shape[0], batch, *keys.shape[1:]))
                values = jnp.broadcast_to(values[:, None], (values.shape[0], batch, *values.shape[1:]))
            prefix = (keys, values)
        rows = {}
        if num_virtual and getattr(module, "row_options", False):
            rows["grad_rows"] = num_virtual
            if not virtual_outputs:
                rows["output_from"] = num_virtual
        hidden = module(embeds, mask, prefix=prefix, token_type_ids=token_type_ids, remat=self.resolve_remat(remat), **rows)
        if num_virtual and not virtual_outputs:
            if "output_from" not in rows:
                hidden = hidden[:, num_virtual:]
            mask, num_virtual = mask[:, num_virtual:], 0
        logits = module.lm_head(hidden) if (with_logits and self.is_decoder) else None
        return BackboneOutput(hidden=hidden, logits=logits, attention_mask=mask, num_virtual=num_virtual)

    def forward(
        self,
        input_ids,
        attention_mask=None,
        prompt: Prompt = None,
        token_type_ids=None,
        *,
        with_logits: bool = True,
    ) -> BackboneOutput:
        """Jit-compiled forward pass with this backbone's frozen weights.

        Args:
          input_ids: ``[batch, tokens]`` integer token ids.
          attention_mask: ``[batch, tokens]`` 1 for real tokens, 0 for padding (default all 1).
          prompt: a :class:`~fedprompt.backbones.prompt_inputs.SoftPrompt`, a :class:`~fedprompt.backbones.prompt_inputs.Prefix`
            or None.
          token_type_ids: optional segment ids (BERT family).
          with_logits: decoders only; skip the vocabulary projection when False.
        """
        self._require_weights()
        self.check_inputs(input_ids, attention_mask, prompt)
        return self._jit_apply(self.weights, input_ids, attention_mask, prompt, token_type_ids, with_logits=with_logits)

    def check_sequence(self, max_length: int, num_virtual: int = 0) -> None:
        """Raise SequenceTooLongError when ``max_length`` tokens and ``num_virtual`` virtual
        tokens exceed the backbone's positions."""
        if self.config.max_positions is not None and max_length + num_virtual > self.config.max_positions:
            raise SequenceTooLongError(
                f"max_length {max_length} + {num_virtual} virtual tokens exceeds {self.config.max_positions} positions"
            )

    def tokenize(self, texts: list[str], max_length: int, *, num_virtual: int = 0) -> dict[str, np.ndarray]:
        """Tokenize a list of texts to fixed-length NumPy arrays (right padding, truncation).

        ``max_length`` counts the real tokens; ``num_virtual`` virtual tokens must still fit in the
        backbone's maximum positions. Each text is first cut to
        :func:`fedprompt.wire.limits.max_text_chars` characters (``16 * max_length + 256``), far
        more than ``max_length`` tokens of normal text span, so a huge text costs no more than a
        long one and the tokens are those of the whole text.
        """
        from fedprompt.wire.limits import max_text_chars

        if self.tokenizer is None:
            raise InputError(f"backbone {self.name!r} has no tokenizer")
        self.check_sequence(max_length, num_virtual)
        tok = self.tokenizer
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        tok.padding_side = "right"
        limit = max_text_chars(max_length)
        texts = [text[:limit] if isinstance(text, str) else text for text in texts]
        enc = tok(texts, padding="max_length", truncation=True, max_length=max_length, return_tensors="np")
        out = {"input_ids": enc["input_ids"].astype(np.int32), "attention_mask": enc["attention_mask"].astype(np.int32)}
        return out



def _check_remat(remat: Any) -> None:
    if remat is not None and not isinstance(remat, bool):
        raise ConfigError(f"remat must be True, False or None, got {remat!r}")
