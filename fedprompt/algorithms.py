"""Federated algorithm factories: ``fedprompt.algorithms.fedavg()``, ``fedadam()``, ...

See :mod:`fedprompt.server.algorithms` for what each one does.
"""

from fedprompt.server.algorithms import (
    ALGORITHMS,
    Algorithm,
    ServerState,
    fedadagrad,
    fedadam,
    fedavg,
    fedavgm,
    fedprox,
    fedyogi,
    from_name,
    scaffold,
)

__all__ = ["ALGORITHMS", "Algorithm", "ServerState", "fedadagrad", "fedadam", "fedavg", "fedavgm", "fedprox",
           "fedyogi", "from_name", "scaffold"]
