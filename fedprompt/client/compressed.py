"""Compressed client updates: int8 / int4 quantization of the update before it is sent.

The client trains exactly as without compression, then quantizes its update with per-block
scales and stochastic rounding (:mod:`fedprompt.kernels.quantize`; unbiased, so the server's
average carries no rounding bias) and sends the payload ``{"q", "scale"}`` per leaf: int8
values (one byte each) or int4 values (two a byte) and one float32 scale per block. The server
dequantizes every payload (``to_delta``) before aggregating. The wire codec encodes the payload
itself, so the bytes a run counts are the compressed ones.

With error feedback (Seide et al. 2014; Karimireddy et al. 2019, "Error Feedback Fixes
SignSGD and other Gradient Compression Schemes") the client adds what compression lost in its
previous rounds to the update before quantizing, and keeps the new loss as its state: the
residual arrives as ``client_control`` and leaves as ``ClientResult.control`` (the slot
SCAFFOLD uses for its client control variate, so the two cannot be combined), and the runtime
must store it per client between rounds.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from fedprompt.client.federated import ClientResult
from fedprompt.client.program import ClientProgram
from fedprompt.errors import ConfigError
from fedprompt.kernels.quantize import (
    COMPRESSION_KINDS,
    DEFAULT_BLOCK_SIZE,
    ErrorFeedbackState,
    compress,
    decompress,
)
from fedprompt.kernels.quantize import error_feedback as make_error_feedback

Pytree = Any

_ROUNDING_STREAM = 0x51A7  # folded into the client's key for the rounding noise


def compressed_program(
    client_update: Callable[..., ClientResult],
    kind: str = "int8",
    *,
    block_size: int = DEFAULT_BLOCK_SIZE,
    stochastic: bool = True,
    error_feedback: bool = False,
    implementation: str = "xla",
    interpret: bool = False,
):
    """Wrap a client update (e.g. :func:`~fedprompt.client.federated.make_client_update`'s)
    so that what it sends is a quantized payload.

    Args:
      client_update: the uncompressed update; its ``ClientResult.delta`` is compressed.
      kind: ``"int8"`` or ``"int4"``.
      block_size: values per float32 scale.
      stochastic: stochastic rounding (unbiased) from the client's key; False rounds to nearest.
      error_feedback: carry the compression residual in ``client_control`` /
        ``ClientResult.control`` (the runtime must keep it per client; not with SCAFFOLD).
      implementation, interpret: the quantization kernel (:func:`fedprompt.kernels.quantize`).

    Returns:
      a :class:`fedprompt.client.program.ClientProgram`; ``to_delta(global_params,
      payload)`` dequantizes on the server.
    """
    if kind not in COMPRESSION_KINDS:
        raise ConfigError(f"compress must be one of {sorted(COMPRESSION_KINDS)}, got {kind!r}")
    options = {"block_size": block_size, "implementation": implementation, "interpret": interpret}
    decode = {"implementation": implementation, "interpret": interpret}
    feedback = make_error_feedback(kind, **options) if error_feedback else None

    def update(global_params, weights, data, num_examples, key, control=None, client_control=None):
        # with error feedback, client_control is this program's residual, not the inner update's
        inner_control = None if error_feedback else client_control
        result = client_update(global_params, weights, data, num_examples, key, control, inner_control)
        rounding = jax.random.fold_in(key, _ROUNDING_STREAM) if stochastic else None
        if feedback is None:
            delta = jax.tree.map(lambda x: x.astype(jnp.float32), result.delta)
            return ClientResult(compress(delta, kind, rounding, **options), None, None, result.loss)
        payload, state = feedback.compress(result.delta, ErrorFeedbackState(client_control), rounding)
        return ClientResult(payload, None, state.residual, result.loss)

    def to_delta(global_params, payload):
        return decompress(payload, global_params, kind, **decode)

    return ClientProgram(update=update, to_delta=to_delta, client_state=error_feedback)
