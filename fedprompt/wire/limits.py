"""Size limits for hostile input, checked before anything is allocated.

Every loader of outside input (wire messages, ``.fpp`` prompt artifacts, PEFT adapters, data
files, TOML configs, texts to tokenize) checks what the input *declares* (shapes, lengths,
counts, offsets) against what the input itself holds and against the caps below, and only
then allocates. So memory stays within a small factor of the input's size, and a bad input
raises the library's own error (a :class:`~fedprompt.errors.FedPromptError` subclass), never
numpy's ``MemoryError`` or a ``TypeError``.

==============================  ===============================================================
Cap                             Value
==============================  ===============================================================
declared tensors                must fit in the bytes of the input that holds them
                                (:func:`check_declared`, :func:`check_spans`)
:data:`MAX_CLASSES`             65,536 classes in a data file or a classification task
:data:`MAX_JSON_BYTES`          1 MiB for a JSON side file of a PEFT adapter
:data:`MAX_TOML_BYTES`          1 MiB for a TOML config file
:data:`TEXT_CHARS_PER_TOKEN`    a text is cut to ``16 * max_length + 256`` characters before it
                                is tokenized (:func:`max_text_chars`)
:func:`max_wire_objects`        ``65,536 + size // 32`` msgpack objects in a message of ``size``
                                bytes (the codec also bounds every container's declared length
                                by the bytes left to back it)
==============================  ===============================================================

Example:
  >>> from fedprompt.errors import ArtifactError
  >>> check_declared({"prompt/embeddings": TensorSpec((20, 384), "float32")}, 40_000, what="the content")
  30720
  >>> try:
  ...     check_declared({"w": TensorSpec((100_000, 100_000), "int8")}, 1_000, what="the content", error=ArtifactError)
  ... except ArtifactError as exc:
  ...     print(exc)
  the content declares 10000000000 values (w (100000, 100000)), at least 10000000000 bytes, but holds only 1000 bytes
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from fedprompt.errors import FedPromptError, WireError

__all__ = [
    "MAX_CLASSES",
    "MAX_JSON_BYTES",
    "MAX_TOML_BYTES",
    "TEXT_CHARS_PER_TOKEN",
    "TEXT_SLACK_CHARS",
    "TensorSpec",
    "check_class_count",
    "check_declared",
    "check_finite",
    "check_spans",
    "max_text_chars",
    "max_wire_objects",
    "read_bounded",
]

MAX_CLASSES = 65536
"""The most classes a data file or a classification task may have."""

MAX_JSON_BYTES = 1024 * 1024
"""The largest JSON side file (``adapter_config.json``, ``fedprompt_task.json``) read."""

MAX_TOML_BYTES = 1024 * 1024
"""The largest TOML config file read."""

TEXT_CHARS_PER_TOKEN = 16
"""Characters kept per token of ``max_length`` when a text is cut before tokenizing."""

TEXT_SLACK_CHARS = 256
"""Characters kept beyond ``TEXT_CHARS_PER_TOKEN * max_length`` (see :func:`max_text_chars`)."""

_WIRE_OBJECT_FLOOR = 65536
_WIRE_BYTES_PER_OBJECT = 32


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """A declared tensor: its shape and dtype, and nothing allocated.

    It has ``.shape`` and ``.dtype``, so it serves as a leaf of the template
    :func:`fedprompt.wire.codec.check_template` takes.
    """

    shape: tuple[int, ...]
    dtype: Any = np.float32

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.size * np.dtype(self.dtype).itemsize


def check_declared(
    declared: Mapping[str, TensorSpec],
    available: int,
    *,
    what: str,
    error: type[FedPromptError] = WireError,
    itemsize: int | None = None,
) -> int:
    """Checks that tensors an input declares fit in the bytes that input holds.

    A tensor stored in ``available`` bytes cannot have more than ``available / itemsize``
    values, so a declaration beyond that is refused before anything of that size exists.

    Args:
      declared: name -> declared shape and dtype (Python ints: no overflow).
      available: the bytes of the input that must hold them.
      what: the input, for the message (``"the artifact's content"``).
      error: the error to raise.
      itemsize: bytes per value when the tensors may be stored smaller than their dtype (the
        smallest storage; ``1`` for int8); default: each dtype's own.

    Returns:
      The declared bytes.

    Raises:
      error: the declared tensors need more bytes than ``available``.
    """
    values = sum(spec.size for spec in declared.values())
    needed = sum(spec.size * (itemsize or np.dtype(spec.dtype).itemsize) for spec in declared.values())
    if needed > available:
        shapes = ", ".join(f"{name} {tuple(spec.shape)}" for name, spec in declared.items())
        raise error(f"{what} declares {values} values ({shapes}), at least {needed} bytes, but holds only {available} bytes")
    return needed


def check_spans(
    spans: Sequence[tuple[str, int, int, int]],
    available: int,
    *,
    what: str,
    error: type[FedPromptError] = WireError,
) -> None:
    """Checks byte ranges a header declares, before any of them is read.

    Each span ``(name, begin, end, nbytes)`` must lie in ``[0, available]``, be exactly its
    tensor's declared ``nbytes`` long and overlap no other span; so the tensors together hold
    at most ``available`` bytes.

    Raises:
      error: naming the first span out of bounds, of the wrong length, or overlapping another.
    """
    for name, begin, end, nbytes in spans:
        if not 0 <= begin <= end <= available:
            raise error(f"{what}: {name!r} declares bytes [{begin}, {end}), outside the {available} bytes of data")
        if end - begin != nbytes:
            raise error(f"{what}: {name!r} declares {end - begin} bytes of data, but its shape and dtype need {nbytes}")
    ordered = sorted(spans, key=lambda span: (span[1], span[2]))
    for (first, _, end, _), (second, begin, _, _) in zip(ordered, ordered[1:]):
        if begin < end:
            raise error(f"{what}: {first!r} and {second!r} overlap (the same bytes may back one tensor only)")


def check_class_count(count: int, *, what: str, error: type[FedPromptError]) -> None:
    """Refuses more than :data:`MAX_CLASSES` classes (before a table of that many is built)."""
    if count > MAX_CLASSES:
        raise error(f"{what}: {count} classes, over the limit of {MAX_CLASSES}")


def check_finite(array: np.ndarray, *, what: str, error: type[FedPromptError], dtype: Any = np.float32) -> None:
    """Checks that a floating-point array is finite and stays finite once cast to ``dtype``.

    Raises:
      error: some values are NaN or infinite, or finite but beyond ``dtype``'s range (a float64
        value over float32's largest, say), which the cast would turn into infinities.
    """
    finite = np.isfinite(array)
    if not finite.all():
        bad = int(finite.size - np.count_nonzero(finite))
        raise error(f"{what}: {bad} of {array.size} values are not finite (NaN or Inf)")
    limit = float(ml_dtypes.finfo(dtype).max)
    if array.size and float(ml_dtypes.finfo(array.dtype).max) > limit:
        peak = float(np.max(np.abs(array)))
        if peak > limit:
            name = np.dtype(dtype).name
            raise error(f"{what}: values up to {peak:.3g} are out of the {name} range (largest {limit:.3g})")


def max_wire_objects(size: int) -> int:
    """The most msgpack objects (containers and scalars) a message of ``size`` bytes may hold.

    A decoded object costs Python about 50 to 80 bytes; one per 32 bytes of message (above a
    floor of 65,536) keeps a message of tiny objects to a few times its own size, while real
    messages (a handful of leaves, each a map around one binary) stay far below.
    """
    return _WIRE_OBJECT_FLOOR + size // _WIRE_BYTES_PER_OBJECT


def max_text_chars(max_length: int) -> int:
    """How many characters of a text are kept before tokenizing to ``max_length`` tokens.

    A token covers on average far fewer than 16 characters (about 4 in English), so the first
    ``max_length`` tokens of a normal text lie well inside the kept part and truncation gives
    the same tokens; only a text whose tokens average more than 16 characters (a run of
    thousands of spaces, a word of hundreds of letters) is cut sooner.
    """
    return TEXT_CHARS_PER_TOKEN * int(max_length) + TEXT_SLACK_CHARS


def read_bounded(
    path: str | os.PathLike[str],
    max_bytes: int,
    *,
    what: str,
    error: type[FedPromptError],
) -> bytes:
    """Reads a whole file of at most ``max_bytes`` bytes, refusing a larger one before reading it.

    Raises:
      error: the file is missing, unreadable or larger than ``max_bytes``.
    """
    path = Path(path)
    chunks: list[bytes] = []
    total = 0
    try:
        with open(path, "rb") as file:
            size = os.fstat(file.fileno()).st_size
            if size > max_bytes:
                raise error(f"{path}: the {what} is {size} bytes, over the limit of {max_bytes}")
            # Read what the file says it holds (a read of n bytes reserves n bytes first), then
            # on in growing chunks, for files that grow or do not know their size (pipes), up to
            # the cap.
            want, step = size + 1, 4096
            while chunk := file.read(want):
                chunks.append(chunk)
                total += len(chunk)
                if total > max_bytes:
                    raise error(f"{path}: the {what} is over the limit of {max_bytes} bytes")
                want, step = min(step, max_bytes + 1 - total), 2 * step
    except FileNotFoundError:
        raise error(f"{path}: the {what} does not exist") from None
    except OSError as exc:
        raise error(f"{path}: cannot read the {what}: {exc.strerror or exc}") from exc
    return b"".join(chunks)
