"""The prompt artifact (``.fpp``): a trained prompt, with everything needed to use it again.

Schema version 2. An ``.fpp`` file is one :mod:`fedprompt.wire.codec` message, the *envelope*::

    {"format": "fedprompt.wire", "version": 1, "kind": "prompt", "round": nil,
     "fingerprint": "<the backbone's fingerprint>",
     "meta": {"schema": "fedprompt.prompt", "schema_version": 2, "checksum": "sha256:<64 hex digits>"},
     "tree": {"content": <uint8 leaf: the content message's bytes>}}

The *content* is a second codec message (``kind`` ``"prompt-content"``, the same
``fingerprint``) whose ``tree`` is ``{"prompt": ..., "head": ..., "scales": ...}`` (stored
tensors; ``scales`` holds the int8 scales, see below) and whose ``meta`` holds the schema's
fields:

==================  ===========================================================================
``schema``          ``"fedprompt.prompt"``; ``schema_version``: ``2``
``created``         when the file was written, ISO-8601 in UTC (``2025-01-31T12:00:00Z``)
``method``          ``"prompt"`` (soft prompt) or ``"prefix"`` (deep prefix)
``prompt_config``   the :class:`~fedprompt.prompts.PromptConfig` fields
``backbone``        ``name`` (a built-in name, hub id or folder name, never a local path),
                    ``path`` (nil; files of earlier versions may hold a folder),
                    ``fingerprint``, ``tokenizer_hash`` (see
                    :func:`fedprompt.backbones.loading.tokenizer_hash`, or nil) and the shape
                    facts ``model_type``, ``is_decoder``, ``hidden_size``, ``num_layers``,
                    ``num_heads``, ``num_kv_heads``, ``head_dim``, ``vocab_size`` (nil where
                    unknown)
``task``            nil, ``{"type": "causal_lm"}`` or ``{"type": "sequence_classification",
                    "num_labels" (2 to 65,536), "label_names" (or nil), "pooling" (or nil:
                    the backbone's default), "verbalizer" (or nil)}``
``training``        ``rounds``, ``clients``, ``algorithm``, ``privacy_epsilon`` (nil without
                    differential privacy) and any further plain data; a NaN or infinite
                    ``privacy_epsilon``, ``privacy_delta`` or ``final_accuracy`` (epsilon is
                    infinite without noise) is written as the string ``"nan"``, ``"inf"`` or
                    ``"-inf"`` (messages carry finite numbers only) and read back as a float
``storage``         the storage asked for: ``"float32"``, ``"float16"`` or ``"int8"``
``tensors``         per stored leaf (``"prompt/embeddings"``, ``"head/w"``, ...): ``dtype`` (the
                    dtype it is restored to) and ``storage`` (how it is stored)
``metadata``        free-form plain data from the caller
==================  ===========================================================================

Checksum: the SHA-256 of the content bytes exactly as they sit in the envelope's ``content``
leaf (the leaf's raw data, nothing of the envelope around it), written ``"sha256:" + hex``.
Everything but the envelope's own few header fields is covered, and nothing is re-encoded to
check it.

Storage: floating-point leaves are stored as float32, as float16 (a leaf with a value beyond
float16's range stays float32; the ``tensors`` entry says so) or as int8 with symmetric scales
(``x ~= q * scale``; one float32 scale per row, over the last axis, for leaves of two or more
dimensions, one per tensor otherwise). :func:`load_prompt` restores every leaf to its recorded
dtype. The default is float16: it halves the file and keeps about three decimal digits, far
below what changes a prompt's predictions; the default demo's prompt (20 x 384 soft prompt plus a
384 x 26 head) is then about 36 KB instead of 71 KB.

Files are written atomically (a temporary file in the same folder, fsync, ``os.replace``).
Reading treats the file as hostile input: sizes, nesting and dtypes are bounded by the codec,
the checksum and every schema field are checked, the tensors the prompt configuration, backbone
facts and task declare must fit in the content's own bytes (checked before anything of a
declared size is allocated, :func:`fedprompt.wire.limits.check_declared`), the tensors must have
those shapes and be finite (and stay finite in the dtype they are restored to), and every
problem raises :class:`~fedprompt.errors.ArtifactError` (a :class:`~fedprompt.errors.WireError`)
naming the file. Loading takes at most a few times the file's size in memory.

Example:
  >>> import numpy as np, tempfile, os
  >>> from fedprompt.prompts import PromptConfig
  >>> path = os.path.join(tempfile.mkdtemp(), "prompt.fpp")
  >>> params = {"embeddings": np.zeros((20, 384), np.float32)}
  >>> _ = save_prompt(path, params, config=PromptConfig(num_virtual_tokens=20),
  ...                 backbone_name="minilm", fingerprint="ab12")
  >>> artifact = load_prompt(path)
  >>> artifact.params["embeddings"].shape, artifact.method, artifact.fingerprint
  ((20, 384), 'prompt', 'ab12')
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import math
import os
import secrets
import warnings
from collections.abc import Mapping
from pathlib import Path, PureWindowsPath
from typing import TYPE_CHECKING, Any

import numpy as np

from fedprompt.errors import ArtifactError, ConfigError, FedPromptError, PromptMismatchError, WireError
from fedprompt.prompts import Prefix, PromptConfig, SoftPrompt, materialize
from fedprompt.tasks import POOLINGS, CausalLM, SequenceClassification
from fedprompt.wire.codec import ALLOWED_DTYPES, DEFAULT_MAX_BYTES, FLOAT_DTYPE_NAMES, Message, check_template, decode, encode
from fedprompt.wire.limits import TensorSpec, check_class_count, check_declared, check_finite, read_bounded

if TYPE_CHECKING:
    from fedprompt.backbones.backbone import Backbone

__all__ = [
    "CONTENT_KIND",
    "PROMPT_KIND",
    "SCHEMA",
    "SCHEMA_VERSION",
    "STORAGES",
    "SUFFIX",
    "BackboneInfo",
    "PromptArtifact",
    "TaskInfo",
    "check_backbone",
    "decode_prompt",
    "encode_prompt",
    "expected_shapes",
    "load_prompt",
    "save_prompt",
    "write_atomic",
]

PROMPT_KIND = "prompt"
CONTENT_KIND = "prompt-content"
SCHEMA = "fedprompt.prompt"
SCHEMA_VERSION = 2
SUFFIX = ".fpp"
STORAGES = ("float32", "float16", "int8")

_SCHEMA_FIELDS = (
    "schema", "schema_version", "created", "method", "prompt_config", "backbone", "task", "training",
    "storage", "tensors", "metadata",
)
#: Keys of ``metadata`` that :func:`save_prompt` files under ``training`` (and ``label_names``
#: under ``task``), so that callers of the first artifact API keep writing a complete schema.
_TRAINING_KEYS = ("rounds", "clients", "algorithm", "privacy_epsilon")
_OPTIONAL_TRAINING_KEYS = ("privacy_delta", "final_accuracy")
_NUMERIC_TRAINING_KEYS = ("privacy_epsilon", "privacy_delta", "final_accuracy")
_NON_FINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}
_FLOAT16_MAX = float(np.finfo(np.float16).max)


# ----------------------------------------------------------------------------- the loaded artifact


@dataclasses.dataclass(frozen=True)
class BackboneInfo:
    """The backbone a prompt was trained on, as recorded in the artifact.

    Attributes:
      name: its short name (a built-in name, a hub id or a folder's name; never a local path).
      path: always None when written by this version (files of earlier versions may hold the
        checkpoint folder): an artifact is shared, and a local path says nothing portable.
      fingerprint: :attr:`fedprompt.Backbone.fingerprint`.
      tokenizer_hash: :func:`fedprompt.backbones.loading.tokenizer_hash` of its folder, or None.
      model_type, is_decoder, hidden_size, num_layers, num_heads, num_kv_heads, head_dim,
      vocab_size: architecture facts (None where the writer did not know them).
    """

    name: str
    fingerprint: str
    path: str | None = None
    tokenizer_hash: str | None = None
    model_type: str | None = None
    is_decoder: bool | None = None
    hidden_size: int | None = None
    num_layers: int | None = None
    num_heads: int | None = None
    num_kv_heads: int | None = None
    head_dim: int | None = None
    vocab_size: int | None = None

    @classmethod
    def from_backbone(cls, backbone: Backbone, *, with_tokenizer_hash: bool = True) -> BackboneInfo:
        """The facts of a loaded backbone (the tokenizer hash reads its tokenizer files)."""
        from fedprompt.backbones.loading import tokenizer_hash

        cfg = backbone.config
        return cls(
            name=_portable_name(backbone.name), fingerprint=backbone.fingerprint,
            tokenizer_hash=tokenizer_hash(backbone.path) if with_tokenizer_hash else None,
            model_type=cfg.model_type, is_decoder=bool(cfg.is_decoder), hidden_size=int(cfg.hidden_size),
            num_layers=int(cfg.num_layers), num_heads=int(cfg.num_heads), num_kv_heads=int(cfg.num_kv_heads),
            head_dim=int(cfg.head_dim), vocab_size=int(cfg.vocab_size),
        )


@dataclasses.dataclass(frozen=True)
class TaskInfo:
    """The task a prompt was trained for.

    Attributes:
      type: ``"sequence_classification"`` or ``"causal_lm"``.
      num_labels: number of classes (classification).
      label_names: the class names, in label order, when known.
      pooling: the head's pooling (``"cls"``, ``"mean"``, ``"last"``); None means the
        backbone's default (``"mean"`` for encoders, ``"last"`` for decoders).
      verbalizer: decoder classification by the LM head's logits of one token per label.
    """

    type: str
    num_labels: int | None = None
    label_names: tuple[str, ...] | None = None
    pooling: str | None = None
    verbalizer: tuple[int, ...] | None = None

    def to_task(self) -> SequenceClassification | CausalLM:
        """The :mod:`fedprompt.tasks` object for this task."""
        if self.type == "causal_lm":
            return CausalLM()
        return SequenceClassification(num_labels=self.num_labels, pooling=self.pooling, verbalizer=self.verbalizer)

    def to_dict(self) -> dict[str, Any]:
        if self.type == "causal_lm":
            return {"type": "causal_lm"}
        return {
            "type": self.type, "num_labels": self.num_labels,
            "label_names": None if self.label_names is None else list(self.label_names),
            "pooling": self.pooling, "verbalizer": None if self.verbalizer is None else list(self.verbalizer),
        }


@dataclasses.dataclass(frozen=True, eq=False)
class PromptArtifact:
    """A loaded prompt artifact (see :func:`load_prompt`).

    Attributes:
      prompt_config: how the prompt is shaped.
      params: the prompt's parameters (numpy arrays, restored to their recorded dtype).
      head: the task head's parameters (``{"w": [D, C], "b": [C]}``, or ``{}``).
      backbone: the backbone it was trained on.
      task: the task, or None when the writer recorded none.
      training: training facts (``rounds``, ``clients``, ``algorithm``, ``privacy_epsilon``, ...).
      metadata: the writer's free-form metadata.
      created: when the file was written (ISO-8601, UTC).
      storage: the storage the writer asked for (``float32``, ``float16``, ``int8``).
      tensors: per stored leaf, its ``dtype`` and ``storage``.
      checksum: ``"sha256:<hex>"`` of the content.
      schema_version: the schema version of the file.
      path: the file it was read from (None when built in memory).
    """

    prompt_config: PromptConfig
    params: dict[str, Any]
    head: dict[str, Any]
    backbone: BackboneInfo
    task: TaskInfo | None
    training: dict[str, Any]
    metadata: dict[str, Any]
    created: str
    storage: str
    tensors: dict[str, dict[str, str]]
    checksum: str
    schema_version: int = SCHEMA_VERSION
    path: Path | None = None

    @property
    def method(self) -> str:
        return self.prompt_config.method

    @property
    def fingerprint(self) -> str:
        return self.backbone.fingerprint

    @property
    def label_names(self) -> tuple[str, ...] | None:
        return None if self.task is None else self.task.label_names

    def trainable(self) -> dict[str, Any]:
        """``{"prompt": params, "head": head}``, the tree :func:`fedprompt.init_trainable` makes."""
        return {"prompt": self.params, "head": self.head}

    def materialize(self, backbone_config: Any) -> SoftPrompt | Prefix:
        """The :class:`SoftPrompt` or :class:`Prefix` a backbone takes (runs a reparameterization MLP)."""
        return materialize(self.prompt_config, self.params, backbone_config)

    def describe(self) -> dict[str, Any]:
        """Everything but the tensor values, as JSON-able data (``fedprompt inspect --json``)."""
        shapes = {}
        for name, tree in (("prompt", self.params), ("head", self.head)):
            for leaf_path, leaf in _leaves(tree, (name,)):
                shapes[leaf_path] = {"shape": list(leaf.shape), **self.tensors.get(leaf_path, {"dtype": leaf.dtype.name})}
        return {
            "schema": SCHEMA,
            "schema_version": self.schema_version,
            "checksum": self.checksum,
            "created": self.created,
            "method": self.method,
            "prompt_config": dataclasses.asdict(self.prompt_config),
            "backbone": dataclasses.asdict(self.backbone),
            "task": None if self.task is None else self.task.to_dict(),
            "training": self.training,
            "storage": self.storage,
            "tensors": shapes,
            "parameters": int(sum(math.prod(v["shape"]) for v in shapes.values())),
            "metadata": self.metadata,
            "file_bytes": None if self.path is None or not self.path.exists() else self.path.stat().st_size,
        }


# ----------------------------------------------------------------------------- saving


def save_prompt(
    path: str | os.PathLike[str],
    params: Any,
    *,
    config: PromptConfig | Mapping[str, Any],
    method: str | None = None,
    backbone: Backbone | None = None,
    backbone_name: str | None = None,
    fingerprint: str | None = None,
    tokenizer_hash: str | None = None,
    task: SequenceClassification | CausalLM | TaskInfo | None = None,
    label_names: list[str] | tuple[str, ...] | None = None,
    training: Mapping[str, Any] | None = None,
    metadata: Mapping[str, Any] | None = None,
    storage: str = "float16",
) -> Path:
    """Writes a prompt artifact (schema version 2) atomically.

    Args:
      path: The file to write (conventionally ending in ``.fpp``); replaced if it exists.
      params: The prompt's parameters, or the whole trainable tree ``{"prompt": ..., "head": ...}``
        (what :func:`fedprompt.init_trainable` and the federated engine hold).
      config: The :class:`PromptConfig`, or its fields as a mapping (``dataclasses.asdict``).
      method: The prompt method; optional, and must agree with ``config`` when given.
      backbone: The backbone the prompt was trained on: its name, folder, fingerprint,
        tokenizer hash and architecture are recorded. Without it, give ``backbone_name`` and
        ``fingerprint`` (the architecture is then inferred from the tensors where possible).
      backbone_name, fingerprint, tokenizer_hash: Override or stand in for ``backbone``'s.
      task: The task (a :class:`SequenceClassification`, resolved against ``backbone`` when
        given, or :class:`CausalLM`). Without it, a head ``{"w": [D, C], ...}`` implies a
        C-class classification.
      label_names: Class names, in label order.
      training: Training facts: ``rounds``, ``clients``, ``algorithm``, ``privacy_epsilon`` and
        any further plain data.
      metadata: Free-form plain data. Its keys ``label_names``, ``rounds``, ``clients``,
        ``algorithm``, ``privacy_epsilon``, ``privacy_delta`` and ``final_accuracy`` are filed
        under ``task``/``training`` when those are not given; its keys may not be the schema's
        field names.
      storage: ``"float16"`` (default), ``"float32"`` or ``"int8"`` (see the module docstring).

    Returns:
      The path written.

    Raises:
      ConfigError: A bad argument: reserved metadata key, unknown storage, method and config
        disagree, no backbone name or fingerprint, a task that does not fit the head.
      WireError: The parameters or metadata cannot be encoded, or hold non-finite values.
      OSError: The file cannot be written (the target is then left as it was).
    """
    data = encode_prompt(
        params, config=config, method=method, backbone=backbone, backbone_name=backbone_name,
        fingerprint=fingerprint, tokenizer_hash=tokenizer_hash, task=task, label_names=label_names,
        training=training, metadata=metadata, storage=storage,
    )
    return write_atomic(path, data)


def encode_prompt(params: Any, **kwargs: Any) -> bytes:
    """The bytes :func:`save_prompt` writes (same arguments, without ``path``)."""
    content, fingerprint = _encode_content(params, **kwargs)
    checksum = "sha256:" + hashlib.sha256(content).hexdigest()
    return encode(
        {"content": np.frombuffer(content, np.uint8)}, kind=PROMPT_KIND, fingerprint=fingerprint,
        meta={"schema": SCHEMA, "schema_version": SCHEMA_VERSION, "checksum": checksum},
    )


def _encode_content(
    params: Any,
    *,
    config: PromptConfig | Mapping[str, Any],
    method: str | None,
    backbone: Backbone | None,
    backbone_name: str | None,
    fingerprint: str | None,
    tokenizer_hash: str | None,
    task: Any,
    label_names: Any,
    training: Mapping[str, Any] | None,
    metadata: Mapping[str, Any] | None,
    storage: str,
) -> tuple[bytes, str]:
    if storage not in STORAGES:
        raise ConfigError(f"storage must be one of {STORAGES}, got {storage!r}")
    prompt_config = config if isinstance(config, PromptConfig) else _prompt_config_from(config, ConfigError)
    if method is not None and method != prompt_config.method:
        raise ConfigError(f"method {method!r} disagrees with the prompt config's method {prompt_config.method!r}")
    extra = dict(metadata or {})
    clashes = [key for key in _SCHEMA_FIELDS if key in extra]
    if clashes:
        raise ConfigError(f"metadata may not set the reserved keys {clashes}")
    if label_names is None and "label_names" in extra:
        label_names = extra.pop("label_names")
    train_info = dict(training) if training is not None else {}
    for key in (*_TRAINING_KEYS, *_OPTIONAL_TRAINING_KEYS):
        if key in extra and training is None:
            train_info[key] = extra.pop(key)
    for key in _TRAINING_KEYS:
        train_info.setdefault(key, None)
    for key in _NUMERIC_TRAINING_KEYS:
        value = train_info.get(key)
        if isinstance(value, (float, np.floating)) and not math.isfinite(value):
            train_info[key] = str(float(value))  # "nan", "inf", "-inf": messages carry finite numbers only

    prompt_params, head = _split_trainable(params)
    prompt_params, head = _to_numpy(prompt_params), _to_numpy(head)
    info = _backbone_info(backbone, backbone_name, fingerprint, tokenizer_hash, prompt_config, prompt_params, head)
    task_info = _task_info(task, label_names, head, backbone)
    if task_info is not None and task_info.num_labels is not None:
        check_class_count(task_info.num_labels, what="the task's num_labels", error=ConfigError)
    tree: dict[str, Any] = {"prompt": {}, "head": {}, "scales": {}}
    tensors: dict[str, dict[str, str]] = {}
    for part, values in (("prompt", prompt_params), ("head", head)):
        tree[part] = _store_tree(values, (part,), storage, tree["scales"], tensors)  # refuses non-finite values
    _check_shapes(prompt_config, info, task_info, prompt_params, head, ConfigError)
    meta = {
        "schema": SCHEMA,
        "schema_version": SCHEMA_VERSION,
        "created": _utc_now_iso(),
        "method": prompt_config.method,
        "prompt_config": dataclasses.asdict(prompt_config),
        "backbone": dataclasses.asdict(info),
        "task": None if task_info is None else task_info.to_dict(),
        "training": train_info,
        "storage": storage,
        "tensors": tensors,
        "metadata": extra,
    }
    return encode(tree, kind=CONTENT_KIND, fingerprint=info.fingerprint, meta=meta), info.fingerprint


def _split_trainable(params: Any) -> tuple[Any, Any]:
    if isinstance(params, Mapping) and "prompt" in params and set(params) <= {"prompt", "head"}:
        return params["prompt"], params.get("head") or {}
    return params, {}


def _to_numpy(tree: Any) -> Any:
    if tree is None:
        return {}
    if isinstance(tree, Mapping):
        for key in tree:
            if not isinstance(key, str):
                raise WireError(f"parameter keys must be str, got {key!r}")
        return {key: _to_numpy(value) for key, value in tree.items()}
    try:
        return np.asarray(tree)
    except Exception as exc:  # noqa: BLE001 - any conversion failure is a bad leaf
        raise WireError(f"cannot convert a {type(tree).__name__} to an array: {exc}") from exc


def _backbone_info(backbone, name, fingerprint, tok_hash, config: PromptConfig, prompt_params, head) -> BackboneInfo:
    if backbone is not None:
        info = BackboneInfo.from_backbone(backbone)
        overrides = {"name": name and _portable_name(name), "fingerprint": fingerprint, "tokenizer_hash": tok_hash}
        return dataclasses.replace(info, **{k: v for k, v in overrides.items() if v is not None})
    if not isinstance(name, str) or not name:
        raise ConfigError("save_prompt needs the backbone, or a backbone_name")
    if not isinstance(fingerprint, str) or not fingerprint:
        raise ConfigError("save_prompt needs the backbone, or its fingerprint")
    arch: dict[str, Any] = {}
    shape = lambda tree, key: np.shape(tree[key]) if isinstance(tree, Mapping) and key in tree else None  # noqa: E731
    if config.method == "prompt" and shape(prompt_params, "embeddings") is not None and len(shape(prompt_params, "embeddings")) == 2:
        arch["hidden_size"] = int(shape(prompt_params, "embeddings")[1])
    if config.method == "prefix" and shape(prompt_params, "keys") is not None and len(shape(prompt_params, "keys")) == 4:
        layers, _, kv, hd = shape(prompt_params, "keys")
        arch.update(num_layers=int(layers), num_kv_heads=int(kv), head_dim=int(hd))
    if config.method == "prefix" and shape(prompt_params, "embedding") is not None and len(shape(prompt_params, "embedding")) == 2:
        arch["hidden_size"] = int(shape(prompt_params, "embedding")[1])
    if shape(head, "w") is not None and len(shape(head, "w")) == 2:
        arch.setdefault("hidden_size", int(shape(head, "w")[0]))
    return BackboneInfo(name=_portable_name(name), fingerprint=fingerprint, tokenizer_hash=tok_hash, **arch)


def _portable_name(name: str) -> str:
    """A backbone's name as an artifact records it: an absolute local path becomes its last part."""
    if os.path.isabs(name) or PureWindowsPath(name).is_absolute() or name.startswith("~"):
        return PureWindowsPath(name).name or name
    return name


def _task_info(task: Any, label_names: Any, head: Any, backbone: Backbone | None) -> TaskInfo | None:
    names = None
    if label_names is not None:
        if isinstance(label_names, (str, bytes)) or not all(isinstance(n, str) for n in label_names):
            raise ConfigError("label_names must be a list of strings")
        names = tuple(label_names)
    if isinstance(task, TaskInfo):
        return dataclasses.replace(task, label_names=names or task.label_names)
    if isinstance(task, CausalLM):
        return TaskInfo(type="causal_lm")
    if isinstance(task, SequenceClassification):
        if backbone is not None:
            task = task.resolve(backbone)
        return TaskInfo(
            type="sequence_classification", num_labels=task.num_labels, label_names=names,
            pooling=task.pooling, verbalizer=task.verbalizer,
        )
    if task is not None:
        raise ConfigError(f"task must be a SequenceClassification, CausalLM or TaskInfo, got {type(task).__name__}")
    w = head.get("w") if isinstance(head, Mapping) else None
    if w is not None and np.ndim(w) == 2:
        return TaskInfo(type="sequence_classification", num_labels=int(np.shape(w)[1]), label_names=names)
    if names is not None:
        return TaskInfo(type="sequence_classification", num_labels=len(names), label_names=names)
    return None


def _store_tree(tree: Any, path: tuple[str, ...], storage: str, scales: dict[str, Any], tensors: dict) -> Any:
    if isinstance(tree, Mapping):
        return {key: _store_tree(value, (*path, key), storage, scales, tensors) for key, value in tree.items()}
    array = np.asarray(tree)
    name = "/".join(path)
    if array.dtype.name not in FLOAT_DTYPE_NAMES:
        tensors[name] = {"dtype": array.dtype.name, "storage": array.dtype.name}
        return array
    values = array.astype(np.float64)
    if not np.all(np.isfinite(values)):
        raise WireError(f"{name}: {int(values.size - np.count_nonzero(np.isfinite(values)))} values are not finite (NaN or Inf)")
    stored: np.ndarray
    kind = storage
    if storage == "float16" and values.size and np.max(np.abs(values)) > _FLOAT16_MAX:
        kind = "float32"  # beyond float16's range: keep this leaf exact instead
    if kind == "float32":
        stored = array.astype(np.float32)
    elif kind == "float16":
        stored = array.astype(np.float16)
    else:
        stored, scale = _quantize_int8(values)
        _set_path(scales, path, scale)
    tensors[name] = {"dtype": array.dtype.name if array.dtype.name != "float64" else "float32", "storage": kind}
    return stored


def _quantize_int8(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8: per row (last axis) for 2-D and up, per tensor otherwise."""
    if values.ndim >= 2:
        peak = np.max(np.abs(values), axis=-1)
    else:
        peak = np.max(np.abs(values)) if values.size else np.float64(0.0)
    scale = np.asarray(peak / 127.0, np.float32)
    divisor = np.where(scale > 0, scale, 1.0).astype(np.float64)
    divisor = divisor[..., None] if values.ndim >= 2 else divisor
    q = np.clip(np.rint(values / divisor), -127, 127).astype(np.int8)
    return q, scale


def _set_path(tree: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


# ----------------------------------------------------------------------------- loading


def load_prompt(
    path: str | os.PathLike[str],
    *,
    backbone: Backbone | None = None,
    force: bool = False,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> PromptArtifact:
    """Reads and checks a prompt artifact.

    Args:
      path: The ``.fpp`` file.
      backbone: The backbone the prompt is to be used with. Its fingerprint must equal the
        recorded one, and the prompt's shapes must fit it.
      force: Accept a backbone whose fingerprint differs (a ``UserWarning`` says so). Shapes
        must still fit.
      max_bytes: The largest file accepted.

    Returns:
      The :class:`PromptArtifact`.

    Raises:
      ArtifactError: The file is missing, unreadable, too large, corrupted (checksum), of an
        unsupported schema version, or malformed; the message names the path.
      PromptMismatchError: ``backbone`` is not the one the prompt was trained on (unless
        ``force``), or the prompt's shapes do not fit it.
    """
    path = Path(path)
    data = read_bounded(path, max_bytes, what="prompt artifact", error=ArtifactError)
    artifact = decode_prompt(data, max_bytes=max_bytes, where=str(path))
    artifact = dataclasses.replace(artifact, path=path)
    if backbone is not None:
        check_backbone(artifact, backbone, force=force)
    return artifact


def decode_prompt(data: bytes, *, max_bytes: int = DEFAULT_MAX_BYTES, where: str = "prompt artifact") -> PromptArtifact:
    """Checks and decodes the bytes of an ``.fpp`` file (see :func:`load_prompt`)."""
    try:
        content, checksum, size = _open_envelope(data, max_bytes, where)  # the envelope is freed here
        return _parse_content(content.meta, content.tree, checksum, where, size)
    except FedPromptError as exc:
        if isinstance(exc, ArtifactError):
            raise
        raise ArtifactError(f"{where}: {exc}") from exc
    except (TypeError, ValueError, KeyError, AttributeError, IndexError, OverflowError) as exc:
        # A safety net: the checks below should catch every malformed field first.
        raise ArtifactError(f"{where}: malformed prompt artifact: {type(exc).__name__}: {exc}") from exc


def _open_envelope(data: bytes, max_bytes: int, where: str) -> tuple[Message, str, int]:
    """The checked content message of an ``.fpp`` file's bytes, its checksum and its size."""
    try:
        envelope = decode(data, max_bytes=max_bytes, writable=False)  # the content is only read
    except WireError as exc:
        raise ArtifactError(f"{where}: not a valid prompt artifact: {exc}") from exc
    if envelope.kind != PROMPT_KIND:
        raise ArtifactError(f"{where}: not a prompt artifact (kind {envelope.kind!r})")
    meta = envelope.meta
    if not isinstance(meta, dict) or meta.get("schema") != SCHEMA:
        raise ArtifactError(
            f"{where}: not a {SCHEMA} file of schema version {SCHEMA_VERSION} (an artifact of the first "
            "format, written before schema versions? load it with that fedprompt version and save it again)"
        )
    version = meta.get("schema_version")
    if type(version) is not int or version != SCHEMA_VERSION:
        raise ArtifactError(f"{where}: unsupported schema version {version!r}; this fedprompt reads version {SCHEMA_VERSION}")
    checksum = meta.get("checksum")
    if not isinstance(checksum, str) or not checksum.startswith("sha256:") or len(checksum) != 71:
        raise ArtifactError(f"{where}: the artifact has no valid checksum field")
    tree = envelope.tree
    content = tree.get("content") if isinstance(tree, dict) else None
    if set(tree or {}) != {"content"} or not isinstance(content, np.ndarray) or content.dtype != np.uint8 or content.ndim != 1:
        raise ArtifactError(f"{where}: the artifact's tree must be exactly one uint8 'content' leaf")
    content_bytes = memoryview(content)  # no copy: hashed and decoded in place
    actual = "sha256:" + hashlib.sha256(content_bytes).hexdigest()
    if actual != checksum:
        raise ArtifactError(
            f"{where}: checksum mismatch: the file is corrupted or was modified (recorded {checksum[:19]}..., "
            f"content hashes to {actual[:19]}...)"
        )
    try:
        message = decode(content_bytes, max_bytes=max_bytes)
    except WireError as exc:
        raise ArtifactError(f"{where}: the artifact's content is not a valid message: {exc}") from exc
    if message.kind != CONTENT_KIND:
        raise ArtifactError(f"{where}: the artifact's content has kind {message.kind!r}, expected {CONTENT_KIND!r}")
    if message.fingerprint != envelope.fingerprint or not isinstance(message.fingerprint, str):
        raise ArtifactError(f"{where}: the envelope's fingerprint and the content's differ or are missing")
    return message, checksum, content_bytes.nbytes


def _field(meta: Mapping[str, Any], key: str, kind: type | tuple[type, ...], where: str, *, optional: bool = False) -> Any:
    if key not in meta:
        raise ArtifactError(f"{where}: schema field {key!r} is missing")
    value = meta[key]
    if value is None and optional:
        return None
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise ArtifactError(f"{where}: schema field {key!r} must be a {names}{' or nil' if optional else ''}")
    return value


def _parse_content(meta: Any, tree: Any, checksum: str, where: str, content_bytes: int) -> PromptArtifact:
    if not isinstance(meta, dict):
        raise ArtifactError(f"{where}: the artifact's content has no schema fields")
    if meta.get("schema") != SCHEMA or meta.get("schema_version") != SCHEMA_VERSION:
        raise ArtifactError(f"{where}: the content's schema ({meta.get('schema')!r}, {meta.get('schema_version')!r}) is not {SCHEMA} {SCHEMA_VERSION}")
    created = _field(meta, "created", str, where)
    method = _field(meta, "method", str, where)
    config = _prompt_config_from(_field(meta, "prompt_config", dict, where), ArtifactError, where)
    if config.method != method:
        raise ArtifactError(f"{where}: method {method!r} disagrees with the prompt config's {config.method!r}")
    info = _parse_backbone(_field(meta, "backbone", dict, where), where)
    task = _parse_task(_field(meta, "task", dict, where, optional=True), where)
    training = _field(meta, "training", dict, where)
    for key in _NUMERIC_TRAINING_KEYS:
        if isinstance(training.get(key), str) and training[key] in _NON_FINITE:
            training[key] = _NON_FINITE[training[key]]
    storage = _field(meta, "storage", str, where)
    if storage not in STORAGES:
        raise ArtifactError(f"{where}: unknown storage {storage!r}")
    tensors = _field(meta, "tensors", dict, where)
    metadata = _field(meta, "metadata", dict, where)
    if not isinstance(tree, dict) or set(tree) != {"prompt", "head", "scales"}:
        raise ArtifactError(f"{where}: the content's tree must have exactly the keys prompt, head, scales")
    scales = tree["scales"] if isinstance(tree["scales"], dict) else None
    if scales is None:
        raise ArtifactError(f"{where}: 'scales' must be a map")
    # Every stored value takes at least one byte (int8), so the content's own size bounds what
    # the schema may declare; checked before any tensor of a declared size exists.
    check_declared(
        _declared_tensors(config, info, task, ArtifactError, where), content_bytes,
        what=f"{where}: the artifact's content", error=ArtifactError, itemsize=1,
    )
    restored = {}
    for part in ("prompt", "head"):
        restored[part] = _restore_tree(tree[part], (part,), tensors, scales, where)
    _check_shapes(config, info, task, restored["prompt"], restored["head"], ArtifactError, where)
    return PromptArtifact(
        prompt_config=config, params=restored["prompt"], head=restored["head"], backbone=info, task=task,
        training=training, metadata=metadata, created=created, storage=storage,
        tensors={k: dict(v) for k, v in tensors.items()}, checksum=checksum,
    )


def _prompt_config_from(fields: Mapping[str, Any], error: type[Exception], where: str = "prompt config") -> PromptConfig:
    known = {f.name for f in dataclasses.fields(PromptConfig)}
    unknown = sorted(str(k) for k in fields if k not in known)
    if unknown:
        raise error(f"{where}: unknown prompt config fields {unknown}")
    try:
        return PromptConfig(**dict(fields))
    except (ConfigError, TypeError, ValueError) as exc:
        raise error(f"{where}: invalid prompt config: {exc}") from exc


def _parse_backbone(raw: dict[str, Any], where: str) -> BackboneInfo:
    fields = {}
    for key, kind in (("name", str), ("fingerprint", str)):
        fields[key] = _field(raw, key, kind, f"{where}: backbone")
    for key in ("path", "tokenizer_hash", "model_type"):
        fields[key] = _field(raw, key, str, f"{where}: backbone", optional=True)
    fields["is_decoder"] = _field(raw, "is_decoder", bool, f"{where}: backbone", optional=True)
    for key in ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim", "vocab_size"):
        value = _field(raw, key, int, f"{where}: backbone", optional=True)
        if value is not None and not 1 <= value <= 2**31 - 1:
            raise ArtifactError(f"{where}: backbone field {key!r} must be a positive int, got {value}")
        fields[key] = value
    return BackboneInfo(**fields)


def _parse_task(raw: dict[str, Any] | None, where: str) -> TaskInfo | None:
    if raw is None:
        return None
    kind = _field(raw, "type", str, f"{where}: task")
    if kind == "causal_lm":
        return TaskInfo(type="causal_lm")
    if kind != "sequence_classification":
        raise ArtifactError(f"{where}: unknown task type {kind!r}")
    sub = f"{where}: task"
    num_labels = _field(raw, "num_labels", int, sub)
    check_class_count(num_labels, what=f"{sub}: num_labels", error=ArtifactError)
    names = _field(raw, "label_names", list, sub, optional=True)
    if names is not None and (len(names) != num_labels or not all(isinstance(n, str) for n in names)):
        raise ArtifactError(f"{where}: task label_names must be {num_labels} strings")
    pooling = _field(raw, "pooling", str, sub, optional=True)
    if pooling is not None and pooling not in POOLINGS:
        raise ArtifactError(f"{where}: unknown pooling {pooling!r}")
    verbalizer = _field(raw, "verbalizer", list, sub, optional=True)
    if verbalizer is not None and (
        len(verbalizer) != num_labels or not all(type(t) is int and 0 <= t < 2**31 for t in verbalizer)
    ):
        raise ArtifactError(f"{where}: task verbalizer must be {num_labels} token ids")
    try:
        info = TaskInfo(
            type=kind, num_labels=num_labels, label_names=None if names is None else tuple(names),
            pooling=pooling, verbalizer=None if verbalizer is None else tuple(verbalizer),
        )
        info.to_task()  # validates num_labels and friends
    except ConfigError as exc:
        raise ArtifactError(f"{where}: invalid task: {exc}") from exc
    return info


def _restore_tree(node: Any, path: tuple[str, ...], tensors: Mapping[str, Any], scales: Mapping[str, Any], where: str) -> Any:
    name = "/".join(path)
    if isinstance(node, dict):
        return {key: _restore_tree(child, (*path, key), tensors, scales, where) for key, child in node.items()}
    if not isinstance(node, np.ndarray):
        raise ArtifactError(f"{where}: {name} must be a map or a tensor")
    record = tensors.get(name)
    if not isinstance(record, dict) or not isinstance(record.get("dtype"), str) or not isinstance(record.get("storage"), str):
        raise ArtifactError(f"{where}: tensor {name} has no valid 'tensors' record")
    dtype_name, kind = record["dtype"], record["storage"]
    if kind != node.dtype.name and not (kind == "int8" and node.dtype == np.int8):
        raise ArtifactError(f"{where}: tensor {name} is stored as {node.dtype.name}, its record says {kind}")
    if dtype_name not in FLOAT_DTYPE_NAMES:
        if kind != dtype_name:
            raise ArtifactError(f"{where}: tensor {name}: a {dtype_name} tensor cannot be stored as {kind}")
        return node
    if kind == "int8":
        scale = scales
        for key in path:
            scale = scale.get(key) if isinstance(scale, dict) else None
        want = node.shape[:-1] if node.ndim >= 2 else ()
        if not isinstance(scale, np.ndarray) or scale.dtype != np.float32 or scale.shape != want:
            raise ArtifactError(f"{where}: tensor {name} is int8 without a float32 scale of shape {want}")
        if not np.all(np.isfinite(scale)) or np.any(scale < 0):
            raise ArtifactError(f"{where}: tensor {name} has invalid int8 scales")
        values = node.astype(np.float32)
        values *= scale[..., None] if node.ndim >= 2 else scale
    elif kind in ("float16", "float32", "bfloat16", "float64"):
        values = node
    else:
        raise ArtifactError(f"{where}: tensor {name} has unknown storage {kind!r}")
    dtype = ALLOWED_DTYPES[dtype_name]
    check_finite(values, what=f"{where}: tensor {name}", error=ArtifactError, dtype=dtype)  # before a cast overflows
    return values.astype(dtype, copy=False)


# ----------------------------------------------------------------------------- shape checks


def expected_shapes(config: PromptConfig, info: BackboneInfo) -> dict[str, tuple[int, ...]] | None:
    """The prompt parameter shapes ``config`` implies on the recorded backbone (None if unknown)."""
    p = config.num_virtual_tokens
    d, layers, kv, hd = info.hidden_size, info.num_layers, info.num_kv_heads, info.head_dim
    if config.method == "prompt":
        return None if d is None else {"embeddings": (p, d)}
    if not config.reparameterize:
        if None in (layers, kv, hd):
            return None
        return {"keys": (layers, p, kv, hd), "values": (layers, p, kv, hd)}
    if None in (d, layers, kv, hd):
        return None
    hidden = config.reparam_hidden or d
    out = layers * 2 * kv * hd
    return {"embedding": (p, d), "mlp_in/w": (d, hidden), "mlp_in/b": (hidden,), "mlp_out/w": (hidden, out), "mlp_out/b": (out,)}


def _declared_tensors(config: PromptConfig, info: BackboneInfo, task: TaskInfo | None, error, where: str) -> dict[str, TensorSpec]:
    """Every tensor the schema fields imply (``"prompt/..."``, ``"head/..."``), as shapes only."""
    want = expected_shapes(config, info)
    if want is None:
        raise error(
            f"{where}: the backbone's architecture ({dataclasses.asdict(info)}) is not known well enough to check a "
            f"{config.method} prompt; save it with the backbone"
        )
    declared = {f"prompt/{key}": TensorSpec(shape) for key, shape in want.items()}
    if task is not None and task.type == "sequence_classification" and task.verbalizer is None:
        if info.hidden_size is None:
            raise error(f"{where}: the backbone's width is unknown, so the head cannot be checked")
        declared["head/w"] = TensorSpec((info.hidden_size, task.num_labels))
        declared["head/b"] = TensorSpec((task.num_labels,))
    return declared


def _check_shapes(config, info: BackboneInfo, task: TaskInfo | None, params, head, error, where: str = "prompt") -> None:
    templates: dict[str, Any] = {"prompt": {}, "head": {}}
    for name, spec in _declared_tensors(config, info, task, error, where).items():
        _set_path(templates, tuple(name.split("/")), spec)
    try:
        check_template(_as_float32(params), templates["prompt"])
    except WireError as exc:
        raise error(f"{where}: the prompt parameters do not fit the {config.method} config: {exc}") from exc
    try:
        check_template(_as_float32(head), templates["head"])
    except WireError as exc:
        raise error(f"{where}: the head does not fit the task {task.to_dict() if task else None}: {exc}") from exc


def _as_float32(tree: Any) -> Any:
    if isinstance(tree, Mapping):
        return {key: _as_float32(value) for key, value in tree.items()}
    array = np.asarray(tree)
    return array.astype(np.float32, copy=False) if array.dtype.name in FLOAT_DTYPE_NAMES else array


def check_backbone(artifact: PromptArtifact, backbone: Backbone, *, force: bool = False) -> None:
    """Checks that ``artifact`` may be applied to ``backbone``.

    Raises:
      PromptMismatchError: the fingerprints differ (unless ``force``: then a ``UserWarning``),
        or the prompt's or head's shapes do not fit the backbone (never forced).
    """
    recorded = artifact.backbone
    if recorded.fingerprint != backbone.fingerprint:
        text = (
            f"the prompt was trained on backbone {recorded.name!r} (fingerprint {recorded.fingerprint}), "
            f"but {backbone.name!r} has fingerprint {backbone.fingerprint}"
        )
        if not force:
            raise PromptMismatchError(f"{text}; pass force=True (--force) to apply it anyway")
        warnings.warn(f"{text}; applying it anyway (forced)", UserWarning, stacklevel=3)
    if recorded.tokenizer_hash is not None and backbone.path is not None:
        from fedprompt.backbones.loading import tokenizer_hash

        current = tokenizer_hash(backbone.path)
        if current is not None and current != recorded.tokenizer_hash:
            warnings.warn(
                f"backbone {backbone.name!r} has a different tokenizer from the one the prompt was trained with",
                UserWarning, stacklevel=3,
            )
    here = BackboneInfo.from_backbone(backbone, with_tokenizer_hash=False)
    try:
        _check_shapes(artifact.prompt_config, here, artifact.task, artifact.params, artifact.head, PromptMismatchError, "prompt")
    except PromptMismatchError as exc:
        raise PromptMismatchError(f"the prompt does not fit backbone {backbone.name!r}: {exc}") from exc
    if artifact.task is not None:
        try:
            artifact.task.to_task().check_backbone(backbone)
        except ConfigError as exc:
            raise PromptMismatchError(f"the task does not fit backbone {backbone.name!r}: {exc}") from exc


# ----------------------------------------------------------------------------- files


def write_atomic(path: str | os.PathLike[str], data: bytes) -> Path:
    """Writes ``data`` to ``path`` so that readers see the old file or the new one, never a part.

    The bytes go to a temporary file in the same folder, are flushed to disk (fsync) and the
    file is renamed over ``path`` (``os.replace``). On any error the temporary file is removed
    and ``path`` is left as it was. The new file's permissions follow the umask.

    Args:
        path: The file to write.
        data: Its new content.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        OSError: The file cannot be written.
    """
    path = Path(path)
    temp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    _fsync_directory(path.parent)
    return path


def _fsync_directory(directory: Path) -> None:
    """Makes a rename in ``directory`` durable, where the platform allows it (POSIX)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _leaves(tree: Any, path: tuple[str, ...]):
    if isinstance(tree, Mapping):
        for key, value in tree.items():
            yield from _leaves(value, (*path, key))
    else:
        yield "/".join(path), np.asarray(tree)


def _utc_now_iso() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")
