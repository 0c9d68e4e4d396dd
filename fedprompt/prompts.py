"""Trainable prompts: soft prompts and deep prefixes.

* Soft prompt tuning (Lester, Al-Rfou and Constant 2021, "The Power of Scale for
  Parameter-Efficient Prompt Tuning"): ``P`` vectors in the word-embedding space are prepended
  to the input's word embeddings and the attention mask is extended by ``P`` ones. The backbone
  then adds its own position (and token-type) embeddings to the whole sequence. These are the
  semantics of Hugging Face PEFT's prompt tuning, so a prompt moves between the two unchanged.
* Deep prefix tuning (Li and Liang 2021, "Prefix-Tuning"; Liu et al. 2022, "P-Tuning v2"): per
  layer, ``P`` key and value vectors are placed before the real tokens' keys and values, like a
  pre-filled key/value cache (PEFT's prefix tuning). Optionally reparameterized by an MLP
  (``embedding -> Linear -> tanh -> Linear``) during training; :func:`fold_prompt` evaluates
  the MLP once and yields plain prefixes for transport and inference.

The trainable parameters of a prompt are a plain dict pytree (see :func:`init_prompt`);
:func:`materialize` turns them into the :class:`SoftPrompt` or :class:`Prefix` a backbone takes.
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING, Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

from fedprompt.backbones.prompt_inputs import Prefix, SoftPrompt
from fedprompt.errors import ConfigError, PromptMismatchError

if TYPE_CHECKING:
    from fedprompt.backbones.backbone import Backbone

Method = Literal["prompt", "prefix"]
Init = Literal["random", "sample_vocab", "text"]
METHODS = ("prompt", "prefix")
INITS = ("random", "sample_vocab", "text")


@dataclasses.dataclass(frozen=True)
class PromptConfig:
    """How the trainable prompt is shaped and initialized.

    Attributes:
      method: ``"prompt"`` (soft prompt) or ``"prefix"`` (deep prefix, P-tuning v2).
      num_virtual_tokens: number of virtual tokens ``P`` (>= 1).
      init: ``"random"`` (normal with ``random_std``, PEFT's RANDOM), ``"sample_vocab"``
        (rows of the word-embedding table at uniformly sampled token ids, PEFT's SAMPLE_VOCAB)
        or ``"text"`` (the embedding rows of ``init_text`` tokenized with the backbone's
        tokenizer, repeated or truncated to ``P``, PEFT's TEXT). ``None`` picks
        ``"sample_vocab"`` for soft prompts and ``"random"`` for prefixes. A plain prefix only
        supports ``"random"``; with ``reparameterize=True`` the MLP's input embedding may use
        any init.
      init_text: text for ``init="text"``.
      random_std: standard deviation of ``"random"`` init (PEFT's ``nn.Embedding`` default is 1).
      reparameterize: prefix only; train the prefix through an MLP (Li and Liang 2021).
      reparam_hidden: hidden width of that MLP (defaults to the backbone width).

    Example:
      >>> PromptConfig(method="prefix", num_virtual_tokens=10).resolved_init
      'random'
    """

    method: Method = "prompt"
    num_virtual_tokens: int = 20
    init: Init | None = None
    init_text: str | None = None
    random_std: float = 1.0
    reparameterize: bool = False
    reparam_hidden: int | None = None

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"method must be one of {METHODS}, got {self.method!r}")
        if not isinstance(self.num_virtual_tokens, int) or isinstance(self.num_virtual_tokens, bool) or self.num_virtual_tokens < 1:
            raise ConfigError(f"num_virtual_tokens must be a positive integer, got {self.num_virtual_tokens!r}")
        if self.init is not None and self.init not in INITS:
            raise ConfigError(f"init must be one of {INITS}, got {self.init!r}")
        if self.resolved_init == "text" and not self.init_text:
            raise ConfigError("init='text' needs a non-empty init_text")
        if not (isinstance(self.random_std, (int, float)) and math.isfinite(self.random_std) and self.random_std > 0):
            raise ConfigError(f"random_std must be a positive finite number, got {self.random_std!r}")
        if self.reparameterize and self.method != "prefix":
            raise ConfigError("reparameterize applies to method='prefix' only")
        if self.method == "prefix" and not self.reparameterize and self.resolved_init != "random":
            raise ConfigError(
                "a plain prefix lives in key/value space and only supports init='random'; "
                "use reparameterize=True to initialize from vocabulary or text"
            )
        if self.reparam_hidden is not None and (not isinstance(self.reparam_hidden, int) or self.reparam_hidden < 1):
            raise ConfigError(f"reparam_hidden must be a positive integer, got {self.reparam_hidden!r}")

    @property
    def resolved_init(self) -> str:
        """The init actually used (``init`` with its method-dependent default applied)."""
        if self.init is not None:
            return self.init
        return "sample_vocab" if self.method == "prompt" else "random"


def _init_token_ids(config: PromptConfig, backbone: Backbone, key: jax.Array) -> jax.Array:
    """Token ids whose embeddings initialize the prompt (sample_vocab / text)."""
    p = config.num_virtual_tokens
    if config.resolved_init == "sample_vocab":
        return jax.random.randint(key, (p,), 0, backbone.config.vocab_size)
    if backbone.tokenizer is None:
        raise ConfigError(f"init='text' needs a tokenizer, and backbone {backbone.name!r} has none")
    ids = list(backbone.tokenizer(config.init_text)["input_ids"])
    if not ids:
        raise ConfigError(f"init_text {config.init_text!r} tokenizes to no tokens")
    ids = (ids * math.ceil(p / len(ids)))[:p]
    return jnp.asarray(ids, jnp.int32)


def _embedding_init(config: PromptConfig, backbone: Backbone, key: jax.Array) -> jax.Array:
    """``[P, D]`` initial embeddings by ``config.resolved_init``."""
    if config.resolved_init == "random":
        return config.random_std * jax.random.normal(key, (config.num_virtual_tokens, backbone.width), jnp.float32)
    return backbone.word_embeddings(_init_token_ids(config, backbone, key))


def _uniform_linear(key: jax.Array, fan_in: int, fan_out: int) -> dict[str, jax.Array]:
    """A linear layer initialized like PyTorch's ``nn.Linear`` (PEFT's prefix MLP)."""
    kw, kb = jax.random.split(key)
    bound = 1.0 / math.sqrt(fan_in)
    return {
        "w": jax.random.uniform(kw, (fan_in, fan_out), jnp.float32, -bound, bound),
        "b": jax.random.uniform(kb, (fan_out,), jnp.float32, -bound, bound),
    }


def init_prompt(config: PromptConfig, backbone: Backbone, key: jax.Array) -> dict[str, Any]:
    """Initial trainable prompt parameters (a float32 dict pytree).

    Returns:
      * soft prompt: ``{"embeddings": [P, D]}``;
      * plain prefix: ``{"keys": [L, P, H_kv, hd], "values": [L, P, H_kv, hd]}``;
      * reparameterized prefix: ``{"embedding": [P, D], "mlp_in": {"w", "b"}, "mlp_out": {"w", "b"}}``.
    """
    cfg = backbone.config
    p = config.num_virtual_tokens
    k_embed, k_in, k_out, k_v = jax.random.split(key, 4)
    if config.method == "prompt":
        return {"embeddings": _embedding_init(config, backbone, k_embed)}
    if not config.reparameterize:
        shape = (cfg.num_layers, p, cfg.num_kv_heads, cfg.head_dim)
        return {
            "keys": config.random_std * jax.random.normal(k_embed, shape, jnp.float32),
            "values": config.random_std * jax.random.normal(k_v, shape, jnp.float32),
        }
    hidden = config.reparam_hidden or backbone.width
    out = cfg.num_layers * 2 * cfg.num_kv_heads * cfg.head_dim
    return {
        "embedding": _embedding_init(config, backbone, k_embed),
        "mlp_in": _uniform_linear(k_in, backbone.width, hidden),
        "mlp_out": _uniform_linear(k_out, hidden, out),
    }


def prefix_from_flat(flat: jax.Array, num_layers: int, num_kv_heads: int, head_dim: int) -> Prefix:
    """Split PEFT's flat prefix layout ``[P, L * 2 * H_kv * hd]`` into per-layer keys and values.

    The flat vector of each virtual token is ordered ``(layer, key|value, head, head_dim)``,
    which is how PEFT's prefix encoder output is viewed before it becomes the cache.
    """
    p = flat.shape[0]
    x = flat.reshape(p, num_layers, 2, num_kv_heads, head_dim)
    x = jnp.transpose(x, (2, 1, 0, 3, 4))  # [2, L, P, H, hd]
    return Prefix(keys=x[0], values=x[1])


def prefix_to_flat(prefix: Prefix) -> jax.Array:
    """Inverse of :func:`prefix_from_flat`: ``[L, P, H, hd]`` keys/values -> ``[P, L * 2 * H * hd]``."""
    x = jnp.stack([prefix.keys, prefix.values])  # [2, L, P, H, hd]
    x = jnp.transpose(x, (2, 1, 0, 3, 4))  # [P, L, 2, H, hd]
    return x.reshape(x.shape[0], -1)


def materialize(config: PromptConfig, params: dict[str, Any], backbone_config: Any) -> SoftPrompt | Prefix:
    """Turn trainable parameters into what a backbone consumes (runs the MLP if reparameterized)."""
    if config.method == "prompt":
        return SoftPrompt(params["embeddings"])
    if "keys" in params:
        return Prefix(params["keys"], params["values"])
    h = jnp.tanh(params["embedding"] @ params["mlp_in"]["w"] + params["mlp_in"]["b"])
    flat = h @ params["mlp_out"]["w"] + params["mlp_out"]["b"]
    cfg = backbone_config
    return prefix_from_flat(flat, cfg.num_layers, cfg.num_kv_heads, cfg.head_dim)


def fold_prompt(config: PromptConfig, params: dict[str, Any], backbone_config: Any) -> tuple[PromptConfig, dict[str, Any]]:
    """Fold a reparameterized prefix into plain per-layer prefixes (exact: the MLP is evaluated once).

    Prompts that are not reparameterized are returned unchanged.
    """
    if not config.reparameterize:
        return config, params
    prefix = materialize(config, params, backbone_config)
    folded = dataclasses.replace(config, reparameterize=False, reparam_hidden=None, init="random")
    return folded, {"keys": prefix.keys, "values": prefix.values}


def check_prompt_params(config: PromptConfig, params: dict[str, Any], backbone: Backbone) -> None:
    """Raise :class:`PromptMismatchError` if ``params`` do not fit ``config`` and ``backbone``."""
    want = jax.tree.map(np.shape, jax.eval_shape(lambda: init_prompt(config, backbone, jax.random.key(0))))
    got = jax.tree.map(np.shape, params)
    if jax.tree.structure(want) != jax.tree.structure(got) or want != got:
        raise PromptMismatchError(f"prompt parameters {got} do not match {config} on backbone {backbone.name!r}: expected {want}")
