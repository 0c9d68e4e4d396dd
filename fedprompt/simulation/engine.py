"""The in-process simulation engine: many clients in one XLA program.

One round:

1. sample ``clients_per_round`` clients uniformly without replacement (seeded); each sampled
   client drops out with probability ``dropout``;
2. broadcast the global state (its encoded size is counted as ``bytes_down``);
3. train a block of clients at once: :func:`~fedprompt.client.federated.make_client_update`
   ``vmap``-ed over the block, all sharing ONE copy of the frozen backbone weights (they are an
   un-batched argument), client data gathered inside the program from device-resident
   ``[clients, N_max, ...]`` arrays; the block is padded to a power-of-two size so a varying
   number of clients never recompiles;
4. every update goes through the wire codec exactly as in deployment: encoded (``bytes_up``
   counts the real bytes), decoded and validated against the template; a malformed or
   non-finite update is rejected and left out, and the remaining weights renormalize;
5. aggregate (one jit-compiled program) and apply the algorithm's server step;
6. evaluate the global state on the test set.

Memory grows with prompt size x clients, never backbone size x clients. For a given seed
the run is deterministic. With ``parallel=`` a block of clients is spread over the local
devices (:mod:`fedprompt.parallel`: ``shard_map`` or ``pmap`` over devices, ``vmap`` within
each), with the same results as one device.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedprompt.backbones.backbone import Backbone
from fedprompt.client.federated import ClientResult, make_client_update
from fedprompt.client.local import init_trainable, iterate_batches, make_eval_step, make_loss_fn
from fedprompt.errors import ConfigError, OutOfMemoryError, SecureAggregationError
from fedprompt.parallel import DeviceAxis, make_parallel_train_clients
from fedprompt.prompts import PromptConfig
from fedprompt.privacy import dp
from fedprompt.server import aggregators, rounds
from fedprompt.server.algorithms import Algorithm, ServerState
from fedprompt.simulation import attacks
from fedprompt.simulation.datasets import TextDataset
from fedprompt.tasks import Task
from fedprompt.wire import codec

Pytree = Any


@dataclasses.dataclass(frozen=True)
class ClientData:
    """All clients' tokenized data, padded to the largest client and kept on the device.

    Attributes:
      columns: ``{"input_ids": [C, N_max, T], "attention_mask": ..., "labels": [C, N_max]}``.
      sizes: real examples per client ``[C]``.
      label_histograms: ``[C, num_labels]`` label counts (for reports).
    """

    columns: Mapping[str, jax.Array]
    sizes: np.ndarray
    label_histograms: np.ndarray

    @property
    def num_clients(self) -> int:
        return len(self.sizes)


def encode_dataset(backbone: Backbone, dataset: TextDataset, max_length: int, num_virtual: int) -> dict[str, np.ndarray]:
    """Tokenize a labelled text data set into fixed-shape NumPy columns."""
    encoded = backbone.tokenize(list(dataset.texts), max_length, num_virtual=num_virtual)
    return {**encoded, "labels": np.asarray(dataset.labels, np.int32)}


def build_client_data(encoded: Mapping[str, np.ndarray], parts: list[np.ndarray], num_labels: int) -> ClientData:
    """Stack per-client rows of ``encoded`` into ``[C, N_max, ...]`` arrays (zero padded)."""
    sizes = np.array([len(p) for p in parts], np.int32)
    if sizes.min() < 1:
        raise ConfigError("every client needs at least one example")
    capacity = int(sizes.max())
    columns = {}
    for name, column in encoded.items():
        stacked = np.zeros((len(parts), capacity, *column.shape[1:]), column.dtype)
        for i, part in enumerate(parts):
            stacked[i, : len(part)] = column[part]
        columns[name] = jnp.asarray(stacked)
    labels = np.asarray(encoded["labels"])
    histograms = np.stack([np.bincount(labels[p], minlength=num_labels) for p in parts])
    return ClientData(columns=columns, sizes=sizes, label_histograms=histograms)


@dataclasses.dataclass
class RoundResult:
    """What one round did (all numbers are plain Python values)."""

    round: int
    train_loss: float
    clients: int
    sampled: int
    dropped: int
    rejected: int
    rejections: dict[str, int]
    bytes_up: int
    bytes_down: int
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)


class ClientProgram(NamedTuple):
    """How clients train and what travels, for methods other than plain gradient steps.

    Attributes:
      update: the vmappable client update, with the signature of
        :func:`~fedprompt.client.federated.make_client_update`'s result; its
        ``ClientResult.delta`` is the *payload* a client sends (a seed/scalar list, a
        low-dimensional vector, a quantized update ...).
      to_delta: ``(global_params, payload) -> delta`` on the server (jittable): the change of the
        global state that a payload stands for.
      init: ``(key) -> global params``; None uses :func:`~fedprompt.client.local.init_trainable`.
      to_trainable: ``(params) -> {"prompt", "head"}`` for evaluation; None: identity.
      client_state: ``ClientResult.control`` is state the client keeps between rounds (such as
        an error-feedback residual, shaped like the global params): the runtime stores it per
        client and passes it back as ``client_control`` the next time that client trains.
    """

    update: Callable[..., ClientResult]
    to_delta: Callable[[Pytree, Pytree], Pytree]
    init: Callable[[jax.Array], Pytree] | None = None
    to_trainable: Callable[[Pytree], Pytree] | None = None
    client_state: bool = False


def _local_devices(count: int | None) -> list[jax.Device]:
    """The first ``count`` of this process's devices (all when None)."""
    available = jax.local_devices()
    if count is None:
        return available
    if not 1 <= count <= len(available):
        raise ConfigError(f"devices must be between 1 and the {len(available)} local devices, got {count}")
    return available[:count]


def gradient_program(
    backbone: Backbone,
    prompt_config: PromptConfig,
    task: Task,
    algorithm: Algorithm,
    local_optimizer: optax.GradientTransformation,
    *,
    local_steps: int,
    batch_size: int,
    scaffold_lr: float | None = None,
) -> ClientProgram:
    """The gradient-based client of ``algorithm`` (FedProx's proximal term, SCAFFOLD's
    correction) as a :class:`ClientProgram` whose payload is the update itself; what
    :class:`FederatedSimulation` runs when it is given no program."""
    if algorithm.scaffold and scaffold_lr is None:
        raise ConfigError("SCAFFOLD needs scaffold_lr (the clients' SGD learning rate)")
    update = make_client_update(
        make_loss_fn(backbone, prompt_config, task.resolve(backbone)), local_optimizer,
        local_steps=local_steps, batch_size=batch_size, prox_mu=algorithm.prox_mu,
        scaffold_lr=scaffold_lr if algorithm.scaffold else None,
    )
    return ClientProgram(update=update, to_delta=lambda global_params, payload: payload)


class FederatedSimulation:
    """Runs rounds of a federated algorithm over simulated clients.

    Args:
      backbone, prompt_config, task: what is trained.
      algorithm: the federated algorithm (:mod:`fedprompt.server.algorithms`).
      local_optimizer: optax transformation of the clients.
      client_data: the clients' data (:func:`build_client_data`).
      clients_per_round, local_steps, batch_size: the round's shape.
      scaffold_lr: local learning rate for SCAFFOLD's control update (SCAFFOLD only).
      dropout: probability that a sampled client drops out of a round.
      client_block: clients per vmapped program (None: all clients of a round in one block).
      seed: the run's seed.
      program: a :class:`ClientProgram` replacing the gradient-based client update (its
        ``local_optimizer``, ``local_steps`` and ``batch_size`` are then not used).
      aggregator: ``(stacked, weights) -> mean`` (default: the weighted mean; see
        :mod:`fedprompt.server.robust` for robust rules).
      attack: malicious clients (a fixed fraction, chosen by seed) and what they do.
      dp_config: client-level differential privacy (central or local DP-FedAvg).
      total_rounds: the run's rounds (needed to calibrate a DP target epsilon).
      secure_aggregation: aggregate with secure aggregation (only the sum is revealed).
      secagg_threshold: Shamir threshold (default about two thirds of the round's clients).
      secagg_range: per-coordinate clip range of quantized updates without DP.
      parallel: spread each block of clients over the local devices: ``"shard_map"`` or
        ``"pmap"`` (see :mod:`fedprompt.parallel`; same results as one device), or a
        :class:`~fedprompt.parallel.DeviceAxis`. None: one device.
      devices: how many local devices ``parallel`` uses (None: all).
    """

    def __init__(
        self,
        backbone: Backbone,
        prompt_config: PromptConfig,
        task: Task,
        algorithm: Algorithm,
        local_optimizer: optax.GradientTransformation,
        client_data: ClientData,
        *,
        clients_per_round: int,
        local_steps: int,
        batch_size: int,
        scaffold_lr: float | None = None,
        dropout: float = 0.0,
        client_block: int | None = None,
        seed: int = 0,
        program: ClientProgram | None = None,
        aggregator: aggregators.Aggregator = aggregators.weighted_mean,
        attack: attacks.AttackConfig | None = None,
        dp_config: dp.DPConfig | None = None,
        total_rounds: int | None = None,
        secure_aggregation: bool = False,
        secagg_threshold: int | None = None,
        secagg_range: float = 1.0,
        parallel: str | DeviceAxis | None = None,
        devices: int | None = None,
    ):
        if clients_per_round > client_data.num_clients:
            raise ConfigError(f"clients_per_round {clients_per_round} exceeds the {client_data.num_clients} clients")
        if algorithm.scaffold and scaffold_lr is None:
            raise ConfigError("SCAFFOLD needs scaffold_lr (the clients' SGD learning rate)")
        self.backbone = backbone
        self.prompt_config = prompt_config
        self.task = task.resolve(backbone)
        self.algorithm = algorithm
        self.attack = attack
        self.malicious = np.zeros(client_data.num_clients, bool)
        if attack is not None:
            self.malicious = attacks.malicious_clients(client_data.num_clients, attack.fraction, seed)
            if attack.kind == "label_flip":
                labels = attacks.poison_client_labels(np.asarray(client_data.columns["labels"]), self.malicious,
                                                      self.task.num_labels)
                client_data = dataclasses.replace(client_data, columns={**client_data.columns, "labels": jnp.asarray(labels)})
        self.client_data = client_data
        self.clients_per_round = clients_per_round
        self.secagg = secure_aggregation
        self.secagg_threshold = secagg_threshold
        self.secagg_range = secagg_range
        self._init_privacy(dp_config or dp.DPConfig(), total_rounds)
        self.dropout = dropout
        self.seed = seed
        # a block larger than the round would only train padding clients
        self.block = aggregators.bucket_size(min(client_block or clients_per_round, clients_per_round))
        self._key = jax.random.key(seed)
        if program is None:
            program = gradient_program(
                backbone, prompt_config, self.task, algorithm, local_optimizer,
                local_steps=local_steps, batch_size=batch_size, scaffold_lr=scaffold_lr,
            )
        if program.client_state and algorithm.scaffold:
            raise ConfigError("a client program that keeps per-client state cannot run SCAFFOLD (one state slot)")
        self.program = program
        update = program.update
        self._client_update = update
        self._to_delta = jax.jit(jax.vmap(program.to_delta, in_axes=(None, 0)))
        self._to_delta_single = jax.jit(program.to_delta)
        self.parallel = None if parallel is None else (
            parallel if isinstance(parallel, DeviceAxis) else DeviceAxis(parallel, _local_devices(devices))
        )
        if self.parallel is None:

            def train_block(global_params, weights, columns, sizes, ids, keys, control, client_controls):
                data = {name: column[ids] for name, column in columns.items()}
                return jax.vmap(update, in_axes=(None, None, 0, 0, 0, None, 0))(
                    global_params, weights, data, sizes[ids], keys, control, client_controls
                )

            self._train_block = jax.jit(train_block)
        else:  # blocks of clients spread over the devices: pmap/shard_map x vmap
            self._train_block = make_parallel_train_clients(update, axis=self.parallel).train_block
        self._aggregate = aggregators.Aggregation(aggregator)
        self._server_step = jax.jit(algorithm.apply)
        self._eval_step = make_eval_step(backbone, prompt_config, self.task)
        self._sizes = jnp.asarray(client_data.sizes)

    def _init_privacy(self, config: dp.DPConfig, total_rounds: int | None) -> None:
        """Noise multiplier (calibrated to a target epsilon if asked), accountant, DP aggregator."""
        self.dp = config
        self.ledger = None
        self.noise_multiplier = 0.0
        self._central_dp = None
        self._local_dp = None
        self.dp_state: Any = {}
        if not config.enabled:
            return
        from fedprompt.privacy import accounting  # dp-accounting (and SciPy) only when DP is used

        population, cohort = self.client_data.num_clients, self.clients_per_round
        delta = config.resolved_delta(population)
        z = config.noise_multiplier
        if z is None:
            if total_rounds is None:
                raise ConfigError("a DP target epsilon needs the number of rounds to calibrate the noise")
            z = accounting.noise_multiplier_for_epsilon(
                config.target_epsilon, None, total_rounds, delta, accountant=config.accountant, sampling="fixed",
                population=population, cohort=cohort, mode=config.mode,
            )
        self.noise_multiplier = float(z)
        self.ledger = accounting.PrivacyLedger(
            noise_multiplier=z, delta=delta, mode=config.mode, accountant=config.accountant, sampling="fixed",
            population=population, cohort=cohort,
        )
        if config.mode == "central":
            self._central_dp = dp.CentralDP(
                clip=config.clip, noise_multiplier=z, denominator=cohort, adaptive=config.adaptive,
                target_quantile=config.target_quantile, clip_lr=config.clip_lr, count_stddev=config.count_stddev,
            )
            self.dp_state = self._central_dp.init()
        else:
            self._local_dp = jax.jit(jax.vmap(dp.local_privatize, in_axes=(0, 0, None, None)))

    # -- state -------------------------------------------------------------------------------

    def init(self, key: jax.Array | None = None) -> tuple[ServerState, Pytree]:
        """Initial server state and the (zero) per-client control variates ``[C, ...]``."""
        key = jax.random.fold_in(self._key, 0) if key is None else key
        if self.program.init is not None:
            params = self.program.init(key)
        else:
            params = init_trainable(self.backbone, self.prompt_config, self.task, key)
        state = self.algorithm.init(params)
        client_controls = jax.tree.map(
            lambda x: jnp.zeros((self.client_data.num_clients, *x.shape), x.dtype), params
        )
        return state, client_controls

    # -- one round ---------------------------------------------------------------------------

    def sample(self, round_index: int) -> tuple[np.ndarray, np.ndarray]:
        """The sampled client ids of a round and which of them drop out (seeded by round)."""
        rng = np.random.default_rng([self.seed, round_index])
        ids = np.sort(rng.choice(self.client_data.num_clients, self.clients_per_round, replace=False))
        dropped = rng.random(self.clients_per_round) < self.dropout
        return ids, dropped

    def client_keys(self, round_index: int) -> jax.Array:
        """``[C]`` PRNG keys of a round, one per client id (independent of blocking and sampling)."""
        return jax.random.split(jax.random.fold_in(self._key, round_index + 1), self.client_data.num_clients)

    def train_clients(self, state: ServerState, client_controls: Pytree, ids: np.ndarray, round_index: int) -> ClientResult:
        """Local training of the clients ``ids`` (vmapped in padded blocks); stacked results."""
        keys = self.client_keys(round_index)
        results = []
        for start in range(0, len(ids), self.block):
            block_ids = ids[start : start + self.block]
            padded = np.concatenate([block_ids, np.full(self.block - len(block_ids), block_ids[0])])
            padded = jnp.asarray(padded, jnp.int32)
            controls = jax.tree.map(lambda c: c[padded], client_controls)
            try:
                out = self._train_block(
                    state.params, self.backbone.weights, self.client_data.columns, self._sizes,
                    padded, keys[padded], state.control, controls,
                )
            except jax.errors.JaxRuntimeError as err:
                if "RESOURCE_EXHAUSTED" not in str(err):
                    raise
                raise OutOfMemoryError(
                    f"training {self.block} clients in one program ran out of device memory ({err}); "
                    f"train fewer at once with client_block (`--client-block`), below {self.block}"
                ) from err
            results.append(jax.tree.map(lambda x: x[: len(block_ids)], out))
        return jax.tree.map(lambda *xs: jnp.concatenate(xs), *results)

    def run_round(self, state: ServerState, client_controls: Pytree, round_index: int) -> tuple[ServerState, Pytree, RoundResult]:
        """Sample, broadcast, train, (attack, privatize,) encode/validate, aggregate, step the server."""
        ids, dropped = self.sample(round_index)
        fingerprint = self.backbone.fingerprint
        broadcast = {"params": state.params, **({"control": state.control} if self.algorithm.scaffold else {})}
        bytes_down = len(codec.encode(jax.device_get(broadcast), kind=rounds.GLOBAL_KIND, round=round_index,
                                      fingerprint=fingerprint)) * len(ids)
        results = self.train_clients(state, client_controls, ids, round_index)
        round_key = jax.random.fold_in(self._key, 2_000_000 + round_index)
        payload = results.delta
        if self._local_dp is not None:  # each client clips and noises its own update before sending
            payload = self._local_dp(jax.random.split(round_key, len(ids)), payload, self.dp.clip, self.noise_multiplier)
        if self.attack is not None and self.attack.kind != "label_flip":
            payload = attacks.attack_updates(
                self.attack.kind, payload, jnp.asarray(self.malicious[ids]), jax.random.fold_in(round_key, 1),
                scale=self.attack.scale, noise_std=self.attack.noise_std,
            )
        host = jax.device_get(results._replace(delta=payload))
        extra: dict[str, Any] = {}
        if self.secagg:
            state, num, train_loss, bytes_up, extra = self._secure_round(state, host, ids, dropped, round_index, round_key)
            rejections: dict[str, int] = {}
        else:
            template = {"delta": host.delta, "control_delta": host.control_delta} if self.algorithm.scaffold else {"delta": host.delta}
            template = jax.tree.map(lambda x: x[0], template)
            messages = []
            for slot in range(len(ids)):
                if dropped[slot]:
                    messages.append(None)
                    continue
                update = {"delta": jax.tree.map(lambda x: x[slot], host.delta)}
                if self.algorithm.scaffold:
                    update["control_delta"] = jax.tree.map(lambda x: x[slot], host.control_delta)
                messages.append(codec.encode(update, kind=rounds.UPDATE_KIND, round=round_index, fingerprint=fingerprint))
            received = rounds.receive_updates(messages, round_index=round_index, fingerprint=fingerprint, template=template)
            aggregate = self._aggregate
            if self._central_dp is not None:
                aggregate = self._central_dp_aggregate(round_key, extra)
            outcome = rounds.aggregate_round(
                state, received, self.client_data.sizes[ids], server_step=self._server_step, aggregate=aggregate,
                num_clients=self.client_data.num_clients, to_delta=self._to_delta, scaffold=self.algorithm.scaffold,
                losses=host.loss,
            )
            state, num, train_loss = outcome.state, outcome.num_aggregated, outcome.train_loss
            bytes_up, rejections = received.bytes_up, received.rejections
            if (self.algorithm.scaffold or self.program.client_state) and received.accepted.any():
                accepted = np.flatnonzero(received.accepted)
                rows = jnp.asarray(ids[accepted], jnp.int32)
                new = jax.tree.map(lambda x: jnp.asarray(x[accepted]), host.control)
                client_controls = jax.tree.map(lambda c, n: c.at[rows].set(n), client_controls, new)
        if self.ledger is not None:
            epsilon = self.ledger.record_round(ids[~dropped])
            extra.update({"epsilon": epsilon if np.isfinite(epsilon) else None, "delta": self.ledger.delta})
        result = RoundResult(
            round=round_index + 1, train_loss=train_loss, clients=num, sampled=len(ids),
            dropped=int(dropped.sum()), rejected=sum(rejections.values()), rejections=rejections,
            bytes_up=bytes_up, bytes_down=bytes_down, extra=extra,
        )
        return state, client_controls, result

    def _central_dp_aggregate(self, key: jax.Array, extra: dict[str, Any]) -> Callable[..., Any]:
        """An aggregate function for :func:`rounds.aggregate_round` that runs central DP."""

        def aggregate(deltas, weights):
            result, self.dp_state = self._central_dp(self.dp_state, deltas, weights, key, stacked=True)
            extra.update({"dp_clip": float(result.clip), "dp_noise_std": float(result.noise_std)})
            if self.dp.adaptive:
                extra["dp_unclipped_fraction"] = float(result.unclipped_fraction)
            return result

        return aggregate

    def _secure_round(self, state, host, ids, dropped, round_index, key):
        """Secure aggregation (Bonawitz et al. 2017): the server learns only the sum of the updates.

        Every reporting client clips (to the DP clip with central DP, else to ``secagg_range``
        per coordinate), quantizes and masks its flattened update; the masked vectors are
        encoded with the wire codec (their real bytes are counted); the server sums them and
        removes the masks with the survivors' Shamir shares. The mean is uniform over the
        survivors (example weights would reveal more than the sum), or DP-FedAvg's noised sum
        over the fixed denominator with central DP.
        """
        from fedprompt.privacy import secagg

        n = len(ids)
        t = self.secagg_threshold or max(2, -(-2 * n // 3))
        central = self._central_dp is not None
        clip_range = self.dp.clip if central else self.secagg_range
        deltas = [jax.tree.map(lambda x: x[slot], host.delta) for slot in range(n)]
        if central:
            deltas = [jax.device_get(dp.clip_update(d, self.dp.clip)[0]) for d in deltas]
        vectors = [secagg.flatten_tree(d) for d in deltas]
        spec = vectors[0][1]
        scale = secagg.scale_for(n, clip_range, 32)
        session = secagg.SecureAggregation.setup(n, t, length=spec.size, bits=32, seed=self.seed * 100_003 + round_index)
        survivors = [i for i in range(n) if not dropped[i]]
        masked, bytes_up = {}, 0
        for i in survivors:
            ints = secagg.quantize(vectors[i][0], clip_range=clip_range, scale=scale, bits=32)
            message = codec.encode({"masked": session.mask(i, ints)}, kind=rounds.UPDATE_KIND, round=round_index,
                                   fingerprint=self.backbone.fingerprint)
            bytes_up += len(message)
            masked[i] = codec.decode(message).tree["masked"]
        extra: dict[str, Any] = {"secagg_threshold": t}
        try:
            total = session.unmask(session.sum_masked(masked), survivors, session.unmasking_shares(survivors))
        except SecureAggregationError as err:
            extra.update({"secagg_failed": True, "secagg_error": str(err)})
            return state._replace(round=state.round + 1), 0, float("nan"), bytes_up, extra
        summed = secagg.unflatten_tree(secagg.dequantize(total, scale=scale, bits=32), spec)
        if central:
            mean = dp.privatize_sum(key, summed, clip=self.dp.clip, noise_multiplier=self.noise_multiplier,
                                    denominator=float(self.clients_per_round))
            extra.update({"dp_clip": self.dp.clip, "dp_noise_std": self.noise_multiplier * self.dp.clip})
        else:
            mean = jax.tree.map(lambda x: x / len(survivors), summed)
        mean = self._to_delta_single(state.params, mean)
        state = self._server_step(state, mean, None, len(survivors) / self.client_data.num_clients)
        train_loss = float(np.mean(np.asarray(host.loss)[survivors]))
        return state, len(survivors), train_loss, bytes_up, extra

    # -- evaluation --------------------------------------------------------------------------

    def evaluate(self, params: Pytree, encoded: Mapping[str, np.ndarray], batch_size: int = 128) -> dict[str, float]:
        """Loss and accuracy of ``params`` on an encoded data set (all examples counted once)."""
        if self.program.to_trainable is not None:
            params = self.program.to_trainable(params)
        total_loss = total_correct = total = 0.0
        for batch in iterate_batches(encoded, batch_size):
            m = self._eval_step(params, batch, self.backbone.weights)
            n = float(m.examples)
            total_loss += float(m.loss) * n
            total_correct += float(m.accuracy) * n
            total += n
        return {"eval_loss": total_loss / total, "eval_accuracy": total_correct / total}


def run_rounds(
    simulation: FederatedSimulation,
    rounds: int,
    test: Mapping[str, np.ndarray],
    *,
    eval_every: int = 1,
    state: ServerState | None = None,
    client_controls: Pytree | None = None,
    start_round: int = 0,
    callback: Callable[[dict[str, Any]], None] | None = None,
    on_state: Callable[[int, ServerState, Pytree], None] | None = None,
) -> tuple[ServerState, Pytree, list[dict[str, Any]]]:
    """Run rounds ``start_round .. start_round + rounds - 1``, evaluating every ``eval_every``
    rounds and after the last one.

    ``callback(metrics)`` receives each round's metrics dict as soon as it is known;
    ``on_state(completed_rounds, state, client_controls)`` then sees the new state (to
    checkpoint it).
    """
    if state is None:
        state, client_controls = simulation.init()
    history = []
    for r in range(start_round, start_round + rounds):
        start = time.perf_counter()
        state, client_controls, result = simulation.run_round(state, client_controls, r)
        metrics: dict[str, Any] = dataclasses.asdict(result)
        metrics.update(metrics.pop("extra"))
        if (r + 1) % eval_every == 0 or r + 1 == start_round + rounds:
            metrics.update(simulation.evaluate(state.params, test))
        else:
            metrics.update({"eval_loss": None, "eval_accuracy": None})
        metrics["seconds"] = time.perf_counter() - start
        history.append(metrics)
        if callback is not None:
            callback(metrics)
        if on_state is not None:
            on_state(r + 1, state, client_controls)
    return state, client_controls, history
