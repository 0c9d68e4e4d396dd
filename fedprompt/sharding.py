"""A frozen backbone sharded over a device mesh, for backbones that do not fit one device.

Data parallelism (:mod:`fedprompt.parallel`) keeps a whole copy of the backbone on every
device. A 70B backbone in bfloat16 is 128 GiB, more than any one device holds, so here the
weight matrices are split over a mesh axis instead (tensor parallelism in the style of
Megatron-LM, Shoeybi et al. 2019): each device keeps ``1 / n`` of every large matrix, and XLA's
SPMD partitioner (GSPMD, Xu et al. 2021) inserts the collectives the forward and backward
passes need. The prompt, the task head and the optimizer state are small and replicated; a
batch is replicated, or split over an optional ``data`` axis of the mesh.

Which axis of each weight is split (``[in, out]`` layout, as the backbones store them):

* column-parallel (the output axis): the query/key/value, gate/up and first MLP projections
  and their biases, and an untied LM head (split over the vocabulary);
* row-parallel (the input axis): the attention output and the MLP down projections, whose
  partial products are then summed over the devices;
* word embeddings ``[vocab, D]``: the hidden axis ``D`` (a lookup then needs no collective);
* everything else (norms, position tables, row-parallel biases) is replicated.

A weight whose chosen axis does not divide by the mesh axis's size stays replicated, so any
architecture and mesh size give a correct (if less memory-saving) program. With the heads
divisible by the mesh size, each device computes whole attention heads (Llama-2-70B on 8
devices: 8 query heads and 1 key/value head per device).

On host CPUs, ``XLA_FLAGS=--xla_force_host_platform_device_count=8`` (or
``jax.config.update("jax_num_cpu_devices", 8)`` before JAX starts) gives 8 devices to try it on;
:func:`use_host_devices` does the latter.

Example:

  >>> mesh = make_mesh(model=8)  # doctest: +SKIP
  >>> step = make_sharded_train_step(backbone, PromptConfig(), task, optax.adam(1e-2), mesh)  # doctest: +SKIP
  >>> trainable, opt_state, metrics = step(trainable, opt_state, batch)  # doctest: +SKIP
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from fedprompt.backbones.backbone import Backbone
from fedprompt.client.local import StepMetrics, compiled_memory, make_train_step
from fedprompt.errors import ConfigError
from fedprompt.parallel import pad_batch
from fedprompt.prompts import PromptConfig
from fedprompt.tasks import Task

Pytree = Any

MODEL_AXIS = "model"
"""The mesh axis the weight matrices are split over."""

DATA_AXIS = "data"
"""The mesh axis a batch is split over (size 1: the batch is replicated)."""

#: ``[in, out]`` weights split over their output axis (names as the backbone modules store them).
COLUMN_PARALLEL = frozenset(
    {"q_w", "k_w", "v_w", "qkv_w", "gate_w", "up_w", "head", "c_attn_w", "c_fc_w", "mlp_in_w"}
)
#: Biases of column-parallel weights: split like the weight's output axis.
COLUMN_PARALLEL_BIASES = frozenset({"q_b", "k_b", "v_b", "qkv_b", "gate_b", "up_b", "c_attn_b", "c_fc_b", "mlp_in_b"})
#: ``[in, out]`` weights split over their input axis.
ROW_PARALLEL = frozenset({"o_w", "down_w", "attn_proj_w", "mlp_proj_w", "attn_out_w", "mlp_out_w"})
#: ``[vocab, D]`` word-embedding tables, split over ``D``.
EMBEDDINGS = frozenset({"embed", "wte", "word_embeddings"})

#: XLA flag that makes the CPU compiler schedule for memory rather than for concurrency.
CPU_MEMORY_SCHEDULER_FLAG = "--xla_cpu_enable_concurrency_optimized_scheduler=false"


def use_host_devices(count: int, *, memory_scheduler: bool = True) -> bool:
    """Ask for ``count`` host CPU devices (and XLA's memory-minimising CPU scheduler).

    Must run before JAX creates its backends (before any array is made or ``jax.devices()``
    is called). Other platforms (GPU, TPU) are unaffected and keep their own devices.

    Args:
      count: the number of CPU devices to force (>= 1).
      memory_scheduler: also add :data:`CPU_MEMORY_SCHEDULER_FLAG` to ``XLA_FLAGS`` unless the
        variable already sets that flag: XLA's CPU compiler otherwise orders a program for
        concurrency, which keeps many more buffers alive than a device's compiler would.

    Returns:
      True when the settings were applied; False when JAX had already started (the process
      keeps the devices and flags it started with).
    """
    if count < 1:
        raise ConfigError(f"the number of devices must be >= 1, got {count}")
    if memory_scheduler:
        flags = os.environ.get("XLA_FLAGS", "")
        if "xla_cpu_enable_concurrency_optimized_scheduler" not in flags:
            os.environ["XLA_FLAGS"] = f"{flags} {CPU_MEMORY_SCHEDULER_FLAG}".strip()
    try:
        jax.config.update("jax_num_cpu_devices", int(count))
    except RuntimeError:  # the backends exist already
        return False
    return True


def make_mesh(model: int | None = None, data: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ``(data, model)`` device mesh: weights split over ``model``, batches over ``data``.

    Args:
      model: devices along the model axis (default: every device not used by ``data``).
      data: devices along the data axis (default 1: batches replicated).
      devices: the devices to use (default ``jax.devices()``).

    Raises:
      ConfigError: a size below 1, or more devices asked for than there are.
    """
    devices = list(jax.devices() if devices is None else devices)
    if data < 1:
        raise ConfigError(f"data axis size must be >= 1, got {data}")
    model = len(devices) // data if model is None else model
    if model < 1:
        raise ConfigError(f"model axis size must be >= 1, got {model} ({len(devices)} devices, data={data})")
    if model * data > len(devices):
        raise ConfigError(
            f"a mesh of data={data} x model={model} needs {model * data} devices, but {len(devices)} are available; "
            "on CPU start with XLA_FLAGS=--xla_force_host_platform_device_count=N"
        )
    grid = np.array(devices[: model * data], dtype=object).reshape(data, model)
    return Mesh(grid, (DATA_AXIS, MODEL_AXIS))


def _leaf_name(path: tuple[Any, ...]) -> str:
    """The attribute name of a weight in ``backbone.weights`` (the last key before ``value``)."""
    names = [getattr(k, "key", getattr(k, "name", None)) for k in path]
    names = [n for n in names if isinstance(n, str) and n != "value"]
    return names[-1] if names else ""


def _split_axis(name: str, ndim: int) -> int | None:
    """The axis of a weight that is split over the model axis (None: replicated)."""
    if ndim == 2 and name in COLUMN_PARALLEL:
        return 1
    if ndim == 2 and name in ROW_PARALLEL:
        return 0
    if ndim == 2 and name in EMBEDDINGS:
        return 1
    if ndim == 1 and name in COLUMN_PARALLEL_BIASES:
        return 0
    return None


def weight_partition_specs(backbone: Backbone, mesh: Mesh, *, axis: str = MODEL_AXIS) -> Pytree:
    """A :class:`~jax.sharding.PartitionSpec` per weight (same tree as ``backbone.weights``).

    See the module docstring for which axis of which weight is split; a weight whose axis does
    not divide by ``mesh.shape[axis]`` is replicated.
    """
    if axis not in mesh.shape:
        raise ConfigError(f"mesh has no axis {axis!r}; its axes are {tuple(mesh.shape)}")
    size = mesh.shape[axis]

    def spec(path: tuple[Any, ...], leaf: Any) -> PartitionSpec:
        shape = tuple(leaf.shape)
        split = _split_axis(_leaf_name(path), len(shape))
        if split is None or size == 1 or shape[split] % size:
            return PartitionSpec()
        parts: list[str | None] = [None] * len(shape)
        parts[split] = axis
        return PartitionSpec(*parts)

    return jax.tree_util.tree_map_with_path(spec, backbone.weights)


def weight_shardings(backbone: Backbone, mesh: Mesh, *, axis: str = MODEL_AXIS) -> Pytree:
    """A :class:`~jax.sharding.NamedSharding` per weight (see :func:`weight_partition_specs`)."""
    return jax.tree.map(
        lambda spec: NamedSharding(mesh, spec),
        weight_partition_specs(backbone, mesh, axis=axis),
        is_leaf=lambda x: isinstance(x, PartitionSpec),
    )


def shard_weights(backbone: Backbone, mesh: Mesh, *, axis: str = MODEL_AXIS) -> Pytree:
    """The backbone's weights placed on the mesh, each device holding its part.

    For an abstract backbone, ``jax.ShapeDtypeStruct`` leaves carrying the shardings (to lower
    a program with; nothing is allocated).
    """
    shardings = weight_shardings(backbone, mesh, axis=axis)
    if backbone.is_abstract:
        return jax.tree.map(
            lambda w, s: jax.ShapeDtypeStruct(w.shape, w.dtype, sharding=s), backbone.weights, shardings
        )
    return jax.device_put(backbone.weights, shardings)


def weight_bytes_per_device(backbone: Backbone, mesh: Mesh, *, axis: str = MODEL_AXIS) -> int:
    """Bytes of the weights each device holds under :func:`weight_partition_specs` (closed form)."""
    size = mesh.shape[axis]
    specs = jax.tree.leaves(weight_partition_specs(backbone, mesh, axis=axis), is_leaf=lambda x: isinstance(x, PartitionSpec))
    total = 0
    for leaf, spec in zip(jax.tree.leaves(backbone.weights), specs):
        nbytes = math.prod(leaf.shape) * np.dtype(leaf.dtype).itemsize
        total += nbytes // size if any(part == axis for part in spec) else nbytes
    return total


class ShardedTrainStep:
    """A prompt-tuning step on a backbone sharded over a mesh:
    ``step(trainable, opt_state, batch) -> (trainable, opt_state, StepMetrics)``.

    The same computation as :func:`~fedprompt.client.local.make_train_step`'s step on one
    device (equal up to float summation order), compiled once per batch shape for the mesh.
    ``trainable`` and ``opt_state`` come back replicated and can be fed straight back in.

    Attributes:
      mesh: the device mesh.
      weights: the frozen weights, placed on the mesh once (:func:`shard_weights`).
      weight_shardings: their shardings.
    """

    def __init__(
        self,
        backbone: Backbone,
        prompt_config: PromptConfig,
        task: Task,
        optimizer: optax.GradientTransformation,
        mesh: Mesh,
        *,
        model_axis: str = MODEL_AXIS,
        data_axis: str | None = DATA_AXIS,
        remat: bool | None = None,
    ):
        if data_axis is not None and data_axis not in mesh.shape:
            raise ConfigError(f"mesh has no axis {data_axis!r}; its axes are {tuple(mesh.shape)}")
        self.mesh = mesh
        self.backbone = backbone
        self.data_size = 1 if data_axis is None else int(mesh.shape[data_axis])
        self.weight_shardings = weight_shardings(backbone, mesh, axis=model_axis)
        self.weights = shard_weights(backbone, mesh, axis=model_axis)
        self._replicated = NamedSharding(mesh, PartitionSpec())
        self._batch_sharding = NamedSharding(mesh, PartitionSpec(data_axis)) if data_axis else self._replicated
        step = make_train_step(backbone, prompt_config, task, optimizer, jit=False, remat=remat)
        self._step: Callable[..., Any] = jax.jit(
            step,
            in_shardings=(self._replicated, self._replicated, self._batch_sharding, self.weight_shardings),
            out_shardings=self._replicated,
            donate_argnums=(0, 1),
        )

    def __call__(self, trainable: Pytree, opt_state: Pytree, batch: Mapping[str, Any]) -> tuple[Pytree, Pytree, StepMetrics]:
        """One step; a batch whose size does not divide over the data axis is padded with masked rows."""
        return self._step(self._place(trainable), self._place(opt_state), self._batch(batch), self.weights)

    def lower(self, trainable: Pytree, opt_state: Pytree, batch: Mapping[str, Any]):
        """The lowered program (``.compile().memory_analysis()``); accepts ``jax.ShapeDtypeStruct``
        leaves, so nothing needs to be allocated to see what a step would take."""
        return self._step.lower(trainable, opt_state, batch, self.weights)

    def memory(
        self, trainable: Pytree, opt_state: Pytree, batch: Mapping[str, Any], *, compiler_options: Mapping[str, Any] | None = None
    ) -> dict[str, int]:
        """XLA's per-device memory analysis of the compiled step (see
        :func:`~fedprompt.client.local.compiled_memory`)."""
        return compiled_memory(self._step, trainable, opt_state, batch, self.weights, compiler_options=compiler_options)

    def _place(self, tree: Pytree) -> Pytree:
        return jax.device_put(tree, self._replicated)

    def _batch(self, batch: Mapping[str, Any]) -> Pytree:
        if self.data_size > 1:
            batch = pad_batch(batch, self.data_size)
        return jax.device_put(dict(batch), self._batch_sharding)


def make_sharded_train_step(
    backbone: Backbone,
    prompt_config: PromptConfig,
    task: Task,
    optimizer: optax.GradientTransformation,
    mesh: Mesh | None = None,
    *,
    model_axis: str = MODEL_AXIS,
    data_axis: str | None = DATA_AXIS,
    remat: bool | None = None,
) -> ShardedTrainStep:
    """A prompt-tuning step with the backbone's weights split over ``mesh`` (see :class:`ShardedTrainStep`).

    Args:
      backbone: the frozen backbone (its weights are placed on the mesh now, once).
      prompt_config, task, optimizer: as for :func:`~fedprompt.client.local.make_train_step`.
      mesh: default :func:`make_mesh` over every device (all on the model axis).
      model_axis: the mesh axis the weights are split over.
      data_axis: the mesh axis the batch is split over, or None to replicate the batch.
      remat: rematerialise the blocks in the backward pass (None: the backbone's default).
    """
    return ShardedTrainStep(
        backbone, prompt_config, task, optimizer, make_mesh() if mesh is None else mesh,
        model_axis=model_axis, data_axis=data_axis, remat=remat,
    )
