"""Aggregators of stacked client updates: ``fedprompt.aggregators.weighted_mean`` and friends.

See :mod:`fedprompt.server.aggregators`.
"""

from fedprompt.server.aggregators import (
    Aggregation,
    AggregationResult,
    bucket_size,
    finite_clients,
    pad_clients,
    stack_clients,
    weighted_mean,
)

__all__ = ["Aggregation", "AggregationResult", "bucket_size", "finite_clients", "pad_clients", "stack_clients",
           "weighted_mean"]
