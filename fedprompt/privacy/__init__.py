"""Privacy for federated prompt tuning: differential privacy and secure aggregation.

* :mod:`fedprompt.privacy.dp`: DP-FedAvg (McMahan, Ramage, Talwar & Zhang 2018, "Learning
  Differentially Private Recurrent Language Models", ICLR): per-client L2 clipping of the
  update, Gaussian noise on the sum (central DP) or on every client's update (local DP), a
  fixed denominator; adaptive clipping (Andrew, Thakkar, McMahan & Ramaswamy 2021,
  "Differentially Private Learning with Adaptive Clipping", NeurIPS).
* :mod:`fedprompt.privacy.accounting`: epsilon at a given delta with Google's
  ``dp-accounting`` package (RDP or PLD accountant; Poisson or fixed-size client sampling), the
  noise multiplier for a target epsilon, and a per-round :class:`~fedprompt.privacy.accounting.PrivacyLedger`.
* :mod:`fedprompt.privacy.secagg`: secure aggregation (Bonawitz et al. 2017, "Practical Secure
  Aggregation for Privacy-Preserving Machine Learning", CCS): quantization to a ring, pairwise
  masks from X25519 key agreement, double masking, Shamir sharing of the mask keys and seeds so
  that dropped clients are recovered; the server learns only the sum.

The submodules are imported on their own (``from fedprompt.privacy import dp``): ``accounting``
needs ``dp-accounting`` and ``secagg`` needs ``cryptography``, and nothing here imports them
before they are used.
"""
