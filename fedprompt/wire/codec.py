"""A msgpack codec for pytrees of arrays sent between clients and server.

A message is one msgpack map, made only of plain msgpack types (no extension types)::

    {"format": "fedprompt.wire", "version": 1,
     "kind": "update",            # what the message is: "prompt", "update", "control", ...
     "round": 3,                  # the federated round it belongs to, or nil
     "fingerprint": "9f2c...",    # the backbone's fingerprint, or nil
     "meta": {...},               # free-form plain data (str keys), or nil
     "tree": <node>}

A tree node is a map with string keys (a dict), an array of nodes (a list or tuple), nil
(``None``, an empty subtree as in JAX) or a leaf. A leaf is the map
``{"dtype": "float32", "shape": [20, 384], "data": <bin>}`` with the array's bytes in C order,
little-endian. A map is a leaf exactly when its ``"data"`` value is binary: a dict node's
values are nodes, never binary, so the two cannot be confused. Tuples (NamedTuples included)
come back as lists; :func:`check_template` rebuilds the containers of the tree the receiver
expects.

:func:`decode` treats its input as hostile. Before msgpack builds anything, it walks the
encoding and refuses messages over ``max_bytes``, extension types, nesting deeper than
:data:`MAX_DEPTH`, more objects than :func:`fedprompt.wire.limits.max_wire_objects` allows
for the message's size, and containers whose declared lengths the remaining bytes cannot
back (so a few bytes can never make msgpack reserve megabytes). It then refuses duplicate
map keys, non-finite floats in ``meta``, dtypes outside :data:`ALLOWED_DTYPES`, malformed
shapes and data whose length is not ``prod(shape) * itemsize``. Every bad input raises
:class:`fedprompt.errors.WireError`, and nothing else; decoding takes at most a few times the
message's size in memory.

Example:
  >>> import numpy as np
  >>> data = encode({"prompt": np.zeros((20, 384), np.float32)}, kind="update", round=1)
  >>> message = decode(data)
  >>> message.kind, message.round, message.tree["prompt"].shape
  ('update', 1, (20, 384))
  >>> len(data) - 20 * 384 * 4 < 300
  True
"""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping
from typing import Any, NamedTuple

import ml_dtypes
import msgpack
import numpy as np

from fedprompt.errors import WireError
from fedprompt.wire.limits import max_wire_objects

__all__ = [
    "ALLOWED_DTYPES",
    "DEFAULT_MAX_BYTES",
    "FORMAT",
    "MAX_DEPTH",
    "VERSION",
    "Message",
    "check_message",
    "check_template",
    "decode",
    "encode",
    "encoded_size",
    "object_count",
]

FORMAT = "fedprompt.wire"
VERSION = 1

DEFAULT_MAX_BYTES = 64 * 1024 * 1024
"""The largest message :func:`decode` accepts unless told otherwise (64 MiB)."""

MAX_DEPTH = 32
"""The deepest nesting of containers allowed in a tree, and in ``meta``."""

MAX_NDIM = 32
"""The most dimensions a leaf may have."""

MAX_DIM = 2**31 - 1
"""The largest size of one dimension of a leaf."""

MAX_STR_LEN = 1024 * 1024
"""The longest string (a key, a dtype, a meta value) :func:`decode` accepts."""

MAX_CONTAINER_LEN = 65536
"""The most entries in one msgpack map or array."""

ALLOWED_DTYPES: dict[str, np.dtype] = {
    dtype.name: dtype
    for dtype in map(
        np.dtype,
        [
            np.bool_,
            np.int8,
            np.int16,
            np.int32,
            np.int64,
            np.uint8,
            np.uint16,
            np.uint32,
            np.uint64,
            np.float16,
            np.float32,
            np.float64,
            ml_dtypes.bfloat16,
        ],
    )
}
"""The dtypes a leaf may have, by name (``np.dtype(...).name``)."""

FLOAT_DTYPE_NAMES = frozenset({"float16", "bfloat16", "float32", "float64"})

_HEADER_KEYS = ("format", "version", "kind", "round", "fingerprint", "meta", "tree")
_LEAF_KEYS = frozenset({"dtype", "shape", "data"})
_MIN_INT = -(2**63)
_MAX_UINT = 2**64 - 1

Path = tuple[str | int, ...]


class Message(NamedTuple):
    """A decoded message.

    Attributes:
        kind: What the message is (``"prompt"``, ``"update"``, ``"control"``, ...).
        round: The federated round it belongs to, or ``None``.
        fingerprint: The fingerprint of the backbone it was made for, or ``None``.
        meta: Free-form plain data (str keys), or ``None``.
        tree: The pytree: dicts, lists, ``None`` and numpy arrays (writable, owned copies).
    """

    kind: str
    round: int | None
    fingerprint: str | None
    meta: dict[str, Any] | None
    tree: Any


# ----------------------------------------------------------------------------- encoding


def encode(
    tree: Any,
    *,
    kind: str,
    round: int | None = None,  # noqa: A002 - the wire field's name
    fingerprint: str | None = None,
    meta: Mapping[str, Any] | None = None,
) -> bytes:
    """Encodes a pytree of arrays as a message.

    Args:
        tree: Nested dicts (str keys), lists and tuples, with array leaves (numpy or JAX
            arrays, or anything ``np.asarray`` takes) of a dtype in :data:`ALLOWED_DTYPES`.
            ``None`` is an empty subtree.
        kind: What the message is, a non-empty string.
        round: The federated round, a non-negative int, or ``None``.
        fingerprint: The backbone's fingerprint, or ``None``.
        meta: Plain data (str keys; None, bool, int, finite float, str, bytes, lists and
            dicts of them; numpy scalars are converted), or ``None``.

    Returns:
        The msgpack bytes.

    Raises:
        WireError: A key is not a string, a leaf cannot be converted or has a dtype that is
            not allowed, the nesting is too deep, a float in ``meta`` is NaN or infinite, or a
            header field is malformed.
    """
    message = {
        "format": FORMAT,
        "version": VERSION,
        "kind": _checked_kind(kind),
        "round": _checked_round(round),
        "fingerprint": _checked_fingerprint(fingerprint),
        "meta": _checked_meta(meta),
        "tree": _encode_node(tree, ()),
    }
    return msgpack.packb(message, use_bin_type=True)


def encoded_size(tree: Any, **kwargs: Any) -> int:
    """The size in bytes of ``encode(tree, **kwargs)``: what a run counts as sent on the wire."""
    return len(encode(tree, **kwargs))


def object_count(data: bytes | bytearray | memoryview) -> int:
    """The number of msgpack objects (containers and scalars) in an encoded message, counted
    without building any (what :func:`decode`'s ``max_objects`` compares against).

    Raises:
        WireError: As :func:`decode` does for a malformed or oversized encoding.
    """
    return _check_structure(memoryview(data).cast("B"))


def _encode_node(node: Any, path: Path) -> Any:
    if len(path) > MAX_DEPTH:
        raise WireError(f"{_where(path)}: the tree is nested deeper than {MAX_DEPTH} levels")
    if node is None:
        return None
    if isinstance(node, Mapping):
        for key in node:
            if not isinstance(key, str):
                raise WireError(f"{_where(path)}: dict keys must be str, got {key!r}")
        return {key: _encode_node(child, (*path, key)) for key, child in node.items()}
    if isinstance(node, (list, tuple)):
        return [_encode_node(child, (*path, index)) for index, child in enumerate(node)]
    return _encode_leaf(node, path)


def _encode_leaf(value: Any, path: Path) -> dict[str, Any]:
    try:
        array = np.asarray(value)
    except Exception as exc:  # any conversion failure is a bad leaf
        raise WireError(f"{_where(path)}: cannot convert a {type(value).__name__} to an array: {exc}") from exc
    allowed = ALLOWED_DTYPES.get(array.dtype.name)
    if allowed is None or array.dtype.newbyteorder("=") != allowed:
        raise WireError(f"{_where(path)}: dtype {array.dtype} is not allowed (allowed: {', '.join(ALLOWED_DTYPES)})")
    return {"dtype": allowed.name, "shape": list(array.shape), "data": _little_endian_bytes(array)}


def _little_endian_bytes(array: np.ndarray) -> bytes:
    native = array.astype(array.dtype.newbyteorder("="), copy=False)
    if sys.byteorder == "big":
        native = native.byteswap()
    return native.tobytes(order="C")


def _plain_meta(value: Any, path: Path) -> Any:
    """``value`` as plain msgpack data; numpy scalars become Python scalars, tuples lists."""
    if len(path) > MAX_DEPTH + 1:
        raise WireError(f"{_where(path)}: meta is nested deeper than {MAX_DEPTH} levels")
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        raise WireError(f"{_where(path)}: {value} is not finite; meta holds finite numbers only")
    if value is None or isinstance(value, (bool, float, str, bytes)):
        return value
    if isinstance(value, int):
        if not _MIN_INT <= value <= _MAX_UINT:
            raise WireError(f"{_where(path)}: the int {value} does not fit in 64 bits")
        return value
    if isinstance(value, Mapping):
        for key in value:
            if not isinstance(key, str):
                raise WireError(f"{_where(path)}: meta keys must be str, got {key!r}")
        return {key: _plain_meta(child, (*path, key)) for key, child in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain_meta(child, (*path, index)) for index, child in enumerate(value)]
    raise WireError(f"{_where(path)}: a {type(value).__name__} is not plain data (use str, int, float, ...)")


def _checked_meta(meta: Any) -> dict[str, Any] | None:
    if meta is None:
        return None
    if not isinstance(meta, Mapping):
        raise WireError(f"meta must be a dict or None, got {type(meta).__name__}")
    return _plain_meta(meta, ("meta",))


def _checked_kind(kind: Any) -> str:
    if not isinstance(kind, str) or not kind:
        raise WireError(f"kind must be a non-empty str, got {kind!r}")
    return kind


def _checked_round(round_: Any) -> int | None:
    if round_ is None:
        return None
    if isinstance(round_, np.integer):
        round_ = int(round_)
    if type(round_) is not int or not 0 <= round_ <= _MAX_UINT:
        raise WireError(f"round must be a non-negative int or None, got {round_!r}")
    return round_


def _checked_fingerprint(fingerprint: Any) -> str | None:
    if fingerprint is not None and not isinstance(fingerprint, str):
        raise WireError(f"fingerprint must be a str or None, got {type(fingerprint).__name__}")
    return fingerprint


# ----------------------------------------------------------------------------- decoding


def decode(
    data: bytes | bytearray | memoryview,
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
    writable: bool = True,
    max_objects: int | None = None,
) -> Message:
    """Decodes and checks a message from another party.

    Args:
        data: The message's bytes.
        max_bytes: The largest message accepted.
        writable: Whether the leaves are writable copies (default) or read-only arrays over
            the decoder's own buffers, which saves one copy of every leaf.
        max_objects: The most msgpack objects accepted, below what the message's size allows
            (:func:`~fedprompt.wire.limits.max_wire_objects`): a receiver that knows what it
            expects (:func:`object_count` of a template) refuses a message of many small
            objects before msgpack builds any. None: the size's allowance only.

    Returns:
        The :class:`Message`; its tree's leaves are numpy arrays, owned and writable unless
        ``writable`` is False.

    Raises:
        WireError: For any bad input: too large, not msgpack, extension types, nesting deeper
            than :data:`MAX_DEPTH`, too many objects for its size, a container longer than
            the bytes left, a duplicate map key, a missing or unexpected header field, a wrong
            format or version, a non-finite float in ``meta``, a dtype outside
            :data:`ALLOWED_DTYPES`, a malformed shape, or data whose length is not
            ``prod(shape) * itemsize``. The message names the leaf's path.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise WireError(f"a message must be bytes, got {type(data).__name__}")
    size = memoryview(data).nbytes
    if size > max_bytes:
        raise WireError(f"the message is {size} bytes, over the limit of {max_bytes}")
    view = memoryview(data)
    if not view.c_contiguous:
        raise WireError("a message must be contiguous bytes")
    _check_structure(view.cast("B"), max_objects)
    raw = _unpack(data, max_bytes)
    return _parse_message(raw, writable)


def _refuse_ext(code: int, data: bytes) -> Any:
    raise WireError(f"msgpack extension types are not allowed (got type {code})")


def _unique_map(pairs: list[tuple[Any, Any]]) -> dict[Any, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):
        seen: set[Any] = set()
        duplicate = next(key for key, _ in pairs if key in seen or seen.add(key))
        raise WireError(f"a map has the key {_short(duplicate)} more than once")
    return result


# The encoded size of each msgpack format's length field (str, bin, array, map) or payload
# (fixed-size scalars), by first byte; see the msgpack specification.
_FIXED_PAYLOAD = {0xC0: 0, 0xC2: 0, 0xC3: 0, 0xCA: 4, 0xCB: 8, 0xCC: 1, 0xCD: 2, 0xCE: 4, 0xCF: 8,
                  0xD0: 1, 0xD1: 2, 0xD2: 4, 0xD3: 8}
_SIZED_PAYLOAD = {0xC4: 1, 0xC5: 2, 0xC6: 4, 0xD9: 1, 0xDA: 2, 0xDB: 4}
_CONTAINERS = {0xDC: (2, 1), 0xDD: (4, 1), 0xDE: (2, 2), 0xDF: (4, 2)}  # length bytes, entries per item
_EXTENSIONS = frozenset({0xC7, 0xC8, 0xC9, 0xD4, 0xD5, 0xD6, 0xD7, 0xD8})
_MAX_NESTING = MAX_DEPTH + 4  # the message map, the tree or meta map, a leaf map and its shape


def _check_structure(data: memoryview, max_objects: int | None = None) -> int:
    """Walks a msgpack encoding without building any object, before msgpack does.

    Refuses truncated data, trailing bytes, extension types, nesting deeper than the tree
    allows, more objects than :func:`~fedprompt.wire.limits.max_wire_objects` allows, and
    container lengths that the bytes left cannot back: every entry takes at least one byte,
    so the entries still owed by all open containers may never exceed the bytes left. That
    bounds what msgpack reserves for declared lengths by the message's own size.
    """
    size = len(data)
    budget = max_wire_objects(size)
    expected = max_objects is not None and max_objects < budget
    if expected:
        budget = max_objects
    pending: list[int] = []  # entries still owed by each open container, innermost last
    owed = 0  # their sum
    pos = objects = 0
    while True:
        if pos >= size:
            raise WireError(f"not a valid msgpack message: truncated at byte {pos}")
        objects += 1
        if objects > budget:
            if expected:
                raise WireError(f"too many msgpack objects: more than the {budget} this receiver expects")
            raise WireError(f"the message holds more than {budget} msgpack objects, too many for its {size} bytes")
        first = data[pos]
        pos += 1
        entries = 0
        if first <= 0x7F or first >= 0xE0:
            pass
        elif first <= 0x8F:
            entries = 2 * (first & 0x0F)
        elif first <= 0x9F:
            entries = first & 0x0F
        elif first <= 0xBF:
            pos += first & 0x1F
        elif first in _FIXED_PAYLOAD:
            pos += _FIXED_PAYLOAD[first]
        elif first in _SIZED_PAYLOAD:
            width = _SIZED_PAYLOAD[first]
            pos += width + int.from_bytes(data[pos : pos + width], "big")
        elif first in _CONTAINERS:
            width, per_item = _CONTAINERS[first]
            entries = per_item * int.from_bytes(data[pos : pos + width], "big")
            pos += width
        elif first in _EXTENSIONS:
            raise WireError(f"msgpack extension types are not allowed (byte {pos - 1})")
        else:
            raise WireError(f"not a valid msgpack message: byte {pos - 1} is 0x{first:02x}, which msgpack never uses")
        if pos > size:
            raise WireError(f"not a valid msgpack message: an object at byte {pos - 1} runs past the end")
        if pending:
            pending[-1] -= 1
            owed -= 1
        if entries:
            if owed + entries > size - pos:
                raise WireError(
                    f"a msgpack container at byte {pos} declares {entries} entries, more than the {size - pos} bytes left can hold"
                )
            if len(pending) >= _MAX_NESTING:
                raise WireError(f"the message is nested deeper than {MAX_DEPTH} levels")
            pending.append(entries)
            owed += entries
        while pending and pending[-1] == 0:
            pending.pop()
        if not pending:
            break
    if pos != size:
        raise WireError(f"not a valid msgpack message: {size - pos} bytes after the end of the message")
    return objects


def _unpack(data: bytes | bytearray | memoryview, max_bytes: int) -> Any:
    try:
        return msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=True,
            use_list=True,
            object_pairs_hook=_unique_map,
            ext_hook=_refuse_ext,
            max_bin_len=max_bytes,
            max_str_len=min(max_bytes, MAX_STR_LEN),
            max_array_len=MAX_CONTAINER_LEN,
            max_map_len=MAX_CONTAINER_LEN,
            max_ext_len=0,
        )
    except WireError:
        raise
    except Exception as exc:  # msgpack raises several types (ValueError, StackError, ...)
        raise WireError(f"not a valid msgpack message: {type(exc).__name__}: {exc}") from exc


def _parse_message(raw: Any, writable: bool) -> Message:
    if not isinstance(raw, dict):
        raise WireError(f"a message must be a msgpack map, got {_type_name(raw)}")
    missing = [key for key in _HEADER_KEYS if key not in raw]
    unexpected = [key for key in raw if key not in _HEADER_KEYS]
    if missing or unexpected:
        raise WireError(f"message fields: missing {missing}, unexpected {unexpected}")
    if raw["format"] != FORMAT:
        raise WireError(f"not a {FORMAT} message (format {_short(raw['format'])})")
    if type(raw["version"]) is not int or raw["version"] != VERSION:
        raise WireError(f"unsupported message version {_short(raw['version'])} (this reads version {VERSION})")
    meta = raw["meta"]
    if meta is not None:
        if not isinstance(meta, dict):
            raise WireError(f"meta must be a map or nil, got {_type_name(meta)}")
        _plain_meta(meta, ("meta",))
    return Message(
        kind=_checked_kind(raw["kind"]),
        round=_checked_round(raw["round"]),
        fingerprint=_checked_fingerprint(raw["fingerprint"]),
        meta=meta,
        tree=_decode_node(raw["tree"], (), writable),
    )


def _decode_node(node: Any, path: Path, writable: bool) -> Any:
    if len(path) > MAX_DEPTH:
        raise WireError(f"{_where(path)}: the tree is nested deeper than {MAX_DEPTH} levels")
    if node is None:
        return None
    if isinstance(node, list):
        return [_decode_node(child, (*path, index), writable) for index, child in enumerate(node)]
    if isinstance(node, dict):
        if isinstance(node.get("data"), bytes):
            return _decode_leaf(node, path, writable)
        for key in node:
            if not isinstance(key, str):
                raise WireError(f"{_where(path)}: map keys must be str, got {_short(key)}")
        return {key: _decode_node(child, (*path, key), writable) for key, child in node.items()}
    raise WireError(f"{_where(path)}: expected a map, an array or nil, got {_type_name(node)}")


def _decode_leaf(node: dict[Any, Any], path: Path, writable: bool) -> np.ndarray:
    where = _where(path)
    if set(node) != _LEAF_KEYS:
        raise WireError(f"{where}: a leaf has exactly the keys dtype, shape, data; got {sorted(map(repr, node))}")
    dtype = _decode_dtype(node["dtype"], where)
    shape = _decode_shape(node["shape"], where)
    data: bytes = node.pop("data")  # freed as soon as the array no longer needs it
    expected = math.prod(shape) * dtype.itemsize
    if len(data) != expected:
        raise WireError(
            f"{where}: {len(data)} data bytes, expected {expected} for {dtype.name} of shape {tuple(shape)}"
        )
    try:
        array = np.frombuffer(data, dtype=dtype).reshape(shape)
    except (ValueError, OverflowError) as exc:
        raise WireError(f"{where}: cannot build an array of shape {tuple(shape)}: {exc}") from exc
    if sys.byteorder == "big":
        return array.byteswap()  # a copy, in native order
    return array.copy() if writable else array


def _decode_dtype(name: Any, where: str) -> np.dtype:
    if not isinstance(name, str) or name not in ALLOWED_DTYPES:
        raise WireError(f"{where}: dtype {_short(name)} is not allowed (allowed: {', '.join(ALLOWED_DTYPES)})")
    return ALLOWED_DTYPES[name]


def _decode_shape(shape: Any, where: str) -> list[int]:
    if not isinstance(shape, list) or len(shape) > MAX_NDIM:
        raise WireError(f"{where}: a shape is an array of at most {MAX_NDIM} ints, got {_short(shape)}")
    for dim in shape:
        if type(dim) is not int or not 0 <= dim <= MAX_DIM:
            raise WireError(f"{where}: shape {_short(shape)} has a dimension that is not an int in [0, {MAX_DIM}]")
    return shape


# ----------------------------------------------------------------------------- checking


def check_message(
    message: Message,
    *,
    kind: str | None = None,
    round: int | None = None,  # noqa: A002 - the wire field's name
    fingerprint: str | None = None,
) -> Message:
    """Checks a decoded message's header against what the receiver expects.

    Each argument that is not ``None`` must equal the message's field.

    Returns:
        The message, unchanged.

    Raises:
        WireError: Naming the first field that differs.
    """
    expected = {"kind": kind, "round": round, "fingerprint": fingerprint}
    for field, value in expected.items():
        if value is not None and getattr(message, field) != value:
            raise WireError(f"expected {field} {value!r}, the message has {_short(getattr(message, field))}")
    return message


def check_template(tree: Any, template: Any, *, finite: bool = True) -> Any:
    """Checks a decoded tree against the tree the receiver expects.

    The tree must have the template's structure (the same dict keys, the same sequence
    lengths, ``None`` where the template has ``None``), and each leaf the template leaf's shape
    and dtype; floating-point leaves must be finite. Lists and tuples match each other.

    Args:
        tree: A decoded tree (see :func:`decode`).
        template: A pytree of arrays, or of anything with ``.shape`` and ``.dtype`` (such as
            ``jax.ShapeDtypeStruct``): dicts, lists, tuples and NamedTuples.
        finite: False leaves the finiteness check to the caller (a server that squares every
            value anyway: a sum of squares is finite only if every value is).

    Returns:
        The tree in the template's containers: NamedTuples and tuples are rebuilt and dict
        keys come in the template's order. Leaves are the tree's arrays, unchanged.

    Raises:
        WireError: Naming the leaf path and the problem (missing or unexpected keys, wrong
            length, shape or dtype, non-finite values).

    Example:
      >>> import numpy as np
      >>> template = {"w": np.zeros((2, 3), np.float32)}
      >>> check_template({"w": np.ones((2, 3), np.float32)}, template)["w"].shape
      (2, 3)
    """
    return _match(tree, template, (), finite)


def _match(node: Any, ref: Any, path: Path, finite: bool = True) -> Any:
    where = _where(path)
    if ref is None:
        if node is not None:
            raise WireError(f"{where}: expected nothing (None), got {_type_name(node)}")
        return None
    if isinstance(ref, Mapping):
        if not isinstance(node, Mapping):
            raise WireError(f"{where}: expected a map with keys {sorted(ref)}, got {_type_name(node)}")
        missing = [key for key in ref if key not in node]
        unexpected = [key for key in node if key not in ref]
        if missing or unexpected:
            raise WireError(f"{where}: missing keys {missing}, unexpected keys {unexpected}")
        return {key: _match(node[key], ref[key], (*path, key), finite) for key in ref}
    if isinstance(ref, (list, tuple)):
        if not isinstance(node, (list, tuple)):
            raise WireError(f"{where}: expected a sequence of {len(ref)}, got {_type_name(node)}")
        if len(node) != len(ref):
            raise WireError(f"{where}: expected a sequence of {len(ref)}, got {len(node)} entries")
        names = getattr(ref, "_fields", range(len(ref)))
        children = [_match(child, sub, (*path, name), finite) for child, sub, name in zip(node, ref, names)]
        if hasattr(ref, "_fields"):
            return type(ref)(*children)
        return tuple(children) if isinstance(ref, tuple) else children
    return _match_leaf(node, ref, where, finite)


def _match_leaf(node: Any, ref: Any, where: str, finite: bool = True) -> Any:
    if not (hasattr(node, "shape") and hasattr(node, "dtype")):
        raise WireError(f"{where}: expected an array, got {_type_name(node)}")
    shape, dtype = _shape_and_dtype(ref)
    if tuple(node.shape) != shape:
        raise WireError(f"{where}: expected shape {shape}, got {node.shape}")
    if node.dtype != dtype:
        raise WireError(f"{where}: expected dtype {dtype.name}, got {node.dtype.name}")
    if finite and dtype.name in FLOAT_DTYPE_NAMES:
        bad = int(np.size(node) - np.count_nonzero(np.isfinite(node)))
        if bad:
            raise WireError(f"{where}: {bad} of {node.size} values are not finite (NaN or Inf)")
    return node


def _shape_and_dtype(ref: Any) -> tuple[tuple[int, ...], np.dtype]:
    if hasattr(ref, "shape") and hasattr(ref, "dtype"):
        return tuple(ref.shape), np.dtype(ref.dtype)
    array = np.asarray(ref)
    return array.shape, array.dtype


# ----------------------------------------------------------------------------- messages


def _where(path: Path) -> str:
    """A leaf path for error messages: ``prompt/embeddings``, ``layers/0/keys``."""
    return "/".join(str(part) for part in path) if path else "(root)"


def _type_name(value: Any) -> str:
    names = {dict: "a map", list: "an array", bytes: "binary", str: "a string", type(None): "nil"}
    return names.get(type(value), f"a {type(value).__name__}")


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
