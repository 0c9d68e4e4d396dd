"""Hugging Face PEFT adapters: export a prompt artifact as one, and import one.

A PEFT prompt-learning adapter is a folder with two files, written by
``PeftModel.save_pretrained`` (PEFT 0.21):

* ``adapter_config.json``: the ``PromptTuningConfig`` or ``PrefixTuningConfig`` fields, as
  ``json.dumps(config, indent=2, sort_keys=True)``;
* ``adapter_model.safetensors``: one tensor ``prompt_embeddings`` (plus, for ``SEQ_CLS``, the
  classifier PEFT trains beside the prompt: ``base_model.classifier.*`` or
  ``base_model.score.weight``), with safetensors metadata ``{"format": "pt"}``.

The tensor is

* prompt tuning (Lester et al. 2021): the soft prompt ``[P, hidden]`` (``token_dim = hidden``);
* prefix tuning (Li and Liang 2021): the prefix in PEFT's flat layout ``[P, L * 2 * H_kv * hd]``,
  ordered ``(layer, key|value, head, head_dim)`` per virtual token
  (:func:`fedprompt.prompts.prefix_to_flat`), with ``num_attention_heads = H_kv`` and
  ``token_dim = H_kv * hd`` (PEFT's grouped-query convention). PEFT saves the *output* of its
  prefix encoder, so an adapter trained with ``prefix_projection: true`` holds the projected
  prefix in this same layout (the MLP is not saved, and PEFT itself reloads it as a plain
  prefix): :func:`import_peft` reads it as a plain prefix, which is exact. For the same reason
  :func:`export_peft` folds a reparameterized prefix (:func:`fedprompt.fold_prompt`) and writes
  ``prefix_projection: false``.

The task head. PEFT's ``SEQ_CLS`` models classify with the base model's own head (BERT: the
pooler, ``tanh(dense(h_[CLS]))``, then ``classifier``; GPT-2 and the Llama family: ``score``,
without bias, on the last non-padding token), which is not fedprompt's head (pooling plus a
linear layer). So:

* ``CAUSAL_LM`` (the default for decoders) and ``FEATURE_EXTRACTION`` (the default for
  encoders) adapters carry the prompt only, and PEFT reproduces fedprompt's hidden states
  exactly; fedprompt's head and task travel beside them in ``fedprompt_head.safetensors``
  (``weight`` ``[C, D]``, ``bias`` ``[C]``, ``torch.nn.Linear``'s layout) and
  ``fedprompt_task.json`` (type, labels, pooling), which PEFT ignores and :func:`read_peft_adapter`
  reads back;
* ``SEQ_CLS`` adapters (which PEFT cannot load without classifier weights) get fedprompt's
  linear layer as ``classifier``/``score``: PEFT then loads and runs them, but its predictions
  differ from fedprompt's because its pooling does (a warning says so). RoBERTa's two-layer
  classification head has no counterpart, so ``SEQ_CLS`` is refused for it.

Everything read from an adapter folder is checked as hostile input: file sizes (JSON side
files at most :data:`fedprompt.wire.limits.MAX_JSON_BYTES`), the JSON fields and their types,
the safetensors header (dtypes, shapes, and offsets: in bounds, exactly the declared sizes and
never overlapping, all checked before a single tensor is copied), finite values within float32's
range. Every problem raises :class:`~fedprompt.errors.ArtifactError`. Pickled
``adapter_model.bin`` files are never read. The export records the backbone's name (a
built-in name, hub id or folder name), never a local path, as ``base_model_name_or_path``.

Example:
  >>> export_peft(load_prompt("prompt.fpp"), "adapter/", base_model_name_or_path="gpt2")  # doctest: +SKIP
  >>> config, params = import_peft("adapter/")  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import json
import os
import struct
import sys
import types
import warnings
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from fedprompt.errors import ArtifactError, ConfigError
from fedprompt.prompts import Prefix, PromptConfig, fold_prompt, prefix_from_flat, prefix_to_flat
from fedprompt.wire.artifact import BackboneInfo, PromptArtifact, TaskInfo, _parse_task, _portable_name, write_atomic
from fedprompt.wire.codec import DEFAULT_MAX_BYTES
from fedprompt.wire.limits import MAX_JSON_BYTES, TensorSpec, check_finite, check_spans, read_bounded

__all__ = [
    "ADAPTER_CONFIG",
    "ADAPTER_WEIGHTS",
    "HEAD_FILE",
    "PEFT_VERSION",
    "TASK_FILE",
    "TASK_TYPES",
    "PeftAdapter",
    "export_peft",
    "import_peft",
    "peft_adapter_config",
    "read_peft_adapter",
    "read_safetensors",
]

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
HEAD_FILE = "fedprompt_head.safetensors"
TASK_FILE = "fedprompt_task.json"
PEFT_VERSION = "0.21.2"
"""The PEFT release whose adapter format :func:`export_peft` writes."""
TASK_TYPES = ("CAUSAL_LM", "SEQ_CLS", "FEATURE_EXTRACTION")

_MAX_HEADER_BYTES = 16 * 1024 * 1024
_SAFETENSORS_DTYPES = {"F32": np.dtype(np.float32), "F16": np.dtype(np.float16), "BF16": np.dtype(ml_dtypes.bfloat16), "F64": np.dtype(np.float64)}
_INITS_TO_PEFT = {"random": "RANDOM", "sample_vocab": "SAMPLE_VOCAB", "text": "TEXT"}
_BERT_CLASSIFIER = ("bert",)
_SCORE_CLASSIFIER = ("gpt2", "llama", "qwen2", "mistral")


# ----------------------------------------------------------------------------- export


def peft_adapter_config(
    prompt_config: PromptConfig,
    backbone: BackboneInfo,
    *,
    task_type: str,
    base_model_name_or_path: str | None,
) -> dict[str, Any]:
    """The ``adapter_config.json`` fields PEFT 0.21 writes for this prompt (a plain prefix or a soft prompt).

    Raises:
      ConfigError: ``task_type`` is unknown, the prompt is reparameterized (fold it first), or
        the backbone facts needed for a prefix are missing.
    """
    if task_type not in TASK_TYPES:
        raise ConfigError(f"task_type must be one of {TASK_TYPES}, got {task_type!r}")
    common = {
        "auto_mapping": None,
        "base_model_name_or_path": base_model_name_or_path,
        "inference_mode": True,
        "modules_to_save": ["classifier", "score"] if task_type == "SEQ_CLS" else None,
        "num_layers": backbone.num_layers,
        "num_transformer_submodules": 1,
        "num_virtual_tokens": prompt_config.num_virtual_tokens,
        "peft_version": PEFT_VERSION,
        "revision": None,
        "task_type": task_type,
    }
    if prompt_config.method == "prompt":
        if backbone.hidden_size is None:
            raise ConfigError("the backbone's hidden size is unknown; save the artifact with its backbone")
        init = prompt_config.resolved_init
        return {
            **common,
            "num_attention_heads": backbone.num_heads,
            "peft_type": "PROMPT_TUNING",
            "prompt_tuning_init": _INITS_TO_PEFT[init],
            "prompt_tuning_init_text": prompt_config.init_text if init == "text" else None,
            "token_dim": backbone.hidden_size,
            "tokenizer_kwargs": None,
            "tokenizer_name_or_path": base_model_name_or_path if init == "text" else None,
        }
    if prompt_config.reparameterize:
        raise ConfigError("fold a reparameterized prefix (fedprompt.fold_prompt) before writing a PEFT config")
    if None in (backbone.num_layers, backbone.num_kv_heads, backbone.head_dim):
        raise ConfigError("the backbone's layers, key/value heads or head size are unknown; save the artifact with its backbone")
    token_dim = backbone.num_kv_heads * backbone.head_dim
    return {
        **common,
        "encoder_hidden_size": token_dim,
        "init_weights": None,
        "num_attention_heads": backbone.num_kv_heads,
        "peft_type": "PREFIX_TUNING",
        "prefix_projection": False,
        "token_dim": token_dim,
    }


def export_peft(
    artifact: PromptArtifact,
    out_dir: str | os.PathLike[str],
    *,
    base_model_name_or_path: str | None = None,
    task_type: str | None = None,
) -> Path:
    """Writes a prompt artifact as a PEFT prompt-tuning or prefix-tuning adapter folder.

    Args:
      artifact: The loaded artifact (:func:`fedprompt.load_prompt`).
      out_dir: The folder to write (created if needed; files of the same names are replaced).
      base_model_name_or_path: What PEFT records as the base model (default: the artifact's
        backbone name, a built-in name, hub id or folder name; never a local path).
      task_type: ``"CAUSAL_LM"`` (default for decoders), ``"FEATURE_EXTRACTION"`` (default for
        encoders) or ``"SEQ_CLS"`` (see the module docstring about the head).

    Returns:
      ``out_dir`` as a :class:`~pathlib.Path`.

    Raises:
      ConfigError: An unknown or unsuitable task type, or backbone facts missing from the artifact.
      OSError: The files cannot be written.
    """
    info = artifact.backbone
    if task_type is None:
        task_type = "CAUSAL_LM" if info.is_decoder else "FEATURE_EXTRACTION"
    if task_type == "CAUSAL_LM" and info.is_decoder is False:
        raise ConfigError(f"task_type CAUSAL_LM needs a decoder; {info.name!r} is an encoder")
    base = base_model_name_or_path or _portable_name(info.name)
    config, params = artifact.prompt_config, artifact.params
    if config.reparameterize:
        arch = types.SimpleNamespace(num_layers=info.num_layers, num_kv_heads=info.num_kv_heads, head_dim=info.head_dim)
        if None in vars(arch).values():
            raise ConfigError("the backbone's layers, heads or head size are unknown: cannot fold the reparameterized prefix")
        config, params = fold_prompt(config, params, arch)
    adapter = peft_adapter_config(config, info, task_type=task_type, base_model_name_or_path=base)
    if config.method == "prompt":
        embeddings = np.asarray(params["embeddings"], np.float32)
    else:
        embeddings = np.asarray(prefix_to_flat(Prefix(np.asarray(params["keys"]), np.asarray(params["values"]))), np.float32)
    tensors = {"prompt_embeddings": np.ascontiguousarray(embeddings)}
    head = artifact.head or {}
    if task_type == "SEQ_CLS":
        tensors.update(_classifier_tensors(artifact, head))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / ADAPTER_CONFIG, json.dumps(adapter, indent=2, sort_keys=True).encode())
    _write_safetensors(out / ADAPTER_WEIGHTS, tensors)
    if "w" in head:
        w = np.asarray(head["w"], np.float32)
        _write_safetensors(out / HEAD_FILE, {"weight": np.ascontiguousarray(w.T), "bias": np.asarray(head["b"], np.float32)})
    if artifact.task is not None:
        task = {**artifact.task.to_dict(), "backbone": info.name, "fingerprint": info.fingerprint}
        write_atomic(out / TASK_FILE, json.dumps(task, indent=2, sort_keys=True).encode())
    return out


def _classifier_tensors(artifact: PromptArtifact, head: dict[str, Any]) -> dict[str, np.ndarray]:
    model_type = artifact.backbone.model_type
    if "w" not in head:
        raise ConfigError("task_type SEQ_CLS needs a classification head (this artifact has none); use CAUSAL_LM or FEATURE_EXTRACTION")
    weight = np.ascontiguousarray(np.asarray(head["w"], np.float32).T)
    bias = np.asarray(head["b"], np.float32)
    if model_type in _BERT_CLASSIFIER:
        warnings.warn(
            "SEQ_CLS export: PEFT's BertForSequenceClassification applies BERT's pooler (tanh(dense([CLS]))) before the "
            "classifier, which fedprompt's head does not; the prompt is exact, the class scores are not. "
            "Use FEATURE_EXTRACTION plus fedprompt_head.safetensors for fedprompt's exact predictions.",
            UserWarning, stacklevel=3,
        )
        return {"base_model.classifier.weight": weight, "base_model.classifier.bias": bias}
    if model_type in _SCORE_CLASSIFIER:
        warnings.warn(
            "SEQ_CLS export: PEFT's score layer has no bias and pools the last non-padding token by pad id; "
            f"fedprompt's bias (max |b| = {float(np.max(np.abs(bias))) if bias.size else 0.0:.3g}) is dropped. "
            "Use CAUSAL_LM plus fedprompt_head.safetensors for fedprompt's exact predictions.",
            UserWarning, stacklevel=3,
        )
        return {"base_model.score.weight": weight}
    raise ConfigError(
        f"task_type SEQ_CLS is not supported for model_type {model_type!r} (its classification head has no "
        "fedprompt counterpart); use FEATURE_EXTRACTION or CAUSAL_LM"
    )


def _write_safetensors(path: Path, tensors: dict[str, np.ndarray]) -> None:
    from safetensors.numpy import save

    write_atomic(path, save(tensors, metadata={"format": "pt"}))


# ----------------------------------------------------------------------------- import


@dataclasses.dataclass(frozen=True, eq=False)
class PeftAdapter:
    """A PEFT prompt-learning adapter as read by :func:`read_peft_adapter`.

    Attributes:
      prompt_config: the equivalent :class:`PromptConfig` (a plain prefix for prefix tuning).
      params: fedprompt's prompt parameters (float32 numpy): ``{"embeddings": [P, D]}`` or
        ``{"keys", "values"}`` of ``[L, P, H_kv, hd]``.
      config: the adapter's ``adapter_config.json``.
      task_type: PEFT's task type (or None).
      base_model_name_or_path: the base model PEFT recorded (or None).
      head: fedprompt's head from ``fedprompt_head.safetensors`` (``{"w": [D, C], "b": [C]}``), or ``{}``.
      task: the task from ``fedprompt_task.json``, or None.
      extra_tensors: names of the other tensors in the adapter (a ``SEQ_CLS`` classifier), not imported.
      fingerprint: the backbone fingerprint recorded in ``fedprompt_task.json``, or None.
    """

    prompt_config: PromptConfig
    params: dict[str, np.ndarray]
    config: dict[str, Any]
    task_type: str | None
    base_model_name_or_path: str | None
    head: dict[str, np.ndarray]
    task: TaskInfo | None
    extra_tensors: tuple[str, ...]
    fingerprint: str | None = None


def import_peft(adapter_dir: str | os.PathLike[str]) -> tuple[PromptConfig, dict[str, np.ndarray]]:
    """Reads a PEFT prompt-tuning or prefix-tuning adapter as fedprompt's ``(PromptConfig, params)``.

    Prefix adapters trained with ``prefix_projection: true`` are read exactly: PEFT saves the
    projected prefix, not the MLP (see the module docstring). P-tuning (a prompt encoder),
    multitask prompt tuning, encoder-decoder adapters (``num_transformer_submodules: 2``) and
    every non-prompt method (LoRA, ...) are refused.

    Raises:
      ArtifactError: The folder is not a readable, well-formed adapter of a supported kind.
    """
    adapter = read_peft_adapter(adapter_dir)
    return adapter.prompt_config, adapter.params


def read_peft_adapter(adapter_dir: str | os.PathLike[str], *, max_bytes: int = DEFAULT_MAX_BYTES) -> PeftAdapter:
    """Reads and checks a PEFT prompt-learning adapter folder, with fedprompt's head and task if present.

    Raises:
      ArtifactError: see :func:`import_peft`.
    """
    folder = Path(adapter_dir)
    if not folder.is_dir():
        raise ArtifactError(f"{folder}: not a folder (a PEFT adapter is a folder with {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS})")
    config = _read_json(folder / ADAPTER_CONFIG)
    where = str(folder / ADAPTER_CONFIG)
    peft_type = config.get("peft_type")
    if peft_type not in ("PROMPT_TUNING", "PREFIX_TUNING"):
        raise ArtifactError(
            f"{where}: peft_type {peft_type!r} is not supported; fedprompt imports PROMPT_TUNING and PREFIX_TUNING adapters"
        )
    p = _positive_int(config, "num_virtual_tokens", where)
    token_dim = _positive_int(config, "token_dim", where)
    submodules = config.get("num_transformer_submodules")
    if submodules not in (None, 1):
        raise ArtifactError(f"{where}: num_transformer_submodules {submodules!r}: encoder-decoder adapters are not supported")
    task_type = config.get("task_type")
    if task_type is not None and not isinstance(task_type, str):
        raise ArtifactError(f"{where}: task_type must be a string or null")
    base = config.get("base_model_name_or_path")
    base = base if isinstance(base, str) else None

    weights_path = folder / ADAPTER_WEIGHTS
    if not weights_path.is_file():
        bin_note = " (adapter_model.bin is a pickle, which fedprompt never reads; re-save with safe_serialization=True)" if (folder / "adapter_model.bin").exists() else ""
        raise ArtifactError(f"{folder}: no {ADAPTER_WEIGHTS}{bin_note}")
    tensors = read_safetensors(weights_path, max_bytes=max_bytes)
    if "prompt_embeddings" not in tensors:
        raise ArtifactError(f"{weights_path}: no 'prompt_embeddings' tensor (found {sorted(tensors)[:8]})")
    flat = tensors["prompt_embeddings"].astype(np.float32)
    extra = tuple(sorted(k for k in tensors if k != "prompt_embeddings"))

    if peft_type == "PROMPT_TUNING":
        if flat.shape != (p, token_dim):
            raise ArtifactError(f"{weights_path}: prompt_embeddings has shape {flat.shape}, expected {(p, token_dim)}")
        prompt_config = _prompt_tuning_config(config, p, where)
        params = {"embeddings": flat}
    else:
        layers = _positive_int(config, "num_layers", where)
        heads = _positive_int(config, "num_attention_heads", where)
        if token_dim % heads:
            raise ArtifactError(f"{where}: token_dim {token_dim} is not divisible by num_attention_heads {heads}")
        want = (p, layers * 2 * token_dim)
        if flat.shape != want:
            projection = " (an unprojected prefix_projection embedding? PEFT saves the projected prefix)" if config.get("prefix_projection") else ""
            raise ArtifactError(f"{weights_path}: prompt_embeddings has shape {flat.shape}, expected {want}{projection}")
        prefix = prefix_from_flat(flat, layers, heads, token_dim // heads)
        prompt_config = PromptConfig(method="prefix", num_virtual_tokens=p)
        params = {"keys": np.asarray(prefix.keys, np.float32), "values": np.asarray(prefix.values, np.float32)}

    head: dict[str, np.ndarray] = {}
    if (folder / HEAD_FILE).is_file():
        head_tensors = read_safetensors(folder / HEAD_FILE, max_bytes=max_bytes)
        w, b = head_tensors.get("weight"), head_tensors.get("bias")
        if set(head_tensors) != {"weight", "bias"} or w.ndim != 2 or b.shape != (w.shape[0],):
            raise ArtifactError(f"{folder / HEAD_FILE}: expected 'weight' [C, D] and 'bias' [C]")
        head = {"w": np.ascontiguousarray(w.astype(np.float32).T), "b": b.astype(np.float32)}
    task, fingerprint = None, None
    if (folder / TASK_FILE).is_file():
        raw = _read_json(folder / TASK_FILE)
        task = _parse_task({k: raw.get(k) for k in ("type", "num_labels", "label_names", "pooling", "verbalizer") if k in raw}, str(folder / TASK_FILE))
        fingerprint = raw.get("fingerprint") if isinstance(raw.get("fingerprint"), str) else None
    if head and (task is None or task.type != "sequence_classification" or task.num_labels != head["b"].shape[0]):
        raise ArtifactError(f"{folder}: {HEAD_FILE} needs a {TASK_FILE} of a classification task with as many labels")
    return PeftAdapter(
        prompt_config=prompt_config, params=params, config=config, task_type=task_type,
        base_model_name_or_path=base, head=head, task=task, extra_tensors=extra, fingerprint=fingerprint,
    )


def _prompt_tuning_config(config: dict[str, Any], p: int, where: str) -> PromptConfig:
    init = config.get("prompt_tuning_init", "RANDOM")
    inits = {v: k for k, v in _INITS_TO_PEFT.items()}
    if not isinstance(init, str) or init not in inits:
        raise ArtifactError(f"{where}: prompt_tuning_init must be one of {sorted(inits)}, got {init!r}")
    text = config.get("prompt_tuning_init_text")
    if inits[init] == "text" and not (isinstance(text, str) and text):
        raise ArtifactError(f"{where}: prompt_tuning_init TEXT without prompt_tuning_init_text")
    return PromptConfig(method="prompt", num_virtual_tokens=p, init=inits[init], init_text=text if inits[init] == "text" else None)


def _positive_int(config: dict[str, Any], key: str, where: str) -> int:
    value = config.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 2**31 - 1:
        raise ArtifactError(f"{where}: {key} must be a positive integer, got {value!r}")
    return value


def _read_json(path: Path) -> dict[str, Any]:
    data = read_bounded(path, MAX_JSON_BYTES, what="JSON file", error=ArtifactError)
    try:
        value = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ArtifactError(f"{path}: not valid JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise ArtifactError(f"{path}: must hold a JSON object")
    return value


def read_safetensors(path: str | os.PathLike[str], *, max_bytes: int = DEFAULT_MAX_BYTES) -> dict[str, np.ndarray]:
    """Reads a safetensors file of floating-point tensors, checking it as hostile input.

    The format: an 8-byte little-endian header length ``N``, ``N`` bytes of JSON
    (``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}``), then
    the data; offsets count from the end of the header. Accepted dtypes: F32, F16, BF16, F64.

    Returns:
      name -> numpy array (an owned copy), in the file's dtype.

    Raises:
      ArtifactError: unreadable, too large, a malformed header, offsets out of range, of a
        length other than the declared shape and dtype need, or overlapping (all checked before
        any tensor is copied), a dtype other than the four above, non-finite values, or values
        beyond float32's range (fedprompt uses every tensor as float32).
    """
    path = Path(path)
    data = read_bounded(path, max_bytes, what="safetensors file", error=ArtifactError)
    if len(data) < 8:
        raise ArtifactError(f"{path}: too short to be a safetensors file")
    (n,) = struct.unpack("<Q", data[:8])
    if n > min(_MAX_HEADER_BYTES, len(data) - 8):
        raise ArtifactError(f"{path}: header length {n} is larger than the file allows")
    try:
        header = json.loads(data[8 : 8 + n].decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ArtifactError(f"{path}: the safetensors header is not valid JSON: {exc}") from exc
    if not isinstance(header, dict):
        raise ArtifactError(f"{path}: the safetensors header must be a JSON object")
    buffer = memoryview(data)[8 + n :]
    declared: dict[str, tuple[TensorSpec, int, int]] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
            raise ArtifactError(f"{path}: tensor {name!r}: expected exactly dtype, shape, data_offsets")
        dtype = _SAFETENSORS_DTYPES.get(entry["dtype"]) if isinstance(entry["dtype"], str) else None
        if dtype is None:
            raise ArtifactError(f"{path}: tensor {name!r} has dtype {entry['dtype']!r}; accepted: {sorted(_SAFETENSORS_DTYPES)}")
        shape, offsets = entry["shape"], entry["data_offsets"]
        if not isinstance(shape, list) or len(shape) > 8 or not all(type(d) is int and 0 <= d <= 2**31 - 1 for d in shape):
            raise ArtifactError(f"{path}: tensor {name!r} has a malformed shape {shape!r}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)):
            raise ArtifactError(f"{path}: tensor {name!r} has malformed data_offsets")
        declared[name] = (TensorSpec(tuple(shape), dtype), *offsets)
    # Every offset, length and overlap is checked before anything is copied: tensors aliasing the
    # same bytes would otherwise cost a copy each.
    spans = [(name, begin, end, spec.nbytes) for name, (spec, begin, end) in declared.items()]
    check_spans(spans, len(buffer), what=str(path), error=ArtifactError)
    tensors: dict[str, np.ndarray] = {}
    for name, (spec, begin, end) in declared.items():
        array = np.frombuffer(buffer[begin:end], dtype=spec.dtype).reshape(spec.shape)
        array = array.byteswap() if sys.byteorder == "big" else array.copy()  # the format is little-endian
        check_finite(array, what=f"{path}: tensor {name!r}", error=ArtifactError, dtype=np.float32)
        tensors[name] = array
    return tensors
