"""Task heads and losses on top of a frozen backbone.

A task is a small frozen dataclass with two pure functions:

* ``init_head(key, backbone) -> head params`` (a dict pytree, ``{}`` when nothing is trained),
* ``loss(head, output, batch) -> (loss, metrics)`` where ``output`` is a
  :class:`~fedprompt.backbones.backbone.BackboneOutput`. In training and evaluation
  (:func:`fedprompt.client.local.make_loss_fn`) it covers the real tokens only: a soft prompt's
  virtual positions are left out (``num_virtual == 0``; ``Backbone.apply(...,
  virtual_outputs=False)``), so a loss reads positions from ``output.num_virtual`` on, as the
  tasks here do.

Batches are dicts of arrays: ``input_ids`` and ``attention_mask`` ``[B, T]``, plus ``labels``
``[B]`` for classification or ``loss_mask`` ``[B, T]`` (1 on completion tokens) for causal LM.
An optional ``example_mask`` ``[B]`` (1 = real example) lets padded batches keep one shape.
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING, Any, Literal

import jax
import jax.numpy as jnp
import optax

from fedprompt.errors import ConfigError

if TYPE_CHECKING:
    from fedprompt.backbones.backbone import Backbone, BackboneOutput

Pooling = Literal["cls", "mean", "last"]
POOLINGS = ("cls", "mean", "last")


def _example_mask(batch: dict[str, Any]) -> jax.Array:
    if "example_mask" in batch:
        return jnp.asarray(batch["example_mask"], jnp.float32)
    return jnp.ones(batch["input_ids"].shape[:1], jnp.float32)


def _masked_mean(values: jax.Array, weights: jax.Array) -> jax.Array:
    return jnp.sum(values * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def pool(output: BackboneOutput, method: Pooling) -> jax.Array:
    """Pool the real tokens' hidden states into one ``[B, D]`` vector per example (float32).

    * ``cls``: the first real token (BERT's [CLS]); virtual tokens are skipped.
    * ``mean``: mean over real, unpadded tokens (sentence-transformers' pooling).
    * ``last``: the last unpadded token (for decoders; assumes right padding).
    """
    p = output.num_virtual
    hidden = output.hidden[:, p:].astype(jnp.float32)
    mask = output.attention_mask[:, p:].astype(jnp.float32)
    if method == "cls":
        return hidden[:, 0]
    if method == "mean":
        return jnp.sum(hidden * mask[..., None], axis=1) / jnp.maximum(mask.sum(1, keepdims=True), 1.0)
    last = jnp.maximum(mask.sum(1).astype(jnp.int32) - 1, 0)
    return jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0]


@dataclasses.dataclass(frozen=True)
class SequenceClassification:
    """Classify a sequence: pooling + a trainable linear head, or a verbalizer on the LM head.

    Attributes:
      num_labels: number of classes (>= 2).
      pooling: ``"cls"``, ``"mean"`` or ``"last"``; ``None`` picks ``"mean"`` for encoders and
        ``"last"`` for decoders.
      verbalizer: decoders only: one token id per label; the frozen LM head's logits of those
        tokens at the last real position are the class scores, and no head is trained.
    """

    num_labels: int
    pooling: Pooling | None = None
    verbalizer: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.num_labels, int) or self.num_labels < 2:
            raise ConfigError(f"num_labels must be an integer >= 2, got {self.num_labels!r}")
        if self.pooling is not None and self.pooling not in POOLINGS:
            raise ConfigError(f"pooling must be one of {POOLINGS}, got {self.pooling!r}")
        if self.verbalizer is not None:
            if len(self.verbalizer) != self.num_labels:
                raise ConfigError(f"verbalizer needs {self.num_labels} token ids, got {len(self.verbalizer)}")
            object.__setattr__(self, "verbalizer", tuple(int(t) for t in self.verbalizer))

    def needs_logits(self) -> bool:
        return self.verbalizer is not None

    def check_backbone(self, backbone: Backbone) -> None:
        if self.verbalizer is None:
            return
        if not backbone.is_decoder:
            raise ConfigError("a verbalizer needs a decoder backbone with an LM head")
        bad = [t for t in self.verbalizer if not 0 <= t < backbone.config.vocab_size]
        if bad:
            raise ConfigError(f"verbalizer token ids {bad} are outside the vocabulary of {backbone.config.vocab_size}")

    def resolve(self, backbone: Backbone) -> SequenceClassification:
        """This task with its defaults filled in for ``backbone`` (and checked against it)."""
        self.check_backbone(backbone)
        return dataclasses.replace(self, pooling=self.pooling or ("last" if backbone.is_decoder else "mean"))

    def init_head(self, key: jax.Array, backbone: Backbone) -> dict[str, Any]:
        """A zero-bias linear head ``{"w": [D, C], "b": [C]}`` (empty with a verbalizer)."""
        self.check_backbone(backbone)
        if self.verbalizer is not None:
            return {}
        d = backbone.width
        w = jax.random.normal(key, (d, self.num_labels), jnp.float32) / math.sqrt(d)
        return {"w": w, "b": jnp.zeros((self.num_labels,), jnp.float32)}

    def logits(self, head: dict[str, Any], output: BackboneOutput) -> jax.Array:
        """Class scores ``[B, C]`` in float32."""
        if self.verbalizer is not None:
            p = output.num_virtual
            mask = output.attention_mask[:, p:]
            last = jnp.maximum(mask.sum(1) - 1, 0) + p
            final = jnp.take_along_axis(output.logits, last[:, None, None], axis=1)[:, 0]
            return final[:, jnp.asarray(self.verbalizer)].astype(jnp.float32)
        return pool(output, self.pooling or "mean") @ head["w"] + head["b"]

    def loss(self, head: dict[str, Any], output: BackboneOutput, batch: dict[str, Any]) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Mean cross-entropy over real examples, with accuracy and example count; a batch's
        ``logit_offset`` ``[B, C]`` (logit-adjusted training) is added to the logits first."""
        logits = self.logits(head, output)
        if "logit_offset" in batch:
            logits = logits + batch["logit_offset"]
        labels = jnp.asarray(batch["labels"], jnp.int32)
        weights = _example_mask(batch)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
        correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
        return _masked_mean(ce, weights), {"accuracy": _masked_mean(correct, weights), "examples": weights.sum()}


@dataclasses.dataclass(frozen=True)
class CausalLM:
    """Next-token prediction with the loss on completion tokens only.

    ``batch["loss_mask"][b, t] == 1`` marks token ``t`` as a completion token to be predicted;
    prompt-side tokens, padding and virtual tokens contribute nothing.
    """

    def needs_logits(self) -> bool:
        return True

    def resolve(self, backbone: Backbone) -> CausalLM:
        self.check_backbone(backbone)
        return self

    def check_backbone(self, backbone: Backbone) -> None:
        if not backbone.is_decoder:
            raise ConfigError("CausalLM needs a decoder backbone")

    def init_head(self, key: jax.Array, backbone: Backbone) -> dict[str, Any]:
        self.check_backbone(backbone)
        return {}

    def loss(self, head: dict[str, Any], output: BackboneOutput, batch: dict[str, Any]) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Token-averaged cross-entropy over completion tokens, with token accuracy."""
        p = output.num_virtual
        logits = output.logits[:, p:-1].astype(jnp.float32)  # position t predicts token t + 1
        targets = jnp.asarray(batch["input_ids"], jnp.int32)[:, 1:]
        weights = (
            jnp.asarray(batch["loss_mask"], jnp.float32)[:, 1:]
            * jnp.asarray(batch["attention_mask"], jnp.float32)[:, 1:]
            * _example_mask(batch)[:, None]
        )
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
        correct = (jnp.argmax(logits, -1) == targets).astype(jnp.float32)
        return _masked_mean(ce, weights), {"accuracy": _masked_mean(correct, weights), "examples": _example_mask(batch).sum()}


Task = SequenceClassification | CausalLM
