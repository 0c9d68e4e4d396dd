"""Text classification data sets: the packaged WordNet set and loaders for user data.

A :class:`TextDataset` is an immutable list of texts with integer class labels and the
names of the classes. Data sets come from

* :func:`load_wordnet_supersenses`: the built-in set shipped with the package, WordNet 3.0
  noun definitions labelled with one of 26 noun supersenses (``noun.animal``, ...), with a
  fixed train/test split (see :mod:`fedprompt.data.build_wordnet`);
* :func:`load_text_file`: a user's ``.jsonl`` / ``.json`` or ``.csv`` file;
* :func:`from_lists`: Python lists already in memory.

Malformed input of any kind raises :class:`fedprompt.errors.DataError`, with a message
naming the file, the line and the problem. A data set has at most
:data:`fedprompt.wire.limits.MAX_CLASSES` (65,536) classes, checked before the class table is
built, and at least two when the classes are inferred from the labels.
"""

from __future__ import annotations

import csv
import dataclasses
import gzip
import importlib.resources
import io
import json
import numbers
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fedprompt.errors import ConfigError, DataError
from fedprompt.wire.limits import MAX_CLASSES, check_class_count

__all__ = [
    "TextDataset",
    "from_lists",
    "load_text_file",
    "load_wordnet_supersenses",
    "train_test_split",
]

WORDNET_RESOURCE = "wordnet/wordnet_supersenses.jsonl.gz"

_JSON_SUFFIXES = (".jsonl", ".json")
_CSV_SUFFIXES = (".csv",)
_INTEGER_LITERAL = re.compile(r"[+-]?\d+")


@dataclasses.dataclass(frozen=True, eq=False, repr=False)
class TextDataset:
    """An immutable text classification data set.

    Attributes:
        texts: The examples' texts.
        labels: Class index of each example, int32, shape ``(len(texts),)``, read-only.
        label_names: Name of each class; ``labels`` index into it.
        responses: Instruction data only (:mod:`fedprompt.data.instructions`): each example's
            response, the text a decoder learns to write after its prompt (``texts``); the
            labels then only group the examples (for partitions), ``("all",)`` when the data
            has no group column. None for classification data.

    Equality and hashing are by identity (the labels are an array).
    """

    texts: tuple[str, ...]
    labels: np.ndarray
    label_names: tuple[str, ...]
    responses: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        texts = tuple(self.texts)
        label_names = tuple(self.label_names)
        labels = np.array(self.labels, dtype=np.int64, copy=True)
        if labels.size == 0:
            labels = labels.reshape(0)
        if labels.ndim != 1 or labels.shape[0] != len(texts):
            raise DataError(
                f"labels must have shape ({len(texts)},) to match the texts, got {labels.shape}"
            )
        if not all(isinstance(text, str) for text in texts):
            raise DataError("every text must be a str")
        if not label_names or not all(isinstance(name, str) for name in label_names):
            raise DataError("label_names must be a non-empty sequence of str")
        if len(set(label_names)) != len(label_names):
            raise DataError(f"label_names has duplicates: {label_names}")
        if labels.size and (labels.min() < 0 or labels.max() >= len(label_names)):
            raise DataError(
                f"labels must lie in [0, {len(label_names)}), got range "
                f"[{labels.min()}, {labels.max()}]"
            )
        labels = labels.astype(np.int32)
        labels.setflags(write=False)
        if self.responses is not None:
            responses = tuple(self.responses)
            if len(responses) != len(texts) or not all(isinstance(r, str) for r in responses):
                raise DataError(f"responses must be {len(texts)} str, one per text")
            object.__setattr__(self, "responses", responses)
        object.__setattr__(self, "texts", texts)
        object.__setattr__(self, "labels", labels)
        object.__setattr__(self, "label_names", label_names)

    def __len__(self) -> int:
        return len(self.texts)

    def __repr__(self) -> str:
        kind = "" if self.responses is None else ", instructions"
        return f"TextDataset(num_examples={len(self)}, num_labels={self.num_labels}{kind})"

    @property
    def num_labels(self) -> int:
        """Number of classes (including classes with no examples here)."""
        return len(self.label_names)

    def subset(self, indices: Sequence[int] | np.ndarray) -> TextDataset:
        """Returns the examples at ``indices``, in that order, with the same label names.

        Args:
            indices: Integer positions, or a boolean mask of length ``len(self)``.

        Returns:
            A new data set.

        Raises:
            IndexError: An index is out of range or the mask has the wrong length.
        """
        index = np.asarray(indices)
        if index.dtype == np.bool_:
            if index.shape != (len(self),):
                raise IndexError(f"boolean mask has shape {index.shape}, expected ({len(self)},)")
            index = np.flatnonzero(index)
        elif index.size == 0:
            index = np.zeros(0, dtype=np.int64)
        elif not np.issubdtype(index.dtype, np.integer):
            raise IndexError(f"indices must be integers or a boolean mask, got {index.dtype}")
        index = index.reshape(-1)
        labels = self.labels[index]  # raises IndexError for out-of-range positions
        return TextDataset(
            texts=tuple(self.texts[i] for i in index.tolist()),
            labels=labels,
            label_names=self.label_names,
            responses=None if self.responses is None else tuple(self.responses[i] for i in index.tolist()),
        )

    def label_histogram(self) -> np.ndarray:
        """Returns the number of examples of each class, shape ``(num_labels,)``, int64."""
        return np.bincount(self.labels, minlength=self.num_labels).astype(np.int64)


def load_wordnet_supersenses() -> tuple[TextDataset, TextDataset]:
    """Loads the packaged WordNet 3.0 noun-supersense data set.

    About 80,000 noun definitions, each labelled with one of 26 supersenses; the split
    (about 80% train, 20% test) is fixed by a hash of each text. Derived from WordNet 3.0,
    (c) Princeton University; see ``data/WORDNET_LICENSE.txt`` beside the data file.

    Returns:
        ``(train, test)``, sharing the same sorted ``label_names``.

    Raises:
        DataError: The data file is missing from the installed package or malformed.
    """
    resource = importlib.resources.files("fedprompt.data").joinpath(WORDNET_RESOURCE)
    try:
        raw = resource.read_bytes()
    except (FileNotFoundError, NotADirectoryError) as error:
        raise DataError(
            f"packaged data file {WORDNET_RESOURCE} not found; the package was installed "
            "without its data (package-data for fedprompt.simulation)"
        ) from error
    source = f"fedprompt.simulation/{WORDNET_RESOURCE}"
    splits: dict[str, list[tuple[str, str, Any]]] = {"train": [], "test": []}
    for line_number, line in enumerate(gzip.decompress(raw).decode("utf-8").splitlines(), 1):
        record = _parse_json_line(line, source, line_number)
        split = record.get("split")
        if split not in splits:
            raise DataError(f"{source}, line {line_number}: unknown split {split!r}")
        where = f"{source}, line {line_number}"
        splits[split].append(_item(record, "text", "label", where))
    label_names = sorted({label for items in splits.values() for _, _, label in items})
    train = _assemble(splits["train"], label_names, source)
    test = _assemble(splits["test"], label_names, source)
    return train, test


def load_text_file(
    path: str | Path,
    *,
    text_key: str = "text",
    label_key: str = "label",
    label_names: Sequence[str] | None = None,
) -> TextDataset:
    """Loads a text classification data set from a file.

    Formats, by extension:

    * ``.jsonl`` / ``.json``: one JSON object per line (blank lines are skipped); a
      ``.json`` file holding a single JSON array of objects is read too.
    * ``.csv``: comma-separated with a header row naming the columns.

    Labels may be strings or integers, but not both in one file. Integer labels are class
    indices below 65,536 (:data:`~fedprompt.wire.limits.MAX_CLASSES`); their names are
    ``"0"``..``"K-1"`` (K = largest label + 1) unless ``label_names`` is given. String labels
    map to their sorted unique values (at most 65,536 of them), or to their positions in
    ``label_names`` when it is given. Classes inferred from the labels must be at least two.
    CSV has no types: a label column whose
    every value is a base-10 integer is read as integer indices, unless ``label_names``
    contains every one of those values, in which case they are names.

    Args:
        path: The file to read (UTF-8).
        text_key: Key (JSON) or column (CSV) holding the text.
        label_key: Key or column holding the label.
        label_names: The classes, in index order; by default inferred from the labels.

    Returns:
        The data set, in file order.

    Raises:
        DataError: The file is missing, has an unknown extension, holds no examples, or a
            line has bad JSON, a missing key, a null or non-string text, an empty text, a
            label of the wrong type, labels of mixed types, or a label not in
            ``label_names``; or the labels make more than 65,536 classes, or (inferred)
            only one.
    """
    path = Path(path)
    source = str(path)
    names = _check_label_names(label_names, source)
    suffix = path.suffix.lower()
    if suffix not in _JSON_SUFFIXES + _CSV_SUFFIXES:
        raise DataError(
            f"{source}: unknown file extension {path.suffix!r}; expected .jsonl, .json or .csv"
        )
    if not path.is_file():
        raise DataError(f"{source}: file not found")
    try:
        content = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as error:
        raise DataError(f"{source}: not valid UTF-8 ({error})") from error
    if suffix in _CSV_SUFFIXES:
        items = _read_csv(content, source, text_key, label_key, names)
    else:
        items = _read_json(content, source, text_key, label_key)
    return _assemble(items, names, source)


def from_lists(
    texts: Sequence[str],
    labels: Sequence[str | int] | np.ndarray,
    label_names: Sequence[str] | None = None,
) -> TextDataset:
    """Builds a data set from Python sequences, with the same checks as :func:`load_text_file`.

    Args:
        texts: The examples' texts.
        labels: One label per text: all strings (class names) or all integers (indices).
        label_names: The classes, in index order; by default inferred from the labels.

    Returns:
        The data set.

    Raises:
        DataError: Lengths differ, there are no examples, a text is empty, or a label is of
            the wrong type, of a different type from the others, or not in ``label_names``.
    """
    source = "in-memory data"
    names = _check_label_names(label_names, source)
    if isinstance(texts, str) or isinstance(labels, str):
        raise DataError(f"{source}: texts and labels must be sequences, not a single str")
    texts = list(texts)
    labels = list(labels.tolist() if isinstance(labels, np.ndarray) else labels)
    if len(texts) != len(labels):
        raise DataError(f"{source}: {len(texts)} texts but {len(labels)} labels")
    items = [
        (f"{source}, item {i}", text, label) for i, (text, label) in enumerate(zip(texts, labels))
    ]
    return _assemble(items, names, source)


def train_test_split(
    ds: TextDataset, test_fraction: float = 0.2, seed: int = 0
) -> tuple[TextDataset, TextDataset]:
    """Splits a data set at random into train and test parts.

    The same data set, fraction and seed always give the same split. Each part keeps the
    original order of its examples and the full ``label_names``.

    Args:
        ds: The data set to split.
        test_fraction: Share of examples for the test part, in (0, 1); the test part gets
            ``round(len(ds) * test_fraction)`` examples.
        seed: Seed of the numpy ``Generator`` whose permutation picks the test examples.

    Returns:
        ``(train, test)``.

    Raises:
        ConfigError: ``test_fraction`` is not strictly between 0 and 1.
        DataError: ``ds`` is too small for both parts to get at least one example.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ConfigError(f"test_fraction must lie strictly between 0 and 1, got {test_fraction}")
    num_test = int(round(len(ds) * test_fraction))
    if not 0 < num_test < len(ds):
        raise DataError(
            f"cannot split {len(ds)} examples with test_fraction={test_fraction}: "
            f"one part would be empty"
        )
    permutation = np.random.default_rng(seed).permutation(len(ds))
    test_index = np.sort(permutation[:num_test])
    train_index = np.sort(permutation[num_test:])
    return ds.subset(train_index), ds.subset(test_index)


# ---------------------------------------------------------------------------------------
# Reading and validation helpers.


def _check_label_names(label_names: Sequence[str] | None, source: str) -> tuple[str, ...] | None:
    """Validates user-given label names: a non-empty sequence of distinct strings."""
    if label_names is None:
        return None
    if isinstance(label_names, str):
        raise DataError(f"{source}: label_names must be a sequence of str, not a single str")
    names = tuple(label_names)
    if not names or not all(isinstance(name, str) and name for name in names):
        raise DataError(f"{source}: label_names must be non-empty strings, got {names!r}")
    if len(set(names)) != len(names):
        raise DataError(f"{source}: label_names has duplicates: {names!r}")
    check_class_count(len(names), what=f"{source}: label_names makes", error=DataError)
    return names


def _parse_json_line(line: str, source: str, line_number: int) -> dict[str, Any]:
    """Parses one JSON-lines line into an object."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise DataError(f"{source}, line {line_number}: bad JSON ({error.msg})") from error
    if not isinstance(record, dict):
        raise DataError(
            f"{source}, line {line_number}: expected a JSON object, got {type(record).__name__}"
        )
    return record


def _require(record: dict[str, Any], key: str, where: str, expected: str) -> Any:
    """Returns ``record[key]``, or raises a DataError naming the missing key or its null value."""
    if key not in record:
        raise DataError(f"{where}: missing key {key!r}")
    if record[key] is None:
        raise DataError(f"{where}: {key!r} is null; expected {expected}")
    return record[key]


def _item(
    record: dict[str, Any], text_key: str, label_key: str, where: str
) -> tuple[str, Any, Any]:
    """Returns the ``(where, text, label)`` item of one record."""
    text = _require(record, text_key, where, "a string")
    return where, text, _require(record, label_key, where, "a string or an integer")


def _read_json(
    content: str, source: str, text_key: str, label_key: str
) -> list[tuple[str, Any, Any]]:
    """Reads JSON lines (or one JSON array of objects) into ``(where, text, label)`` items."""
    if content.lstrip().startswith("["):
        try:
            records = json.loads(content)
        except json.JSONDecodeError as error:
            raise DataError(f"{source}, line {error.lineno}: bad JSON ({error.msg})") from error
        items = []
        for i, record in enumerate(records):
            where = f"{source}, item {i}"
            if not isinstance(record, dict):
                raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
            items.append(_item(record, text_key, label_key, where))
        return items
    items = []
    for line_number, line in enumerate(content.splitlines(), 1):
        if not line.strip():
            continue
        record = _parse_json_line(line, source, line_number)
        where = f"{source}, line {line_number}"
        items.append(_item(record, text_key, label_key, where))
    return items


def _read_csv(
    content: str,
    source: str,
    text_key: str,
    label_key: str,
    label_names: tuple[str, ...] | None,
) -> list[tuple[str, Any, Any]]:
    """Reads CSV with a header row into ``(where, text, label)`` items."""
    reader = csv.DictReader(io.StringIO(content, newline=""))
    try:
        header = reader.fieldnames
        if header is None:
            return []
        for key in (text_key, label_key):
            if key not in header:
                raise DataError(f"{source}, line 1: missing column {key!r} in header {header}")
        items = []
        for row in reader:  # DictReader skips blank lines
            where = f"{source}, line {reader.line_num}"
            present = {key: value for key, value in row.items() if value is not None}  # a short row lacks keys
            items.append(_item(present, text_key, label_key, where))
    except csv.Error as error:
        raise DataError(f"{source}, line {reader.line_num}: bad CSV ({error})") from error
    raw_labels = [label.strip() for _, _, label in items]
    all_integers = bool(raw_labels) and all(_INTEGER_LITERAL.fullmatch(v) for v in raw_labels)
    names_cover_all = label_names is not None and set(raw_labels) <= set(label_names)
    if all_integers and not names_cover_all:
        return [(where, text, int(label)) for (where, text, _), label in zip(items, raw_labels)]
    return [(where, text, label) for (where, text, _), label in zip(items, raw_labels)]


def _label_kind(label: Any) -> str | None:
    """Returns ``"int"`` or ``"str"`` for a valid label type, else ``None``."""
    if isinstance(label, str):
        return "str"
    if isinstance(label, numbers.Integral) and not isinstance(label, (bool, np.bool_)):
        return "int"
    return None


def _assemble(
    items: Iterable[tuple[str, Any, Any]],
    label_names: Sequence[str] | None,
    source: str,
) -> TextDataset:
    """Validates ``(where, text, label)`` items and maps labels to class indices."""
    items = list(items)
    if not items:
        raise DataError(f"{source}: no examples (empty file or data)")
    first_kind = first_where = None
    for where, text, label in items:
        if not isinstance(text, str):
            raise DataError(f"{where}: text must be a string, got {type(text).__name__}")
        if not text.strip():
            raise DataError(f"{where}: empty text")
        kind = _label_kind(label)
        if kind is None:
            raise DataError(
                f"{where}: label must be a string or an integer, "
                f"got {type(label).__name__} {label!r}"
            )
        if first_kind is None:
            first_kind, first_where = kind, where
        elif kind != first_kind:
            raise DataError(
                f"{where}: mixed label types: {label!r} is {kind} but the first label "
                f"({first_where}) is {first_kind}"
            )
        if kind == "str" and not label.strip():
            raise DataError(f"{where}: empty label")
        if kind == "int" and label < 0:
            raise DataError(f"{where}: negative label {label}")

    if first_kind == "int":
        values = [int(label) for _, _, label in items]
        if label_names is None:
            largest = max(values)
            if largest >= MAX_CLASSES:
                where = next(where for (where, _, _), value in zip(items, values) if value == largest)
                raise DataError(
                    f"{where}: label {largest} is too large: integer labels are class indices below "
                    f"{MAX_CLASSES} (the most classes a data set may have); write the labels as strings (they "
                    "are then mapped to their sorted distinct values) or give label_names"
                )
            names = tuple(str(i) for i in range(largest + 1))
        else:
            names = tuple(label_names)
            for (where, _, _), value in zip(items, values):
                if value >= len(names):
                    raise DataError(
                        f"{where}: label {value} is out of range for {len(names)} label_names"
                    )
        indices = values
    else:
        if label_names is None:
            names = tuple(sorted({label for _, _, label in items}))
            check_class_count(len(names), what=f"{source}: the distinct labels make", error=DataError)
        else:
            names = tuple(label_names)
        position = {name: i for i, name in enumerate(names)}
        indices = []
        for where, _, label in items:
            if label not in position:
                raise DataError(f"{where}: label {label!r} is not in label_names {names!r}")
            indices.append(position[label])
    if label_names is None and len(names) < 2:
        raise DataError(
            f"{source}: only one distinct label ({items[0][2]!r}); a classification data set needs at least two "
            "(give label_names to declare the others)"
        )
    return TextDataset(
        texts=tuple(text for _, text, _ in items),
        labels=np.asarray(indices, dtype=np.int32),
        label_names=names,
    )
