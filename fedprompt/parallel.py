"""Device-parallel training: one small interface over the device axis, two backends.

:class:`DeviceAxis` maps a per-device function over a 1-D mesh of devices. Each argument is
either *sharded* (its leading axis is split evenly over the devices; the function sees its
device's block) or *replicated* (every device holds the whole value; the function sees all
of it); collectives (:meth:`DeviceAxis.psum`, :meth:`DeviceAxis.pmean`) reduce over the axis.
Two backends run the same per-device function and give identical results:

* ``backend="shard_map"`` (the default): ``jax.jit(jax.shard_map(...))`` over a
  :class:`jax.sharding.Mesh`;
* ``backend="pmap"``: ``jax.pmap`` (in maintenance mode upstream; kept for comparison).

Both run without replication checks (``check_vma=False``, as ``pmap`` itself does), so a
gradient taken inside the mapped function is the device's own gradient and the reduction is
explicit.

On top of it:

* :func:`make_parallel_train_step`: data-parallel local training. A batch is split across the
  devices, each device computes the gradient of its part, the gradients are combined with
  ``psum`` weighted by each part's share of the loss (so a padded or uneven batch gives the
  exact full-batch gradient), and every device applies the same optimizer update. The frozen
  backbone is replicated onto the devices once, when the step is built, and reused by every
  call: no step copies the backbone from host to device.
* :func:`make_parallel_train_clients`: the simulation's client blocks spread over devices:
  ``K`` clients are padded to a multiple of the device count, each device runs a ``vmap`` over
  its block of clients against its replica of the backbone, and the padding is cut off.

Multi-host (several machines, one silo). Nothing here moves bytes between machines itself:
JAX's distributed runtime does. Start the same program on every machine and, before any
other JAX call, initialize it::

    import jax
    jax.distributed.initialize(coordinator_address="10.0.0.1:1234",
                               num_processes=4, process_id=RANK)
    # on SLURM / Open MPI / TPU pods / Kubernetes JobSet the arguments are detected:
    # jax.distributed.initialize()

Then ``jax.devices()`` lists the devices of every machine, and ``DeviceAxis()`` (use the
``shard_map`` backend) spans them all; ``jax.local_devices()`` are this process's own. Every
process loads the same backbone and calls the same functions in the same order (SPMD).
Arrays passed to a mapped function are global arrays: :meth:`DeviceAxis.replicate` (the same
value on every process) and :meth:`DeviceAxis.shard` (the same whole value on every process,
each keeping its devices' rows) build them; :meth:`DeviceAxis.shard_local` builds one from
each process's own rows (``jax.make_array_from_process_local_data``). The parallel train step
takes each process's own part of the batch; the client trainer takes the whole round on
every process. Read results back with
``jax.experimental.multihost_utils.process_allgather(x, tiled=True)``. Collectives run over
the cluster's interconnect (NCCL across GPUs, ICI/DCN on TPU; on CPUs Gloo, after
``jax.config.update("jax_cpu_collectives_implementation", "gloo")``). tests/multihost_worker.py
runs exactly this on one machine: two processes of two CPU devices each.

Example (8 host CPU devices: ``XLA_FLAGS=--xla_force_host_platform_device_count=8``):

  >>> axis = DeviceAxis(backend="shard_map")  # doctest: +SKIP
  >>> step = make_parallel_train_step(backbone, PromptConfig(), task, optax.adam(1e-2), axis=axis)  # doctest: +SKIP
  >>> trainable, opt_state, metrics = step(trainable, optax.adam(1e-2).init(trainable), batch)  # doctest: +SKIP
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from fedprompt.backbones.backbone import Backbone
from fedprompt.client.federated import ClientResult
from fedprompt.client.local import StepMetrics, make_loss_fn
from fedprompt.errors import ConfigError, InputError
from fedprompt.prompts import PromptConfig
from fedprompt.tasks import CausalLM, Task

Pytree = Any
Backend = Literal["pmap", "shard_map"]
BACKENDS = ("pmap", "shard_map")

SHARDED = "sharded"
"""An argument or output whose leading axis is split evenly over the devices."""

REPLICATED = "replicated"
"""An argument or output that every device holds whole."""

__all__ = [
    "BACKENDS",
    "REPLICATED",
    "SHARDED",
    "DeviceAxis",
    "ParallelClientTrainer",
    "ParallelTrainStep",
    "make_parallel_train_clients",
    "make_parallel_train_step",
    "pad_batch",
]


class DeviceAxis:
    """A 1-D mesh of devices and a way to map a per-device function over it.

    Args:
      backend: ``"shard_map"`` (default) or ``"pmap"``.
      devices: the devices (default: ``jax.devices()``, every process's devices).
      axis_name: the name collectives use.

    Example:
      >>> axis = DeviceAxis(devices=jax.devices()[:1])
      >>> f = axis.map(lambda x, w: axis.psum(jnp.sum(x * w)), (SHARDED, REPLICATED), REPLICATED)
      >>> float(f(jnp.arange(4.0), axis.replicate(jnp.float32(2.0))))
      12.0
    """

    def __init__(self, backend: Backend = "shard_map", devices: Sequence[jax.Device] | None = None, *, axis_name: str = "devices"):
        if backend not in BACKENDS:
            raise ConfigError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self.backend = backend
        self.devices = tuple(jax.devices() if devices is None else devices)
        if not self.devices:
            raise ConfigError("a device axis needs at least one device")
        self.axis_name = axis_name
        self.mesh = Mesh(np.array(self.devices), (axis_name,))
        self._replicated = NamedSharding(self.mesh, PartitionSpec())
        self._sharded = NamedSharding(self.mesh, PartitionSpec(axis_name))

    @property
    def size(self) -> int:
        """The number of devices (of every process)."""
        return len(self.devices)

    @property
    def local_size(self) -> int:
        """The number of this process's devices on the axis."""
        me = jax.process_index()
        return sum(d.process_index == me for d in self.devices)

    def __repr__(self) -> str:
        return f"DeviceAxis(backend={self.backend!r}, devices={self.size}, axis_name={self.axis_name!r})"

    # -- placement ---------------------------------------------------------------------------

    def replicate(self, tree: Pytree) -> Pytree:
        """A copy of every leaf on every device (a global array with a replicated sharding).

        Pass the result to mapped functions as a ``REPLICATED`` argument: it is used in place,
        without a copy, by every later call.
        """
        return jax.device_put(tree, self._replicated)

    def shard(self, tree: Pytree) -> Pytree:
        """Splits every leaf's leading axis evenly over the devices.

        ``tree`` is the whole (global) value; with several processes, every process passes the
        same value and keeps the rows of its own devices.
        """
        jax.tree.map(self._check_divisible, tree)
        if jax.process_count() == 1:
            return jax.device_put(tree, self._sharded)

        def leaf(x):  # every process builds its own devices' rows from the whole value
            if jax.dtypes.issubdtype(getattr(x, "dtype", None), jax.dtypes.prng_key):
                return jax.random.wrap_key_data(leaf(jax.random.key_data(x)), impl=jax.random.key_impl(x))
            return jax.make_array_from_callback(np.shape(x), self._sharded, lambda index: np.asarray(x[index]))

        return jax.tree.map(leaf, tree)

    def shard_local(self, tree: Pytree) -> Pytree:
        """A global array from this process's rows (``jax.make_array_from_process_local_data``):
        with several processes, each passes its own part of the leading axis, a multiple of its
        :attr:`local_size`. With one process, the same as :meth:`shard`."""
        if jax.process_count() == 1:
            return self.shard(tree)

        def leaf(x):
            x = np.asarray(x)
            if x.ndim == 0 or x.shape[0] % self.local_size:
                raise InputError(f"a process's rows must divide over its {self.local_size} devices, got shape {x.shape}")
            return jax.make_array_from_process_local_data(self._sharded, x)

        return jax.tree.map(leaf, tree)

    def is_replicated(self, x: Any) -> bool:
        """Whether ``x`` is already a global array replicated over this axis's devices."""
        return isinstance(x, jax.Array) and x.sharding.is_equivalent_to(self._replicated, x.ndim)

    # -- collectives (inside a mapped function) ----------------------------------------------

    def psum(self, tree: Pytree) -> Pytree:
        """Sum over the devices."""
        return jax.lax.psum(tree, self.axis_name)

    def pmean(self, tree: Pytree) -> Pytree:
        """Mean over the devices."""
        return jax.lax.pmean(tree, self.axis_name)

    def index(self) -> jax.Array:
        """This device's position on the axis."""
        return jax.lax.axis_index(self.axis_name)

    # -- mapping -----------------------------------------------------------------------------

    def map(self, fn: Callable[..., Any], in_specs: Sequence[str], out_specs: str | Any) -> Callable[..., Any]:
        """``fn`` run on every device, compiled once per input shape.

        Args:
          fn: the per-device function. A ``SHARDED`` argument arrives as the device's block of
            the leading axis (``[n / devices, ...]``), a ``REPLICATED`` one whole.
          in_specs: one of ``SHARDED`` / ``REPLICATED`` per positional argument (applies to
            every leaf of that argument).
          out_specs: one spec for all outputs, or a pytree prefix of the outputs of specs. A
            ``SHARDED`` output is the devices' blocks concatenated; a ``REPLICATED`` output
            must be equal on every device (e.g. the result of a ``psum``), and is returned as a
            replicated global array.

        Returns:
          A function of the same arguments, global arrays in and out, for both backends.
        """
        in_specs = tuple(in_specs)
        for spec in (*in_specs, *jax.tree.leaves(out_specs)):
            if spec not in (SHARDED, REPLICATED):
                raise ConfigError(f"specs must be SHARDED or REPLICATED, got {spec!r}")
        if self.backend == "pmap":
            if jax.process_count() > 1:
                raise ConfigError("with several processes use backend='shard_map' (global arrays); pmap's host-local arrays are not supported here")
            return self._map_pmap(fn, in_specs, out_specs)
        return self._map_shard_map(fn, in_specs, out_specs)

    def _partition(self, spec: str) -> PartitionSpec:
        return PartitionSpec(self.axis_name) if spec == SHARDED else PartitionSpec()

    def _map_shard_map(self, fn, in_specs, out_specs):
        mapped = jax.shard_map(
            fn,
            mesh=self.mesh,
            in_specs=tuple(self._partition(s) for s in in_specs),
            out_specs=jax.tree.map(self._partition, out_specs),
            check_vma=False,
        )
        return jax.jit(mapped)

    def _map_pmap(self, fn, in_specs, out_specs):
        n = self.size

        def per_device(*args):
            # pmap takes the leading axis away; a block keeps its [n / devices] axis.
            return fn(*args)

        pmapped = jax.pmap(
            per_device,
            axis_name=self.axis_name,
            in_axes=tuple(0 if s == SHARDED else None for s in in_specs),
            out_axes=jax.tree.map(lambda s: 0 if s == SHARDED else None, out_specs),
            devices=self.devices,
        )

        def split(x):  # [n * m, ...] -> [n, m, ...]
            return x.reshape(n, x.shape[0] // n, *x.shape[1:])

        def merge(x):  # [n, m, ...] -> [n * m, ...]
            return x.reshape(x.shape[0] * x.shape[1], *x.shape[2:])

        def call(*args):
            if len(args) != len(in_specs):
                raise InputError(f"expected {len(in_specs)} arguments, got {len(args)}")
            args = [
                jax.tree.map(lambda x: split(self._check_divisible(x)), a) if s == SHARDED else a
                for a, s in zip(args, in_specs)
            ]
            out = pmapped(*args)
            if isinstance(out_specs, str):
                return jax.tree.map(merge, out) if out_specs == SHARDED else out
            return jax.tree.map(lambda s, o: jax.tree.map(merge, o) if s == SHARDED else o, out_specs, out)

        return call

    def _check_divisible(self, x):
        if np.ndim(x) == 0 or np.shape(x)[0] % self.size:
            raise InputError(f"a sharded leading axis must divide over {self.size} devices, got shape {np.shape(x)}")
        return x


def _axis(axis: DeviceAxis | None, backend: Backend, devices: Sequence[jax.Device] | None) -> DeviceAxis:
    return axis if axis is not None else DeviceAxis(backend, devices)


# ----------------------------------------------------------------------------- data-parallel step


def pad_batch(batch: Mapping[str, Any], multiple: int) -> dict[str, np.ndarray]:
    """Pads a batch to a multiple of ``multiple`` rows; added rows get ``example_mask`` 0.

    Rows are copies of row 0 (any valid input), so the padded batch has the same loss and
    gradient as the original once the mask is applied.
    """
    arrays = {k: np.asarray(v) for k, v in batch.items()}
    sizes = {k: v.shape[0] if v.ndim else None for k, v in arrays.items()}
    if None in sizes.values() or len(set(sizes.values())) != 1:
        raise InputError(f"every batch column needs the same leading batch axis, got {sizes}")
    n = next(iter(sizes.values()))
    if n == 0:
        raise InputError("the batch holds no examples")
    if "example_mask" not in arrays:
        arrays["example_mask"] = np.ones(n, np.float32)
    pad = -n % multiple
    if pad:
        arrays = {k: np.concatenate([v, np.repeat(v[:1], pad, axis=0)]) for k, v in arrays.items()}
        arrays["example_mask"][n:] = 0
    return arrays


def _loss_weight(task: Task, batch: Mapping[str, jax.Array]) -> jax.Array:
    """What a task's loss averages over in this batch part: real examples, or for a causal LM
    the counted completion tokens (the denominator of the task's masked mean)."""
    mask = jnp.asarray(batch["example_mask"], jnp.float32)
    if isinstance(task, CausalLM):
        tokens = jnp.asarray(batch["loss_mask"], jnp.float32)[:, 1:] * jnp.asarray(batch["attention_mask"], jnp.float32)[:, 1:]
        return jnp.sum(tokens * mask[:, None])
    return jnp.sum(mask)


class ParallelTrainStep:
    """A data-parallel train step: ``step(trainable, opt_state, batch) -> (trainable, opt_state, StepMetrics)``.

    Equal to :func:`fedprompt.client.local.make_train_step`'s step on the whole batch (up to
    float summation order). ``trainable`` and ``opt_state`` come back replicated on the
    devices and can be fed straight back in; :meth:`DeviceAxis` places anything else.

    Attributes:
      axis: the device axis.
      weights: the frozen backbone weights, replicated onto the devices once.
    """

    def __init__(self, backbone: Backbone, prompt_config: PromptConfig, task: Task, optimizer: optax.GradientTransformation, axis: DeviceAxis):
        self.axis = axis
        task = task.resolve(backbone)
        loss_fn = make_loss_fn(backbone, prompt_config, task)
        self.weights = axis.replicate(backbone.weights)

        def per_device(trainable, opt_state, batch, weights):
            (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable, weights, batch)
            share = _loss_weight(task, batch)
            total = axis.psum(share)
            denominator = jnp.maximum(total, 1.0)
            # Each part's loss is a mean over its own share; the full batch's is the
            # share-weighted sum of the parts' over the total share.
            grads = jax.tree.map(lambda g: axis.psum(g * share) / denominator, grads)
            loss = axis.psum(loss * share) / denominator
            accuracy = axis.psum(metrics["accuracy"] * share) / denominator
            examples = axis.psum(metrics["examples"])
            updates, opt_state = optimizer.update(grads, opt_state, trainable)
            trainable = optax.apply_updates(trainable, updates)
            return trainable, opt_state, StepMetrics(loss, accuracy, examples)

        self._step = axis.map(per_device, (REPLICATED, REPLICATED, SHARDED, REPLICATED), REPLICATED)

    def __call__(self, trainable: Pytree, opt_state: Pytree, batch: Mapping[str, Any]) -> tuple[Pytree, Pytree, StepMetrics]:
        """One step. ``batch``: this process's examples (with one process, the whole batch)."""
        return self._step(self._place(trainable), self._place(opt_state), self._batch(batch), self.weights)

    def _batch(self, batch: Mapping[str, Any]) -> Pytree:
        batch = pad_batch(batch, self.axis.local_size)
        return self.axis.shard_local(batch) if self.axis.backend == "shard_map" else batch

    def _place(self, tree: Pytree) -> Pytree:
        """Replicates the leaves that are not yet (prompt-sized: cheap)."""
        return jax.tree.map(lambda x: x if self.axis.is_replicated(x) else self.axis.replicate(x), tree)

    def lower(self, trainable: Pytree, opt_state: Pytree, batch: Mapping[str, Any]):
        """The lowered program (for ``.compile().cost_analysis()`` / ``memory_analysis()``)."""
        args = (self._place(trainable), self._place(opt_state), self._batch(batch), self.weights)
        if self.axis.backend == "shard_map":
            return self._step.lower(*args)
        raise ConfigError("lower() is available with the shard_map backend")


def make_parallel_train_step(
    backbone: Backbone,
    prompt_config: PromptConfig,
    task: Task,
    optimizer: optax.GradientTransformation,
    *,
    backend: Backend = "shard_map",
    devices: Sequence[jax.Device] | None = None,
    axis: DeviceAxis | None = None,
) -> ParallelTrainStep:
    """One optimizer step with the batch split across devices (see :class:`ParallelTrainStep`).

    The batch may have any size: it is padded to a multiple of the device count with masked
    rows. The backbone is replicated now, once.
    """
    return ParallelTrainStep(backbone, prompt_config, task, optimizer, _axis(axis, backend, devices))


# ----------------------------------------------------------------------------- client blocks


class ParallelClientTrainer:
    """Client updates of a round spread over devices: ``vmap`` over each device's block of clients.

    Call it with stacked inputs, ``trainer(global_params, weights, data, num_examples, keys,
    control, client_controls)`` (``data`` ``[K, N_max, ...]``, ``num_examples`` and ``keys``
    ``[K]``, ``client_controls`` ``[K, ...]``), or through :meth:`train_block`, which has the
    signature of the simulation engine's block program (clients gathered from all clients'
    columns by id). Returns a :class:`~fedprompt.client.federated.ClientResult` with a
    leading ``[K]`` axis, equal to ``vmap(client_update)`` on one device.

    ``K`` is padded to a multiple of the device count with copies of client 0 (their results
    are cut off). The backbone weights are replicated once per weights object and reused.
    """

    def __init__(self, client_update: Callable[..., ClientResult], axis: DeviceAxis):
        self.axis = axis
        self.client_update = client_update
        self._weights_source: Any = None
        self._weights: Any = None

        def per_device(global_params, weights, data, num_examples, keys, control, client_controls):
            return jax.vmap(client_update, in_axes=(None, None, 0, 0, 0, None, 0))(
                global_params, weights, data, num_examples, keys, control, client_controls
            )

        self._run = axis.map(per_device, (REPLICATED, REPLICATED, SHARDED, SHARDED, SHARDED, REPLICATED, SHARDED), SHARDED)

    def replicated_weights(self, weights: Pytree) -> Pytree:
        """``weights`` on every device; copied only the first time this weights object is seen."""
        if weights is not self._weights_source:
            self._weights = self.axis.replicate(weights)
            self._weights_source = weights
        return self._weights

    def padded_size(self, k: int) -> int:
        """Clients after padding ``k`` to a multiple of the device count."""
        return self.axis.size * math.ceil(k / self.axis.size)

    def __call__(
        self,
        global_params: Pytree,
        weights: Pytree,
        data: Mapping[str, Any],
        num_examples: Any,
        keys: jax.Array,
        control: Pytree = None,
        client_controls: Pytree = None,
    ) -> ClientResult:
        k = int(np.shape(num_examples)[0])
        if k < 1:
            raise InputError("no clients to train")
        pad = self.padded_size(k) - k
        index = jnp.asarray(np.concatenate([np.arange(k), np.zeros(pad, np.int64)]), jnp.int32)

        def padded(tree):
            return jax.tree.map(lambda x: jnp.take(jnp.asarray(x), index, axis=0) if pad else x, tree)

        sharded = (lambda tree: self.axis.shard(padded(tree))) if self.axis.backend == "shard_map" else padded
        out = self._run(
            self.axis.replicate(global_params),
            self.replicated_weights(weights),
            sharded(dict(data)),
            sharded(jnp.asarray(num_examples)),
            sharded(keys),
            self.axis.replicate(control),
            sharded(client_controls),
        )
        return jax.tree.map(lambda x: x[:k], out) if pad else out

    def train_block(self, global_params, weights, columns, sizes, ids, keys, control, client_controls) -> ClientResult:
        """The engine's block program: ``(global_params, weights, columns [C, N_max, ...],
        sizes [C], ids [B], keys [B], control, client_controls [B, ...]) -> ClientResult [B]``."""
        ids = jnp.asarray(ids, jnp.int32)
        data = {name: jnp.take(column, ids, axis=0) for name, column in columns.items()}
        return self(global_params, weights, data, jnp.take(jnp.asarray(sizes), ids, axis=0), keys, control, client_controls)


def make_parallel_train_clients(
    client_update: Callable[..., ClientResult],
    *,
    backend: Backend = "shard_map",
    devices: Sequence[jax.Device] | None = None,
    axis: DeviceAxis | None = None,
) -> ParallelClientTrainer:
    """Device-parallel client training for
    :func:`~fedprompt.client.federated.make_client_update`'s pure update (or a
    ``ClientProgram.update``): ``pmap``/``shard_map`` over devices x ``vmap`` over the clients of
    each device's block. See :class:`ParallelClientTrainer`."""
    return ParallelClientTrainer(client_update, _axis(axis, backend, devices))
