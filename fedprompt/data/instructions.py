"""Instruction data for generative tasks: prompts and the responses a decoder learns to write.

An instruction data set is a :class:`~fedprompt.data.datasets.TextDataset` whose ``texts`` are
the prompts and whose ``responses`` hold the answers; its labels only group the examples (a
``label_key`` column such as Dolly's ``category``, or one group ``"all"``), so the partitions
that skew labels skew the groups. Sources:

* :func:`load_instruction_file`: a user's ``.jsonl`` / ``.json`` / ``.csv`` file, a
  ``.parquet`` file, or a folder written by Hugging Face ``datasets``' ``save_to_disk``
  (the last two need the ``generate`` extra);
* :func:`load_wordnet_generation`: the built-in WordNet glosses, each to be answered with its
  supersense's name (``"animal"`` for a ``noun.animal`` gloss), on the classification task's
  split.

:func:`encode_instructions` turns prompts and responses into the training columns of
:class:`~fedprompt.tasks.CausalLM` (the loss falls on the response and the end-of-text token
only) through :func:`format_prompt`, the one place a prompt's text is laid out (training,
generation and ``fedprompt apply`` alike): the tokenizer's chat template where it has one,
else the prompt and a newline.

Example:
  >>> ds = from_records([{"prompt": "2 + 2 =", "response": "4"}, {"prompt": "3 + 3 =", "response": "6"}])
  >>> ds.texts, ds.responses, ds.label_names
  (('2 + 2 =', '3 + 3 ='), ('4', '6'), ('all',))
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fedprompt.data import datasets
from fedprompt.errors import DataError
from fedprompt.wire.limits import check_class_count, max_text_chars

if TYPE_CHECKING:
    from fedprompt.backbones.backbone import Backbone

__all__ = [
    "encode_instructions",
    "format_prompt",
    "from_records",
    "load_instruction_file",
    "load_wordnet_generation",
]

ONE_GROUP = "all"
"""The group of every example of instruction data without a group column."""


def load_wordnet_generation() -> tuple[datasets.TextDataset, datasets.TextDataset]:
    """The built-in generative task: from a WordNet noun gloss, write its supersense's name.

    The glosses, split and groups of :func:`~fedprompt.data.datasets.load_wordnet_supersenses`
    (so label skew over clients is the classification task's); each response is the
    supersense without its ``noun.`` prefix, after a space (``" animal"``, ``" artifact"``, ...):
    with the space, 19 of the 26 names are one token of ``wordnet-gpt2``'s vocabulary (4
    without it), so the first token the model writes mostly names the answer. Prompts
    read ``"<gloss>\\nsupersense:"``; exact match ignores the space.
    """
    train, test = datasets.load_wordnet_supersenses()

    def instructions(ds: datasets.TextDataset) -> datasets.TextDataset:
        names = [name.split(".", 1)[-1] for name in ds.label_names]
        return datasets.TextDataset(
            texts=tuple(f"{text}\nsupersense:" for text in ds.texts), labels=ds.labels, label_names=ds.label_names,
            responses=tuple(f" {names[label]}" for label in ds.labels.tolist()),
        )

    return instructions(train), instructions(test)


def from_records(
    records: Iterable[Mapping[str, Any]],
    *,
    prompt_key: str = "prompt",
    response_key: str = "response",
    label_key: str | None = None,
    label_names: Sequence[str] | None = None,
    source: str = "in-memory data",
) -> datasets.TextDataset:
    """Instruction data from records (dicts): ``prompt_key`` and ``response_key`` strings, and a
    group from ``label_key`` when every record has one (else one group, ``"all"``).

    Raises:
      DataError: no records, a missing, null, empty or non-string prompt or response, a group
        outside ``label_names``.
    """
    items, groups = [], []
    rows = list(records)
    if not rows:
        raise DataError(f"{source}: no examples (empty file or data)")
    grouped = label_key is not None and all(isinstance(r, Mapping) and r.get(label_key) is not None for r in rows)
    for i, record in enumerate(rows):
        where = f"{source}, item {i}"
        if not isinstance(record, Mapping):
            raise DataError(f"{where}: expected an object, got {type(record).__name__}")
        prompt = _string(record, prompt_key, where)
        response = _string(record, response_key, where)
        items.append((prompt, response))
        if grouped:
            group = record[label_key]
            if isinstance(group, bool) or not isinstance(group, (str, int)):
                raise DataError(f"{where}: {label_key!r} must be a string or an integer, got {group!r}")
            groups.append(str(group))
    if grouped:
        names = tuple(label_names) if label_names is not None else tuple(sorted(set(groups)))
        check_class_count(len(names), what=f"{source}: the distinct {label_key!r} values make", error=DataError)
        position = {name: k for k, name in enumerate(names)}
        missing = next((g for g in groups if g not in position), None)
        if missing is not None:
            raise DataError(f"{source}: group {missing!r} is not in label_names {names!r}")
        labels = [position[g] for g in groups]
    else:
        names = tuple(label_names) if label_names is not None else (ONE_GROUP,)
        labels = [0] * len(items)
    return datasets.TextDataset(texts=tuple(p for p, _ in items), labels=np.asarray(labels, np.int32),
                                label_names=names, responses=tuple(r for _, r in items))


def load_instruction_file(
    path: str | Path,
    *,
    prompt_key: str = "prompt",
    response_key: str = "response",
    label_key: str | None = None,
    label_names: Sequence[str] | None = None,
    split: str = "train",
) -> datasets.TextDataset:
    """Instruction data from a file or a Hugging Face ``datasets`` folder (see the module).

    Args:
      path: a ``.jsonl`` / ``.json`` (JSON lines or one array of objects), ``.csv`` (a header
        row), ``.parquet`` file, or a folder saved by ``datasets.Dataset.save_to_disk`` (a
        ``DatasetDict`` folder gives its ``split``).
      prompt_key, response_key: the columns of the prompt and the response.
      label_key: a column that groups the examples (for partitions); unused when some row
        lacks it.
      label_names: the groups in index order (default: the sorted distinct values).
      split: the split of a ``DatasetDict`` folder.

    Raises:
      DataError: the file is missing, unreadable or malformed, or a row lacks a prompt or a
        response; a parquet file or a folder without the ``generate`` extra installed.
    """
    path = Path(path)
    source = str(path)
    if path.is_dir():
        rows = _read_hf_folder(path, split, source)
    elif not path.is_file():
        raise DataError(f"{source}: file not found")
    elif path.suffix.lower() == ".parquet":
        rows = _read_parquet(path, source)
    elif path.suffix.lower() in (".jsonl", ".json", ".csv"):
        try:
            content = path.read_text(encoding="utf-8-sig")
        except UnicodeDecodeError as error:
            raise DataError(f"{source}: not valid UTF-8 ({error})") from error
        rows = _read_csv(content, source) if path.suffix.lower() == ".csv" else _read_json(content, source)
    else:
        raise DataError(f"{source}: unknown file extension {path.suffix!r}; expected .jsonl, .json, .csv, "
                        ".parquet or a datasets folder")
    return from_records(rows, prompt_key=prompt_key, response_key=response_key, label_key=label_key,
                        label_names=label_names, source=source)


def folder_splits(path: str | Path) -> tuple[str, ...]:
    """The splits of a ``datasets`` ``DatasetDict`` folder (its ``dataset_dict.json``); ``()`` for
    anything else."""
    index = Path(path) / "dataset_dict.json"
    if not index.is_file():
        return ()
    try:
        splits = json.loads(index.read_text(encoding="utf-8")).get("splits", [])
    except (OSError, ValueError, AttributeError):
        return ()
    return tuple(s for s in splits if isinstance(s, str)) if isinstance(splits, list) else ()


def format_prompt(backbone: Backbone, prompt: str) -> list[int]:
    """The token ids a decoder reads before its response: the tokenizer's chat template (one
    user turn, then the assistant's turn opened) where it has one, else ``prompt + "\\n"``
    tokenized with the tokenizer's special tokens. Prompts are first cut to
    :func:`~fedprompt.wire.limits.max_text_chars` of 1,024 tokens."""
    tok = _tokenizer(backbone)
    prompt = prompt[: max_text_chars(1024)]
    if getattr(tok, "chat_template", None):
        try:
            ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                          tokenize=True)
        except ImportError:
            raise DataError(f"the tokenizer of {backbone.name!r} has a chat template, which needs jinja2: "
                            "pip install 'fedprompt[generate]'") from None
        ids = ids["input_ids"] if isinstance(ids, Mapping) else ids
        return [int(t) for t in ids]
    return [int(t) for t in tok(prompt + "\n")["input_ids"]]


def encode_instructions(
    backbone: Backbone, ds: datasets.TextDataset, max_length: int, num_virtual: int = 0
) -> dict[str, np.ndarray]:
    """The training columns of instruction data for :class:`~fedprompt.tasks.CausalLM`.

    Each row is the formatted prompt (:func:`format_prompt`), the response's tokens and the
    end-of-text token, right-padded to ``max_length``; ``loss_mask`` is 1 on the response and
    end-of-text tokens. A row too long keeps the end of its prompt and as much of its
    response as fits in ``max_length`` beside at least half of that much prompt, or all of the
    prompt when it is shorter.

    Returns:
      ``input_ids``, ``attention_mask``, ``loss_mask`` ``[N, max_length]`` int32 and
      ``labels`` ``[N]`` (the groups).
    """
    if ds.responses is None:
        raise DataError("encode_instructions needs instruction data (a data set with responses)")
    backbone.check_sequence(max_length, num_virtual)
    tok = _tokenizer(backbone)
    eos = tok.eos_token_id
    n = len(ds)
    ids = np.zeros((n, max_length), np.int32)
    if tok.pad_token_id is not None:
        ids[:] = tok.pad_token_id
    attention = np.zeros((n, max_length), np.int32)
    loss = np.zeros((n, max_length), np.int32)
    limit = max_text_chars(max_length)
    for row, (prompt, response) in enumerate(zip(ds.texts, ds.responses)):
        head = format_prompt(backbone, prompt)
        tail = [int(t) for t in tok(response[:limit], add_special_tokens=False)["input_ids"]]
        tail += [] if eos is None else [int(eos)]
        keep = min(len(tail), max(max_length - len(head), max_length - max_length // 2))
        tail = tail[:keep]
        head = head[-(max_length - len(tail)):] if max_length > len(tail) else []
        tokens = head + tail
        ids[row, : len(tokens)] = tokens
        attention[row, : len(tokens)] = 1
        loss[row, len(head) : len(tokens)] = 1
    return {"input_ids": ids, "attention_mask": attention, "loss_mask": loss,
            "labels": np.asarray(ds.labels, np.int32)}


# ---------------------------------------------------------------------------------------


def _tokenizer(backbone: Backbone) -> Any:
    if backbone.tokenizer is None:
        raise DataError(f"backbone {backbone.name!r} has no tokenizer to encode text with")
    return backbone.tokenizer


def _string(record: Mapping[str, Any], key: str, where: str) -> str:
    if key not in record:
        raise DataError(f"{where}: missing key {key!r}")
    value = record[key]
    if value is None:
        raise DataError(f"{where}: {key!r} is null; expected a string")
    if not isinstance(value, str):
        raise DataError(f"{where}: {key!r} must be a string, got {type(value).__name__}")
    if not value.strip():
        raise DataError(f"{where}: empty {key!r}")
    return value


def _read_json(content: str, source: str) -> list[Any]:
    if content.lstrip().startswith("["):
        try:
            records = json.loads(content)
        except json.JSONDecodeError as error:
            raise DataError(f"{source}, line {error.lineno}: bad JSON ({error.msg})") from error
        return list(records)
    return [datasets._parse_json_line(line, source, number)
            for number, line in enumerate(content.splitlines(), 1) if line.strip()]


def _read_csv(content: str, source: str) -> list[dict[str, Any]]:
    reader = csv.DictReader(io.StringIO(content, newline=""))
    try:
        return [{k: v for k, v in row.items() if k is not None and v is not None} for row in reader]
    except csv.Error as error:
        raise DataError(f"{source}, line {reader.line_num}: bad CSV ({error})") from error


def _read_parquet(path: Path, source: str) -> list[dict[str, Any]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{source}: reading parquet needs pyarrow: pip install 'fedprompt[generate]'") from None
    try:
        return pq.read_table(path).to_pylist()
    except Exception as error:  # noqa: BLE001 - pyarrow raises many kinds for a bad file
        raise DataError(f"{source}: not a readable parquet file ({error})") from None


def _read_hf_folder(path: Path, split: str, source: str) -> list[dict[str, Any]]:
    try:
        import datasets as hf_datasets
    except ImportError:
        raise DataError(f"{source}: a datasets folder needs the `datasets` package: "
                        "pip install 'fedprompt[generate]'") from None
    try:
        loaded = hf_datasets.load_from_disk(str(path))
    except Exception as error:  # noqa: BLE001 - datasets raises many kinds for a bad folder
        raise DataError(f"{source}: not a folder saved by datasets' save_to_disk ({error})") from None
    if isinstance(loaded, hf_datasets.DatasetDict):
        if split not in loaded:
            raise DataError(f"{source}: the DatasetDict has no split {split!r} (it has {', '.join(loaded)})")
        loaded = loaded[split]
    return loaded.to_list()
