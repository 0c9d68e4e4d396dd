"""Pallas kernels, installed as ``fedprompt.kernels``.

Each kernel sits beside a pure-jnp reference and is selected with ``implementation="xla" |
"pallas"``. The folder is mapped into the package by ``pyproject.toml`` and is never installed
as a top-level ``kernels`` module (that name belongs to another package).
"""
