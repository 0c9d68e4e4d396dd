"""The in-process simulation engine: many clients in one XLA program.

One round:

1. sample ``clients_per_round`` clients uniformly without replacement (seeded); each sampled
   client drops out with probability ``dropout``;
2. broadcast the global state (its encoded size is counted as ``bytes_down``);
3. train a block of clients at once: the plan's client program
   (:class:`~fedprompt.client.program.ClientProgram`) ``vmap``-ed over the block, all sharing
   ONE copy of the frozen backbone weights (they are an un-batched argument), client data
   gathered inside the program from device-resident ``[clients, N_max, ...]`` arrays; the block
   is padded to a power-of-two size so a varying number of clients never recompiles; then the
   plan's encode stage (local DP), ``vmap``-ed too, and a simulated attack if one is set;
4. every update goes through the wire codec exactly as in deployment: encoded (``bytes_up``
   counts the real bytes), decoded and validated against the template; a malformed or
   non-finite update is rejected and left out, and the remaining weights renormalize;
5. the plan's server round (:class:`~fedprompt.server.rounds.ServerRound`), the very calls the
   Flower ServerApp makes: clip every delta to the update bound (``update_clip``), aggregate
   (robust rule or central DP), optax server step, privacy;
6. evaluate the global state on the test set.

Everything but the vmap over clients, the devices, the attacks and the simulated dropouts is
the :class:`~fedprompt.federation.plan.FederationPlan`'s, shared with the deployment.

Memory grows with prompt size x clients, never backbone size x clients. For a given seed
the run is deterministic. With ``parallel=`` a block of clients is spread over the local
devices (:mod:`fedprompt.parallel`: ``shard_map`` or ``pmap`` over devices, ``vmap`` within
each), with the same results as one device.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fedprompt.backbones.backbone import Backbone
from fedprompt.client import class_means
from fedprompt.client.federated import ClientResult
from fedprompt.errors import ConfigError, OutOfMemoryError, SecureAggregationError
from fedprompt.federation.plan import FederationPlan, build_plan
from fedprompt.federation.records import RoundRecord, client_message, evaluate_now
from fedprompt.kernels._common import floor_pow2
from fedprompt.parallel import DeviceAxis, make_parallel_train_clients
from fedprompt.server import aggregators, rounds
from fedprompt.server.rounds import RoundState
from fedprompt.simulation import attacks
from fedprompt.config import RunConfig
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


def _local_devices(count: int | None) -> list[jax.Device]:
    """The first ``count`` of this process's devices (all when None)."""
    available = jax.local_devices()
    if count is None:
        return available
    if not 1 <= count <= len(available):
        raise ConfigError(f"devices must be between 1 and the {len(available)} local devices, got {count}")
    return available[:count]


CPU_BLOCK_FLOPS = 1e9
"""On a CPU, ``client_block="auto"`` batches clients until a block holds about this many
floating-point operations: a client whose program is larger already keeps every core busy on
its own, and batching it with others only adds memory (``fedprompt bench simulate``: blocks
of 32 MiniLM clients ran at 0.63-0.71x the speed of one client at a time)."""


def choose_client_block(
    clients: int,
    *,
    cpu: bool,
    flops_per_client: float | None = None,
    budget: float | None = None,
    fixed_bytes: float = 0.0,
    bytes_per_client: float | None = None,
) -> int:
    """The clients per block program for ``client_block="auto"``: a power of two, at most
    :func:`~fedprompt.server.aggregators.bucket_size` of ``clients``, at least 1.

    On a CPU (``cpu``) no more than :data:`CPU_BLOCK_FLOPS` of work (``flops_per_client`` each);
    with a ``budget`` (bytes) no more than fit it, a block of ``b`` costing
    ``fixed_bytes + b * bytes_per_client`` (outputs and temporaries, from XLA's memory analysis
    of blocks of 1 and 2).

    Example:
      >>> choose_client_block(8, cpu=True, flops_per_client=4e10)   # MiniLM: one at a time
      1
      >>> choose_client_block(8, cpu=True, flops_per_client=2e6)    # a tiny model: the round
      8
      >>> choose_client_block(1000, cpu=False, budget=80e9, fixed_bytes=2e9, bytes_per_client=0.2e9)
      256
    """
    block = aggregators.bucket_size(max(int(clients), 1))
    if cpu and flops_per_client:
        block = min(block, floor_pow2(int(CPU_BLOCK_FLOPS // flops_per_client)))
    if budget is not None and bytes_per_client:
        while block > 1 and fixed_bytes + block * bytes_per_client > budget:
            block //= 2
    return block


def free_memory(device: jax.Device) -> float | None:
    """Bytes a new program may use on ``device``: 90% of an accelerator's free memory (its
    ``memory_stats``); None when the device does not say (a CPU)."""
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    if stats and "bytes_limit" in stats:
        return 0.9 * (stats["bytes_limit"] - stats.get("bytes_in_use", 0))
    return None


class FederatedSimulation:
    """Runs rounds of a :class:`~fedprompt.federation.plan.FederationPlan` over simulated clients.

    Args:
      plan: the federation (:func:`~fedprompt.federation.plan.make_plan` from a RunConfig, or
        :func:`~fedprompt.federation.plan.build_plan` from its parts).
      client_data: the clients' data (:func:`build_client_data`).
      client_block: clients per vmapped program: ``"auto"`` (the default,
        :func:`choose_client_block`: on a CPU as many as hold about :data:`CPU_BLOCK_FLOPS` of
        work, one client for a backbone whose step already keeps the cores busy; on an
        accelerator as many as fit the device's free memory), a number, or None (all clients of
        a round in one block).
      client_block_memory: bytes one block program may use beyond its arguments (the weights
        and the clients' data, already on the device) (``"auto"`` only; None: 90% of an
        accelerator's free memory; on a CPU no check beyond the block's bounded work).
      attack: malicious clients (a fixed fraction, chosen by seed) and what they do.
      parallel: spread each block of clients over the local devices: ``"shard_map"`` or
        ``"pmap"`` (see :mod:`fedprompt.parallel`; same results as one device), or a
        :class:`~fedprompt.parallel.DeviceAxis`. None: one device.
      devices: how many local devices ``parallel`` uses (None: all).
    """

    def __init__(
        self,
        plan: FederationPlan,
        client_data: ClientData,
        *,
        client_block: int | str | None = "auto",
        client_block_memory: float | None = None,
        attack: attacks.AttackConfig | None = None,
        parallel: str | DeviceAxis | None = None,
        devices: int | None = None,
    ):
        if client_data.num_clients != plan.num_clients:
            raise ConfigError(f"the plan has {plan.num_clients} clients, the data {client_data.num_clients}")
        self.plan = plan
        self.backbone = plan.backbone
        self.attack = attack
        self.malicious = np.zeros(client_data.num_clients, bool)
        if attack is not None:
            self.malicious = attacks.malicious_clients(client_data.num_clients, attack.fraction, plan.keys.seed)
            if attack.kind == "label_flip":
                labels = attacks.poison_client_labels(np.asarray(client_data.columns["labels"]), self.malicious,
                                                      plan.task.num_labels)
                client_data = dataclasses.replace(client_data, columns={**client_data.columns, "labels": jnp.asarray(labels)})
        self.client_data = client_data
        if client_block != "auto" and client_block is not None and (
                isinstance(client_block, bool) or not isinstance(client_block, int) or client_block < 1):
            raise ConfigError(f"client_block must be 'auto', a number >= 1 or None, got {client_block!r}")
        self._block_setting = client_block
        self._block_memory = client_block_memory
        self._block: int | None = None  # resolved at first use (see `block`)
        update = plan.program.update
        self.parallel = None if parallel is None else (
            parallel if isinstance(parallel, DeviceAxis) else DeviceAxis(parallel, _local_devices(devices))
        )

        def train_block(global_params, weights, columns, sizes, ids, keys, control, client_controls):
            data = {name: column[ids] for name, column in columns.items()}
            return jax.vmap(update, in_axes=(None, None, 0, 0, 0, None, 0))(
                global_params, weights, data, sizes[ids], keys, control, client_controls
            )

        def train_one(global_params, weights, columns, sizes, ids, keys, control, client_controls):
            # a block of one is the plain client program, with no batch axis of 1 on every op
            data = {name: column[ids[0]] for name, column in columns.items()}
            out = update(global_params, weights, data, sizes[ids[0]], keys[0], control,
                         jax.tree.map(lambda c: c[0], client_controls))
            return jax.tree.map(lambda x: x[None], out)

        self._one_device_block = jax.jit(train_block)
        self._one_client = jax.jit(train_one)
        if self.parallel is None:
            self._train_block = self._one_device_block
        else:  # blocks of clients spread over the devices: pmap/shard_map x vmap
            self._train_block = make_parallel_train_clients(update, axis=self.parallel).train_block
        self._encode = None if plan.encode is None else jax.jit(jax.vmap(plan.encode))
        self._statistics = None
        if plan.head_statistics is not None:
            def statistics(params, weights, columns, sizes, ids, keys):
                rows = {name: column[ids] for name, column in columns.items()}
                return jax.vmap(plan.head_statistics, in_axes=(None, None, 0, 0, 0))(
                    plan.trainable(params), weights, rows, sizes[ids], keys)

            self._statistics = jax.jit(statistics)
        self._sizes = jnp.asarray(client_data.sizes)
        template_rows = {name: column[0, :1] for name, column in client_data.columns.items()}
        self._template = plan.update_template(template_rows) if template_rows else None

    @classmethod
    def build(
        cls,
        backbone: Backbone,
        prompt_config: Any,
        task: Any,
        algorithm: Any,
        local_optimizer: Any,
        client_data: ClientData,
        *,
        client_block: int | str | None = "auto",
        client_block_memory: float | None = None,
        attack: attacks.AttackConfig | None = None,
        parallel: str | DeviceAxis | None = None,
        devices: int | None = None,
        **plan_options: Any,
    ) -> FederatedSimulation:
        """A simulation from parts: :func:`~fedprompt.federation.plan.build_plan` with
        ``plan_options`` (``clients_per_round``, ``local_steps``, ``program``, ``dp_config`` ...)
        over ``client_data``'s clients, then the engine.

        Example:
          >>> sim = FederatedSimulation.build(backbone, PromptConfig(), task, algorithms.fedavg(),  # doctest: +SKIP
          ...                                 optax.adam(1e-2), client_data, clients_per_round=4, local_steps=8)
        """
        plan = build_plan(backbone, prompt_config, task, algorithm, local_optimizer,
                          num_clients=client_data.num_clients, **plan_options)
        return cls(plan, client_data, client_block=client_block, client_block_memory=client_block_memory, attack=attack,
                   parallel=parallel, devices=devices)

    @classmethod
    def from_config(cls, config: RunConfig, plan: FederationPlan, client_data: ClientData) -> FederatedSimulation:
        """The simulation of a run: the plan, the clients' data, and the simulation's own
        settings of ``config`` (client blocks, devices, attacks)."""
        attack = None if config.attack is None else attacks.AttackConfig(
            kind=config.attack, fraction=config.attack_fraction, scale=config.attack_scale)
        devices = {} if config.devices == 1 else {"parallel": config.parallel_backend, "devices": config.devices or None}
        memory = None if config.client_block_memory is None else config.client_block_memory * 2**30
        return cls(plan, client_data, client_block=config.client_block, client_block_memory=memory, attack=attack,
                   **devices)

    # -- client blocks -------------------------------------------------------------------------

    @property
    def block(self) -> int:
        """Clients per block program (a power of two; chosen at first use when ``"auto"``)."""
        if self._block is None:
            per_round = self.plan.clients_per_round
            setting = self._block_setting
            if setting == "auto":
                self._block = self._auto_block()
            else:  # a block larger than the round would only train padding clients
                self._block = aggregators.bucket_size(min(setting or per_round, per_round))
        return self._block

    def block_cost(self, block: int, *, memory: bool = True) -> dict[str, float]:
        """What one block program of ``block`` clients (on one device) costs, without running it:
        ``flops`` (XLA's cost analysis of the lowered program) and, with ``memory``, XLA's
        memory analysis of the compiled one (``arguments``, ``outputs``, ``temporaries``,
        ``peak`` bytes; see :func:`fedprompt.client.local.compiled_memory`)."""
        params = self.plan.init_params()
        state = self.plan.server.init(params)
        keys = self.client_keys(0)

        def batched(x):
            return jax.ShapeDtypeStruct((block, *x.shape), x.dtype)

        args = (state.server.params, self.backbone.weights, self.client_data.columns, self._sizes,
                jax.ShapeDtypeStruct((block,), jnp.int32), jax.ShapeDtypeStruct((block, *keys.shape[1:]), keys.dtype),
                state.server.control, jax.tree.map(batched, state.server.params))
        lowered = (self._one_client if block == 1 else self._one_device_block).lower(*args)
        analysis = lowered.cost_analysis()
        analysis = analysis[0] if isinstance(analysis, (list, tuple)) else analysis
        out: dict[str, float] = {"flops": float((analysis or {}).get("flops", 0.0))}
        if memory:
            compiled = lowered.compile().memory_analysis()
            out.update(arguments=compiled.argument_size_in_bytes, outputs=compiled.output_size_in_bytes,
                       temporaries=compiled.temp_size_in_bytes)
            out["peak"] = out["arguments"] + out["outputs"] + out["temporaries"] - compiled.alias_size_in_bytes
        return out

    def _auto_block(self) -> int:
        devices = 1 if self.parallel is None else self.parallel.size
        per_device = -(-self.plan.clients_per_round // devices)
        device = jax.local_devices()[0] if self.parallel is None else self.parallel.devices[0]
        cpu = device.platform == "cpu"
        flops = self.block_cost(1, memory=False)["flops"] if cpu else None
        # a CPU block of at most CPU_BLOCK_FLOPS holds little memory: checked against a budget only when one is set
        budget = self._block_memory if self._block_memory is not None or cpu else free_memory(device)
        block = choose_client_block(per_device, cpu=cpu, flops_per_client=flops)
        if block > 1 and budget is not None:
            # what a block needs beyond its arguments (the weights and all clients' data, already
            # on the device): outputs and temporaries, linear in the block
            one, two = (self.block_cost(b) for b in (1, 2))
            need = [cost["peak"] - cost["arguments"] for cost in (one, two)]
            per_client = max(need[1] - need[0], 1)
            block = choose_client_block(per_device, cpu=cpu, flops_per_client=flops, budget=budget,
                                        fixed_bytes=max(need[0] - per_client, 0), bytes_per_client=per_client)
        return block * devices

    # -- state -------------------------------------------------------------------------------

    def init(self, key: jax.Array | None = None, *, head: bool = True) -> tuple[RoundState, Pytree]:
        """Initial server state and the (zero) per-client states ``[C, ...]``.

        With the plan's class-means head (``head_init = "class_means"``) and ``head``, every
        client's class statistics set the head first (:meth:`class_statistics`); ``head=False``
        skips that (a resumed run's checkpoint holds the head)."""
        params = self.plan.init_params(key)
        if head and self._statistics is not None:
            params = self.plan.with_class_means_head(params, class_means.combine(self.class_statistics(params)))
        state = self.plan.server.init(params)
        if self.plan.seeds is not None and not self.plan.seeds.initial_held:  # the set-up hands it to all
            state = state._replace(downlink=self.plan.seeds.installed(state.downlink,
                                                                      np.arange(self.client_data.num_clients)))
        client_states = jax.tree.map(
            lambda x: jnp.zeros((self.client_data.num_clients, *x.shape), x.dtype), state.server.params
        )
        return state, client_states

    def _padded(self, ids: np.ndarray) -> jax.Array:
        """Client ids padded to a whole block (repeating the first; the extra rows are dropped)."""
        return jnp.asarray(np.concatenate([ids, np.full(self.block - len(ids), ids[0])]), jnp.int32)

    def class_statistics(self, params: Pytree) -> class_means.ClassStatistics:
        """Every client's class statistics ``[C, ...]`` under ``params`` (in blocks of
        clients), as each client sends them before the first round."""
        num_clients = self.client_data.num_clients
        keys = jnp.stack([self.plan.keys.head_statistics(i) for i in range(num_clients)])
        blocks = []
        for start in range(0, num_clients, self.block):
            ids = np.arange(start, min(start + self.block, num_clients))
            padded = self._padded(ids)
            out = self._statistics(params, self.backbone.weights, self.client_data.columns, self._sizes, padded,
                                   keys[padded])
            blocks.append(jax.tree.map(lambda x: x[: len(ids)], out))
        return jax.tree.map(lambda *xs: jnp.concatenate(xs), *blocks)

    def setup_bytes(self) -> dict[str, int]:
        """Bytes of the one-time set-up before the first round, per client: the initial state
        down and the class statistics up (zero without a class-means head); with a seed
        downlink, the state with its head down once more (what the clients then replay from)."""
        if self._statistics is None:
            return {"bytes_up": 0, "bytes_down": 0}
        plan = self.plan
        zeros = jax.tree.map(lambda t: np.zeros(t.shape, t.dtype), plan.class_statistics_template())
        down = codec.encoded_size(jax.device_get({"params": plan.init_params()}), kind=rounds.GLOBAL_KIND,
                                  fingerprint=self.backbone.fingerprint)
        return {"bytes_up": codec.encoded_size(dict(zeros._asdict()), kind=class_means.STATISTICS_KIND,
                                               fingerprint=self.backbone.fingerprint),
                "bytes_down": down * (2 if plan.seeds is not None else 1)}

    # -- one round ---------------------------------------------------------------------------

    def sample(self, round_index: int) -> tuple[np.ndarray, np.ndarray]:
        """The sampled client ids of a round and which of them drop out (the plan's)."""
        return self.plan.sample(round_index)

    def client_keys(self, round_index: int) -> jax.Array:
        """``[C]`` PRNG keys of a round, one per client id (the plan's)."""
        return self.plan.client_keys(round_index)

    def train_clients(self, state: RoundState, client_states: Pytree, ids: np.ndarray, round_index: int) -> ClientResult:
        """Local training of the clients ``ids`` (vmapped in padded blocks); stacked results."""
        keys = self.client_keys(round_index)
        server = state.server
        results = []
        program = self._one_client if self.block == 1 and self.parallel is None else self._train_block
        for start in range(0, len(ids), self.block):
            block_ids = ids[start : start + self.block]
            padded = self._padded(block_ids)
            controls = jax.tree.map(lambda c: c[padded], client_states)
            try:
                out = jax.block_until_ready(program(
                    server.params, self.backbone.weights, self.client_data.columns, self._sizes,
                    padded, keys[padded], server.control, controls,
                ))
            except jax.errors.JaxRuntimeError as err:
                if "RESOURCE_EXHAUSTED" not in str(err):
                    raise
                raise OutOfMemoryError(
                    f"training {self.block} clients in one program ran out of device memory ({err}); "
                    f"train fewer at once with client_block (`--client-block`), below {self.block}"
                ) from err
            results.append(jax.tree.map(lambda x: x[: len(block_ids)], out))
        return jax.tree.map(lambda *xs: jnp.concatenate(xs), *results)

    def run_round(self, state: RoundState, client_states: Pytree, round_index: int) -> tuple[RoundState, Pytree, RoundRecord]:
        """Sample, broadcast, train, encode (local DP; attack), receive, and the server's round."""
        plan = self.plan
        ids, dropped = self.sample(round_index)
        fingerprint = self.backbone.fingerprint
        full = codec.encode(jax.device_get(plan.broadcast(state)), kind=rounds.GLOBAL_KIND, round=round_index,
                            fingerprint=fingerprint)
        sizes = [len(full)] * len(ids)
        if plan.seeds is not None:  # each client is sent the rounds it missed, or the state (fewer bytes wins)
            sizes = [len(m) for m in plan.seeds.messages(state.downlink, ids.tolist(), round_index,
                                                         state.server.params, fingerprint=fingerprint, full=full)]
        bytes_down = sum(sizes)
        results = self.train_clients(state, client_states, ids, round_index)
        noise = plan.keys.round_noise(round_index)
        payload = results.delta
        if self._encode is not None:  # each client clips and noises its own update before sending
            payload = self._encode(payload, jax.random.split(noise, len(ids)))
        if self.attack is not None and self.attack.kind != "label_flip":
            payload = attacks.attack_updates(
                self.attack.kind, payload, jnp.asarray(self.malicious[ids]), plan.keys.attack(round_index),
                scale=self.attack.scale, noise_std=self.attack.noise_std,
            )
        host = jax.device_get(results._replace(delta=payload))
        if plan.secagg is not None:
            state, outcome, bytes_up = self._secure_round(state, host, ids, dropped, round_index)
            rejections: dict[str, int] = {}
            participants = [int(ids[i]) for i in range(len(ids)) if not dropped[i]] if outcome.num_aggregated else []
        else:
            messages = [
                None if dropped[slot] else codec.encode(
                    client_message(jax.tree.map(lambda x, s=slot: x[s], host), plan.scaffold),
                    kind=rounds.UPDATE_KIND, round=round_index, fingerprint=fingerprint)
                for slot in range(len(ids))
            ]
            received = plan.server.receive(messages, round_index=round_index, fingerprint=fingerprint,
                                           template=self._template)
            state, outcome = plan.server.apply(
                state, received, self.client_data.sizes[ids], key=noise, losses=host.loss, participants=ids,
            )
            bytes_up, rejections = received.bytes_up, received.rejections
            participants = [int(i) for i in ids[received.accepted]]
            if plan.program.client_state and received.accepted.any():
                accepted = np.flatnonzero(received.accepted)
                rows = jnp.asarray(ids[accepted], jnp.int32)
                new = jax.tree.map(lambda x: jnp.asarray(x[accepted]), host.control)
                client_states = jax.tree.map(lambda c, n: c.at[rows].set(n), client_states, new)
        if plan.seeds is not None:  # a client that dropped out may not have what it was sent
            state = state._replace(downlink=plan.seeds.delivered(state.downlink, ids, ~dropped, round_index))
        record = RoundRecord(
            round=round_index + 1, train_loss=outcome.train_loss, clients=outcome.num_aggregated, sampled=len(ids),
            dropped=int(dropped.sum()), rejections=rejections, bytes_up=bytes_up, bytes_down=bytes_down,
            participants=participants, extra={**outcome.metrics, "largest_down": max(sizes)},
        )
        return state, client_states, record

    def _secure_round(self, state: RoundState, host: ClientResult, ids, dropped, round_index):
        """Secure aggregation (Bonawitz et al. 2017): the server learns only the sum of the updates.

        All parties run here, each with its own secrets (seeded by the key schedule's
        ``secagg_session``, for a reproducible simulation): every reporting client turns its
        update into ring elements (:meth:`~fedprompt.privacy.secure_round.SecureRound.client_input`)
        and masks them; the masked vectors are encoded with the wire codec (their real bytes are
        counted); the server sums them, removes the masks with the survivors' Shamir shares and
        publishes the mean (:meth:`~fedprompt.privacy.secure_round.SecureRound.publish`) -- the
        very calls a Flower deployment makes.
        """
        from fedprompt.privacy import secagg
        from fedprompt.privacy.secure_round import SecureRound

        plan = self.plan
        n = len(ids)
        secure = SecureRound.of(n, plan.secagg, plan.privacy)
        inputs = [secure.client_input(jax.tree.map(lambda x, s=slot: x[s], host.delta)) for slot in range(n)]
        spec = inputs[0][1]
        session = secagg.SecureAggregation.setup(n, secure.t, length=spec.size, bits=32,
                                                 seed=plan.keys.secagg_session(round_index))
        survivors = [i for i in range(n) if not dropped[i]]
        masked, bytes_up = {}, 0
        for i in survivors:
            message = codec.encode({"masked": session.mask(i, inputs[i][0])}, kind=rounds.UPDATE_KIND,
                                   round=round_index, fingerprint=self.backbone.fingerprint)
            bytes_up += len(message)
            masked[i] = codec.decode(message).tree["masked"]
        try:
            total = session.unmask(session.sum_masked(masked), survivors, session.unmasking_shares(survivors))
        except SecureAggregationError as err:
            metrics = {"secagg_threshold": secure.t, "secagg_failed": True, "secagg_error": str(err)}
            state, outcome = plan.server.skip(state, metrics)
            return state, outcome, bytes_up
        mean, metrics = secure.publish(total, spec, len(survivors), clients_per_round=plan.clients_per_round,
                                       key=plan.keys.round_noise(round_index))
        train_loss = float(np.mean(np.asarray(host.loss)[survivors]))
        state, outcome = plan.server.apply_mean(state, mean, count=len(survivors), train_loss=train_loss,
                                                participants=ids[survivors], metrics=metrics)
        return state, outcome, bytes_up

    # -- evaluation --------------------------------------------------------------------------

    def evaluate(self, params: Pytree, encoded: Mapping[str, np.ndarray], batch_size: int = 128) -> dict[str, float]:
        """Loss and accuracy of global ``params`` on an encoded data set (all examples counted once)."""
        return self.plan.evaluate(params, encoded, batch_size)


def run_rounds(
    simulation: FederatedSimulation,
    rounds: int,
    test: Mapping[str, np.ndarray],
    *,
    eval_every: int = 1,
    state: RoundState | None = None,
    client_states: Pytree | None = None,
    start_round: int = 0,
    callback: Callable[[dict[str, Any]], None] | None = None,
    on_state: Callable[[int, RoundState, Pytree], None] | None = None,
) -> tuple[RoundState, Pytree, list[dict[str, Any]]]:
    """Run rounds ``start_round .. start_round + rounds - 1``, evaluating every ``eval_every``
    rounds and after the last one.

    ``callback(metrics)`` receives each round's metrics dict as soon as it is known;
    ``on_state(completed_rounds, state, client_states)`` then sees the new state (to
    checkpoint it).
    """
    if state is None:
        state, client_states = simulation.init()
    history = []
    last = start_round + rounds
    for r in range(start_round, last):
        start = time.perf_counter()
        state, client_states, record = simulation.run_round(state, client_states, r)
        evaluation = None
        if evaluate_now(r, eval_every, last):
            evaluation = simulation.evaluate(state.server.params, test)
        metrics = record.to_dict(evaluation, seconds=time.perf_counter() - start)
        history.append(metrics)
        if callback is not None:
            callback(metrics)
        if on_state is not None:
            on_state(r + 1, state, client_states)
    return state, client_states, history
