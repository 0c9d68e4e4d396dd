"""A run's data, the same in both runtimes: its examples, their split over clients, one client's shard.

:func:`load_data` reads the built-in WordNet set or the user's files, :func:`select_examples`
picks the run's subsets (the key schedule's ``train_subset`` / ``test_subset``),
:func:`partition_clients` splits the training rows over clients (the demo partition a Flower
deployment also uses), :func:`encode_dataset` tokenizes, and :func:`client_shard` pads one
client's rows exactly as the simulation engine's ``build_client_data`` pads them, because the
client update draws its batches from a random order over the padded rows.

:func:`load_labelled_file` reads one party's own file against the run's agreed classes (a
Flower SuperNode's own training or held-out rows, or the server operator's held-out set).

Example:
  >>> from fedprompt.config import RunConfig
  >>> cfg = RunConfig(clients=3, clients_per_round=2, partition="iid")
  >>> data = synthetic_token_data(12, max_length=8, vocab_size=100, num_labels=3, seed=0)
  >>> [len(p) for p in partition_clients(cfg, data["labels"])]
  [4, 4, 4]
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np

from fedprompt.config import RunConfig
from fedprompt.data import datasets, instructions, partition
from fedprompt.errors import ConfigError
from fedprompt.federation.keys import KeySchedule

if TYPE_CHECKING:
    from fedprompt.backbones.backbone import Backbone


def load_data(config: RunConfig) -> tuple[datasets.TextDataset, datasets.TextDataset]:
    """Train and test sets for a config: the built-in WordNet set, or the user's files
    (instruction data for ``task = "generate"``: :mod:`fedprompt.data.instructions`)."""
    if config.task == "generate":
        return _load_instructions(config)
    if config.data is None:
        return datasets.load_wordnet_supersenses()
    full = datasets.load_text_file(config.data, text_key=config.text_key, label_key=config.label_key)
    if config.test_data is None:
        return datasets.train_test_split(full, test_fraction=0.2, seed=config.seed)
    test = datasets.load_text_file(
        config.test_data, text_key=config.text_key, label_key=config.label_key, label_names=full.label_names
    )
    return full, test


def select_examples(
    config: RunConfig, train: datasets.TextDataset, test: datasets.TextDataset
) -> tuple[datasets.TextDataset, datasets.TextDataset]:
    """The run's training and test subsets (``train_examples``, ``eval_examples``; seeded)."""
    keys = KeySchedule(config.seed)
    train = _subsample(train, config.train_examples, keys.train_subset)
    return train, _subsample(test, config.eval_examples, keys.test_subset)


def _load_instructions(config: RunConfig) -> tuple[datasets.TextDataset, datasets.TextDataset]:
    if config.data is None:
        return instructions.load_wordnet_generation()
    full = load_labelled_file(config, config.data, None)
    if config.test_data is None:
        if "test" in instructions.folder_splits(config.data):
            return full, load_labelled_file(config, config.data, full.label_names, split="test")
        return datasets.train_test_split(full, test_fraction=0.2, seed=config.seed)
    return full, load_labelled_file(config, config.test_data, full.label_names)


def load_labelled_file(config: RunConfig, path: str, label_names: Sequence[str] | None,
                       split: str = "train") -> datasets.TextDataset:
    """One party's own file of labelled texts (a SuperNode's training or held-out rows, a
    server's held-out set): JSONL or CSV, read with the run's ``text_key`` / ``label_key``, every
    label one of the agreed ``label_names`` (a label outside them raises a DataError naming the
    file, the line and the label). Instruction data (``task = "generate"``) is read with the
    run's ``prompt_key`` / ``response_key``, grouped by ``label_key`` where every row has it
    (``split``: the split of a ``datasets`` folder)."""
    if config.task == "generate":
        return instructions.load_instruction_file(
            path, prompt_key=config.prompt_key, response_key=config.response_key, label_key=config.label_key,
            label_names=label_names, split=split)
    return datasets.load_text_file(path, text_key=config.text_key, label_key=config.label_key,
                                   label_names=label_names)


def select_test_examples(config: RunConfig, test: datasets.TextDataset) -> datasets.TextDataset:
    """The run's test subset of ``test`` (``eval_examples``, seeded as in :func:`select_examples`)."""
    return _subsample(test, config.eval_examples, KeySchedule(config.seed).test_subset)


def _subsample(ds: datasets.TextDataset, limit: int | None, seed: int) -> datasets.TextDataset:
    if limit is None or limit >= len(ds):
        return ds
    return ds.subset(np.sort(np.random.default_rng(seed).choice(len(ds), limit, replace=False)))


def partition_clients(config: RunConfig, labels: np.ndarray) -> list[np.ndarray]:
    """The training rows of every client (``partition``, ``alpha``, ``labels_per_client``, ``seed``).

    Raises:
      ConfigError: a label-skewed partition (``dirichlet``, ``shards``) of data in one group
        (instruction data without a ``label_key`` column).
    """
    if config.partition in ("dirichlet", "shards") and np.unique(np.asarray(labels)).size < 2:
        raise ConfigError(f"partition {config.partition!r} skews labels, but the training data is one group "
                          f"(no {config.label_key!r} column): use --partition iid or quantity, or --label-key "
                          "naming a column that groups the examples")
    return partition.partition(
        config.partition, np.asarray(labels), config.clients,
        alpha=config.alpha, labels_per_client=config.labels_per_client, seed=config.seed,
    )


def encode_dataset(backbone: Backbone, dataset: datasets.TextDataset, max_length: int, num_virtual: int) -> dict[str, np.ndarray]:
    """Tokenize a labelled text data set into fixed-shape NumPy columns (instruction data: the
    :class:`~fedprompt.tasks.CausalLM` columns of :func:`~fedprompt.data.instructions.encode_instructions`)."""
    if dataset.responses is not None:
        return instructions.encode_instructions(backbone, dataset, max_length, num_virtual)
    encoded = backbone.tokenize(list(dataset.texts), max_length, num_virtual=num_virtual)
    return {**encoded, "labels": np.asarray(dataset.labels, np.int32)}


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
