"""Fuzz target for the wire decoder and the prompt-artifact loader.

With atheris (``pip install atheris``), coverage-guided::

    python tests/fuzz_wire_decoder.py -atheris_runs=100000

Without it, the same target runs on seeded random and mutated inputs for ``--runs`` inputs.
Any exception other than the library's own ``FedPromptError`` is a bug and stops the run.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np

from fedprompt.errors import FedPromptError
from fedprompt.wire import artifact, codec

SEED_MESSAGE = codec.encode({"delta": {"w": np.ones((3, 4), np.float32)}}, kind="update", round=1, fingerprint="f" * 32)


def target(data: bytes) -> None:
    """Decode ``data`` as a wire message and as a prompt file; only FedPromptError may escape."""
    try:
        codec.decode(data)
    except FedPromptError:
        pass
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "p.fpp"
        path.write_bytes(data)
        try:
            artifact.load_prompt(path)
        except FedPromptError:
            pass


def _mutations(rng: np.random.Generator, runs: int):
    for i in range(runs):
        if i % 2:
            yield rng.bytes(int(rng.integers(0, 256)))
        else:
            data = bytearray(SEED_MESSAGE)
            for _ in range(int(rng.integers(1, 8))):
                data[int(rng.integers(len(data)))] = int(rng.integers(256))
            yield bytes(data[: int(rng.integers(1, len(data) + 1))])


def main(argv: list[str]) -> None:
    try:
        import atheris
    except ImportError:
        runs = int(argv[argv.index("--runs") + 1]) if "--runs" in argv else 2000
        for data in _mutations(np.random.default_rng(0), runs):
            target(data)
        print(f"{runs} inputs, no crash")
        return
    atheris.Setup(argv, target)
    atheris.Fuzz()


if __name__ == "__main__":
    main(sys.argv)
