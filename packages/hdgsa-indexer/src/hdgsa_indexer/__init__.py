"""Gated lightning indexer scores and fused top-k selection for Gated Sparse Attention."""

__version__ = "0.1.0"

__all__ = ["__version__"]
