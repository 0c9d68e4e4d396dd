"""Update compression: int8 / int4 quantization with per-block scales and stochastic rounding.

A tensor is flattened and cut into blocks of ``block_size`` values (the last one zero-padded).
Each block gets one float32 scale ``s = max|x| / q_max`` (``q_max`` = 127 for int8, 7 for
int4) and its values become integers ``q = R(x / s)`` in ``[-q_max, q_max]``:

* deterministic rounding, ``R = round`` (half to even): ``|x - s q| <= s / 2``;
* stochastic rounding (Gupta et al. 2015, "Deep Learning with Limited Numerical Precision";
  QSGD, Alistarh et al. 2017), ``R(y) = floor(y + u)`` with ``u ~ U[0, 1)`` drawn from a key:
  ``E[s q] = x`` (unbiased, so averaged client updates carry no rounding bias) and
  ``|x - s q| < s``. ``|y| <= q_max`` already, so no value is clipped.

int8 values are stored one per byte (``int8``); int4 values two per byte (``uint8``): within
each block, byte ``j`` holds value ``j`` in its low nibble and value ``j + block_size / 2`` in
its high nibble (two's complement), so packing reads two contiguous half blocks.

Error feedback (Seide et al. 2014, "1-Bit Stochastic Gradient Descent"; Karimireddy et al.
2019, "Error Feedback Fixes SignSGD"): a client adds the part of its previous updates that
compression lost to the next update before compressing, so the sum of what the server
receives tracks the sum of the true updates (:func:`error_feedback`).

:func:`compress` / :func:`decompress` turn a pytree into a wire payload (per leaf
``{"q": int8|uint8 [blocks, ...], "scale": float32 [blocks]}``) and back; the payload is
plain arrays, so :mod:`fedprompt.wire.codec` encodes it and the bytes counted are the real
ones. Kernels (quantize and dequantize, one program per group of blocks) sit beside the
pure-jnp references, which are the ``implementation="xla"`` default.

Example:
  >>> import jax, jax.numpy as jnp
  >>> tree = {"prompt": jnp.linspace(-1.0, 1.0, 300).reshape(20, 15)}
  >>> payload = compress(tree, "int4", jax.random.key(0))
  >>> payload["prompt"]["q"].dtype, payload["prompt"]["q"].shape, payload["prompt"]["scale"].shape
  (dtype('uint8'), (5, 32), (5,))
  >>> back = decompress(payload, tree, "int4")
  >>> bool(jnp.max(jnp.abs(back["prompt"] - tree["prompt"])) < 1.0 / 7)
  True
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from fedprompt.errors import ConfigError, InputError
from fedprompt.kernels._common import check_implementation, floor_pow2

Pytree = Any

__all__ = [
    "COMPRESSION_KINDS",
    "ErrorFeedback",
    "ErrorFeedbackState",
    "QuantizedBlocks",
    "compress",
    "decompress",
    "dequantize",
    "dequantize_reference",
    "error_feedback",
    "pack_int4",
    "payload_template",
    "quantize",
    "quantize_reference",
    "unpack_int4",
]

COMPRESSION_KINDS = {"int8": 8, "int4": 4}
"""Compression kinds and their bits per value."""

DEFAULT_BLOCK_SIZE = 64


class QuantizedBlocks(NamedTuple):
    """One quantized tensor: ``q`` int8 ``[blocks, block_size]`` (int4: uint8
    ``[blocks, block_size / 2]``, two values a byte) and float32 ``scale`` ``[blocks]``."""

    q: jax.Array
    scale: jax.Array


def _bits(kind_or_bits: str | int) -> int:
    if isinstance(kind_or_bits, str):
        if kind_or_bits not in COMPRESSION_KINDS:
            raise ConfigError(f"compression must be one of {sorted(COMPRESSION_KINDS)}, got {kind_or_bits!r}")
        return COMPRESSION_KINDS[kind_or_bits]
    if kind_or_bits not in (4, 8):
        raise ConfigError(f"bits must be 4 or 8, got {kind_or_bits}")
    return int(kind_or_bits)


def _qmax(bits: int) -> int:
    return (1 << (bits - 1)) - 1


def _check_block_size(block_size: int, bits: int) -> None:
    if block_size < 2 or block_size % 2:
        raise ConfigError(f"block_size must be an even number >= 2, got {block_size}")


def num_blocks(size: int, block_size: int) -> int:
    """Blocks of ``block_size`` values that hold ``size`` values (at least 1)."""
    return max(1, math.ceil(size / block_size))


def _as_blocks(x: jax.Array, block_size: int) -> jax.Array:
    flat = jnp.asarray(x).reshape(-1)
    nb = num_blocks(flat.size, block_size)
    pad = nb * block_size - flat.size
    return (jnp.pad(flat, (0, pad)) if pad else flat).reshape(nb, block_size)


def _noise(key: jax.Array | None, shape: tuple[int, ...]) -> jax.Array | None:
    return None if key is None else jax.random.uniform(key, shape, jnp.float32)


# ----------------------------------------------------------------------------- int4 packing


def pack_int4(q: jax.Array) -> jax.Array:
    """int values in [-8, 7], ``[blocks, B]`` -> uint8 ``[blocks, B/2]``: low nibble value ``j``,
    high nibble value ``j + B/2`` of each block."""
    half = q.shape[-1] // 2
    v = q.astype(jnp.int32)
    return ((v[..., :half] & 0xF) | ((v[..., half:] & 0xF) << 4)).astype(jnp.uint8)


def unpack_int4(packed: jax.Array) -> jax.Array:
    """uint8 ``[blocks, B/2]`` -> int8 ``[blocks, B]`` (inverse of :func:`pack_int4`)."""
    b = packed.astype(jnp.int32)
    lo, hi = b & 0xF, (b >> 4) & 0xF
    lo = lo - ((lo & 0x8) << 1)
    hi = hi - ((hi & 0x8) << 1)
    return jnp.concatenate([lo, hi], axis=-1).astype(jnp.int8)


# ----------------------------------------------------------------------------- references


def _quantize_blocks(blocks: jax.Array, noise: jax.Array | None, bits: int) -> tuple[jax.Array, jax.Array]:
    """``[rows, B]`` float -> (int32 values, float32 scale ``[rows, 1]``). Shared by both paths."""
    qmax = float(_qmax(bits))
    x = blocks.astype(jnp.float32)
    # A multiply by the rounded reciprocal, not a division: compilers may turn a division by a
    # constant into exactly this, so both paths are written the way every compiler keeps them.
    scale = jnp.max(jnp.abs(x), axis=-1, keepdims=True) * np.float32(1.0 / qmax)
    y = x / jnp.where(scale > 0, scale, 1.0)
    q = jnp.round(y) if noise is None else jnp.floor(y + noise)
    return jnp.clip(q, -qmax, qmax).astype(jnp.int32), scale


def quantize_reference(
    x: jax.Array, bits: int = 8, *, key: jax.Array | None = None, block_size: int = DEFAULT_BLOCK_SIZE
) -> QuantizedBlocks:
    """Quantize ``x`` (any shape, any float dtype) to ``bits`` with per-block scales (pure jnp).

    With ``key``, stochastic rounding with noise ``jax.random.uniform(key, [blocks, block_size])``;
    without, round to nearest.
    """
    bits = _bits(bits)
    _check_block_size(block_size, bits)
    blocks = _as_blocks(x, block_size)
    return _quantize_xla(blocks, _noise(key, blocks.shape), bits=bits)


@functools.partial(jax.jit, static_argnames=("bits",))
def _quantize_xla(blocks, noise, *, bits: int) -> QuantizedBlocks:
    q, scale = _quantize_blocks(blocks, noise, bits)
    q = pack_int4(q) if bits == 4 else q.astype(jnp.int8)
    return QuantizedBlocks(q, scale[:, 0])


def dequantize_reference(
    quantized: QuantizedBlocks, shape: tuple[int, ...], bits: int = 8, dtype: Any = jnp.float32
) -> jax.Array:
    """Back to an array of ``shape`` and ``dtype`` (pure jnp)."""
    bits = _bits(bits)
    q = unpack_int4(quantized.q) if bits == 4 else quantized.q
    values = q.astype(jnp.float32) * jnp.asarray(quantized.scale, jnp.float32)[:, None]
    size = int(np.prod(shape, dtype=np.int64))
    return values.reshape(-1)[:size].reshape(shape).astype(dtype)


# ----------------------------------------------------------------------------- Pallas kernels


def _quantize_kernel(*refs, bits: int, stochastic: bool):
    if stochastic:
        x_ref, noise_ref, q_ref, scale_ref = refs
        noise = noise_ref[...]
    else:
        x_ref, q_ref, scale_ref = refs
        noise = None
    q, scale = _quantize_blocks(x_ref[...], noise, bits)
    if bits == 4:
        half = q.shape[-1] // 2
        q_ref[...] = ((q[:, :half] & 0xF) | ((q[:, half:] & 0xF) << 4)).astype(jnp.uint8)
    else:
        q_ref[...] = q.astype(jnp.int8)
    scale_ref[...] = scale


def _dequantize_kernel(q_ref, scale_ref, out_ref, *, bits: int):
    scale = scale_ref[...]  # [rows, 1]
    if bits == 4:
        b = q_ref[...].astype(jnp.int32)
        half = b.shape[-1]
        lo, hi = b & 0xF, (b >> 4) & 0xF
        out_ref[:, :half] = (lo - ((lo & 0x8) << 1)).astype(jnp.float32) * scale
        out_ref[:, half:] = (hi - ((hi & 0x8) << 1)).astype(jnp.float32) * scale
    else:
        out_ref[...] = q_ref[...].astype(jnp.float32) * scale


def _row_block(rows: int, block_size: int) -> int:
    """Blocks per program: ~64K values, a power of two, or all rows when fewer."""
    per = max(8, floor_pow2(max(65536 // block_size, 1)))
    return rows if rows <= per else per


@functools.partial(jax.jit, static_argnames=("bits", "rows", "interpret"))
def _quantize_pallas(blocks, noise, *, bits: int, rows: int, interpret: bool):
    nb, block_size = blocks.shape
    width = block_size // 2 if bits == 4 else block_size
    spec = pl.BlockSpec((rows, block_size), lambda i: (i, 0))
    inputs = (blocks,) if noise is None else (blocks, noise)
    return pl.pallas_call(
        functools.partial(_quantize_kernel, bits=bits, stochastic=noise is not None),
        out_shape=(
            jax.ShapeDtypeStruct((nb, width), jnp.uint8 if bits == 4 else jnp.int8),
            jax.ShapeDtypeStruct((nb, 1), jnp.float32),
        ),
        grid=(pl.cdiv(nb, rows),),
        in_specs=[spec] * len(inputs),
        out_specs=(pl.BlockSpec((rows, width), lambda i: (i, 0)), pl.BlockSpec((rows, 1), lambda i: (i, 0))),
        interpret=interpret,
        name=f"fedprompt_quantize_int{bits}",
    )(*inputs)


@functools.partial(jax.jit, static_argnames=("bits", "rows", "interpret"))
def _dequantize_pallas(q, scale, *, bits: int, rows: int, interpret: bool):
    nb, width = q.shape
    block_size = 2 * width if bits == 4 else width
    return pl.pallas_call(
        functools.partial(_dequantize_kernel, bits=bits),
        out_shape=jax.ShapeDtypeStruct((nb, block_size), jnp.float32),
        grid=(pl.cdiv(nb, rows),),
        in_specs=[pl.BlockSpec((rows, width), lambda i: (i, 0)), pl.BlockSpec((rows, 1), lambda i: (i, 0))],
        out_specs=pl.BlockSpec((rows, block_size), lambda i: (i, 0)),
        interpret=interpret,
        name=f"fedprompt_dequantize_int{bits}",
    )(q, scale[:, None])


# ----------------------------------------------------------------------------- public entry points


def quantize(
    x: jax.Array,
    bits: int | str = 8,
    *,
    key: jax.Array | None = None,
    block_size: int = DEFAULT_BLOCK_SIZE,
    implementation: str = "xla",
    interpret: bool = False,
) -> QuantizedBlocks:
    """Quantize ``x`` to int8 or int4 with one float32 scale per ``block_size`` values.

    Args:
      x: any shape, any float dtype (flattened in C order).
      bits: 8 or 4 (or ``"int8"`` / ``"int4"``).
      key: stochastic rounding from this key (unbiased); None rounds to nearest.
      block_size: values per scale (even).
      implementation: ``"xla"`` (the reference) or ``"pallas"``.
      interpret: run the Pallas kernel in interpret mode (needed on CPU).
    """
    check_implementation(implementation)
    bits = _bits(bits)
    _check_block_size(block_size, bits)
    if implementation == "xla":
        return quantize_reference(x, bits, key=key, block_size=block_size)
    blocks = _as_blocks(x, block_size)
    q, scale = _quantize_pallas(
        blocks, _noise(key, blocks.shape), bits=bits, rows=_row_block(blocks.shape[0], block_size), interpret=interpret
    )
    return QuantizedBlocks(q, scale[:, 0])


def dequantize(
    quantized: QuantizedBlocks,
    shape: tuple[int, ...],
    bits: int | str = 8,
    dtype: Any = jnp.float32,
    *,
    implementation: str = "xla",
    interpret: bool = False,
) -> jax.Array:
    """Inverse of :func:`quantize`: an array of ``shape`` and ``dtype``."""
    check_implementation(implementation)
    bits = _bits(bits)
    if implementation == "xla":
        return dequantize_reference(quantized, shape, bits, dtype)
    q = jnp.asarray(quantized.q)
    values = _dequantize_pallas(
        q, jnp.asarray(quantized.scale, jnp.float32), bits=bits, rows=_row_block(q.shape[0], q.shape[1]), interpret=interpret
    )
    size = int(np.prod(shape, dtype=np.int64))
    return values.reshape(-1)[:size].reshape(shape).astype(dtype)


# ----------------------------------------------------------------------------- pytrees on the wire


def compress(
    tree: Pytree,
    kind: str = "int8",
    key: jax.Array | None = None,
    *,
    block_size: int = DEFAULT_BLOCK_SIZE,
    implementation: str = "xla",
    interpret: bool = False,
) -> Pytree:
    """A pytree of float arrays -> a wire payload: the same tree with every leaf replaced by
    ``{"q": int8 [blocks, block_size] | uint8 [blocks, block_size/2], "scale": float32 [blocks]}``.

    ``key`` (one per call; split over the leaves) turns on stochastic rounding.
    """
    bits = _bits(kind)
    leaves, treedef = jax.tree.flatten(tree)
    keys = [None] * len(leaves) if key is None else list(jax.random.split(key, max(len(leaves), 1)))
    out = []
    for leaf, k in zip(leaves, keys):
        q = quantize(leaf, bits, key=k, block_size=block_size, implementation=implementation, interpret=interpret)
        out.append({"q": q.q, "scale": q.scale})
    return jax.tree.unflatten(treedef, out)


def decompress(
    payload: Pytree,
    template: Pytree,
    kind: str = "int8",
    *,
    implementation: str = "xla",
    interpret: bool = False,
) -> Pytree:
    """A payload of :func:`compress` -> a pytree shaped like ``template`` (its shapes and dtypes).

    Raises:
      InputError: the payload's structure or a leaf's block count does not fit the template.
    """
    bits = _bits(kind)
    leaves, treedef = jax.tree.flatten(template)
    try:
        parts = treedef.flatten_up_to(payload)
    except (ValueError, TypeError) as err:
        raise InputError(f"the compressed payload does not match the template: {err}") from None
    out = []
    for leaf, part in zip(leaves, parts):
        if not isinstance(part, dict) or set(part) != {"q", "scale"}:
            raise InputError("every compressed leaf must be {'q': ..., 'scale': ...}")
        q, scale = jnp.asarray(part["q"]), jnp.asarray(part["scale"])
        if q.dtype != (jnp.uint8 if bits == 4 else jnp.int8) or scale.dtype != jnp.float32:
            raise InputError(f"compressed leaf has dtypes {q.dtype}/{scale.dtype}, expected {'uint8' if bits == 4 else 'int8'}/float32")
        shape = tuple(np.shape(leaf))
        width = q.shape[1] * (2 if bits == 4 else 1) if q.ndim == 2 else 0
        if q.ndim != 2 or scale.shape != (q.shape[0],) or q.shape[0] != num_blocks(int(np.prod(shape, dtype=np.int64)), max(width, 1)):
            raise InputError(f"compressed leaf of shape {q.shape} / scales {scale.shape} does not hold a {shape} tensor")
        dtype = getattr(leaf, "dtype", jnp.float32)
        out.append(dequantize(QuantizedBlocks(q, scale), shape, bits, dtype, implementation=implementation, interpret=interpret))
    return jax.tree.unflatten(treedef, out)


def payload_template(template: Pytree, kind: str = "int8", *, block_size: int = DEFAULT_BLOCK_SIZE) -> Pytree:
    """Zero arrays with the shapes and dtypes of ``compress(template, kind)``'s payload, for
    :func:`fedprompt.wire.codec.check_template` on the receiving side."""
    bits = _bits(kind)
    _check_block_size(block_size, bits)

    def leaf(x):
        nb = num_blocks(int(np.prod(np.shape(x), dtype=np.int64)), block_size)
        width = block_size // 2 if bits == 4 else block_size
        return {"q": np.zeros((nb, width), np.uint8 if bits == 4 else np.int8), "scale": np.zeros((nb,), np.float32)}

    return jax.tree.map(leaf, template)


# ----------------------------------------------------------------------------- error feedback


class ErrorFeedbackState(NamedTuple):
    """A client's compression residual: what compression has lost so far (float32, the update's shapes)."""

    residual: Pytree


class ErrorFeedback(NamedTuple):
    """``init(template) -> state`` and ``compress(update, state, key) -> (payload, state)``."""

    init: Callable[[Pytree], ErrorFeedbackState]
    compress: Callable[[Pytree, ErrorFeedbackState, jax.Array | None], tuple[Pytree, ErrorFeedbackState]]


def error_feedback(
    kind: str = "int8",
    *,
    block_size: int = DEFAULT_BLOCK_SIZE,
    implementation: str = "xla",
    interpret: bool = False,
) -> ErrorFeedback:
    """Compression with error feedback, for the client.

    ``compress(update, state, key)`` compresses ``update + state.residual`` and keeps, as the
    new residual, what the compressed payload does not carry. Pure and jittable.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> ef = error_feedback("int4")
      >>> state = ef.init({"w": jnp.zeros(8)})
      >>> payload, state = ef.compress({"w": jnp.full(8, 0.01)}, state, None)
    """
    bits = _bits(kind)
    _check_block_size(block_size, bits)

    def init(template: Pytree) -> ErrorFeedbackState:
        return ErrorFeedbackState(jax.tree.map(lambda x: jnp.zeros(np.shape(x), jnp.float32), template))

    def compress_with_feedback(update, state, key):
        corrected = jax.tree.map(lambda u, r: jnp.asarray(u, jnp.float32) + r, update, state.residual)
        payload = compress(corrected, kind, key, block_size=block_size, implementation=implementation, interpret=interpret)
        sent = decompress(payload, corrected, kind, implementation=implementation, interpret=interpret)
        return payload, ErrorFeedbackState(jax.tree.map(jnp.subtract, corrected, sent))

    return ErrorFeedback(init, compress_with_feedback)
