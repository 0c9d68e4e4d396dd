"""Compiled memory of client steps: gradient-free steps next to inference and a gradient step
(a big, abstract backbone's step with and without remat: :func:`fedprompt.bench.step_memory_report`).

A client that only runs forward passes should need about the memory of inference: the frozen
weights, one forward's activations and a few prompt-sized buffers. A backpropagating step
must also keep every layer's activations for the backward pass, unless its blocks are
rematerialised. XLA's memory analysis of the compiled programs
(:func:`fedprompt.client.local.compiled_memory`) shows each, side by side.
"""

from __future__ import annotations

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
