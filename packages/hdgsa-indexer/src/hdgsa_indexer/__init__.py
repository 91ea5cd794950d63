"""Gated lightning indexer scores and fused top-k selection for Gated Sparse Attention.

- :func:`gated_indexer`: ``[B, Tq, Tkv]`` float32 scores, differentiable.
- :func:`indexer_topk`: the best ``topk`` keys per query (with attention sinks and optional
  score statistics), without building the score matrix.
- :func:`indexer_scores_at`: the scores at chosen keys ``[B, Tq, K]``, differentiable in
  O(B * Tq * K) memory (training the indexer at long context).
"""

from .api import gated_indexer, indexer_scores_at, indexer_topk

__version__ = "0.1.0"

__all__ = ["__version__", "gated_indexer", "indexer_scores_at", "indexer_topk"]
