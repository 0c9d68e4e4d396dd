"""One round of secure aggregation as both runtimes run it: what a client masks, what the server publishes.

The protocol itself (key agreement, Shamir shares, masks) is :mod:`fedprompt.privacy.secagg`;
the in-process simulation drives all its parties in one process, a Flower deployment drives one
party per SuperNode over messages. Around it, both make the same two calls:

* :meth:`SecureRound.client_input` (on the client): with central DP, clip the update to the DP
  clip (the server can no longer clip what it cannot see); flatten it and quantize it to the
  ring, clipped per coordinate to ``clip_range`` (the DP clip, or the secure aggregation's own
  range). Rounding is to nearest, so the unmasked sum is exactly the sum of the quantized inputs.
* :meth:`SecureRound.publish` (on the server): the unmasked ring sum back to floats, then the
  uniform mean over the survivors (example weights would reveal more than the sum), or with
  central DP the DP-FedAvg release: Gaussian noise ``N(0, (z C)^2)`` on the sum, divided by the
  fixed denominator ``clients_per_round``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np

from fedprompt.privacy import dp, secagg

Pytree = Any

BITS = 32
"""The ring ``Z_{2^32}`` both runtimes use."""


@dataclasses.dataclass(frozen=True)
class SecureRound:
    """The numbers of one secure-aggregation round of ``n`` clients.

    Attributes:
      n: the clients in the protocol (the round's sampled clients that are there to start it).
      t: the Shamir threshold.
      clip_range: the per-coordinate range of the quantized inputs.
      scale: the quantization scale (:func:`~fedprompt.privacy.secagg.scale_for`).
      dp_clip: the central-DP L2 clip of each update, None without central DP.
      noise_multiplier: central DP's ``z`` (0 without).
    """

    n: int
    t: int
    clip_range: float
    scale: float
    dp_clip: float | None = None
    noise_multiplier: float = 0.0

    @classmethod
    def of(cls, n: int, settings: Any, privacy: Any) -> SecureRound:
        """The round for ``n`` clients, a plan's ``secagg`` settings and its resolved ``privacy``."""
        central = privacy.mode == "central"
        clip_range = privacy.config.clip if central else settings.clip_range
        return cls(n=n, t=settings.resolved_threshold(n), clip_range=clip_range,
                   scale=secagg.scale_for(n, clip_range, BITS), dp_clip=clip_range if central else None,
                   noise_multiplier=privacy.noise_multiplier if central else 0.0)

    def client_input(self, payload: Pytree) -> tuple[np.ndarray, secagg.TreeSpec]:
        """A client's update as ring elements (and the tree it was flattened from)."""
        if self.dp_clip is not None:
            payload = jax.device_get(dp.clip_update(payload, self.dp_clip)[0])
        vector, spec = secagg.flatten_tree(payload)
        return secagg.quantize(vector, clip_range=self.clip_range, scale=self.scale, bits=BITS), spec

    def publish(
        self, total: np.ndarray, spec: secagg.TreeSpec, survivors: int, *, clients_per_round: int, key: jax.Array
    ) -> tuple[Pytree, dict[str, Any]]:
        """The mean update the server may release from the unmasked sum of ``survivors`` inputs,
        and the round's metrics. ``key`` draws central DP's noise."""
        summed = secagg.unflatten_tree(secagg.dequantize(total, scale=self.scale, bits=BITS), spec)
        metrics: dict[str, Any] = {"secagg_threshold": self.t}
        if self.dp_clip is None:
            return jax.tree.map(lambda x: x / survivors, summed), metrics
        mean = dp.privatize_sum(key, summed, clip=self.dp_clip, noise_multiplier=self.noise_multiplier,
                                denominator=float(clients_per_round))
        metrics.update({"dp_clip": self.dp_clip, "dp_noise_std": self.noise_multiplier * self.dp_clip})
        return mean, metrics
