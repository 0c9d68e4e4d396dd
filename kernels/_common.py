"""Shared helpers of the kernels: implementation choice and block sizes."""

from __future__ import annotations

from typing import Literal

from fedprompt.errors import ConfigError

Implementation = Literal["xla", "pallas"]
IMPLEMENTATIONS = ("xla", "pallas")

# Bytes of one input block a kernel program holds (double-buffered by the pipeline): small
# enough for TPU VMEM and GPU shared memory, large enough to amortize the per-program cost.
BLOCK_BYTES = 1 << 20


def check_implementation(implementation: str) -> None:
    if implementation not in IMPLEMENTATIONS:
        raise ConfigError(f"implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")


def floor_pow2(n: int) -> int:
    """The largest power of two ``<= n`` (at least 1)."""
    return 1 << max(int(n), 1).bit_length() - 1


def next_pow2(n: int) -> int:
    """The smallest power of two ``>= n`` (at least 1)."""
    n = int(n)
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def column_block(rows: int, columns: int, *, itemsize: int = 4, block_bytes: int = BLOCK_BYTES) -> int:
    """Width of a ``[rows, width]`` block over ``columns``: a power of two in [128, 4096] that keeps
    the block under ``block_bytes``, or all ``columns`` when they fit in one such block."""
    width = min(4096, max(128, floor_pow2(block_bytes // max(rows * itemsize, 1))))
    return columns if columns <= width else width
