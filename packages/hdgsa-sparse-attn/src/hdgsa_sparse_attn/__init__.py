"""Attention over selected token indices (Gated Sparse Attention), forward and backward, with GQA."""

from .api import sparse_attention, sparse_attention_path

__version__ = "0.1.0"

__all__ = ["__version__", "sparse_attention", "sparse_attention_path"]
