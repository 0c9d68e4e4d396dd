"""How a :class:`~fedprompt.config.RunConfig` becomes a federation, written once for every runtime.

:func:`make_plan` builds, from the settings and the frozen backbone and without any client
data, everything both runtimes share: the prompt and task, the algorithm and local optimizer,
the :class:`~fedprompt.client.program.ClientProgram` every client runs, the client's encode
stage (local DP), the server's :class:`~fedprompt.server.rounds.ServerRound` (the update bound,
robust rule or central DP, the optax step, the privacy ledger), and the
:class:`~fedprompt.federation.keys.KeySchedule`.
The in-process simulation (:mod:`fedprompt.simulation.engine`) and the Flower apps
(:mod:`fedprompt.flower`) then make the same calls, round by round::

    ids, _ = plan.sample(r)                                        # both runtimes
    result = plan.program.update(params, weights, rows, n, plan.client_keys(r)[i], ...)  # client i
    payload = plan.encode(result.delta, noise_key)                 # client i: local DP
    received = plan.server.receive(messages, ..., template=plan.update_template(rows))   # server
    state, outcome = plan.server.apply(state, received, sizes, key=noise_key, ...)       # server

A deployment with the same seed and data therefore ends with the prompt of the simulation
(up to the DP noise, which a deployment draws from the operating system's entropy).

Example:
  >>> from fedprompt.config import RunConfig
  >>> make_prompt_config(RunConfig()).num_virtual_tokens
  20
  >>> make_algorithm(RunConfig(algorithm="fedavgm", server_momentum=0.5)).name
  'fedavgm'
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
import optax

from fedprompt.backbones.backbone import Backbone
from fedprompt.client import class_means
from fedprompt.client.local import init_trainable, iterate_batches, make_eval_step
from fedprompt.client.program import ClientProgram, gradient_program, identity_delta
from fedprompt.config import ADAM_LR, DPConfig, RunConfig
from fedprompt.errors import ConfigError
from fedprompt.federation.keys import KeySchedule
from fedprompt.federation.seeds import SeedDownlink
from fedprompt.privacy import dp
from fedprompt.prompts import PromptConfig
from fedprompt.server import algorithms, rounds
from fedprompt.server.robust import make_aggregator
from fedprompt.tasks import CausalLM, SequenceClassification, Task

Pytree = Any


def make_baseline_optimizer(config: RunConfig) -> optax.GradientTransformation:
    """The optimizer of the ``baselines``: Adam, the centralized recipe, at ``local_lr`` when the
    clients use Adam too and at Adam's default 0.01 when they use SGD, so that a federation
    whose clients take plain SGD steps (for its server optimizer to adapt) is compared with
    centralized and local-only prompts trained as well as they can be, not with SGD ones."""
    if config.resolved_local_optimizer == "adam":
        return optax.adam(config.resolved_local_lr)
    return optax.adam(ADAM_LR)


def make_prompt_config(config: RunConfig) -> PromptConfig:
    """The prompt of a run: ``method`` and ``num_virtual_tokens``; prefixes start small (std 0.02).

    The gradient-free methods tune a soft prompt."""
    return PromptConfig(
        method="prefix" if config.method == "prefix" else "prompt", num_virtual_tokens=config.num_virtual_tokens,
        random_std=0.02 if config.method == "prefix" else 1.0,
    )


def make_task(num_labels: int, task: str = "classify", verbalizer: Sequence[int] | None = None) -> Task:
    """The task of a run: sequence classification over ``num_labels`` classes (by the LM head's
    logits of ``verbalizer``'s token ids, one per class, when given), or for ``task =
    "generate"`` next-token prediction on the responses (:class:`~fedprompt.tasks.CausalLM`)."""
    if task == "generate":
        return CausalLM()
    return SequenceClassification(num_labels=num_labels, verbalizer=None if verbalizer is None else tuple(verbalizer))


def verbalizer_tokens(config: RunConfig, backbone: Backbone, label_names: Sequence[str]) -> tuple[int, ...] | None:
    """The token ids of ``config.verbalizer``'s label words (``names``: the label names), one per
    class: each word's first token with the backbone's tokenizer, read after a space as it
    follows other words in a text; None without a verbalizer.

    Raises:
      ConfigError: an encoder, no tokenizer, a count of words other than the classes', a word
        with no tokens, or two words starting with the same token.
    """
    if config.verbalizer is None:
        return None
    if not backbone.is_decoder or backbone.tokenizer is None:
        raise ConfigError(f"a verbalizer needs a decoder backbone with a tokenizer; {backbone.name!r} is not one")
    words = list(label_names) if config.verbalizer == "names" else [w.strip() for w in config.verbalizer.split(",")]
    if len(words) != len(label_names):
        raise ConfigError(f"verbalizer has {len(words)} words for {len(label_names)} classes "
                          f"({', '.join(label_names)})")
    ids = []
    for word in words:
        tokens = backbone.tokenizer(" " + word, add_special_tokens=False)["input_ids"]
        if not tokens:
            raise ConfigError(f"verbalizer word {word!r} has no tokens")
        ids.append(int(tokens[0]))
    if len(set(ids)) != len(ids):
        raise ConfigError(f"verbalizer words {words} do not all start with different tokens")
    return tuple(ids)


def check_task(config: RunConfig, backbone: Backbone, label_names: Sequence[str] | None = None) -> None:
    """Refuse a task the backbone cannot run (before anything is written).

    Raises:
      ConfigError: ``task = "generate"`` on an encoder; a ``verbalizer`` that does not fit the
        backbone or ``label_names`` (:func:`verbalizer_tokens`).
    """
    if label_names is not None:
        verbalizer_tokens(config, backbone, label_names)
    if config.task == "generate" and not backbone.is_decoder:
        raise ConfigError(f"task = 'generate' needs a decoder backbone (GPT-2, Llama, Qwen2, Mistral; the built-in "
                          f"one is --backbone wordnet-gpt2); {backbone.name!r} is an encoder")


def make_algorithm(config: RunConfig) -> algorithms.Algorithm:
    """The algorithm named by the config with its hyperparameters."""
    kwargs: dict[str, Any] = {}
    if config.server_lr is not None:
        kwargs["server_lr"] = config.server_lr
    if config.algorithm == "fedavgm":
        kwargs["momentum"] = config.server_momentum
    if config.algorithm == "fedprox":
        kwargs["mu"] = config.prox_mu
    if config.algorithm in ("fedadagrad", "fedadam", "fedyogi"):
        kwargs["tau"] = config.tau
        kwargs["b1"] = config.b1 if config.algorithm != "fedadagrad" else 0.0
        if config.algorithm != "fedadagrad":
            kwargs["b2"] = config.b2
    return algorithms.from_name(config.algorithm, **kwargs)


def make_local_optimizer(config: RunConfig) -> optax.GradientTransformation:
    """The clients' optax optimizer (``local_optimizer``, ``local_lr``)."""
    if config.resolved_local_optimizer == "sgd":
        return optax.sgd(config.resolved_local_lr)
    return optax.adam(config.resolved_local_lr)


def make_program(
    config: RunConfig,
    backbone: Backbone,
    prompt_config: PromptConfig,
    task: Task,
    algorithm: algorithms.Algorithm | None = None,
    batch_sharding: Any = None,
) -> ClientProgram:
    """The :class:`~fedprompt.client.program.ClientProgram` of a run: the gradient client of the
    algorithm, wrapped by ``compress``; or the gradient-free ``bbt`` / ``zo`` clients.
    ``batch_sharding``: the gradient client's local batches spread over devices."""
    if config.method == "bbt":
        from fedprompt.client.bbt import make_bbt_program

        head_optimizer = None if config.local_lr is None else optax.adam(config.local_lr)
        return make_bbt_program(backbone, prompt_config, task, local_steps=config.local_steps,
                                batch_size=config.batch_size, seed=config.seed, head_optimizer=head_optimizer,
                                dim=config.bbt_dim, popsize=config.bbt_popsize,
                                fitness_examples=config.bbt_fitness_examples or None)
    if config.method == "zo":
        from fedprompt.client.zeroth_order import make_zo_program

        lr = {} if config.local_lr is None else {"lr": config.local_lr}
        return make_zo_program(backbone, prompt_config, task, local_steps=config.local_steps,
                               batch_size=config.batch_size, seed=config.seed, num_seeds=config.zo_seeds,
                               eps=config.zo_eps, head=config.zo_head, **lr)
    program = gradient_program(
        backbone, prompt_config, task, algorithm or make_algorithm(config), make_local_optimizer(config),
        local_steps=config.local_steps, batch_size=config.batch_size, scaffold_lr=config.resolved_local_lr,
        batch_sharding=batch_sharding, logit_adjustment=config.logit_adjustment,
    )
    if config.compress is None:
        return program
    from fedprompt.client.compressed import compressed_program

    return compressed_program(program.update, config.compress, error_feedback=config.error_feedback)


def local_batch_sharding(config: RunConfig) -> Any:
    """For ``devices`` > 1 (or 0: all) on one client's machine, the sharding that splits each
    local batch's examples over that many local devices; None for one device.

    Raises:
      ConfigError: a gradient-free method (its forward passes are not split), more devices than
        this machine has, or a batch that does not split evenly.
    """
    available = jax.local_devices()
    count = len(available) if config.devices == 0 else config.devices
    if count == 1:
        return None
    if config.method in ("bbt", "zo"):
        raise ConfigError(f"devices > 1 on one client splits gradient steps; method {config.method!r} has none")
    if count > len(available):
        raise ConfigError(f"devices = {count}, but this machine has {len(available)} local devices")
    if config.batch_size % count:
        raise ConfigError(f"batch_size {config.batch_size} does not split over {count} devices")
    mesh = jax.sharding.Mesh(np.array(available[:count]), ("devices",))
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("devices"))


@dataclasses.dataclass(frozen=True)
class Privacy:
    """A run's differential privacy, resolved: the noise multiplier (calibrated to a target
    epsilon if asked) and the ledger; ``None`` fields without DP."""

    config: DPConfig
    noise_multiplier: float = 0.0
    ledger: Any = None

    @property
    def mode(self) -> str | None:
        return self.config.mode if self.config.enabled else None


def make_privacy(
    dp_config: DPConfig | None, *, num_clients: int, clients_per_round: int, rounds: int | None
) -> Privacy:
    """DP settings with the noise multiplier resolved (calibrated to ``target_epsilon`` over
    ``rounds`` when no multiplier is given); dp-accounting is imported only with DP."""
    dp_config = dp_config or DPConfig()
    if not dp_config.enabled:
        return Privacy(dp_config)
    from fedprompt.privacy import accounting  # dp-accounting (and SciPy) only when DP is used

    delta = dp_config.resolved_delta(num_clients)
    z = dp_config.noise_multiplier
    if z is None:
        if rounds is None:
            raise ConfigError("a DP target epsilon needs the number of rounds to calibrate the noise")
        z = accounting.noise_multiplier_for_epsilon(
            dp_config.target_epsilon, None, rounds, delta, accountant=dp_config.accountant, sampling="fixed",
            population=num_clients, cohort=clients_per_round, mode=dp_config.mode,
        )
    ledger = accounting.PrivacyLedger(
        noise_multiplier=z, delta=delta, mode=dp_config.mode, accountant=dp_config.accountant, sampling="fixed",
        population=num_clients, cohort=clients_per_round,
    )
    return Privacy(dp_config, float(z), ledger)


@dataclasses.dataclass(frozen=True)
class SecureAggregationSettings:
    """Secure aggregation of a run: the Shamir threshold (None: about two thirds of the
    round's clients) and the per-coordinate clip range of quantized updates without DP."""

    threshold: int | None = None
    clip_range: float = 1.0

    def resolved_threshold(self, n: int) -> int:
        return self.threshold or max(2, -(-2 * n // 3))


LOCAL_DP_TAIL = 6.0
"""How many standard deviations above its mean the norm of local DP's noise may lie before the
server's bound clips it: ``P(||N(0, s^2 I_D)|| > s (sqrt(D) + t)) <= exp(-t^2 / 2)``, about
1.5e-8 for ``t = 6`` (Gaussian concentration of a 1-Lipschitz function)."""


def resolve_update_clip(update_clip: float | None, privacy: Privacy, size: int) -> float | None:
    """The server's bound on every client's delta (:func:`~fedprompt.server.rounds.update_clip_stage`).

    * without DP: ``update_clip`` (None or 0: no bound);
    * central DP: None, whatever ``update_clip`` says: the DP stage clips every update to its
      clip ``C`` (adaptive or not) and calibrates the noise to exactly that ``C``; a second clip
      that the sensitivity analysis does not see is left out;
    * local DP (when ``update_clip`` is on): ``C (1 + z (sqrt(D) + t))`` for ``D = size``
      coordinates and ``t =`` :data:`LOCAL_DP_TAIL`: an honest client sends its update clipped
      to ``C`` plus ``N(0, (z C)^2 I_D)``, whose norm exceeds ``z C (sqrt(D) + t)`` with
      probability below ``exp(-t^2 / 2)``, so honest updates pass unscaled (clipping them would
      only be post-processing, never a privacy loss, but it would bias them), and a hostile one
      moves the mean no further than an honest one can.
    """
    if privacy.mode == "central":
        return None
    if not update_clip:
        return None
    if privacy.mode == "local":
        c = privacy.config.clip
        return float(c * (1.0 + privacy.noise_multiplier * (np.sqrt(size) + LOCAL_DP_TAIL)))
    return float(update_clip)


def make_aggregate_stage(
    aggregator: Any, privacy: Privacy, clients_per_round: int
) -> rounds.AggregateStage:
    """The server's aggregation stage: central DP-FedAvg, else the (robust) ``aggregator``."""
    if privacy.mode == "central":
        c = privacy.config
        return dp.central_dp_stage(dp.CentralDP(
            clip=c.clip, noise_multiplier=privacy.noise_multiplier, denominator=clients_per_round,
            adaptive=c.adaptive, target_quantile=c.target_quantile, clip_lr=c.clip_lr, count_stddev=c.count_stddev,
        ))
    return rounds.mean_stage(aggregator)


@dataclasses.dataclass(frozen=True, eq=False)
class FederationPlan:
    """Everything the runtimes share about one federation (module docstring); no client data.

    Attributes:
      backbone: the frozen backbone (loaded where the plan is built; it never travels).
      prompt_config, task: what is trained (the task resolved against the backbone).
      algorithm: the federated algorithm.
      program: what every client runs.
      server: the server's round.
      privacy: the resolved DP settings.
      encode: the client's encode stage ``(payload, key) -> payload`` (local DP), or None.
      keys: the run's key schedule.
      num_clients, clients_per_round: the federation's and a round's clients.
      dropout: the probability that a sampled client drops out (simulation only).
      secagg: secure aggregation's settings, None without it.
      head_statistics: with ``head_init = "class_means"``, the clients' class statistics
        ``(trainable, weights, rows, n, key) -> ClassStatistics``
        (:func:`~fedprompt.client.class_means.make_class_statistics`); None: a random head.
      head_covariance: the class statistics carry the features' covariance (``head_init =
        "lda"``: the head is linear discriminant analysis).
      seeds: a zeroth-order federation's seed-only downlink
        (:class:`~fedprompt.federation.seeds.SeedDownlink`); None: the state is broadcast.
    """

    backbone: Backbone
    prompt_config: PromptConfig
    task: Task
    algorithm: algorithms.Algorithm
    program: ClientProgram
    server: rounds.ServerRound
    privacy: Privacy
    encode: Callable[[Pytree, jax.Array], Pytree] | None
    keys: KeySchedule
    num_clients: int
    clients_per_round: int
    dropout: float
    secagg: SecureAggregationSettings | None
    _eval_step: Callable[..., Any] = dataclasses.field(repr=False)
    head_statistics: Callable[..., class_means.ClassStatistics] | None = dataclasses.field(default=None, repr=False)
    seeds: SeedDownlink | None = dataclasses.field(default=None, repr=False)
    head_covariance: bool = False

    @property
    def scaffold(self) -> bool:
        return self.algorithm.scaffold

    # -- the one-time class-means head (before the first round) ------------------------------

    def class_statistics(self, params: Pytree, rows: Mapping[str, Any], num_examples: Any, key: jax.Array):
        """Client side: the class statistics of a client's rows seen through ``params``' prompt
        (``key``: :meth:`~fedprompt.federation.keys.KeySchedule.head_statistics` of the client)."""
        return self.head_statistics(self.trainable(params), self.backbone.weights, rows, num_examples, key)

    def class_statistics_template(self) -> class_means.ClassStatistics:
        """Shapes and dtypes of one client's :meth:`class_statistics` (what the server decodes)."""
        labels, width = self.task.num_labels, self.backbone.width
        return class_means.ClassStatistics(
            jax.ShapeDtypeStruct((labels, width), np.float32), jax.ShapeDtypeStruct((labels,), np.float32),
            jax.ShapeDtypeStruct((labels,), np.float32),
            jax.ShapeDtypeStruct((width, width), np.float32) if self.head_covariance else None,
        )

    def with_class_means_head(self, params: Pytree, total: class_means.ClassStatistics) -> Pytree:
        """Server side: ``params`` with the head set from the federation's summed statistics."""
        return {**params, "head": class_means.class_means_head(total)}

    def sample(self, round_index: int) -> tuple[np.ndarray, np.ndarray]:
        """The sampled client ids of a round (sorted) and which of them drop out (simulated)."""
        rng = self.keys.sampling(round_index)
        ids = np.sort(rng.choice(self.num_clients, self.clients_per_round, replace=False))
        dropped = rng.random(self.clients_per_round) < self.dropout
        return ids, dropped

    def client_keys(self, round_index: int) -> jax.Array:
        """``[C]`` PRNG keys of a round, one per client id."""
        return self.keys.client_keys(round_index, self.num_clients)

    def init_params(self, key: jax.Array | None = None) -> Pytree:
        """The initial global parameters (the program's, or a prompt + head)."""
        key = self.keys.init() if key is None else key
        if self.program.init is not None:
            return self.program.init(key)
        return init_trainable(self.backbone, self.prompt_config, self.task, key)

    def init(self, key: jax.Array | None = None) -> rounds.RoundState:
        """The server state before the first round (algorithm and protections)."""
        return self.server.init(self.init_params(key))

    def broadcast(self, state: rounds.RoundState) -> dict[str, Pytree]:
        """What the server sends a sampled client: ``params`` (and SCAFFOLD's ``control``)."""
        server = state.server
        return {"params": server.params, **({"control": server.control} if self.scaffold else {})}

    def broadcast_template(self) -> dict[str, Pytree]:
        """Shapes and dtypes of :meth:`broadcast` (``jax.ShapeDtypeStruct`` leaves)."""
        return jax.eval_shape(lambda: self.broadcast(self.init()))

    def update_template(self, rows: Mapping[str, Any]) -> dict[str, Pytree]:
        """The tree the server expects from a client: ``delta`` (the program's payload) and, for
        SCAFFOLD, ``control_delta``; ``rows`` is any client's (or one example's) encoded data,
        whose column names and dtypes fix the payload's shape."""
        params = jax.eval_shape(self.init_params)
        rows = {name: jax.ShapeDtypeStruct(np.shape(c), np.asarray(c).dtype if not hasattr(c, "dtype") else c.dtype)
                for name, c in rows.items()}
        result = jax.eval_shape(
            self.program.update, params, self.backbone.weights, rows, np.int32(1), self.keys.init(), params, params,
        )
        return {"delta": result.delta, **({"control_delta": params} if self.scaffold else {})}

    def trainable(self, params: Pytree) -> Pytree:
        """The ``{"prompt", "head"}`` that global ``params`` stand for (gradient-free programs
        hold low-dimensional parameters)."""
        to_trainable = self.program.to_trainable
        return params if to_trainable is None else to_trainable(params)

    def evaluate(self, params: Pytree, encoded: Mapping[str, np.ndarray], batch_size: int = 128) -> dict[str, float]:
        """Loss and accuracy of global ``params`` on an encoded data set (every example once).

        For :class:`~fedprompt.tasks.CausalLM` the accuracy is the response tokens' (the
        argmax is the next token), the loss their mean cross-entropy (each batch's weighted by
        its examples) and ``eval_perplexity`` its exponential."""
        trainable = self.trainable(params)
        total_loss = total_correct = total = 0.0
        for batch in iterate_batches(encoded, batch_size):
            m = self._eval_step(trainable, batch, self.backbone.weights)
            n = float(m.examples)
            total_loss += float(m.loss) * n
            total_correct += float(m.accuracy) * n
            total += n
        out = {"eval_loss": total_loss / total, "eval_accuracy": total_correct / total}
        if isinstance(self.task, CausalLM):
            out["eval_perplexity"] = float(np.exp(min(out["eval_loss"], 700.0)))
        return out


def build_plan(
    backbone: Backbone,
    prompt_config: PromptConfig,
    task: Task,
    algorithm: algorithms.Algorithm,
    local_optimizer: optax.GradientTransformation | None = None,
    *,
    num_clients: int,
    clients_per_round: int,
    local_steps: int = 1,
    batch_size: int = 1,
    seed: int = 0,
    dropout: float = 0.0,
    scaffold_lr: float | None = None,
    program: ClientProgram | None = None,
    aggregator: Any = None,
    dp_config: DPConfig | None = None,
    total_rounds: int | None = None,
    secagg: SecureAggregationSettings | None = None,
    head_init: str = "random",
    head_init_examples: int = 256,
    update_clip: float | None = None,
    downlink: str = "state",
) -> FederationPlan:
    """A :class:`FederationPlan` from its parts (what :func:`make_plan` does for a RunConfig).

    Args:
      backbone, prompt_config, task: what is trained.
      algorithm: the federated algorithm.
      local_optimizer, local_steps, batch_size, scaffold_lr: the gradient client's local
        training (not used when ``program`` is given).
      num_clients, clients_per_round, dropout, seed: the federation's shape and its seed.
      program: a :class:`~fedprompt.client.program.ClientProgram` replacing the gradient client.
      aggregator: ``(stacked, weights) -> mean`` (default: the weighted mean; see
        :mod:`fedprompt.server.robust` for robust rules).
      dp_config, total_rounds: client-level differential privacy (a target epsilon is
        calibrated over ``total_rounds``).
      secagg: secure aggregation (only the sum of the round's updates is revealed).
      head_init, head_init_examples: ``"class_means"`` sets the head once before the first
        round from the clients' class statistics on up to ``head_init_examples`` rows each
        (:mod:`fedprompt.client.class_means`); ``"lda"`` with their feature covariance too.
      update_clip: the server's L2 bound on every client's delta (None or 0: none; with DP,
        :func:`resolve_update_clip`).
      downlink: ``"state"`` (the server broadcasts the global state) or ``"seeds"`` (a
        zeroth-order program under FedAvg's weighted mean: the rounds' merged seed pairs,
        :mod:`fedprompt.federation.seeds`; needs ``total_rounds``).

    Raises:
      ConfigError: a combination that cannot run.
    """
    if clients_per_round > num_clients:
        raise ConfigError(f"clients_per_round {clients_per_round} exceeds the {num_clients} clients")
    task = task.resolve(backbone)
    if program is None:
        if local_optimizer is None:
            raise ConfigError("the gradient client needs a local optimizer")
        program = gradient_program(backbone, prompt_config, task, algorithm, local_optimizer,
                                   local_steps=local_steps, batch_size=batch_size, scaffold_lr=scaffold_lr)
    privacy = make_privacy(dp_config, num_clients=num_clients, clients_per_round=clients_per_round,
                           rounds=total_rounds)
    stage = make_aggregate_stage(aggregator or make_aggregator("mean"), privacy, clients_per_round)
    bound = None
    if update_clip:
        init = program.init or (lambda key: init_trainable(backbone, prompt_config, task, key))
        size = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(jax.eval_shape(init, jax.random.key(0))))
        bound = resolve_update_clip(update_clip, privacy, size)
    seeds = None
    if downlink == "seeds":
        if program.seeds is None or algorithm.plain_server_lr is None or aggregator is not None:
            raise ConfigError("a seed downlink needs a zeroth-order client, FedAvg and the weighted mean (the "
                              "round's move must be a sum of seed directions)")
        if privacy.mode is not None or secagg is not None or total_rounds is None:
            raise ConfigError("a seed downlink needs the number of rounds, and no DP or secure aggregation")
        seeds = SeedDownlink(
            program.seeds.replay, num_seeds=program.seeds.num_seeds,
            pairs_per_round=clients_per_round * program.seeds.local_steps, rounds=int(total_rounds),
            num_clients=num_clients, server_lr=algorithm.plain_server_lr, initial_held=head_init == "random",
        )
    elif downlink != "state":
        raise ConfigError(f"downlink must be 'state' or 'seeds', got {downlink!r}")
    server = rounds.ServerRound(
        algorithm, num_clients=num_clients, aggregate=stage,
        to_delta=None if program.to_delta is identity_delta else program.to_delta, ledger=privacy.ledger,
        update_clip=bound, seeds=seeds,
    )
    encode = None
    if privacy.mode == "local":
        encode = dp.local_dp_stage(privacy.config.clip, privacy.noise_multiplier)
    head_statistics = None
    if head_init in ("class_means", "lda"):
        if not isinstance(task, SequenceClassification):
            raise ConfigError(f"head_init = {head_init!r} sets a classification head; the task has none")
        if privacy.mode is not None or secagg is not None:
            raise ConfigError("class-means head initialisation sends class means in the clear: not with DP or "
                              "secure aggregation")
        if task.verbalizer is not None:
            raise ConfigError("a verbalizer task has no head to initialise from class means")
        head_statistics = class_means.make_class_statistics(backbone, prompt_config, task,
                                                            max_examples=head_init_examples,
                                                            covariance=head_init == "lda")
    elif head_init != "random":
        raise ConfigError(f"head_init must be 'random', 'class_means' or 'lda', got {head_init!r}")
    return FederationPlan(
        backbone=backbone, prompt_config=prompt_config, task=task, algorithm=algorithm, program=program,
        server=server, privacy=privacy, encode=encode, keys=KeySchedule(seed), num_clients=num_clients,
        clients_per_round=clients_per_round, dropout=dropout, secagg=secagg,
        _eval_step=make_eval_step(backbone, prompt_config, task), head_statistics=head_statistics, seeds=seeds,
        head_covariance=head_init == "lda",
    )


def make_plan(config: RunConfig, backbone: Backbone, num_labels: int, *, batch_sharding: Any = None,
              label_names: Sequence[str] | None = None) -> FederationPlan:
    """The :class:`FederationPlan` of a run on ``backbone`` with ``num_labels`` classes
    (``label_names``: their names, for a ``verbalizer`` of ``names``; default ``"0"``, ``"1"``, ...).

    ``batch_sharding`` spreads a gradient client's local batches over this machine's devices
    (a SuperNode with several accelerators, :func:`local_batch_sharding`); the server's plan
    and the simulation's do without (the simulation spreads clients over devices instead).

    Raises:
      ConfigError: a combination the settings cannot run.
    """
    if num_labels < 2 and config.task == "classify":
        raise ConfigError(f"a classification task needs at least 2 labels, got {num_labels}")
    check_task(config, backbone)
    prompt_config = make_prompt_config(config)
    names = tuple(label_names) if label_names is not None else tuple(str(i) for i in range(num_labels))
    task = make_task(num_labels, config.task, verbalizer_tokens(config, backbone, names)).resolve(backbone)
    algorithm = make_algorithm(config)
    secagg = SecureAggregationSettings(config.secagg_threshold) if config.secagg else None
    return build_plan(
        backbone, prompt_config, task, algorithm, num_clients=config.clients,
        clients_per_round=config.clients_per_round, seed=config.seed, dropout=config.dropout,
        program=make_program(config, backbone, prompt_config, task, algorithm, batch_sharding),
        aggregator=None if config.aggregator == "mean" else make_aggregator(config.aggregator,
                                                                            **config.aggregator_options()),
        dp_config=config.dp_config(), total_rounds=config.rounds, secagg=secagg,
        head_init=config.head_init, head_init_examples=config.head_init_examples,
        update_clip=config.resolved_update_clip, downlink=config.resolved_zo_downlink,
    )
