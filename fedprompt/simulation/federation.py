"""How a :class:`~fedprompt.config.RunConfig` becomes a federation, written once for every runtime.

:func:`fedprompt.simulate` (all clients in one process) and the Flower apps
(:mod:`fedprompt.flower`, one client per process or machine) build the same federation from the
same settings: the same training subset, the same partition over clients, the same prompt and
task, the same algorithm and local optimizer, and the same
:class:`~fedprompt.simulation.engine.FederatedSimulation`, whose ``sample`` (which clients a
round trains), ``client_keys`` (each client's PRNG key in a round), ``init`` (the initial global
state) and ``program.update`` (the client update) both runtimes call. A deployment with the same
seed and data therefore ends with the prompt of the simulation.

A deployed client holds only its own rows (:func:`client_shard`), zero-padded to the largest
client's size exactly as :func:`~fedprompt.simulation.engine.build_client_data` pads them, because
the client update draws its batches from a random order over the padded rows.

Example:
  >>> from fedprompt.config import RunConfig
  >>> cfg = RunConfig(clients=3, clients_per_round=2, partition="iid")
  >>> data = synthetic_token_data(12, max_length=8, vocab_size=100, num_labels=3, seed=0)
  >>> [len(p) for p in partition_clients(cfg, data["labels"])]
  [4, 4, 4]
  >>> make_prompt_config(cfg).num_virtual_tokens
  20
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import optax

from fedprompt.backbones.backbone import Backbone
from fedprompt.config import RunConfig
from fedprompt.errors import ConfigError
from fedprompt.prompts import PromptConfig
from fedprompt.simulation import datasets, partition
from fedprompt.simulation.engine import ClientData, FederatedSimulation
from fedprompt.tasks import SequenceClassification


def make_prompt_config(config: RunConfig) -> PromptConfig:
    """The prompt of a run: ``method`` and ``num_virtual_tokens``; prefixes start small (std 0.02).

    The gradient-free methods tune a soft prompt."""
    return PromptConfig(
        method="prefix" if config.method == "prefix" else "prompt", num_virtual_tokens=config.num_virtual_tokens,
        random_std=0.02 if config.method == "prefix" else 1.0,
    )


def make_task(num_labels: int) -> SequenceClassification:
    """The task of a run: sequence classification over ``num_labels`` classes."""
    return SequenceClassification(num_labels=num_labels)


def select_examples(
    config: RunConfig, train: datasets.TextDataset, test: datasets.TextDataset
) -> tuple[datasets.TextDataset, datasets.TextDataset]:
    """The run's training and test subsets (``train_examples``, ``eval_examples``; seeded)."""
    train = _subsample(train, config.train_examples, config.seed)
    return train, _subsample(test, config.eval_examples, config.seed + 1)


def _subsample(ds: datasets.TextDataset, limit: int | None, seed: int) -> datasets.TextDataset:
    if limit is None or limit >= len(ds):
        return ds
    return ds.subset(np.sort(np.random.default_rng(seed).choice(len(ds), limit, replace=False)))


def partition_clients(config: RunConfig, labels: np.ndarray) -> list[np.ndarray]:
    """The training rows of every client (``partition``, ``alpha``, ``labels_per_client``, ``seed``)."""
    return partition.partition(
        config.partition, np.asarray(labels), config.clients,
        alpha=config.alpha, labels_per_client=config.labels_per_client, seed=config.seed,
    )


def client_sizes(parts: Sequence[np.ndarray], labels: np.ndarray, num_labels: int) -> ClientData:
    """A :class:`ClientData` with the clients' sizes and label histograms but no rows.

    What a deployed server knows of its clients, and all a
    :class:`~fedprompt.simulation.engine.FederatedSimulation` needs to sample clients, derive
    their keys, initialize and evaluate (only in-process training reads the rows).
    """
    sizes = np.array([len(p) for p in parts], np.int32)
    if sizes.min() < 1:
        raise ConfigError("every client needs at least one example")
    histograms = partition.label_histograms(labels, list(parts), num_labels)
    return ClientData(columns={}, sizes=sizes, label_histograms=histograms)


def client_shard(rows: Mapping[str, np.ndarray], capacity: int) -> dict[str, np.ndarray]:
    """One client's encoded rows, zero-padded to ``capacity`` rows (the largest client's size).

    Equal to that client's slice of :func:`~fedprompt.simulation.engine.build_client_data`.
    """
    out = {}
    for name, column in rows.items():
        column = np.asarray(column)
        if len(column) > capacity:
            raise ConfigError(f"a client with {len(column)} rows does not fit a capacity of {capacity}")
        padded = np.zeros((capacity, *column.shape[1:]), column.dtype)
        padded[: len(column)] = column
        out[name] = padded
    return out


def make_simulation(
    config: RunConfig,
    backbone: Backbone,
    prompt_config: PromptConfig,
    task: SequenceClassification,
    client_data: ClientData,
) -> FederatedSimulation:
    """The :class:`~fedprompt.simulation.engine.FederatedSimulation` of a run."""
    from fedprompt.simulation.run import make_algorithm, make_local_optimizer  # run.py imports this module

    return FederatedSimulation(
        backbone, prompt_config, task, make_algorithm(config), make_local_optimizer(config), client_data,
        clients_per_round=config.clients_per_round, local_steps=config.local_steps, batch_size=config.batch_size,
        scaffold_lr=config.resolved_local_lr, dropout=config.dropout, client_block=config.client_block,
        seed=config.seed,
        program=client_program(config, backbone, prompt_config, task),
        **protection_options(config),
        **device_options(config),
    )


def device_options(config: RunConfig) -> dict:
    """``devices`` / ``parallel_backend`` as :class:`FederatedSimulation` keyword arguments."""
    if config.devices == 1:
        return {}
    return {"parallel": config.parallel_backend, "devices": config.devices or None}


def client_program(config: RunConfig, backbone: Backbone, prompt_config: PromptConfig, task: SequenceClassification):
    """The :class:`~fedprompt.simulation.engine.ClientProgram` of a run: the gradient-free
    ``bbt``/``zo`` clients, the gradient client wrapped by ``compress``; None (the engine's
    gradient client) otherwise."""
    if config.compress is not None:
        from fedprompt.client.compressed import compressed_program
        from fedprompt.simulation.engine import gradient_program
        from fedprompt.simulation.run import make_algorithm, make_local_optimizer  # run.py imports this module

        inner = gradient_program(
            backbone, prompt_config, task, make_algorithm(config), make_local_optimizer(config),
            local_steps=config.local_steps, batch_size=config.batch_size,
        )
        return compressed_program(inner.update, config.compress, error_feedback=config.error_feedback)
    if config.method == "bbt":
        from fedprompt.client.bbt import make_bbt_program

        head_optimizer = None if config.local_lr is None else optax.adam(config.local_lr)
        return make_bbt_program(backbone, prompt_config, task, local_steps=config.local_steps,
                                batch_size=config.batch_size, seed=config.seed, head_optimizer=head_optimizer)
    if config.method == "zo":
        from fedprompt.client.zeroth_order import make_zo_program

        lr = {} if config.local_lr is None else {"lr": config.local_lr}
        return make_zo_program(backbone, prompt_config, task, local_steps=config.local_steps,
                               batch_size=config.batch_size, seed=config.seed, **lr)
    return None


def protection_options(config: RunConfig) -> dict:
    """Robust aggregation, attacks, differential privacy and secure aggregation of a run, as
    :class:`~fedprompt.simulation.engine.FederatedSimulation` keyword arguments."""
    from fedprompt.server.robust import make_aggregator
    from fedprompt.simulation.attacks import AttackConfig

    return {
        "aggregator": make_aggregator(config.aggregator, **config.aggregator_options()),
        "attack": None if config.attack is None else AttackConfig(
            kind=config.attack, fraction=config.attack_fraction, scale=config.attack_scale),
        "dp_config": config.dp_config(),
        "total_rounds": config.rounds,
        "secure_aggregation": config.secagg,
        "secagg_threshold": config.secagg_threshold,
    }


def synthetic_token_data(
    num_examples: int, *, max_length: int, vocab_size: int, num_labels: int, seed: int
) -> dict[str, np.ndarray]:
    """A learnable, seeded classification set of token ids, for backbones without a tokenizer.

    Each example is ``max_length`` token ids in ``[5, vocab_size)`` (ids below 5 are left to
    special tokens), right-padded with 0 after a random length of at least half the row; its
    label is its first token id modulo ``num_labels``.

    Returns:
      ``{"input_ids": [N, T] int32, "attention_mask": [N, T] int32, "labels": [N] int32}``.
    """
    if num_examples < 1 or max_length < 2 or num_labels < 2 or vocab_size <= 5 + num_labels:
        raise ConfigError(
            f"synthetic data needs >= 1 example, >= 2 tokens, >= 2 labels and a vocabulary over "
            f"{5 + num_labels} ids; got {num_examples}, {max_length}, {num_labels}, {vocab_size}"
        )
    rng = np.random.default_rng([seed, 0x5EED])
    ids = rng.integers(5, vocab_size, (num_examples, max_length)).astype(np.int32)
    lengths = rng.integers((max_length + 1) // 2, max_length + 1, num_examples)
    mask = (np.arange(max_length)[None, :] < lengths[:, None]).astype(np.int32)
    return {"input_ids": ids * mask, "attention_mask": mask, "labels": (ids[:, 0] % num_labels).astype(np.int32)}
