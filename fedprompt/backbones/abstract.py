"""Abstract backbones: the real module structure with shape-only weights, for memory planning.

:func:`abstract_backbone` builds a :class:`~fedprompt.backbones.backbone.Backbone` from a
Hugging Face style config dict whose weights are :class:`jax.ShapeDtypeStruct` leaves: nothing
is downloaded or allocated, yet a prompt-tuning step on it can be lowered and compiled
(``jax.jit(step).lower(...).compile()``) and XLA's memory analysis read, which is how
``fedprompt bench memory --abstract`` tells whether a 7B or 70B step fits a device.

The configs of a few public checkpoints are written out in :data:`ABSTRACT_CONFIGS` (their
published hyper-parameters, as in each model's ``config.json``); any other config dict of a
Llama-family or GPT-2 model works too.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from fedprompt.backbones.backbone import Backbone
from fedprompt.backbones.loading import architecture_classes, fingerprint
from fedprompt.errors import CheckpointError, ConfigError, UnsupportedArchitectureError

#: Published hyper-parameters of public checkpoints, as their ``config.json`` states them.
ABSTRACT_CONFIGS: dict[str, dict[str, Any]] = {
    # meta-llama/Llama-2-7b-hf: 6.74e9 parameters, multi-head attention (32 KV heads).
    "llama-7b": {
        "model_type": "llama",
        "vocab_size": 32000,
        "hidden_size": 4096,
        "intermediate_size": 11008,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
    },
    # meta-llama/Llama-2-70b-hf: 6.90e10 parameters, grouped-query attention (8 KV heads).
    "llama-70b": {
        "model_type": "llama",
        "vocab_size": 32000,
        "hidden_size": 8192,
        "intermediate_size": 28672,
        "num_hidden_layers": 80,
        "num_attention_heads": 64,
        "num_key_value_heads": 8,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
    },
    # Qwen/Qwen2-0.5B: 4.94e8 parameters, 2 KV heads, biases on q/k/v, tied embeddings.
    "qwen2-0.5b": {
        "model_type": "qwen2",
        "vocab_size": 151936,
        "hidden_size": 896,
        "intermediate_size": 4864,
        "num_hidden_layers": 24,
        "num_attention_heads": 14,
        "num_key_value_heads": 2,
        "max_position_embeddings": 131072,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "hidden_act": "silu",
        "tie_word_embeddings": True,
        "use_sliding_window": False,
        "sliding_window": 131072,
        "max_window_layers": 24,
        "bos_token_id": 151643,
        "eos_token_id": 151643,
    },
}


def abstract_tensors(config: Mapping[str, Any], dtype: Any = jnp.bfloat16) -> tuple[Any, dict[str, jax.ShapeDtypeStruct]]:
    """The architecture config and a shape-only checkpoint (name -> ``ShapeDtypeStruct``).

    Raises:
      UnsupportedArchitectureError: the architecture has no ``checkpoint_shapes`` (encoders).
      ConfigError: the config dict is invalid.
    """
    model_type = config.get("model_type")
    if not isinstance(model_type, str):
        raise ConfigError("an abstract backbone's config needs a 'model_type'")
    config_cls, module_cls = architecture_classes(model_type)
    try:
        arch = config_cls.from_hf(dict(config))
    except (KeyError, TypeError) as err:
        raise ConfigError(f"config of model_type {model_type!r} lacks or mistypes a field: {err}") from None
    shapes_fn = getattr(importlib.import_module(module_cls.__module__), "checkpoint_shapes", None)
    if shapes_fn is None:
        raise UnsupportedArchitectureError(
            f"abstract backbones are built for decoders (llama, qwen2, mistral, gpt2), not {model_type!r}"
        )
    tensors = {name: jax.ShapeDtypeStruct(shape, jnp.dtype(dtype)) for name, shape in shapes_fn(arch).items()}
    return arch, tensors


def abstract_backbone(
    config: str | Mapping[str, Any],
    *,
    dtype: Any = jnp.bfloat16,
    compute_dtype: Any | None = None,
    remat: bool | None = None,
) -> Backbone:
    """A backbone with the structure of ``config`` and shape-only weights (nothing allocated).

    Args:
      config: a name of :data:`ABSTRACT_CONFIGS` (``"llama-7b"``, ``"llama-70b"``,
        ``"qwen2-0.5b"``) or a Hugging Face ``config.json`` dict of a Llama-family or GPT-2 model.
      dtype: storage dtype of the weights (default bfloat16, as such models are served).
      compute_dtype: dtype of activations (default ``dtype``); prompts stay float32.
      remat: as for :func:`~fedprompt.backbones.loading.load_backbone`.

    Returns:
      A :class:`~fedprompt.backbones.backbone.Backbone` whose ``weights`` are
      ``jax.ShapeDtypeStruct`` leaves (``is_abstract`` is True); it has no tokenizer. Lower and
      compile steps with it; running it raises :class:`~fedprompt.errors.ConfigError`.

    Raises:
      ConfigError: an unknown name, an invalid config or dtype.
      UnsupportedArchitectureError: an encoder config.

    Example:
      >>> bb = abstract_backbone("llama-7b")
      >>> round(bb.num_parameters() / 1e9, 2), bb.weight_bytes() // 2**30
      (6.74, 12)
    """
    if isinstance(config, str):
        if config not in ABSTRACT_CONFIGS:
            raise ConfigError(f"unknown abstract backbone {config!r}; known: {', '.join(ABSTRACT_CONFIGS)}")
        name, raw = config, ABSTRACT_CONFIGS[config]
    elif isinstance(config, Mapping):
        name, raw = f"abstract-{config.get('model_type', '?')}", config
    else:
        raise ConfigError(f"config must be a name or a config dict, got {type(config).__name__}")
    if jnp.dtype(dtype) not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        raise ConfigError(f"dtype must be float32, bfloat16 or float16, got {dtype}")
    arch, tensors = abstract_tensors(raw, dtype)
    _, module_cls = architecture_classes(arch.model_type)
    try:
        module = module_cls.from_hf(arch, tensors, dtype=dtype)
    except CheckpointError as err:  # the shapes are ours: a mismatch is a config the module cannot build
        raise ConfigError(f"cannot build an abstract {arch.model_type} model: {err}") from None
    return Backbone(
        module=module,
        config=arch,
        name=name,
        fingerprint=fingerprint({**arch.to_dict(), "abstract": True}, {}),
        tokenizer=None,
        compute_dtype=jnp.dtype(compute_dtype or dtype),
        remat=remat,
    )
