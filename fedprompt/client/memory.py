"""Compiled memory of client steps: gradient-free steps next to inference and a gradient step,
and a prompt-tuning step of a big (abstract, possibly sharded) backbone with and without remat.

A client that only runs forward passes should need about the memory of inference: the frozen
weights, one forward's activations and a few prompt-sized buffers. A backpropagating step
must also keep every layer's activations for the backward pass, unless its blocks are
rematerialised. XLA's memory analysis of the compiled programs
(:func:`fedprompt.client.local.compiled_memory`) shows each, side by side.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax

from fedprompt.backbones.backbone import Backbone
from fedprompt.client.bbt import Subspace, make_bbt_program, prompt_forward
from fedprompt.client.local import compiled_memory, init_trainable, make_eval_step, make_loss_fn, make_train_step
from fedprompt.client.zeroth_order import zo_local_train
from fedprompt.prompts import PromptConfig
from fedprompt.tasks import SequenceClassification, Task


def gradient_free_memory_report(
    backbone: Backbone,
    prompt_config: PromptConfig | None = None,
    task: Task | None = None,
    *,
    batch_size: int = 16,
    max_length: int = 64,
    num_labels: int = 26,
    bbt_dim: int = 500,
    bbt_popsize: int = 20,
) -> dict[str, dict[str, int]]:
    """Compile each kind of client step for one batch and return XLA's memory analysis of each.

    Args:
      backbone: the frozen backbone.
      prompt_config: default: a 20-token soft prompt.
      task: default: ``SequenceClassification(num_labels)``.
      batch_size, max_length: the batch shape (``max_length`` real tokens, plus the prompt).
      bbt_dim, bbt_popsize: BBT's subspace dimension and population.

    Returns:
      ``{name: compiled_memory(...)}`` (bytes: ``arguments``, ``outputs``, ``temporaries``,
      ``generated_code``, ``aliased``, ``peak``) for

      * ``inference``: forward + loss, no gradient (``make_eval_step``);
      * ``zo_step``: one MeZO/FedKSeed step (two forwards one after the other + the update);
      * ``bbt_fitness``: one BBT fitness evaluation (``p0 + A z`` with ``A`` drawn block by
        block in the program, forward, loss);
      * ``bbt_generation``: one whole FedBPT client generation (ask, ``popsize`` fitness
        evaluations one at a time, tell, the head's exact-gradient step);
      * ``gradient_step``: one Adam step through the backbone (``make_train_step``).
    """
    prompt_config = prompt_config or PromptConfig(num_virtual_tokens=20)
    task = (task or SequenceClassification(num_labels)).resolve(backbone)
    weights = backbone.weights
    batch = {
        "input_ids": jnp.ones((batch_size, max_length), jnp.int32),
        "attention_mask": jnp.ones((batch_size, max_length), jnp.int32),
        "labels": jnp.zeros((batch_size,), jnp.int32),
    }
    trainable = init_trainable(backbone, prompt_config, task, jax.random.key(0))
    loss_fn = make_loss_fn(backbone, prompt_config, task)
    report: dict[str, dict[str, int]] = {}

    report["inference"] = compiled_memory(make_eval_step(backbone, prompt_config, task, jit=False), trainable, batch, weights)

    def zo_step(params, data, weights, key):
        result = zo_local_train(
            lambda p, b: loss_fn(p, weights, b)[0], params, data, batch_size, key,
            local_steps=1, batch_size=batch_size, lr=1e-3, eps=1e-3,
        )
        return result.params, result.scalars

    report["zo_step"] = compiled_memory(zo_step, trainable, batch, weights, jax.random.key(0))

    program = make_bbt_program(
        backbone, prompt_config, task, dim=bbt_dim, popsize=bbt_popsize, local_steps=1, batch_size=batch_size
    )
    params = program.init(jax.random.key(0))

    space = Subspace(backbone, prompt_config, dim=bbt_dim, sigma=1.0, seed=0)

    def bbt_fitness(z, head, batch, weights):
        prompt_params = space.unravel(space.project(z[None])[0])
        return task.loss(head, prompt_forward(backbone, prompt_config, task, weights, prompt_params, batch), batch)[0]

    report["bbt_fitness"] = compiled_memory(bbt_fitness, params["z"], params["head"], batch, weights)
    report["bbt_generation"] = compiled_memory(
        lambda p, w, d, key: program.update(p, w, d, batch_size, key), params, weights, batch, jax.random.key(0)
    )

    optimizer = optax.adam(1e-2)
    step = make_train_step(backbone, prompt_config, task, optimizer, jit=False)
    report["gradient_step"] = compiled_memory(step, trainable, optimizer.init(trainable), batch, weights)
    return report


def format_memory_report(report: dict[str, dict[str, Any]]) -> str:
    """A small text table of :func:`gradient_free_memory_report` in MiB."""
    lines = [f"{'step':<16}{'temporaries':>14}{'peak':>12}  (MiB)"]
    for name, row in report.items():
        lines.append(f"{name:<16}{row['temporaries'] / 2**20:>14.1f}{row['peak'] / 2**20:>12.1f}")
    return "\n".join(lines)



#: XLA options for programs that are compiled only to read their memory analysis: no LLVM
#: code optimisation (several times faster to compile on CPU). Buffer assignment, and so the
#: analysis, is decided on the HLO before code generation and does not change.
ANALYSIS_COMPILER_OPTIONS: dict[str, Any] = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def step_memory_report(
    backbone: Backbone,
    *,
    batch_size: int = 4,
    tokens: int = 512,
    devices: int = 1,
    num_virtual_tokens: int = 20,
    task: str = "classification",
    remat: tuple[bool, ...] = (False, True),
    compiler_options: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Compile one prompt-tuning Adam step (never run it) and return XLA's per-device memory analysis.

    Works on an abstract backbone (:func:`~fedprompt.backbones.abstract.abstract_backbone`):
    every argument is a ``jax.ShapeDtypeStruct``, so nothing is allocated, and the program is
    only lowered and compiled (``jax.jit(step).lower(...).compile()``).

    Args:
      backbone: the frozen backbone (abstract or loaded).
      batch_size, tokens: the batch shape (``tokens`` real tokens per row, plus the prompt).
      devices: 1 for one device (:func:`~fedprompt.client.local.make_train_step`); N > 1 for
        the weights split over N devices (:func:`~fedprompt.sharding.make_sharded_train_step`,
        batch replicated).
      num_virtual_tokens: length of the soft prompt (float32, trained).
      task: ``"classification"`` (a 26-way linear head on the last token) or ``"lm"``
        (causal LM loss on every token: the logits over the vocabulary are computed).
      remat: the rematerialisation settings to compile, one row each.
      compiler_options: XLA options for these compilations, e.g. :data:`ANALYSIS_COMPILER_OPTIONS`
        (the programs are only analysed, never run).

    Returns:
      ``{"backbone", "parameters", "weight_bytes", "weight_bytes_per_device", "weight_dtype",
      "devices", "platform", "batch_size", "tokens", "virtual_tokens", "task",
      "cpu_memory_scheduler", "rows"}`` where ``rows``
      maps ``"remat"``/``"no_remat"`` to :func:`~fedprompt.client.local.compiled_memory`'s
      per-device bytes plus ``compile_seconds``.
    """
    import time

    from fedprompt.errors import ConfigError
    from fedprompt.sharding import CPU_MEMORY_SCHEDULER_FLAG, make_mesh, make_sharded_train_step, weight_bytes_per_device
    from fedprompt.tasks import CausalLM

    for name, n in (("batch_size", batch_size), ("tokens", tokens), ("devices", devices), ("num_virtual_tokens", num_virtual_tokens)):
        if not isinstance(n, int) or n < 1:
            raise ConfigError(f"{name} must be a positive integer, got {n!r}")
    if task not in ("classification", "lm"):
        raise ConfigError(f"task must be 'classification' or 'lm', got {task!r}")
    prompt_config = PromptConfig(num_virtual_tokens=num_virtual_tokens, init="random", random_std=0.02)
    the_task: Task = SequenceClassification(26) if task == "classification" else CausalLM()
    the_task = the_task.resolve(backbone)
    optimizer = optax.adam(1e-3)
    trainable = jax.eval_shape(lambda key: init_trainable(backbone, prompt_config, the_task, key), jax.random.key(0))
    opt_state = jax.eval_shape(optimizer.init, trainable)
    shape = (batch_size, tokens)
    batch = {"input_ids": jax.ShapeDtypeStruct(shape, jnp.int32), "attention_mask": jax.ShapeDtypeStruct(shape, jnp.int32)}
    if task == "classification":
        batch["labels"] = jax.ShapeDtypeStruct((batch_size,), jnp.int32)
    else:
        batch["loss_mask"] = jax.ShapeDtypeStruct(shape, jnp.int32)
    mesh = make_mesh(model=devices) if devices > 1 else None
    rows: dict[str, dict[str, Any]] = {}
    for on in remat:
        start = time.perf_counter()
        if mesh is None:
            step = make_train_step(backbone, prompt_config, the_task, optimizer, remat=on)
            row: dict[str, Any] = compiled_memory(
                step, trainable, opt_state, batch, backbone.weights, compiler_options=compiler_options
            )
        else:
            row = make_sharded_train_step(backbone, prompt_config, the_task, optimizer, mesh, remat=on).memory(
                trainable, opt_state, batch, compiler_options=compiler_options
            )
        row["compile_seconds"] = round(time.perf_counter() - start, 1)
        rows["remat" if on else "no_remat"] = row
    return {
        "backbone": backbone.name,
        "parameters": backbone.num_parameters(),
        "weight_bytes": backbone.weight_bytes(),
        "weight_bytes_per_device": weight_bytes_per_device(backbone, mesh) if mesh is not None else backbone.weight_bytes(),
        "weight_dtype": str(jax.tree.leaves(backbone.weights)[0].dtype),
        "devices": devices,
        "platform": jax.devices()[0].platform,
        "batch_size": batch_size,
        "tokens": tokens,
        "virtual_tokens": num_virtual_tokens,
        "task": task,
        "cpu_memory_scheduler": CPU_MEMORY_SCHEDULER_FLAG in os.environ.get("XLA_FLAGS", ""),
        "compiler_options": dict(compiler_options or {}),
        "rows": rows,
    }


def format_step_memory_report(report: dict[str, Any]) -> str:
    """A text table of :func:`step_memory_report` in GiB (per device)."""
    gib = 2**30
    where = "one device" if report["devices"] == 1 else f"{report['devices']} devices, weights split over them"
    lines = [
        f"prompt-tuning step of {report['backbone']} ({report['parameters'] / 1e9:.2f}e9 parameters, "
        f"{report['weight_dtype']} weights {report['weight_bytes'] / gib:.2f} GiB, float32 prompt), "
        f"batch {report['batch_size']} x {report['tokens']} tokens + {report['virtual_tokens']} virtual, "
        f"task {report['task']}, {where}",
        f"XLA memory analysis per device (compiled, not run) on {report['platform']}"
        + (_cpu_caption(report["devices"], report["cpu_memory_scheduler"]) if report["platform"] == "cpu" else ""),
        f"weights per device (closed form): {report['weight_bytes_per_device'] / gib:.2f} GiB"
        + (f"; compiled with {report['compiler_options']}" if report.get("compiler_options") else ""),
        f"{'':<10}{'arguments':>11}{'temporaries':>13}{'peak':>9}{'compile s':>11}  (GiB)",
    ]
    for name, row in report["rows"].items():
        lines.append(
            f"{name:<10}{row['arguments'] / gib:>11.2f}{row['temporaries'] / gib:>13.2f}{row['peak'] / gib:>9.2f}"
            f"{row['compile_seconds']:>11.1f}"
        )
    if min(row["arguments"] for row in report["rows"].values()) < report["weight_bytes_per_device"]:
        lines.append("arguments below the weights: XLA leaves out weights the step never reads "
                     "(an untied LM head in a classification step)")
    if report["platform"] == "cpu":
        lines.append(
            "note: on CPU, XLA computes bfloat16 matrix products in float32 on converted copies of the weights; "
            "without remat those copies stay alive through the step (up to 2x the weights' bytes in temporaries), "
            "which a device with bfloat16 matrix units does not need"
        )
    return "\n".join(lines)


def _cpu_caption(devices: int, memory_scheduler: bool) -> str:
    where = "" if devices == 1 else f" for {devices} forced host devices"
    schedule = "memory-minimising schedule" if memory_scheduler else "XLA's default CPU schedule"
    return f" (XLA's CPU buffer assignment{where}, {schedule})"
