"""Inference with a trained prompt: generation (KV cache) and test-time prompt tuning (TPT)."""

from fedprompt.inference.generate import generate
from fedprompt.inference.tpt import (
    augment_views,
    make_tpt_adapt,
    make_tpt_objective,
    make_tpt_program,
    tpt_adapt,
    tpt_evaluate,
)

__all__ = [
    "augment_views",
    "generate",
    "make_tpt_adapt",
    "make_tpt_objective",
    "make_tpt_program",
    "tpt_adapt",
    "tpt_evaluate",
]
