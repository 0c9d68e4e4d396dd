"""Test-time prompt tuning (TPT, Shu et al. 2022, "Test-Time Prompt Tuning for Zero-Shot
Generalization in Vision-Language Models", NeurIPS), for text.

At inference, a *copy* of the prompt is adapted to each unlabeled test batch and thrown away
afterwards (episodic: every batch starts again from the trained prompt):

1. every example is seen in ``num_views`` views: the original and ``num_views - 1`` random
   token-dropout augmentations (:func:`augment_views`; TPT's random resized crops become
   token masking or deletion for text);
2. confidence selection: per example, only the ``confidence_quantile`` fraction of views with
   the lowest prediction entropy is kept (TPT keeps 10% of 64 views);
3. the loss is the entropy of the *averaged* probability over the kept views (TPT's marginal
   entropy, ``p_bar = mean_v p_v`` computed as a log-mean-exp of log-probabilities), averaged
   over the batch's real examples;
4. ``steps`` optimizer steps (TPT: one AdamW step with lr 5e-3) on the prompt only; the head
   and the backbone stay frozen;
5. the adapted prompt then classifies the original, unaugmented inputs.

Unlike BBT and ZO this takes gradients (through the backbone, w.r.t. the prompt), but only at
test time and on unlabeled data. :func:`make_tpt_program` runs the same objective federated:
clients adapt the global prompt on their unlabeled data and the server averages the changes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedprompt.backbones.backbone import Backbone
from fedprompt.client.federated import ClientResult, local_batch, random_order
from fedprompt.client.local import iterate_batches
from fedprompt.errors import ConfigError
from fedprompt.prompts import PromptConfig, materialize
from fedprompt.tasks import SequenceClassification

Pytree = Any
Batch = Mapping[str, Any]


def augment_views(
    key: jax.Array,
    batch: Batch,
    num_views: int,
    drop_prob: float,
    *,
    mask_token_id: int | None = None,
    pad_token_id: int = 0,
    special_ids: tuple[int, ...] = (),
) -> dict[str, jax.Array]:
    """``num_views`` views of a batch by token dropout: ``[V, B, T]`` columns, view 0 the original.

    Every real token except the protected ones is dropped independently with probability
    ``drop_prob``. Protected: padding, the first and the last real token of each sequence
    ([CLS] and [SEP] for BERT-style inputs, the pooled token of ``last`` pooling), and any id
    in ``special_ids``. A dropped token is

    * replaced by ``mask_token_id`` (attention kept) when one is given (BERT's [MASK]);
    * otherwise deleted: the remaining tokens move left, keeping their order, and the freed
      positions at the end become padding (mask 0), so the mask stays right-padded.

    Other columns (``labels``, ``example_mask``, ...) are repeated for every view.
    """
    if not (isinstance(num_views, int) and num_views >= 1):
        raise ConfigError(f"num_views must be a positive integer, got {num_views!r}")
    if not 0.0 <= drop_prob < 1.0:
        raise ConfigError(f"drop_prob must be in [0, 1), got {drop_prob!r}")
    ids = jnp.asarray(batch["input_ids"], jnp.int32)
    mask = jnp.asarray(batch["attention_mask"], jnp.int32)
    b, t = ids.shape
    real = mask > 0
    position = jnp.arange(t)
    first = jnp.argmax(real, axis=1)
    last = t - 1 - jnp.argmax(real[:, ::-1], axis=1)
    protected = ~real | (position == first[:, None]) | (position == last[:, None])
    for special in special_ids:
        protected = protected | (ids == special)
    u = jax.random.uniform(key, (num_views, b, t))
    drop = (u < drop_prob) & ~protected[None] & (jnp.arange(num_views) > 0)[:, None, None]
    views: dict[str, jax.Array] = {
        name: jnp.broadcast_to(jnp.asarray(column), (num_views, *np.shape(column)))
        for name, column in batch.items()
        if name not in ("input_ids", "attention_mask")
    }
    if mask_token_id is not None:
        views["input_ids"] = jnp.where(drop, mask_token_id, ids[None])
        views["attention_mask"] = jnp.broadcast_to(mask, (num_views, b, t))
        return views
    keep = real[None] & ~drop
    order = jnp.argsort(~keep, axis=-1, stable=True)  # kept tokens first, in their order
    views["input_ids"] = jnp.where(
        jnp.take_along_axis(keep, order, -1), jnp.take_along_axis(jnp.broadcast_to(ids, keep.shape), order, -1), pad_token_id
    )
    views["attention_mask"] = jnp.take_along_axis(keep, order, -1).astype(jnp.int32)
    if "token_type_ids" in batch:
        types = jnp.broadcast_to(jnp.asarray(batch["token_type_ids"]), keep.shape)
        views["token_type_ids"] = jnp.where(views["attention_mask"] > 0, jnp.take_along_axis(types, order, -1), 0)
    return views


def kept_views(num_views: int, confidence_quantile: float) -> int:
    """How many views confidence selection keeps: ``max(1, round(q * V))`` (TPT: 6 of 64)."""
    return max(1, int(math.floor(confidence_quantile * num_views + 0.5)))


def entropy(log_probs: jax.Array) -> jax.Array:
    """Shannon entropy (nats) over the last axis of log-probabilities."""
    return -jnp.sum(jnp.exp(log_probs) * log_probs, axis=-1)


def _tokenizer_ids(backbone: Backbone) -> tuple[int | None, int, tuple[int, ...]]:
    tok = backbone.tokenizer
    pad = backbone.config.pad_token_id if backbone.config.pad_token_id is not None else 0
    if tok is None:
        return None, int(pad), ()
    mask_id = getattr(tok, "mask_token_id", None)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else pad
    specials = tuple(sorted(int(i) for i in getattr(tok, "all_special_ids", []) if i != mask_id and i != pad_id))
    return (int(mask_id) if mask_id is not None else None), int(pad_id), specials


def make_tpt_objective(
    backbone: Backbone,
    prompt_config: PromptConfig,
    task: SequenceClassification,
    *,
    num_views: int = 8,
    confidence_quantile: float = 0.1,
    drop_prob: float = 0.15,
    mask_token_id: int | None | str = "auto",
):
    """``objective(prompt_params, head, weights, batch, key) -> marginal entropy`` (pure).

    ``mask_token_id="auto"`` masks with the tokenizer's mask token when it has one (BERT
    family) and deletes tokens otherwise.
    """
    if not isinstance(task, SequenceClassification):
        raise ConfigError("test-time prompt tuning needs a SequenceClassification task")
    if not 0.0 < confidence_quantile <= 1.0:
        raise ConfigError(f"confidence_quantile must be in (0, 1], got {confidence_quantile!r}")
    task = task.resolve(backbone)
    auto_mask, pad_id, specials = _tokenizer_ids(backbone)
    mask_id = auto_mask if mask_token_id == "auto" else mask_token_id
    keep = kept_views(num_views, confidence_quantile)
    with_logits = task.needs_logits()

    def objective(prompt_params, head, weights, batch, key):
        views = augment_views(key, batch, num_views, drop_prob, mask_token_id=mask_id, pad_token_id=pad_id, special_ids=specials)
        flat = {name: views[name].reshape(-1, *views[name].shape[2:]) for name in ("input_ids", "attention_mask")}
        types = views.get("token_type_ids")
        prompt = materialize(prompt_config, prompt_params, backbone.config)
        output = backbone.apply(
            weights, flat["input_ids"], flat["attention_mask"], prompt,
            None if types is None else types.reshape(flat["input_ids"].shape), with_logits=with_logits,
        )
        logp = jax.nn.log_softmax(task.logits(head, output)).reshape(num_views, -1, task.num_labels)  # [V, B, C]
        ent = jax.lax.stop_gradient(entropy(logp))  # [V, B]
        chosen = jnp.argsort(ent, axis=0)[:keep]  # the most confident views of each example
        selected = jnp.take_along_axis(logp, chosen[..., None], axis=0)  # [k, B, C]
        avg = jax.nn.logsumexp(selected, axis=0) - math.log(keep)
        per_example = entropy(avg)
        weights_ = jnp.asarray(batch.get("example_mask", jnp.ones(per_example.shape)), jnp.float32)
        return jnp.sum(per_example * weights_) / jnp.maximum(weights_.sum(), 1.0)

    return objective


def make_tpt_adapt(
    backbone: Backbone,
    prompt_config: PromptConfig,
    task: SequenceClassification,
    *,
    steps: int = 1,
    lr: float = 5e-3,
    optimizer: optax.GradientTransformation | None = None,
    num_views: int = 8,
    confidence_quantile: float = 0.1,
    drop_prob: float = 0.15,
    mask_token_id: int | None | str = "auto",
    jit: bool = True,
):
    """``adapt(trainable, batch, weights, key) -> (adapted trainable, entropy before the first step)``.

    ``steps`` steps of ``optimizer`` (default: TPT's AdamW, ``lr``, weight decay 0.01 as
    PyTorch's default) on a copy of the prompt; the head is returned unchanged.
    """
    if not (isinstance(steps, int) and steps >= 1):
        raise ConfigError(f"steps must be a positive integer, got {steps!r}")
    objective = make_tpt_objective(
        backbone, prompt_config, task, num_views=num_views, confidence_quantile=confidence_quantile,
        drop_prob=drop_prob, mask_token_id=mask_token_id,
    )
    opt = optimizer or optax.adamw(lr, weight_decay=0.01)

    def adapt(trainable, batch, weights, key):
        prompt, head = trainable["prompt"], trainable["head"]

        def step(carry, step_key):
            prompt, opt_state = carry
            loss, grads = jax.value_and_grad(objective)(prompt, head, weights, batch, step_key)
            updates, opt_state = opt.update(grads, opt_state, prompt)
            return (optax.apply_updates(prompt, updates), opt_state), loss

        (prompt, _), losses = jax.lax.scan(step, (prompt, opt.init(prompt)), jax.random.split(key, steps))
        return {"prompt": prompt, "head": head}, losses[0]

    return jax.jit(adapt) if jit else adapt


def tpt_adapt(
    backbone: Backbone,
    prompt_config: PromptConfig,
    task: SequenceClassification,
    trainable: Pytree,
    batch: Batch,
    *,
    key: jax.Array,
    steps: int = 1,
    lr: float = 5e-3,
    num_views: int = 8,
    confidence_quantile: float = 0.1,
    drop_prob: float = 0.15,
    mask_token_id: int | None | str = "auto",
) -> Pytree:
    """Adapt a copy of ``trainable``'s prompt to one unlabeled ``batch`` (labels are not read).

    Returns the adapted ``{"prompt", "head"}`` (the head is ``trainable["head"]``). For many
    batches, build the compiled step once with :func:`make_tpt_adapt` (as :func:`tpt_evaluate`
    does).
    """
    adapt = make_tpt_adapt(
        backbone, prompt_config, task, steps=steps, lr=lr, num_views=num_views,
        confidence_quantile=confidence_quantile, drop_prob=drop_prob, mask_token_id=mask_token_id,
    )
    unlabeled = {k: v for k, v in batch.items() if k != "labels"}
    return adapt(trainable, unlabeled, backbone.weights, key)[0]


def _predict_fn(backbone: Backbone, prompt_config: PromptConfig, task: SequenceClassification):
    task = task.resolve(backbone)

    @jax.jit
    def predict(trainable, batch, weights):
        prompt = materialize(prompt_config, trainable["prompt"], backbone.config)
        output = backbone.apply(
            weights, batch["input_ids"], batch["attention_mask"], prompt, batch.get("token_type_ids"),
            with_logits=task.needs_logits(),
        )
        return jax.nn.log_softmax(task.logits(trainable["head"], output))

    return predict


def tpt_evaluate(
    backbone: Backbone,
    prompt_config: PromptConfig,
    task: SequenceClassification,
    trainable: Pytree,
    data: Mapping[str, np.ndarray],
    *,
    key: jax.Array,
    batch_size: int = 16,
    steps: int = 1,
    lr: float = 5e-3,
    num_views: int = 8,
    confidence_quantile: float = 0.1,
    drop_prob: float = 0.15,
    mask_token_id: int | None | str = "auto",
    clients: Sequence[np.ndarray] | None = None,
) -> dict[str, float]:
    """Accuracy on ``data`` without and with test-time adaptation of a fresh prompt copy per batch.

    Batches are consecutive rows of ``data``, or, with ``clients`` (row indices per test
    client, e.g. a Dirichlet partition of the test set), consecutive rows of each client's
    own data, so that every batch holds one client's label mix. Labels are used only to score.
    Returns ``accuracy_before``/``accuracy_after``, ``loss_before``/``loss_after``
    (cross-entropy), ``entropy_before``/``entropy_after`` (mean prediction entropy on the
    original inputs) and ``examples``, over all rows (of all clients).
    """
    adapt = make_tpt_adapt(
        backbone, prompt_config, task, steps=steps, lr=lr, num_views=num_views,
        confidence_quantile=confidence_quantile, drop_prob=drop_prob, mask_token_id=mask_token_id,
    )
    predict = _predict_fn(backbone, prompt_config, task)
    names = ("accuracy_before", "accuracy_after", "loss_before", "loss_after", "entropy_before", "entropy_after")
    sums = dict.fromkeys(names, 0.0)
    total = 0.0
    if clients is None:
        batches = iterate_batches(data, batch_size)
    else:
        batches = (batch for rows in clients if len(rows)
                   for batch in iterate_batches({k: np.asarray(v)[rows] for k, v in data.items()}, batch_size))
    for index, batch in enumerate(batches):
        labels = jnp.asarray(batch["labels"], jnp.int32)
        real = jnp.asarray(batch["example_mask"], jnp.float32)
        unlabeled = {k: v for k, v in batch.items() if k != "labels"}
        adapted, _ = adapt(trainable, unlabeled, backbone.weights, jax.random.fold_in(key, index))
        for tag, params in (("before", trainable), ("after", adapted)):
            logp = predict(params, unlabeled, backbone.weights)
            correct = (jnp.argmax(logp, -1) == labels).astype(jnp.float32)
            ce = -jnp.take_along_axis(logp, labels[:, None], -1)[:, 0]
            sums[f"accuracy_{tag}"] += float(jnp.sum(correct * real))
            sums[f"loss_{tag}"] += float(jnp.sum(ce * real))
            sums[f"entropy_{tag}"] += float(jnp.sum(entropy(logp) * real))
        total += float(real.sum())
    return {**{name: value / total for name, value in sums.items()}, "examples": int(total)}


def make_tpt_program(
    backbone: Backbone,
    prompt_config: PromptConfig,
    task: SequenceClassification,
    trained: Pytree,
    *,
    local_steps: int = 4,
    batch_size: int = 16,
    lr: float = 5e-3,
    num_views: int = 8,
    confidence_quantile: float = 0.1,
    drop_prob: float = 0.15,
    mask_token_id: int | None | str = "auto",
):
    """Federated test-time adaptation as a ClientProgram: clients minimize TPT's marginal
    entropy on their *unlabeled* data (labels in the client data are never read) and send their
    prompt change; the server averages the changes (use ``fedavg``). The head stays ``trained``'s.

    Global parameters are the usual ``{"prompt", "head"}``; ``init`` returns ``trained``.
    Payload: ``{"prompt": prompt delta}``. Memory: a client backpropagates through
    ``num_views * batch_size`` sequences; in the simulation, bound how many clients run at once
    with ``FederatedSimulation.build(..., client_block=...)``.
    """
    from fedprompt.client.program import ClientProgram

    objective = make_tpt_objective(
        backbone, prompt_config, task, num_views=num_views, confidence_quantile=confidence_quantile,
        drop_prob=drop_prob, mask_token_id=mask_token_id,
    )
    opt = optax.adamw(lr, weight_decay=0.01)
    trained = jax.tree.map(jnp.asarray, trained)

    def update(global_params, weights, data, num_examples, key, control=None, client_control=None):
        unlabeled = {k: v for k, v in data.items() if k != "labels"}
        capacity = next(iter(unlabeled.values())).shape[0]
        k_order, k_views = jax.random.split(key)
        order = random_order(k_order, num_examples, capacity)
        head = global_params["head"]

        def step(carry, s):
            prompt, opt_state = carry
            batch = local_batch(unlabeled, order, num_examples, s, batch_size)
            loss, grads = jax.value_and_grad(objective)(prompt, head, weights, batch, jax.random.fold_in(k_views, s))
            updates, opt_state = opt.update(grads, opt_state, prompt)
            return (optax.apply_updates(prompt, updates), opt_state), loss

        start = global_params["prompt"]
        (prompt, _), losses = jax.lax.scan(step, (start, opt.init(start)), jnp.arange(local_steps))
        return ClientResult({"prompt": jax.tree.map(lambda a, b: a - b, prompt, start)}, None, None, losses.mean())

    def to_delta(global_params, payload):
        return {"prompt": payload["prompt"], "head": jax.tree.map(jnp.zeros_like, global_params["head"])}

    return ClientProgram(update=update, to_delta=to_delta, init=lambda key: trained)
