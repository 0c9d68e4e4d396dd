"""Shared fixtures: tiny golden checkpoints and the real MiniLM, each loaded once."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402

import fedprompt  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures"
TINY = ("bert", "roberta", "gpt2", "llama", "qwen2", "mistral")
DECODERS = ("gpt2", "llama", "qwen2", "mistral")

_cache: dict[str, fedprompt.Backbone] = {}


def tiny_backbone(name: str) -> fedprompt.Backbone:
    """A tiny random checkpoint from tests/fixtures, loaded once per test session."""
    if name not in _cache:
        _cache[name] = fedprompt.load_backbone(FIXTURES / name)
    return _cache[name]


@pytest.fixture(scope="session")
def minilm() -> fedprompt.Backbone:
    """The real all-MiniLM-L6-v2 (the built-in default backbone)."""
    return fedprompt.load_backbone("minilm")
