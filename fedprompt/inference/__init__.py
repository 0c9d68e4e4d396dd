"""Inference-time tuning: test-time prompt adaptation (TPT)."""

from fedprompt.inference.tpt import (
    augment_views,
    make_tpt_adapt,
    make_tpt_objective,
    make_tpt_program,
    tpt_adapt,
    tpt_evaluate,
)

__all__ = ["augment_views", "make_tpt_adapt", "make_tpt_objective", "make_tpt_program", "tpt_adapt", "tpt_evaluate"]
