"""Gradient-based local training of a prompt on a frozen backbone.

Only the trainable pytree ``{"prompt": ..., "head": ...}`` is differentiated. The backbone's
weights enter the compiled step as an argument and pass through ``stop_gradient``, so the
compiled program holds no weight-gradient buffers (check it with
:func:`compiled_memory`). Any optax ``GradientTransformation`` is the local optimizer.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedprompt.backbones.backbone import Backbone
from fedprompt.errors import EmptyBatchError, InputError
from fedprompt.prompts import PromptConfig, check_prompt_params, init_prompt, materialize
from fedprompt.tasks import Task

Batch = Mapping[str, Any]
LossFn = Callable[[dict[str, Any], Any, Batch], tuple[jax.Array, dict[str, jax.Array]]]


class StepMetrics(NamedTuple):
    """Per-step numbers: mean loss and accuracy over the real examples, and their count."""

    loss: jax.Array
    accuracy: jax.Array
    examples: jax.Array


def init_trainable(backbone: Backbone, prompt_config: PromptConfig, task: Task, key: jax.Array) -> dict[str, Any]:
    """The whole trainable state: ``{"prompt": prompt params, "head": task head params}``."""
    k_prompt, k_head = jax.random.split(key)
    task = task.resolve(backbone)
    return {"prompt": init_prompt(prompt_config, backbone, k_prompt), "head": task.init_head(k_head, backbone)}


def make_loss_fn(backbone: Backbone, prompt_config: PromptConfig, task: Task, *, remat: bool | None = None) -> LossFn:
    """``loss(trainable, weights, batch) -> (loss, metrics)``, a pure function of its inputs.

    ``remat`` overrides the backbone's rematerialisation of its blocks in a gradient (see
    :meth:`~fedprompt.backbones.backbone.Backbone.resolve_remat`); values are the same. The
    task's loss sees the real tokens' outputs only (``virtual_outputs=False``: an encoder then
    skips the virtual rows in its last block).
    """
    task = task.resolve(backbone)
    with_logits = task.needs_logits()
    remat = backbone.resolve_remat(remat)

    def loss_fn(trainable: dict[str, Any], weights: Any, batch: Batch):
        prompt = materialize(prompt_config, trainable["prompt"], backbone.config)
        output = backbone.apply(
            weights, batch["input_ids"], batch["attention_mask"], prompt, batch.get("token_type_ids"),
            with_logits=with_logits, remat=remat, virtual_outputs=False,
        )
        return task.loss(trainable["head"], output, batch)

    return loss_fn


def make_train_step(
    backbone: Backbone,
    prompt_config: PromptConfig,
    task: Task,
    optimizer: optax.GradientTransformation,
    *,
    jit: bool = True,
    remat: bool | None = None,
) -> Callable[[dict[str, Any], Any, Batch, Any], tuple[dict[str, Any], Any, StepMetrics]]:
    """One optimizer step on the prompt (and head): ``step(trainable, opt_state, batch, weights)``.

    Returns ``(trainable, opt_state, StepMetrics)``. With ``jit=True`` the step is compiled once
    per batch shape, and ``trainable``/``opt_state`` buffers are donated. ``remat``: rematerialise
    the backbone's blocks in the backward pass (True/False; None: the backbone's setting, by
    default on for decoders of at least
    :data:`~fedprompt.backbones.backbone.REMAT_MIN_PARAMETERS` parameters).

    Example:
      >>> step = make_train_step(bb, PromptConfig(), SequenceClassification(4), optax.adam(1e-2))  # doctest: +SKIP
      >>> trainable, opt_state, m = step(trainable, opt_state, batch, bb.weights)  # doctest: +SKIP
    """
    loss_fn = make_loss_fn(backbone, prompt_config, task, remat=remat)

    def step(trainable, opt_state, batch, weights):
        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable, weights, batch)
        updates, opt_state = optimizer.update(grads, opt_state, trainable)
        trainable = optax.apply_updates(trainable, updates)
        return trainable, opt_state, StepMetrics(loss, metrics["accuracy"], metrics["examples"])

    return jax.jit(step, donate_argnums=(0, 1)) if jit else step


def make_eval_step(backbone: Backbone, prompt_config: PromptConfig, task: Task, *, jit: bool = True):
    """``eval_step(trainable, batch, weights) -> StepMetrics`` (no gradients)."""
    loss_fn = make_loss_fn(backbone, prompt_config, task)

    def eval_step(trainable, batch, weights):
        loss, metrics = loss_fn(trainable, weights, batch)
        return StepMetrics(loss, metrics["accuracy"], metrics["examples"])

    return jax.jit(eval_step) if jit else eval_step


def compiled_memory(step: Callable, *args, compiler_options: Mapping[str, Any] | None = None) -> dict[str, int]:
    """Compile ``step`` for ``args`` and return XLA's memory analysis in bytes.

    Keys: ``arguments``, ``outputs``, ``temporaries``, ``generated_code``, ``peak`` (the sum of
    arguments, outputs and temporaries, less aliased buffers: an upper bound of the live set).
    ``args`` may be ``jax.ShapeDtypeStruct`` leaves: the step is lowered and compiled, never run.
    ``compiler_options`` are XLA options for this compilation only (e.g. ``{"xla_backend_optimization_level": 0}``
    to skip code optimisation when only the analysis is wanted).
    """
    jitted = step if hasattr(step, "lower") else jax.jit(step)
    analysis = jitted.lower(*args).compile(dict(compiler_options) if compiler_options else None).memory_analysis()
    out = {
        "arguments": int(analysis.argument_size_in_bytes),
        "outputs": int(analysis.output_size_in_bytes),
        "temporaries": int(analysis.temp_size_in_bytes),
        "generated_code": int(analysis.generated_code_size_in_bytes),
        "aliased": int(analysis.alias_size_in_bytes),
    }
    out["peak"] = out["arguments"] + out["outputs"] + out["temporaries"] - out["aliased"]
    return out


def iterate_batches(
    data: Mapping[str, np.ndarray],
    batch_size: int,
    *,
    key: jax.Array | None = None,
    drop_remainder: bool = False,
) -> Iterator[dict[str, np.ndarray]]:
    """One epoch of fixed-shape batches over a dict of equally long arrays.

    The last, short batch is padded by repeating rows and marked with ``example_mask`` so every
    batch has the same shape (one compilation). With ``key`` the order is shuffled.
    """
    lengths = {k: len(v) for k, v in data.items()}
    if len(set(lengths.values())) != 1:
        raise InputError(f"all arrays in a data set must have the same length, got {lengths}")
    n = next(iter(lengths.values()), 0)
    if n == 0:
        raise EmptyBatchError("the data set holds no examples")
    if batch_size < 1:
        raise InputError(f"batch_size must be >= 1, got {batch_size}")
    order = np.asarray(jax.random.permutation(key, n)) if key is not None else np.arange(n)
    for start in range(0, n, batch_size):
        idx = order[start : start + batch_size]
        real = len(idx)
        if real < batch_size:
            if drop_remainder:
                return
            idx = np.concatenate([idx, np.resize(idx, batch_size - real)])
        batch = {k: np.asarray(v)[idx] for k, v in data.items()}
        batch["example_mask"] = (np.arange(batch_size) < real).astype(np.float32)
        yield batch


def local_train(
    backbone: Backbone,
    prompt_config: PromptConfig,
    task: Task,
    trainable: dict[str, Any],
    data: Mapping[str, np.ndarray],
    optimizer: optax.GradientTransformation,
    *,
    epochs: int = 1,
    batch_size: int = 16,
    key: jax.Array,
    opt_state: Any = None,
    callback: Callable[[int, StepMetrics], None] | None = None,
) -> tuple[dict[str, Any], Any, list[StepMetrics]]:
    """Train the prompt (and head) for ``epochs`` passes over ``data``.

    Returns the new trainable state, the optimizer state and the per-step metrics.
    ``callback(step, metrics)`` is called after every step (for progress display).
    """
    check_prompt_params(prompt_config, trainable["prompt"], backbone)
    step_fn = make_train_step(backbone, prompt_config, task, optimizer)
    trainable = jax.tree.map(jnp.array, trainable)  # own copies: the step donates its inputs
    opt_state = optimizer.init(trainable) if opt_state is None else opt_state
    history: list[StepMetrics] = []
    for epoch_key in jax.random.split(key, epochs):
        for batch in iterate_batches(data, batch_size, key=epoch_key):
            trainable, opt_state, metrics = step_fn(trainable, opt_state, batch, backbone.weights)
            history.append(metrics)
            if callback is not None:
                callback(len(history), metrics)
    return trainable, opt_state, history
