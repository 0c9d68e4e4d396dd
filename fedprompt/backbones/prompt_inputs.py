"""What a prompt is to a backbone: the two input types its forward pass accepts.

They live below both the backbones and :mod:`fedprompt.prompts` (which builds them from
trainable parameters), so neither imports the other.
"""

from __future__ import annotations

from typing import NamedTuple

import jax


class SoftPrompt(NamedTuple):
    """Virtual-token embeddings ``[P, D]`` (shared by a batch) or ``[B, P, D]``."""

    embeddings: jax.Array


class Prefix(NamedTuple):
    """Per-layer attention prefixes, ``[L, P, H_kv, head_dim]`` each (or ``[L, B, P, H_kv, hd]``)."""

    keys: jax.Array
    values: jax.Array
