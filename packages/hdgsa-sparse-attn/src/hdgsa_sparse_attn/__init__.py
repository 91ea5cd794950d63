"""Attention over selected token indices (Gated Sparse Attention), forward and backward, with GQA."""

__version__ = "0.1.0"

__all__ = ["__version__"]
