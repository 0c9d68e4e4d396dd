"""The configuration of a federated run: defaults, TOML files, overrides, validation.

Every value is checked when the :class:`RunConfig` is built, so a bad value fails before any
model is loaded or any data is read. A TOML file may be flat or grouped in tables; table names
are only for the reader (``[federation] rounds = 10`` is the same as ``rounds = 10``).

Example:
  >>> cfg = RunConfig.from_sources(overrides={"rounds": 3})
  >>> cfg.rounds, cfg.clients
  (3, 16)
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import numbers
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from fedprompt.errors import ConfigError

DP_MODES = ("central", "local")
ACCOUNTANTS = ("rdp", "pld")
SAMPLINGS = ("poisson", "fixed")

ALGORITHM_NAMES = ("fedavg", "fedavgm", "fedprox", "fedadagrad", "fedadam", "fedyogi", "scaffold")
PARTITIONS = ("iid", "dirichlet", "shards", "quantity")
TASKS = ("classify", "generate")
LOCAL_OPTIMIZERS = ("adam", "sgd")
HEAD_INITS = ("random", "class_means", "lda")
"""How a classification head starts: random, from the clients' class means (``head_init``), or
from their class means and feature covariance (linear discriminant analysis)."""


@dataclasses.dataclass(frozen=True)
class DPConfig:
    """Differential-privacy settings of a run, validated on construction.

    Attributes:
      mode: ``"central"`` (the server clips and adds noise to the sum), ``"local"`` (each client
        clips and adds noise before sending) or None (no DP; then no other field may ask for
        noise).
      clip: the L2 clipping norm ``C`` of a client update (the initial one when adaptive).
      noise_multiplier: ``z``; the noise on the sum (central) or on each update (local) has
        standard deviation ``z * C``. Exactly one of ``noise_multiplier`` and
        ``target_epsilon`` is set when ``mode`` is set.
      target_epsilon: choose ``z`` before training so that the whole run spends this epsilon
        (:func:`fedprompt.privacy.accounting.noise_multiplier_for_epsilon`).
      delta: the delta of the (epsilon, delta) guarantee; None: ``min(1e-5, 1 / num_clients)``
        (:meth:`resolved_delta`), i.e. below one over the number of units protected (clients).
      adaptive: adapt ``C`` to the ``target_quantile`` of the update norms (Andrew et al.
        2021); central mode only.
      target_quantile: ``gamma`` in (0, 1).
      clip_lr: ``eta`` > 0, the learning rate of the geometric update of ``C``.
      count_stddev: ``sigma_b`` of the unclipped-count noise; None:
        :func:`fedprompt.privacy.dp.default_count_stddev`.
      accountant: ``"rdp"`` (Renyi DP, Mironov 2017) or ``"pld"`` (privacy loss
        distributions; tighter, slower; Poisson sampling only).
      sampling: how clients are sampled each round, as the accountant must assume:
        ``"poisson"`` (each client independently with probability ``q``; add/remove-one
        neighbours) or ``"fixed"`` (exactly ``clients_per_round`` uniformly without
        replacement, as both runtimes sample;
        replace-one neighbours, RDP only).

    Example:
      >>> DPConfig(mode="central", clip=0.5, noise_multiplier=1.1).enabled
      True
      >>> DPConfig(mode="central", clip=0.5)
      Traceback (most recent call last):
        ...
      fedprompt.errors.ConfigError: DP mode 'central' needs exactly one of noise_multiplier and target_epsilon
    """

    mode: str | None = None
    clip: float = 1.0
    noise_multiplier: float | None = None
    target_epsilon: float | None = None
    delta: float | None = None
    adaptive: bool = False
    target_quantile: float = 0.5
    clip_lr: float = 0.2
    count_stddev: float | None = None
    accountant: str = "rdp"
    sampling: str = "fixed"

    def __post_init__(self) -> None:
        if self.mode is not None and self.mode not in DP_MODES:
            raise ConfigError(f"DP mode must be one of central, local or unset; got {self.mode!r}")
        check_number("clip", self.clip, lower=0.0, strict=True)
        if self.noise_multiplier is not None:
            check_number("noise_multiplier", self.noise_multiplier, lower=0.0)
        if self.target_epsilon is not None:
            check_number("target_epsilon", self.target_epsilon, lower=0.0, strict=True)
        if self.delta is not None:
            check_number("delta", self.delta, lower=0.0, strict=True)
            if not self.delta < 1:
                raise ConfigError(f"delta must be in (0, 1), got {self.delta}")
        if not isinstance(self.adaptive, bool):
            raise ConfigError(f"adaptive must be true or false, got {self.adaptive!r}")
        check_number("target_quantile", self.target_quantile, lower=0.0, strict=True)
        if not self.target_quantile < 1:
            raise ConfigError(f"target_quantile must be in (0, 1), got {self.target_quantile}")
        check_number("clip_lr", self.clip_lr, lower=0.0, strict=True)
        if self.count_stddev is not None:
            check_number("count_stddev", self.count_stddev, lower=0.0)
        if self.accountant not in ACCOUNTANTS:
            raise ConfigError(f"accountant must be one of {', '.join(ACCOUNTANTS)}; got {self.accountant!r}")
        if self.sampling not in SAMPLINGS:
            raise ConfigError(f"sampling must be one of {', '.join(SAMPLINGS)}; got {self.sampling!r}")
        if self.mode is None:
            if self.noise_multiplier is not None or self.target_epsilon is not None or self.adaptive:
                raise ConfigError("noise_multiplier, target_epsilon and adaptive need a DP mode (central or local)")
            return
        if (self.noise_multiplier is None) == (self.target_epsilon is None):
            raise ConfigError(f"DP mode {self.mode!r} needs exactly one of noise_multiplier and target_epsilon")
        if self.adaptive and self.mode != "central":
            raise ConfigError("adaptive clipping is defined for central DP only (the server sees the clipped count)")
        if self.mode == "central" and self.sampling == "fixed" and self.accountant == "pld":
            raise ConfigError(
                "the PLD accountant of dp-accounting has no fixed-size sampling without replacement: "
                "use accountant = 'rdp' or sampling = 'poisson'"
            )

    @property
    def enabled(self) -> bool:
        """Whether any DP is applied."""
        return self.mode is not None

    def resolved_delta(self, num_clients: int) -> float:
        """``delta``, or ``min(1e-5, 1 / num_clients)`` when unset."""
        if self.delta is not None:
            return float(self.delta)
        if num_clients < 1:
            raise ConfigError(f"num_clients must be >= 1, got {num_clients}")
        return min(1e-5, 1.0 / num_clients)


def check_number(name: str, value: Any, *, lower: float, strict: bool = False) -> None:
    """Raises ConfigError unless ``value`` is a finite real number ``>= lower`` (``> lower`` if strict)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ConfigError(f"{name} must be a finite number, got {value!r}")
    if value < lower or (strict and value == lower):
        raise ConfigError(f"{name} must be {'>' if strict else '>='} {lower}, got {value}")




# ----------------------------------------------------------------------------- robustness, attacks

AGGREGATORS = ("mean", "median", "trimmed_mean", "krum", "multi_krum", "norm_bound")
"""The aggregation rules (:func:`fedprompt.server.robust.make_aggregator`)."""

AGGREGATOR_PARAMS: dict[str, tuple[str, ...]] = {
    "mean": (),
    "median": (),
    "trimmed_mean": ("beta",),
    "krum": ("num_byzantine",),
    "multi_krum": ("num_byzantine", "m"),
    "norm_bound": ("bound",),
}
"""The parameters each aggregation rule takes."""

ADAM_LR = 1e-2
"""The local learning rate of Adam when ``local_lr`` is unset (and the baselines' Adam's with SGD clients)."""
SGD_LR = 0.5
"""The local learning rate of SGD when ``local_lr`` is unset."""
SGD_CLIENT_ALGORITHMS = ("scaffold", "fedadagrad", "fedadam", "fedyogi")
"""The algorithms whose clients take SGD steps when ``local_optimizer`` is unset."""

UPDATE_CLIP = 100.0
"""The default :attr:`RunConfig.update_clip`, the server's L2 bound on every client delta.

Measured in the first two rounds of the default settings (MiniLM, 8 clients a round, 1,024
training glosses): the largest honest delta had norm 5.7 with the default soft prompt (Adam, 8
steps of 0.01), 18 with ``method = "prefix"``, 8.3 with ``"zo"``, 3.3 with ``scaffold`` (SGD
0.5) and 27 with ``"bbt"`` (CMA-ES on ``z``, d = 500, sigma 1; on the tiny test backbone, as
its ``z`` does not depend on the backbone's size). 100 leaves all of them unscaled with room
(18x the default's norm), while a client sending values of 1e6 moves the global state by at
most ``100 x its weight share`` instead of ``1e6 x share`` per coordinate."""

ATTACKS = ("sign_flip", "scaling", "gaussian", "label_flip")
"""The simulated attacks (:mod:`fedprompt.simulation.attacks`)."""


def check_trim_beta(beta: Any) -> float:
    if not (isinstance(beta, (int, float)) and not isinstance(beta, bool) and 0 <= beta < 0.5):
        raise ConfigError(f"trimmed_mean needs 0 <= beta < 0.5, got {beta!r}")
    return float(beta)


def check_byzantine(num_byzantine: Any) -> int:
    if isinstance(num_byzantine, bool) or not isinstance(num_byzantine, int) or num_byzantine < 0:
        raise ConfigError(f"num_byzantine must be an integer >= 0, got {num_byzantine!r}")
    return num_byzantine


def check_krum_m(m: Any) -> int:
    if isinstance(m, bool) or not isinstance(m, int) or m < 1:
        raise ConfigError(f"multi_krum needs an integer m >= 1, got {m!r}")
    return m


def check_norm_bound(bound: Any) -> float:
    if isinstance(bound, bool) or not isinstance(bound, (int, float)) or not bound > 0 or bound == float("inf"):
        raise ConfigError(f"norm_bound needs a finite bound > 0, got {bound!r}")
    return float(bound)


_PARAM_CHECKS = {"beta": check_trim_beta, "num_byzantine": check_byzantine, "m": check_krum_m,
                 "bound": check_norm_bound}


def check_aggregator(name: str, params: Mapping[str, Any]) -> dict[str, Any]:
    """The parameters of aggregation rule ``name`` (None values dropped), validated.

    Raises:
      ConfigError: an unknown name, a missing, unknown or invalid parameter.
    """
    if name not in AGGREGATOR_PARAMS:
        raise ConfigError(f"aggregator must be one of {', '.join(AGGREGATORS)}; got {name!r}")
    params = {k: v for k, v in params.items() if v is not None}
    expected = AGGREGATOR_PARAMS[name]
    unknown = sorted(set(params) - set(expected))
    if unknown:
        raise ConfigError(f"aggregator {name!r} takes {', '.join(expected) or 'no parameters'}; got {unknown}")
    missing = [p for p in expected if p not in params]
    if missing:
        raise ConfigError(f"aggregator {name!r} needs {', '.join(missing)}")
    return {k: _PARAM_CHECKS[k](v) for k, v in params.items()}


def check_attack(kind: Any, fraction: Any, scale: Any, noise_std: Any = 1.0) -> None:
    """Raises ConfigError unless the attack settings are valid."""
    if kind not in ATTACKS:
        raise ConfigError(f"attack must be one of {', '.join(ATTACKS)}; got {kind!r}")
    for name, value in (("fraction", fraction), ("scale", scale), ("noise_std", noise_std)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ConfigError(f"attack {name} must be a finite number, got {value!r}")
    if not 0 <= fraction < 1:
        raise ConfigError(f"attack fraction must be in [0, 1), got {fraction}")
    if not scale > 0:
        raise ConfigError(f"attack scale must be > 0, got {scale}")
    if not noise_std > 0:
        raise ConfigError(f"attack noise_std must be > 0, got {noise_std}")


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Everything a ``fedprompt run`` needs. Field docs are the TOML keys.

    Attributes:
      backbone: checkpoint folder, built-in name (``minilm``) or cached hub id.
      data: a JSONL/CSV file of labelled texts; None uses the built-in WordNet supersenses.
      test_data: a separate test file; without it ``data`` is split 80/20 (seeded).
      text_key, label_key: column names in ``data``. With ``task = "generate"`` the
        ``label_key`` column, where every row has one, groups the examples for the
        label-skewed partitions (Dolly's ``category``); without it the data is one group.
      task: ``classify`` (a text's label, the default) or ``generate`` (a decoder writes the
        response to a prompt: instruction tuning, loss on the response tokens only; needs a
        decoder backbone; evaluated by loss, perplexity and greedy generations scored with
        exact match and ROUGE-L; :mod:`fedprompt.data.instructions`).
      verbalizer: classification with a decoder by its frozen LM head instead of a trained
        head: one label word per class, comma-separated in the order of the label names, or
        ``names`` for the label names themselves; a class's score is the LM head's logit of its
        word's first token at the last real position (the words' first tokens must differ).
        Unset: a linear head.
      prompt_key, response_key: ``generate``: the columns of the prompt and the response in
        ``data`` (JSONL, CSV, parquet or a Hugging Face ``datasets`` folder).
      method: ``prompt`` (soft prompt), ``prefix`` (deep prefix), or the gradient-free
        ``bbt`` (CMA-ES on a 500-dimensional projection of a soft prompt, FedBPT) and ``zo``
        (seed-based zeroth-order, FedKSeed); ``local_steps`` are CMA-ES generations or ZO steps.
      num_virtual_tokens: prompt length.
      algorithm: fedavg, fedavgm, fedprox, fedadagrad, fedadam, fedyogi or scaffold.
      server_lr: server learning rate (None: the algorithm's default).
      server_momentum: FedAvgM momentum.
      tau, b1, b2: FedAdagrad/FedAdam/FedYogi adaptivity and decay rates.
      prox_mu: FedProx proximal coefficient.
      rounds: federated rounds.
      clients: number of clients the training data is split over.
      clients_per_round: clients sampled (uniformly, without replacement) each round.
      partition: iid, dirichlet (label skew), shards (k labels per client), quantity (size skew).
      alpha: Dirichlet concentration for ``dirichlet`` and ``quantity``.
      labels_per_client: labels per client for ``shards``.
      local_steps: optimizer steps per client per round.
      batch_size: examples per local step.
      local_optimizer: adam or sgd; unset: sgd for SCAFFOLD (its control variates assume plain
        SGD steps, so SCAFFOLD with adam is refused) and for the adaptive server optimizers
        (FedAdagrad, FedAdam, FedYogi: clients take SGD steps and the server adapts, as in
        Reddi et al. 2021; a fresh local Adam's first steps move every coordinate by about its
        learning rate, noise the server's average cannot undo), adam for the rest.
      local_lr: local learning rate; unset: 0.01 for adam, 0.5 for sgd. For ``zo`` the ZO-SGD
        learning rate (unset: 0.01), for ``bbt`` the Adam learning rate of the head (unset: 0.01).
      head_init: how the classification head starts: ``random``, or ``class_means``: set once
        before the first round from the clients' class means of the frozen features
        (:mod:`fedprompt.client.class_means`; not with DP or secure aggregation, whose
        guarantees it would bypass).
        ``lda``: the same with the clients' summed feature outer products too (``D x D`` floats
        each, once), and the head is linear discriminant analysis with the pooled within-class
        covariance (shrunk by 0.05 towards its mean eigenvalue).
      head_init_examples: with ``class_means`` or ``lda``, rows per client the statistics are taken on.
      zo_seeds: ``zo``: the size K of the seed pool every party shares (FedKSeed).
      zo_eps: ``zo``: the perturbation scale of the two-point estimate.
      zo_head: ``zo``: ``zo`` perturbs the head with the prompt, ``frozen`` keeps the head the
        server set (with ``head_init = "class_means"``: the class-means head) and tunes the prompt.
      zo_downlink: ``zo``: ``seeds`` (the server sends each client the merged seed pairs of the
        rounds it missed, or the state when that is fewer bytes; FedKSeed; needs FedAvg and the
        mean), ``state`` (the state every round), ``auto`` (seeds where they apply).
      bbt_dim: ``bbt``: the dimension d of the searched subspace (BBT: 500).
      bbt_popsize: ``bbt``: CMA-ES candidates per generation (BBT's 20 costs twice the time).
      bbt_fitness_examples: ``bbt``: the examples of each generation's batch the candidates are
        ranked on (the head's step still takes the whole batch; 0: all of it).
      logit_adjustment: tau >= 0; gradient clients train on logits shifted by tau x the log
        of their own label frequencies (FedLC-style calibration against label skew; 0: off).
      max_length: tokens per example (truncated/padded), not counting virtual tokens; for
        ``generate`` the prompt and the response together.
      max_new_tokens: ``generate``: the most tokens a greedy generation writes.
      generate_examples: ``generate``: test examples generated for exact match and ROUGE-L
        after the last round (0: none).
      train_examples: use at most this many training examples (None: all).
      eval_examples: evaluate on at most this many test examples (None: all).
      eval_every: evaluate every this many rounds (and always after the last); unset: every
        ``max(1, rounds // 3)`` rounds, three evaluations a run (every 20 of the default 60
        rounds; an evaluation of 1,024 examples costs about two rounds of 8 clients x 2 local steps).
      dropout: probability that a sampled client drops out of a round.
      client_block: clients trained together in one vmapped program: ``"auto"`` (from the
        block's work on a CPU, from its compiled memory and the device's free memory on an
        accelerator; :func:`fedprompt.simulation.engine.choose_client_block`) or a number
        (written as a number or its digits).
      client_block_memory: ``client_block = "auto"``: GiB one block program may use beyond its
        arguments (weights and data already on the device) (None: 90% of an accelerator's free
        memory; on a CPU unchecked).
      seed: the one seed of the run (sampling, partition, initialization).
      baselines: also train centralized and local-only baselines (with Adam, whatever the clients use).
      aggregator: mean, median, trimmed_mean, krum, multi_krum or norm_bound (robust rules
        replace the mean for every algorithm).
      trim_beta, num_byzantine, krum_m, norm_bound: their parameters.
      update_clip: the server's bound on every client update: a delta (after the program's
        ``to_delta``) of L2 norm above it is scaled down to it before aggregation, so one
        client of weight share ``s`` moves the global mean by at most ``s * update_clip``
        (:func:`fedprompt.server.rounds.update_clip_stage`); 0 or None: off. With central DP
        the DP clip is the bound; with local DP the bound is the DP clip plus the norm the
        noise can reach (:func:`fedprompt.federation.plan.resolve_update_clip`).
      attack: sign_flip, scaling, gaussian or label_flip, by a fixed ``attack_fraction`` of
        the clients; ``attack_scale`` multiplies sign-flipped and scaled updates.
      dp: central or local client-level differential privacy (DP-FedAvg); unset: none.
      dp_clip: the clipping norm C (initial value when ``dp_adaptive``).
      dp_noise_multiplier / dp_target_epsilon: the noise multiplier z, or the epsilon the
        whole run may spend (z is then chosen before training).
      dp_delta: the delta of the guarantee (default min(1e-5, 1 / clients)).
      dp_adaptive: adaptive clipping to the median update norm (Andrew et al. 2021).
      dp_accountant: rdp (fixed-size sampling, as the engine samples).
      secagg: secure aggregation of the round's updates (Bonawitz et al. 2017).
      secagg_threshold: Shamir threshold t (default about 2/3 of the round's clients).
      compress: int8 or int4 quantization of the clients' updates before they are sent
        (per-block scales, stochastic rounding; gradient methods; unset: float32 updates).
      error_feedback: with ``compress``, each client adds what compression lost in its
        earlier rounds to its next update.
      devices: local devices each round's clients are spread over (1: one device; 0: all).
      parallel_backend: shard_map or pmap, for ``devices`` other than 1.
      tpt: after training, also evaluate with test-time prompt tuning (TPT) on test clients
        whose label mix is shifted (Dirichlet ``tpt_alpha`` over ``tpt_test_clients``).
      tpt_steps, tpt_lr, tpt_views: TPT's steps per batch, AdamW learning rate, and views per
        example.
      out: output folder.
    """

    backbone: str = "minilm"
    data: str | None = None
    test_data: str | None = None
    text_key: str = "text"
    label_key: str = "label"
    task: str = "classify"
    verbalizer: str | None = None
    prompt_key: str = "prompt"
    response_key: str = "response"
    method: str = "prompt"
    num_virtual_tokens: int = 20
    algorithm: str = "fedadam"
    server_lr: float | None = None
    server_momentum: float = 0.9
    tau: float = 1e-3
    b1: float = 0.9
    b2: float = 0.99
    prox_mu: float = 0.01
    rounds: int = 60
    clients: int = 16
    clients_per_round: int = 8
    partition: str = "dirichlet"
    alpha: float = 0.5
    labels_per_client: int = 2
    local_steps: int = 2
    batch_size: int = 16
    local_optimizer: str | None = None
    local_lr: float | None = None
    head_init: str = "random"
    head_init_examples: int = 256
    zo_seeds: int = 4096
    zo_eps: float = 1e-3
    zo_head: str = "zo"
    zo_downlink: str = "auto"
    bbt_dim: int = 500
    bbt_popsize: int = 10
    bbt_fitness_examples: int = 4
    logit_adjustment: float = 0.0
    max_length: int = 32
    max_new_tokens: int = 16
    generate_examples: int = 64
    train_examples: int | None = None
    eval_examples: int | None = 1024
    eval_every: int | None = None
    dropout: float = 0.0
    client_block: str | int = "auto"
    client_block_memory: float | None = None
    seed: int = 0
    baselines: bool = False
    aggregator: str = "mean"
    trim_beta: float = 0.2
    num_byzantine: int = 1
    krum_m: int | None = None
    norm_bound: float = 1.0
    update_clip: float | None = UPDATE_CLIP
    attack: str | None = None
    attack_fraction: float = 0.2
    attack_scale: float = 10.0
    dp: str | None = None
    dp_clip: float = 1.0
    dp_noise_multiplier: float | None = None
    dp_target_epsilon: float | None = None
    dp_delta: float | None = None
    dp_adaptive: bool = False
    dp_accountant: str = "rdp"
    secagg: bool = False
    secagg_threshold: int | None = None
    compress: str | None = None
    error_feedback: bool = False
    devices: int = 1
    parallel_backend: str = "shard_map"
    tpt: bool = False
    tpt_steps: int = 1
    tpt_lr: float = 5e-3
    tpt_views: int = 8
    tpt_test_clients: int = 16
    tpt_alpha: float = 0.1
    out: str = "runs/latest"

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            _check_type(field, getattr(self, field.name))
        positive = ("num_virtual_tokens", "rounds", "clients", "clients_per_round", "local_steps", "batch_size",
                    "max_length", "labels_per_client", "head_init_examples", "zo_seeds", "bbt_dim", "max_new_tokens")
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("train_examples", "eval_examples", "eval_every"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"{name} must be >= 1 or unset, got {value}")
        block = self.client_block
        if isinstance(block, str) and block != "auto":
            if not block.strip().isdigit():
                raise ConfigError(f"client_block must be 'auto' or a number >= 1, got {block!r}")
            object.__setattr__(self, "client_block", block := int(block))
        if isinstance(block, int) and block < 1:
            raise ConfigError(f"client_block must be 'auto' or a number >= 1, got {block}")
        if self.client_block_memory is not None and self.client_block_memory <= 0:
            raise ConfigError(f"client_block_memory must be > 0 GiB or unset, got {self.client_block_memory}")
        _choice("method", self.method, ("prompt", "prefix", "bbt", "zo"))
        _choice("task", self.task, TASKS)
        self._check_task()
        if self.method in ("bbt", "zo") and (self.dp is not None or self.secagg or self.algorithm == "scaffold"):
            raise ConfigError(f"method {self.method!r} sends seeds/low-dimensional vectors: DP, secure aggregation "
                              "and SCAFFOLD apply to gradient methods only")
        _choice("algorithm", self.algorithm, ALGORITHM_NAMES)
        _choice("head_init", self.head_init, HEAD_INITS)
        _choice("zo_head", self.zo_head, ("zo", "frozen"))
        _choice("zo_downlink", self.zo_downlink, ("auto", "seeds", "state"))
        if self.bbt_popsize < 2 or self.bbt_fitness_examples < 0:
            raise ConfigError(f"bbt_popsize must be >= 2 and bbt_fitness_examples >= 0, got {self.bbt_popsize} and "
                              f"{self.bbt_fitness_examples}")
        if self.zo_downlink == "seeds" and not self._seeds_apply:
            raise ConfigError("zo_downlink = 'seeds' needs method = 'zo', algorithm = 'fedavg' and aggregator = "
                              "'mean' (the round's move must be a sum of seed directions); use 'auto' or 'state'")
        if not self.zo_eps > 0:
            raise ConfigError(f"zo_eps must be > 0, got {self.zo_eps}")
        if self.head_init != "random" and (self.dp is not None or self.secagg):
            raise ConfigError(f"head_init = {self.head_init!r} sends each client's class means in the clear, outside "
                              f"{'differential privacy' if self.dp else 'secure aggregation'}: use head_init = 'random'")
        _choice("partition", self.partition, PARTITIONS)
        if self.local_optimizer is not None:
            _choice("local_optimizer", self.local_optimizer, LOCAL_OPTIMIZERS)
            if self.algorithm == "scaffold" and self.local_optimizer != "sgd":
                raise ConfigError("SCAFFOLD's control variates assume plain SGD local steps: use local_optimizer = 'sgd'")
        if self.clients_per_round > self.clients:
            raise ConfigError(f"clients_per_round ({self.clients_per_round}) exceeds clients ({self.clients})")
        for name in ("alpha", "tau"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("server_lr", "local_lr"):
            if getattr(self, name) is not None and not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("server_momentum", "b1", "b2", "dropout"):
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if self.prox_mu < 0:
            raise ConfigError(f"prox_mu must be >= 0, got {self.prox_mu}")
        if not self.logit_adjustment >= 0:
            raise ConfigError(f"logit_adjustment must be >= 0, got {self.logit_adjustment}")
        if self.logit_adjustment and self.method in ("bbt", "zo"):
            raise ConfigError(f"logit_adjustment calibrates gradient clients' loss; method {self.method!r} has none")
        self._check_robustness_and_privacy()
        self._check_compression_and_devices()
        if self.test_data is not None and self.data is None:
            raise ConfigError("test_data needs data (the built-in data set has its own test split)")
        for name in ("data", "test_data"):
            path = getattr(self, name)
            if path is None or Path(path).is_file() or (self.task == "generate" and Path(path).is_dir()):
                continue
            raise ConfigError(f"{name} file {path!r} does not exist")

    def _check_task(self) -> None:
        if self.generate_examples < 0:
            raise ConfigError(f"generate_examples must be >= 0, got {self.generate_examples}")
        if self.verbalizer is not None:
            if self.task == "generate":
                raise ConfigError("verbalizer scores classes with label words; task = 'generate' writes responses")
            if self.head_init != "random":
                raise ConfigError(f"a verbalizer has no head for head_init = {self.head_init!r} to set")
            if not [w for w in self.verbalizer.split(",") if w.strip()]:
                raise ConfigError(f"verbalizer must be comma-separated label words or 'names', got {self.verbalizer!r}")
        if self.task != "generate":
            return
        refused = [name for name, on in (
            (f"head_init = {self.head_init!r}", self.head_init != "random"),
            ("logit_adjustment", bool(self.logit_adjustment)), ("tpt", self.tpt),
            ("attack = 'label_flip'", self.attack == "label_flip"),
        ) if on]
        if refused:
            raise ConfigError(f"task = 'generate' trains no classification head: {', '.join(refused)} "
                              "apply to task = 'classify'")

    @classmethod
    def from_sources(cls, config_file: str | Path | None = None, overrides: Mapping[str, Any] | None = None) -> RunConfig:
        """Defaults, then the TOML file, then ``overrides`` (None values in overrides are ignored)."""
        values: dict[str, Any] = {}
        if config_file is not None:
            values.update(read_toml(config_file))
        values.update({k: v for k, v in (overrides or {}).items() if v is not None})
        _reject_unknown(values, source=str(config_file) if config_file else "overrides")
        return cls(**values)

    def _check_robustness_and_privacy(self) -> None:
        check_aggregator(self.aggregator, self.aggregator_options())
        if self.update_clip is not None:
            check_number("update_clip", self.update_clip, lower=0.0)
        if self.attack is not None:
            check_attack(self.attack, self.attack_fraction, self.attack_scale)
        self.dp_config()
        if self.dp is not None and self.algorithm == "scaffold":
            raise ConfigError("differential privacy with SCAFFOLD is not supported: the control deltas are not privatized")
        if self.dp == "central" and self.aggregator != "mean":
            raise ConfigError("central DP needs aggregator = 'mean' (noise is calibrated to the clipped sum)")
        if self.secagg:
            if self.aggregator not in ("mean",):
                raise ConfigError("secure aggregation reveals only the sum: use aggregator = 'mean'")
            if self.dp == "local":
                raise ConfigError("secure aggregation with local DP is not supported; use central DP")
            if self.algorithm == "scaffold":
                raise ConfigError("secure aggregation with SCAFFOLD is not supported")
            threshold = self.secagg_threshold
            if threshold is not None and not 2 <= threshold <= self.clients_per_round:
                raise ConfigError(f"secagg_threshold must be in [2, clients_per_round], got {threshold}")
            if threshold is not None and 2 * threshold <= self.clients_per_round:
                # two disjoint groups of t could each rebuild a client's secrets: a server that
                # shows them different survivor lists would learn that client's input
                raise ConfigError(f"secagg_threshold must exceed half of clients_per_round "
                                  f"({self.clients_per_round}), got {threshold}")

    def _check_compression_and_devices(self) -> None:
        if self.compress is not None:
            _choice("compress", self.compress, ("int8", "int4"))
            if self.method in ("bbt", "zo"):
                raise ConfigError(f"method {self.method!r} already sends seeds/low-dimensional vectors: compress "
                                  "applies to gradient methods")
            conflicts = [name for name, on in (("dp", self.dp is not None), ("secagg", self.secagg),
                                               ("attack", self.attack is not None),
                                               ("algorithm = 'scaffold'", self.algorithm == "scaffold")) if on]
            if conflicts:
                raise ConfigError(f"compress cannot be combined with {', '.join(conflicts)} (they act on the "
                                  "uncompressed update)")
        elif self.error_feedback:
            raise ConfigError("error_feedback needs compress = 'int8' or 'int4'")
        if self.devices < 0:
            raise ConfigError(f"devices must be >= 1, or 0 for all local devices; got {self.devices}")
        _choice("parallel_backend", self.parallel_backend, ("shard_map", "pmap"))
        for name in ("tpt_steps", "tpt_views", "tpt_test_clients"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("tpt_lr", "tpt_alpha"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)}")

    def aggregator_options(self) -> dict[str, Any]:
        """The parameters of ``aggregator`` (:data:`AGGREGATOR_PARAMS`), as keyword arguments of
        :func:`fedprompt.server.robust.make_aggregator`."""
        return {
            "trimmed_mean": {"beta": self.trim_beta},
            "krum": {"num_byzantine": self.num_byzantine},
            "multi_krum": {"num_byzantine": self.num_byzantine, **({"m": self.krum_m} if self.krum_m else {})},
            "norm_bound": {"bound": self.norm_bound},
        }.get(self.aggregator, {})

    @property
    def _seeds_apply(self) -> bool:
        return self.method == "zo" and self.algorithm == "fedavg" and self.aggregator == "mean"

    @property
    def resolved_zo_downlink(self) -> str:
        """``seeds`` or ``state``: what the server sends a ZO run's clients (``state`` for other methods)."""
        if self.zo_downlink == "state" or not self._seeds_apply:
            return "state"
        return "seeds"

    @property
    def resolved_update_clip(self) -> float | None:
        """``update_clip`` as a bound, None when off (0 or unset)."""
        return float(self.update_clip) if self.update_clip else None

    def dp_config(self) -> DPConfig:
        """The :class:`DPConfig` of this run (validated)."""
        if self.dp is None:
            return DPConfig()
        return DPConfig(
            mode=self.dp, clip=self.dp_clip, noise_multiplier=self.dp_noise_multiplier,
            target_epsilon=self.dp_target_epsilon, delta=self.dp_delta, adaptive=self.dp_adaptive,
            accountant=self.dp_accountant, sampling="fixed",
        )

    @property
    def resolved_local_optimizer(self) -> str:
        return self.local_optimizer or ("sgd" if self.algorithm in SGD_CLIENT_ALGORITHMS else "adam")

    @property
    def resolved_eval_every(self) -> int:
        """``eval_every``, or when unset every ``max(1, rounds // 3)`` rounds."""
        return self.eval_every if self.eval_every is not None else max(1, self.rounds // 3)

    @property
    def resolved_local_lr(self) -> float:
        if self.local_lr is not None:
            return self.local_lr
        return SGD_LR if self.resolved_local_optimizer == "sgd" else ADAM_LR

    def to_dict(self) -> dict[str, Any]:
        """Every setting, with the resolved local optimizer, learning rate and evaluation interval filled in."""
        return {**dataclasses.asdict(self), "local_optimizer": self.resolved_local_optimizer,
                "local_lr": self.resolved_local_lr, "eval_every": self.resolved_eval_every}


def read_toml(path: str | Path) -> dict[str, Any]:
    """Read a TOML config, flattening one level of tables.

    A file over :data:`fedprompt.wire.limits.MAX_TOML_BYTES` (1 MiB) is refused before it is read.
    """
    from fedprompt.wire.limits import MAX_TOML_BYTES, read_bounded

    path = Path(path)
    data = read_bounded(path, MAX_TOML_BYTES, what="config file", error=ConfigError)
    try:
        raw = tomllib.loads(data.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError, RecursionError) as err:
        raise ConfigError(f"cannot read config file {str(path)!r}: {err}") from None
    flat: dict[str, Any] = {}
    for key, value in raw.items():
        items = value.items() if isinstance(value, dict) else [(key, value)]
        for name, item in items:
            if isinstance(item, dict):
                raise ConfigError(f"{path}: tables nest one level at most ({key}.{name})")
            if name in flat:
                raise ConfigError(f"{path}: {name!r} is set twice")
            flat[name] = item
    _reject_unknown(flat, source=str(path))
    return flat


def _reject_unknown(values: Mapping[str, Any], source: str) -> None:
    known = {f.name for f in dataclasses.fields(RunConfig)}
    for key in values:
        if key not in known:
            hint = difflib.get_close_matches(key, known, n=1)
            suggestion = f"; did you mean {hint[0]!r}?" if hint else ""
            raise ConfigError(f"{source}: unknown setting {key!r}{suggestion}")


def _choice(name: str, value: str, options: tuple[str, ...]) -> None:
    if value not in options:
        raise ConfigError(f"{name} must be one of {', '.join(options)}; got {value!r}")


def _check_type(field: dataclasses.Field, value: Any) -> None:
    """Check a value against the field's annotation (int, float, str, bool, optional)."""
    annotation = str(field.type)
    optional = "None" in annotation
    if value is None:
        if not optional:
            raise ConfigError(f"{field.name} must be set")
        return
    if annotation.startswith("bool"):
        ok = isinstance(value, bool)
    elif annotation.startswith("str | int"):
        ok = isinstance(value, (str, int)) and not isinstance(value, bool)
    elif annotation.startswith("int"):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif annotation.startswith("float"):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    else:
        ok = isinstance(value, str)
    if not ok:
        kind = annotation.split(" ")[0].split("|")[0]
        raise ConfigError(f"{field.name} must be {kind}, got {value!r}")
