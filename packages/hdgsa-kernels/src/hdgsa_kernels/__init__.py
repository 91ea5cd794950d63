"""hdgsa-kernels: every hdgsa kernel package in one import, plus the ``hdgsa-kernels`` command.

Unified names and the seed's names (docs/api.md) are both exported::

    from hdgsa_kernels import rms_norm, sinkhorn_knopp, gated_indexer, indexer_topk
    from hdgsa_kernels import sparse_attention, gated_delta_rule, HAS_TRITON, HAS_FLA
    from hdgsa_kernels import triton_rmsnorm, pytorch_sinkhorn_knopp  # seed-compatible
"""

from hdgsa_core import HAS_CUDA, HAS_FLA, HAS_TRITON, capabilities
from hdgsa_deltanet_fla import gated_delta_rule
from hdgsa_indexer import gated_indexer, indexer_scores_at, indexer_topk
from hdgsa_rmsnorm import RMSNorm, rms_norm
from hdgsa_sinkhorn import sinkhorn_knopp
from hdgsa_sparse_attn import sparse_attention

from .seed import (
    TritonRMSNorm,
    fla_gated_delta_rule,
    pytorch_gated_indexer,
    pytorch_rmsnorm,
    pytorch_sinkhorn_knopp,
    pytorch_sparse_attention,
    triton_gated_indexer,
    triton_rmsnorm,
    triton_sinkhorn_knopp,
    triton_sparse_attention,
)

__version__ = "0.1.0"

__all__ = [
    "HAS_CUDA",
    "HAS_FLA",
    "HAS_TRITON",
    "RMSNorm",
    "TritonRMSNorm",
    "__version__",
    "capabilities",
    "fla_gated_delta_rule",
    "gated_delta_rule",
    "gated_indexer",
    "indexer_scores_at",
    "indexer_topk",
    "pytorch_gated_indexer",
    "pytorch_rmsnorm",
    "pytorch_sinkhorn_knopp",
    "pytorch_sparse_attention",
    "rms_norm",
    "sinkhorn_knopp",
    "sparse_attention",
    "triton_gated_indexer",
    "triton_rmsnorm",
    "triton_sinkhorn_knopp",
    "triton_sparse_attention",
]
