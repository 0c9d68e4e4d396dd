"""Frozen Flax NNX backbones loaded from Hugging Face checkpoints."""
