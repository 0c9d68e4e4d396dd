"""Privacy accounting for DP-FedAvg with Google's ``dp-accounting`` package.

One round of central DP-FedAvg (:mod:`fedprompt.privacy.dp`) is a *sampled Gaussian mechanism*
over clients: a random subset of the clients is sampled, and the sum of their clipped updates
(norm at most ``C``) gets Gaussian noise of standard deviation ``z C``. ``rounds`` rounds are
the ``rounds``-fold composition (McMahan et al. 2018, "Learning Differentially Private
Recurrent Language Models"; the moments accountant of Abadi et al. 2016, which Renyi DP
(Mironov 2017) generalizes). This module builds that event with ``dp_accounting`` and asks one
of its accountants for epsilon at a given delta:

* ``sampling="poisson"``: every client joins a round independently with probability ``q``
  (``dp_accounting.PoissonSampledDpEvent(q, GaussianDpEvent(z))``), neighbouring data sets
  differ by adding or removing one client (``ADD_OR_REMOVE_ONE``): the sum's sensitivity is
  ``C``. Both accountants support it: ``"rdp"`` (``RdpAccountant``) and ``"pld"``
  (``PLDAccountant``, privacy loss distributions: tighter, slower).
* ``sampling="fixed"``: exactly ``cohort`` of ``population`` clients, uniformly without
  replacement, what :class:`~fedprompt.simulation.engine.FederatedSimulation` does
  (``dp_accounting.SampledWithoutReplacementDpEvent(population, cohort, GaussianDpEvent(z / 2))``).
  ``dp_accounting`` analyses this only under *replace-one* neighbours (``REPLACE_ONE``, the
  population size is public) and only with the RDP accountant (Wang, Balle & Kasiviswanathan
  2019, Theorem 27); its PLD accountant has no such event, and that combination raises
  :class:`~fedprompt.errors.ConfigError`. Replacing one client's clipped update by another
  changes the sum by up to ``2C``, while ``dp_accounting``'s formula for this event takes the
  noise multiplier relative to the *sensitivity* (its ``GaussianDpEvent`` docstring defines it
  relative to the norm bound ``C``, and the RDP accountant passes it through unchanged: see
  google/differential-privacy issue #378). So the Gaussian event is built with ``z / 2``: the
  noise relative to the replace-one sensitivity ``2C``. Without the halving epsilon would be
  underestimated.

Local DP (:func:`fedprompt.privacy.dp.local_privatize`) is accounted per client, without
amplification by sampling (the server sees who sent an update): a client that took part in
``r`` rounds has released ``r`` Gaussian mechanisms on a clipped update whose replace-one
sensitivity is ``2C`` (any update in the ball of radius ``C`` may replace any other), i.e.
``SelfComposedDpEvent(GaussianDpEvent(z / 2), r)``.

Example:
  >>> round(epsilon(1.0, 0.01, 1000, 1e-5, accountant="rdp", sampling="poisson"), 2)
  2.1
  >>> z = noise_multiplier_for_epsilon(2.0, 0.01, 1000, 1e-5)
  >>> 2.0 * 0.99 < epsilon(z, 0.01, 1000, 1e-5) <= 2.0
  True
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any, NamedTuple

import dp_accounting
import numpy as np
from dp_accounting.pld import pld_privacy_accountant
from dp_accounting.rdp import rdp_privacy_accountant

from fedprompt.errors import ConfigError

__all__ = [
    "PrivacyLedger",
    "dp_event",
    "epsilon",
    "local_epsilon",
    "make_accountant",
    "noise_multiplier_for_epsilon",
]

_ACCOUNTANTS = ("rdp", "pld")
_SAMPLINGS = ("poisson", "fixed")
_MODES = ("central", "local")


def _check(
    *, noise_multiplier: float, sample_rate: float | None, rounds: int, delta: float, accountant: str,
    sampling: str, population: int | None, cohort: int | None, mode: str,
) -> float | None:
    """Validates the arguments shared by the public functions; returns the sample rate used."""
    if mode not in _MODES:
        raise ConfigError(f"mode must be one of {', '.join(_MODES)}; got {mode!r}")
    if accountant not in _ACCOUNTANTS:
        raise ConfigError(f"accountant must be one of {', '.join(_ACCOUNTANTS)}; got {accountant!r}")
    if sampling not in _SAMPLINGS:
        raise ConfigError(f"sampling must be one of {', '.join(_SAMPLINGS)}; got {sampling!r}")
    if isinstance(noise_multiplier, bool) or not (isinstance(noise_multiplier, (int, float)) and noise_multiplier >= 0):
        raise ConfigError(f"noise_multiplier must be a number >= 0, got {noise_multiplier!r}")
    if isinstance(rounds, bool) or not isinstance(rounds, (int, np.integer)) or rounds < 0:
        raise ConfigError(f"rounds must be an integer >= 0, got {rounds!r}")
    if not (isinstance(delta, (int, float)) and 0 < delta < 1):
        raise ConfigError(f"delta must be in (0, 1), got {delta!r}")
    if mode == "local":
        return None
    if sampling == "poisson":
        if sample_rate is None or not (isinstance(sample_rate, (int, float)) and 0 < sample_rate <= 1):
            raise ConfigError(f"Poisson sampling needs a sample_rate in (0, 1], got {sample_rate!r}")
        return float(sample_rate)
    if accountant == "pld":
        raise ConfigError(
            "dp-accounting's PLD accountant has no fixed-size sampling without replacement "
            "(SampledWithoutReplacementDpEvent): use accountant='rdp' or sampling='poisson'"
        )
    for name, value in (("population", population), ("cohort", cohort)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ConfigError(f"fixed-size sampling needs {name} (an integer >= 1), got {value!r}")
    if cohort > population:
        raise ConfigError(f"cohort ({cohort}) exceeds population ({population})")
    rate = cohort / population
    if sample_rate is not None and not math.isclose(sample_rate, rate, rel_tol=1e-9):
        raise ConfigError(f"sample_rate {sample_rate} disagrees with cohort / population = {rate}")
    return rate


def dp_event(
    noise_multiplier: float,
    sample_rate: float | None,
    rounds: int,
    *,
    sampling: str = "poisson",
    population: int | None = None,
    cohort: int | None = None,
    mode: str = "central",
) -> dp_accounting.DpEvent:
    """The ``dp_accounting`` event of ``rounds`` rounds (see the module docstring).

    * central, Poisson: ``SelfComposedDpEvent(PoissonSampledDpEvent(q, GaussianDpEvent(z)), rounds)``;
    * central, fixed: ``SelfComposedDpEvent(SampledWithoutReplacementDpEvent(population, cohort,
      GaussianDpEvent(z / 2)), rounds)``;
    * local: ``SelfComposedDpEvent(GaussianDpEvent(z / 2), rounds)`` (``rounds`` = the client's
      participations; the sampling arguments are not used).
    """
    z = float(noise_multiplier)
    if mode == "local":
        return dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(z / 2), int(rounds))
    if sampling == "poisson":
        event = dp_accounting.PoissonSampledDpEvent(float(sample_rate), dp_accounting.GaussianDpEvent(z))
    else:
        event = dp_accounting.SampledWithoutReplacementDpEvent(
            int(population), int(cohort), dp_accounting.GaussianDpEvent(z / 2)
        )
    return dp_accounting.SelfComposedDpEvent(event, int(rounds))


def make_accountant(accountant: str = "rdp", sampling: str = "poisson", mode: str = "central") -> dp_accounting.PrivacyAccountant:
    """A fresh ``dp_accounting`` accountant with the neighbouring relation the event needs.

    ``REPLACE_ONE`` for central fixed-size sampling, ``ADD_OR_REMOVE_ONE`` otherwise (for the
    un-sampled Gaussian of local DP the relation does not change the result; the sensitivity is
    in the event).
    """
    relation = dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE
    if mode == "central" and sampling == "fixed":
        relation = dp_accounting.NeighboringRelation.REPLACE_ONE
    if accountant == "rdp":
        return rdp_privacy_accountant.RdpAccountant(neighboring_relation=relation)
    if accountant == "pld":
        return pld_privacy_accountant.PLDAccountant(neighboring_relation=relation)
    raise ConfigError(f"accountant must be one of {', '.join(_ACCOUNTANTS)}; got {accountant!r}")


def epsilon(
    noise_multiplier: float,
    sample_rate: float | None,
    rounds: int,
    delta: float,
    *,
    accountant: str = "rdp",
    sampling: str = "poisson",
    population: int | None = None,
    cohort: int | None = None,
    mode: str = "central",
) -> float:
    """Epsilon at ``delta`` after ``rounds`` rounds of DP-FedAvg, from ``dp_accounting``.

    Args:
      noise_multiplier: ``z`` (noise standard deviation over the clipping norm).
      sample_rate: ``q``, a client's probability of joining a round (Poisson); for fixed-size
        sampling None or ``cohort / population``.
      rounds: the rounds so far (for ``mode="local"``: the client's participations).
      delta: the target delta.
      accountant: ``"rdp"`` or ``"pld"``.
      sampling: ``"poisson"`` or ``"fixed"`` (the module docstring says what each assumes).
      population: clients in the federation (fixed-size sampling).
      cohort: clients per round (fixed-size sampling).
      mode: ``"central"`` or ``"local"``.

    Returns:
      Epsilon (``inf`` when ``z = 0`` and at least one round ran; 0 after 0 rounds).

    Raises:
      ConfigError: invalid arguments, or PLD with fixed-size sampling.
    """
    _check(noise_multiplier=noise_multiplier, sample_rate=sample_rate, rounds=rounds, delta=delta,
           accountant=accountant, sampling=sampling, population=population, cohort=cohort, mode=mode)
    if rounds == 0:
        return 0.0
    if noise_multiplier == 0:
        return math.inf
    event = dp_event(noise_multiplier, sample_rate, rounds, sampling=sampling, population=population, cohort=cohort,
                     mode=mode)
    return float(make_accountant(accountant, sampling, mode).compose(event).get_epsilon(delta))


def local_epsilon(noise_multiplier: float, participations: int, delta: float, *, accountant: str = "rdp") -> float:
    """Epsilon of local DP for a client that took part in ``participations`` rounds.

    The same as ``epsilon(z, None, participations, delta, mode="local")``: no amplification by
    sampling, replace-one sensitivity ``2C`` (module docstring).
    """
    return epsilon(noise_multiplier, None, participations, delta, accountant=accountant, mode="local")


def noise_multiplier_for_epsilon(
    target_epsilon: float,
    sample_rate: float | None,
    rounds: int,
    delta: float,
    *,
    accountant: str = "rdp",
    sampling: str = "poisson",
    population: int | None = None,
    cohort: int | None = None,
    mode: str = "central",
    tol: float = 1e-5,
) -> float:
    """The smallest noise multiplier whose epsilon after ``rounds`` rounds is at most ``target_epsilon``.

    Brackets the root by halving/doubling from ``z = 1``, then calls
    ``dp_accounting.calibrate_dp_mechanism`` (Brent's method on ``epsilon(z) - target``, which
    guarantees ``epsilon(z) <= target`` for the value returned, within ``tol`` of the optimum).
    The arguments mean what they mean for :func:`epsilon`.

    Raises:
      ConfigError: invalid arguments, or no noise multiplier in ``[2^-20, 2^20]`` reaches the
        target.
    """
    _check(noise_multiplier=1.0, sample_rate=sample_rate, rounds=rounds, delta=delta, accountant=accountant,
           sampling=sampling, population=population, cohort=cohort, mode=mode)
    if not (isinstance(target_epsilon, (int, float)) and target_epsilon > 0 and math.isfinite(target_epsilon)):
        raise ConfigError(f"target_epsilon must be a finite number > 0, got {target_epsilon!r}")
    if rounds == 0:
        return 0.0

    def eps(z: float) -> float:
        return epsilon(z, sample_rate, rounds, delta, accountant=accountant, sampling=sampling,
                       population=population, cohort=cohort, mode=mode)

    low, high = 1.0, 1.0
    while eps(low) <= target_epsilon:
        low /= 2
        if low < 2**-20:
            raise ConfigError(f"epsilon {target_epsilon} is met even with noise multiplier {low}: nothing to calibrate")
    while eps(high) > target_epsilon:
        high *= 2
        if high > 2**20:
            raise ConfigError(f"no noise multiplier up to 2^20 reaches epsilon {target_epsilon}")
    return float(dp_accounting.calibrate_dp_mechanism(
        lambda: make_accountant(accountant, sampling, mode),
        lambda z: dp_event(z, sample_rate, rounds, sampling=sampling, population=population, cohort=cohort, mode=mode),
        float(target_epsilon), float(delta),
        bracket_interval=dp_accounting.ExplicitBracketInterval(low, high), tol=tol,
    ))


class PrivacySpent(NamedTuple):
    """The privacy budget a run has spent: the :class:`PrivacyLedger`'s state, kept with the
    server state (and in checkpoints).

    Attributes:
      rounds: int64 scalar, the rounds released so far.
      participations: int64 ``[population]`` releases per client (local DP), ``[0]`` otherwise.
    """

    rounds: np.ndarray
    participations: np.ndarray


class PrivacyLedger:
    """The privacy spent by a run, one round at a time, as an ``(init, apply)`` pair.

    The ledger holds only the accounting's settings; what has been spent is a
    :class:`PrivacySpent` the server round keeps in its state: :meth:`init_spent` starts it,
    :meth:`spend` records one round and returns the new state and the epsilon after it.
    Central DP: epsilon of the rounds so far, exactly :func:`epsilon` with ``rounds`` = rounds
    recorded (one ``dp_accounting`` call, about 0.1 s with RDP and 0.5-1.5 s with PLD; cached
    per round count). Local DP: the largest epsilon of any client, i.e. :func:`local_epsilon`
    of the most participations.

    Args:
      noise_multiplier: ``z`` (the total one, with adaptive clipping).
      delta: the target delta.
      mode: ``"central"`` or ``"local"``.
      accountant, sampling, sample_rate, population, cohort: as for :func:`epsilon`. Local DP
        needs ``population`` (to count participations per client).

    Example:
      >>> ledger = PrivacyLedger(noise_multiplier=1.0, delta=1e-5, sampling="fixed", population=100, cohort=10)
      >>> spent, eps = ledger.spend(ledger.init_spent())
      >>> int(spent.rounds), eps == epsilon(1.0, None, 1, 1e-5, sampling="fixed", population=100, cohort=10)
      (1, True)
    """

    def __init__(
        self,
        *,
        noise_multiplier: float,
        delta: float,
        mode: str = "central",
        accountant: str = "rdp",
        sampling: str = "fixed",
        sample_rate: float | None = None,
        population: int | None = None,
        cohort: int | None = None,
    ):
        self.sample_rate = _check(
            noise_multiplier=noise_multiplier, sample_rate=sample_rate, rounds=0, delta=delta, accountant=accountant,
            sampling=sampling, population=population, cohort=cohort, mode=mode,
        )
        if mode == "local" and (population is None or population < 1):
            raise ConfigError(f"local DP accounting needs the population (number of clients), got {population!r}")
        self.noise_multiplier = float(noise_multiplier)
        self.delta = float(delta)
        self.mode = mode
        self.accountant = accountant
        self.sampling = sampling
        self.population = population
        self.cohort = cohort
        self._cache: dict[int, float] = {0: 0.0}

    def _epsilon_after(self, count: int) -> float:
        if count not in self._cache:
            self._cache[count] = epsilon(
                self.noise_multiplier, self.sample_rate, count, self.delta, accountant=self.accountant,
                sampling=self.sampling, population=self.population, cohort=self.cohort, mode=self.mode,
            )
        return self._cache[count]

    def init_spent(self) -> PrivacySpent:
        """Nothing spent yet."""
        counts = np.zeros(self.population if self.mode == "local" else 0, np.int64)
        return PrivacySpent(np.zeros((), np.int64), counts)

    def epsilon(self, spent: PrivacySpent) -> float:
        """Epsilon spent (``inf`` without noise)."""
        if self.mode == "local":
            return self._epsilon_after(int(np.max(spent.participations, initial=0)))
        return self._epsilon_after(int(spent.rounds))

    def spend(self, spent: PrivacySpent, participants: Iterable[int] | None = None) -> tuple[PrivacySpent, float]:
        """Records one round; returns the new spent budget and the epsilon after it.

        Args:
          spent: what was spent before this round.
          participants: the client ids whose (noised) update was released this round; required
            for local DP, not used for central DP (every round counts, whoever took part).
        """
        counts = np.array(spent.participations, np.int64)
        if self.mode == "local":
            if participants is None:
                raise ConfigError("local DP accounting needs the ids of the clients that took part")
            if counts.shape != (self.population,):
                raise ConfigError(f"participations must have shape ({self.population},), got {counts.shape}")
            ids = np.unique(np.asarray(list(participants), np.int64))
            if ids.size and (ids.min() < 0 or ids.max() >= self.population):
                raise ConfigError(f"client ids must be in [0, {self.population}), got {ids.tolist()}")
            counts[ids] += 1
        new = PrivacySpent(np.asarray(int(spent.rounds) + 1, np.int64), counts)
        return new, self.epsilon(new)

    def summary(self, spent: PrivacySpent) -> dict[str, Any]:
        """Plain, JSON-safe data for metrics and the prompt artifact's metadata.

        ``epsilon`` is None when it is infinite (no noise), since JSON has no infinity.
        """
        eps = self.epsilon(spent)
        return {
            "epsilon": eps if math.isfinite(eps) else None,
            "delta": self.delta,
            "noise_multiplier": self.noise_multiplier,
            "dp_mode": self.mode,
            "accountant": self.accountant,
            "sampling": self.sampling,
            "sample_rate": self.sample_rate,
            "dp_rounds": int(spent.rounds),
        }
