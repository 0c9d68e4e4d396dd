"""The client-program contract: what a client runs each round, and what it sends.

A :class:`ClientProgram` is the unit both runtimes execute. The in-process simulation
``vmap``s :attr:`ClientProgram.update` over a block of clients that share one copy of the
frozen backbone; a Flower SuperNode calls the very same function for its one client. The
server side of the contract is :attr:`ClientProgram.to_delta`, which turns what arrived (a
quantized update, seeds and scalars, a low-dimensional vector) into a change of the global
state before aggregation.

Client state is opaque to the runtime: SCAFFOLD's control variate or an error-feedback
residual arrives as ``client_control`` and leaves as ``ClientResult.control``; the runtime
keeps it per client (the simulation in an array ``[C, ...]``, a SuperNode in its persistent
context) when :attr:`ClientProgram.client_state` says so, and hands it back the next time that
client trains. It is shaped like the global parameters.

Programs: :func:`gradient_program` (FedAvg / FedProx / SCAFFOLD local steps),
:func:`fedprompt.client.compressed.compressed_program`,
:func:`fedprompt.client.bbt.make_bbt_program`, :func:`fedprompt.client.zeroth_order.make_zo_program`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple

import optax

from fedprompt.client.federated import ClientResult, make_client_update
from fedprompt.client.local import make_loss_fn
from fedprompt.errors import ConfigError
from fedprompt.prompts import PromptConfig
from fedprompt.tasks import Task

if TYPE_CHECKING:
    from fedprompt.backbones.backbone import Backbone
    from fedprompt.server.algorithms import Algorithm

Pytree = Any


class ClientProgram(NamedTuple):
    """How clients train and what travels.

    Attributes:
      update: ``(global_params, weights, data, num_examples, key, control, client_control) ->
        ClientResult``, pure and vmappable (:func:`~fedprompt.client.federated.make_client_update`
        has this signature); its ``ClientResult.delta`` is the *payload* a client sends.
      to_delta: ``(global_params, payload) -> delta`` on the server (jittable): the change of the
        global state that a payload stands for.
      init: ``(key) -> global params``; None uses :func:`~fedprompt.client.local.init_trainable`.
      to_trainable: ``(params) -> {"prompt", "head"}`` for evaluation; None: identity.
      client_state: the program keeps state between rounds in ``ClientResult.control`` (shaped
        like the global params); the runtime stores it per client and passes it back as
        ``client_control``.
      seeds: a zeroth-order program's seed space
        (:class:`~fedprompt.client.zeroth_order.SeedSpace`): how merged seed pairs move the
        global params, for the seed-only downlink (:mod:`fedprompt.federation.seeds`); None
        for other programs.
    """

    update: Callable[..., ClientResult]
    to_delta: Callable[[Pytree, Pytree], Pytree]
    init: Callable[[Any], Pytree] | None = None
    to_trainable: Callable[[Pytree], Pytree] | None = None
    client_state: bool = False
    seeds: Any = None


def identity_delta(global_params: Pytree, payload: Pytree) -> Pytree:
    """``to_delta`` of programs whose payload is the update itself."""
    del global_params
    return payload


def gradient_program(
    backbone: Backbone,
    prompt_config: PromptConfig,
    task: Task,
    algorithm: Algorithm,
    local_optimizer: optax.GradientTransformation,
    *,
    local_steps: int,
    batch_size: int,
    scaffold_lr: float | None = None,
    batch_sharding: Any = None,
    logit_adjustment: float = 0.0,
) -> ClientProgram:
    """The gradient-based client of ``algorithm`` (FedProx's proximal term, SCAFFOLD's
    correction and control variate) as a :class:`ClientProgram` whose payload is the update;
    ``batch_sharding`` spreads each local batch over several devices, ``logit_adjustment``
    calibrates the local loss to the client's label frequencies
    (:func:`~fedprompt.client.federated.make_client_update`)."""
    if algorithm.scaffold and scaffold_lr is None:
        raise ConfigError("SCAFFOLD needs scaffold_lr (the clients' SGD learning rate)")
    task = task.resolve(backbone)
    num_labels = getattr(task, "num_labels", None)
    if logit_adjustment and (num_labels is None or getattr(task, "verbalizer", None) is not None):
        raise ConfigError("logit_adjustment needs a classification task with a trained head")
    update = make_client_update(
        make_loss_fn(backbone, prompt_config, task), local_optimizer,
        local_steps=local_steps, batch_size=batch_size, prox_mu=algorithm.prox_mu,
        scaffold_lr=scaffold_lr if algorithm.scaffold else None, batch_sharding=batch_sharding,
        logit_adjustment=logit_adjustment, num_labels=num_labels,
    )
    return ClientProgram(update=update, to_delta=identity_delta, client_state=algorithm.scaffold)
