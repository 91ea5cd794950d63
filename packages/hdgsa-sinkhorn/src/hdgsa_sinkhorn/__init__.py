"""Batched Sinkhorn-Knopp (doubly stochastic projection for mHC) forward and backward in one Triton launch each, with a PyTorch fallback."""

__version__ = "0.1.0"

__all__ = ["__version__"]
