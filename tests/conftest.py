"""Shared fixtures: tiny golden checkpoints and the real MiniLM, each loaded once."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Many tests compile the same small programs (tiny backbones, the same client update): one XLA
# cache for this test session, fresh each session, shared with the subprocesses tests start.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="fedprompt-tests-xla-"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
FAST_COMPILE_XLA_FLAGS = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
"""XLA flags of every test process and of the processes tests start (workers, deployments): the
tests compile hundreds of small programs and run each a few times, so LLVM's optimization of
the CPU code costs more than it saves (about a fifth of the suite's CPU time). XLA's own passes
(fusion, layouts, buffer assignment) still run: the programs and their memory are those users
get, only their machine code is less optimized. Timings come from ``fedprompt bench``, never
from tests."""
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {FAST_COMPILE_XLA_FLAGS}".strip()


def xla_flags(*extra: str) -> str:
    """``XLA_FLAGS`` for a worker process: :data:`FAST_COMPILE_XLA_FLAGS` and ``extra``."""
    return " ".join((FAST_COMPILE_XLA_FLAGS, *extra))

import numpy as np  # noqa: E402
import pytest  # noqa: E402

import fedprompt  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures"
TINY = ("bert", "roberta", "gpt2", "llama", "qwen2", "mistral")
DECODERS = ("gpt2", "llama", "qwen2", "mistral")

_cache: dict[str, fedprompt.Backbone] = {}

SLOW_MODULES_FIRST = (
    "test_flower_deployment.py", "test_parallel.py", "test_flower_tls.py", "test_training.py", "test_flower.py",
    "test_run.py", "test_flower_ray.py", "test_tpt.py", "test_generate_task.py",
)
"""The longest modules (minutes each, most of it processes starting), collected first: with
``--dist loadfile`` pytest-xdist hands the files to its workers in collection order, so a long
module collected last leaves one worker running it alone while the other idles. Deployments
and compute-bound modules alternate, so that two deployments rarely share the cores."""


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(SLOW_MODULES_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: a module keeps its order


def tiny_backbone(name: str) -> fedprompt.Backbone:
    """A tiny random checkpoint from tests/fixtures, loaded once per test session."""
    if name not in _cache:
        _cache[name] = fedprompt.load_backbone(FIXTURES / name)
    return _cache[name]


@pytest.fixture(scope="session")
def minilm() -> fedprompt.Backbone:
    """The real all-MiniLM-L6-v2 (the built-in default backbone)."""
    return fedprompt.load_backbone("minilm")


def with_word_tokenizer(src, dst, *, perturb: bool = False):
    """A copy of a tiny fixture checkpoint plus a word-level tokenizer: "w3".."w99" are ids 3..99."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("golden.npz"))
    vocab = {"<eos>": 0, "<unk>": 1, "<pad>": 2, **{f"w{i}": i for i in range(3, 100)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", eos_token="<eos>").save_pretrained(dst)
    if perturb:  # same architecture, different weights: a different fingerprint
        from safetensors.numpy import load_file, save_file

        tensors = load_file(dst / "model.safetensors")
        name = next(k for k in sorted(tensors) if k.endswith("bias"))
        tensors[name] = tensors[name] + np.float32(0.5)
        save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    return dst
