"""Pallas kernels, installed as ``fedprompt.kernels``.

Each kernel sits beside a pure-jnp reference and is selected with ``implementation="xla" |
"pallas"`` (``"xla"``, the reference, is the default: on a CPU the Pallas kernels run only in
interpret mode). Every entry point takes ``interpret=`` to run the Pallas kernel through the
interpreter. The folder is mapped into the package by ``pyproject.toml`` and is never installed
as a top-level ``kernels`` module (that name belongs to another package).

* :mod:`~fedprompt.kernels.aggregate`: fused per-client norm clipping, weighting and sum of
  stacked client updates (:func:`clipped_weighted_sum`, :func:`make_clipped_mean`), and the
  server's default mean in one pass (:func:`clipped_mean_of_finite`).
* :mod:`~fedprompt.kernels.robust`: coordinate-wise median and trimmed mean over the client
  axis (:func:`coordinate_median`, :func:`trimmed_mean`, :func:`make_median`,
  :func:`make_trimmed_mean`).
* :mod:`~fedprompt.kernels.quantize`: int8 / int4 quantization with per-block scales and
  stochastic rounding, wire payloads (:func:`compress`, :func:`decompress`) and client error
  feedback (:func:`error_feedback`).

The package exports the functions; ``fedprompt.kernels.quantize`` is therefore the function.
Import from a submodule with ``from fedprompt.kernels.quantize import compress``.
"""

from fedprompt.kernels.aggregate import (
    client_sq_norms,
    clip_scales,
    clipped_mean_of_finite,
    clipped_mean_of_finite_host,
    clipped_mean_of_finite_reference,
    clipped_weighted_sum,
    clipped_weighted_sum_reference,
    copy_row,
    make_clipped_mean,
    weighted_sum,
    weighted_sum_reference,
)
from fedprompt.kernels.quantize import (
    COMPRESSION_KINDS,
    ErrorFeedback,
    ErrorFeedbackState,
    QuantizedBlocks,
    compress,
    decompress,
    dequantize,
    dequantize_reference,
    error_feedback,
    pack_int4,
    payload_template,
    quantize,
    quantize_reference,
    unpack_int4,
)
from fedprompt.kernels.robust import (
    bitonic_sort_rows,
    coordinate_median,
    coordinate_median_reference,
    make_median,
    make_trimmed_mean,
    trimmed_mean,
    trimmed_mean_reference,
)

__all__ = [
    "COMPRESSION_KINDS",
    "ErrorFeedback",
    "ErrorFeedbackState",
    "QuantizedBlocks",
    "bitonic_sort_rows",
    "client_sq_norms",
    "clip_scales",
    "clipped_mean_of_finite",
    "clipped_mean_of_finite_host",
    "clipped_mean_of_finite_reference",
    "clipped_weighted_sum",
    "clipped_weighted_sum_reference",
    "copy_row",
    "compress",
    "coordinate_median",
    "coordinate_median_reference",
    "decompress",
    "dequantize",
    "dequantize_reference",
    "error_feedback",
    "make_clipped_mean",
    "make_median",
    "make_trimmed_mean",
    "pack_int4",
    "payload_template",
    "quantize",
    "quantize_reference",
    "trimmed_mean",
    "trimmed_mean_reference",
    "unpack_int4",
    "weighted_sum",
    "weighted_sum_reference",
]
