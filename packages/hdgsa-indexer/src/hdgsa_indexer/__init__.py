"""Gated lightning indexer scores and fused top-k selection for Gated Sparse Attention.

- :func:`gated_indexer`: ``[B, Tq, Tkv]`` float32 scores, differentiable.
- :func:`indexer_topk`: the best ``topk`` keys per query (with attention sinks and optional
  score statistics), without building the score matrix.
"""

from .api import gated_indexer, indexer_topk

__version__ = "0.1.0"

__all__ = ["__version__", "gated_indexer", "indexer_topk"]
