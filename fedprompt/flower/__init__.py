"""Federated prompt tuning over Flower: a ClientApp and a ServerApp over the same pure functions.

The Flower apps run the federation :func:`fedprompt.simulate` runs in one process, one client
per SuperNode: the same :class:`~fedprompt.simulation.engine.FederatedSimulation` (client
sampling, per-client PRNG keys, initial state), the same client update
(:func:`~fedprompt.client.federated.make_client_update`), the same wire codec
(:mod:`fedprompt.wire.codec`) and the same server round (:mod:`fedprompt.server.rounds`). The
frozen backbone never leaves a node: every message carries the codec's bytes of the global
prompt state (server to client) or of one client's update (client to server).

* :mod:`fedprompt.flower.client_app`: ``app``, the ``ClientApp``
  (``fedprompt.flower.client_app:app``).
* :mod:`fedprompt.flower.server_app`: ``app``, the ``ServerApp``
  (``fedprompt.flower.server_app:app``).
* :mod:`fedprompt.flower.common`: settings from the Flower run and node configs, the federation
  both apps build from them, and the message layout.
* :mod:`fedprompt.flower.credentials`: ``python -m fedprompt.flower.credentials``, the CA, the
  SuperLink's TLS certificate and the SuperNodes' authentication keys of a deployment with TLS
  and SuperNode authentication, and the ``client-keys`` setting that binds clients to node keys.

A runnable app with its step-by-step deployment is in ``examples/flower_app``. Flower is an
optional dependency: ``pip install "fedprompt[flower]"``.
"""

try:
    import flwr  # noqa: F401
except ImportError as err:  # pragma: no cover - depends on the installed extras
    raise ImportError(
        "fedprompt.flower needs Flower: install it with `pip install \"fedprompt[flower]\"` (flwr==1.42.0)"
    ) from err
