"""nograd: train neural networks with forward passes only."""

__version__ = "0.1.0"
