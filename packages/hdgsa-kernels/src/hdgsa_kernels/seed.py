"""The seed ``kernels/`` folder's names, with its positional signatures (docs/api.md).

``triton_X(...)`` is the op with ``backend="triton"`` (it raises where Triton cannot run,
instead of the seed's silent fallback); ``pytorch_X(...)`` is the op with ``backend="torch"``.
"""

from __future__ import annotations

import torch

from hdgsa_deltanet_fla import gated_delta_rule
from hdgsa_indexer import gated_indexer
from hdgsa_rmsnorm import RMSNorm, rms_norm
from hdgsa_sinkhorn import sinkhorn_knopp
from hdgsa_sparse_attn import sparse_attention

__all__ = [
    "TritonRMSNorm",
    "fla_gated_delta_rule",
    "pytorch_gated_indexer",
    "pytorch_rmsnorm",
    "pytorch_sinkhorn_knopp",
    "pytorch_sparse_attention",
    "triton_gated_indexer",
    "triton_rmsnorm",
    "triton_sinkhorn_knopp",
    "triton_sparse_attention",
]


def triton_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    indices: torch.Tensor,
    mask: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """``sparse_attention(q, k, v, indices, mask, scale, backend="triton")``."""
    return sparse_attention(q, k, v, indices, mask, scale, backend="triton")


def pytorch_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    indices: torch.Tensor,
    mask: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """``sparse_attention(q, k, v, indices, mask, scale, backend="torch")``."""
    return sparse_attention(q, k, v, indices, mask, scale, backend="torch")


def triton_gated_indexer(
    q: torch.Tensor,
    k: torch.Tensor,
    w: torch.Tensor,
    bias: torch.Tensor,
    scale: float = 1.0,
    causal: bool = True,
) -> torch.Tensor:
    """``gated_indexer(q, k, w, bias, scale, causal, backend="triton")``."""
    return gated_indexer(q, k, w, bias, scale, causal, backend="triton")


def pytorch_gated_indexer(
    q: torch.Tensor,
    k: torch.Tensor,
    w: torch.Tensor,
    bias: torch.Tensor,
    scale: float = 1.0,
    causal: bool = True,
) -> torch.Tensor:
    """``gated_indexer(q, k, w, bias, scale, causal, backend="torch")``."""
    return gated_indexer(q, k, w, bias, scale, causal, backend="torch")


def triton_sinkhorn_knopp(logits: torch.Tensor, num_iters: int = 20, eps: float = 1e-8) -> torch.Tensor:
    """``sinkhorn_knopp(logits, num_iters, eps, backend="triton")``."""
    return sinkhorn_knopp(logits, num_iters, eps, backend="triton")


def pytorch_sinkhorn_knopp(logits: torch.Tensor, num_iters: int = 20, eps: float = 1e-8) -> torch.Tensor:
    """``sinkhorn_knopp(logits, num_iters, eps, backend="torch")``."""
    return sinkhorn_knopp(logits, num_iters, eps, backend="torch")


def triton_rmsnorm(
    x: torch.Tensor,
    weight: torch.Tensor | None = None,
    eps: float = 1e-6,
    residual: torch.Tensor | None = None,
) -> torch.Tensor:
    """``rms_norm(x, weight, eps, residual, backend="triton")``; returns ``y`` only."""
    return rms_norm(x, weight, eps, residual, backend="triton")


def pytorch_rmsnorm(
    x: torch.Tensor,
    weight: torch.Tensor | None = None,
    eps: float = 1e-6,
    residual: torch.Tensor | None = None,
) -> torch.Tensor:
    """``rms_norm(x, weight, eps, residual, backend="torch")``; returns ``y`` only."""
    return rms_norm(x, weight, eps, residual, backend="torch")


class TritonRMSNorm(RMSNorm):
    """The seed's module name: :class:`hdgsa_rmsnorm.RMSNorm` (backend ``auto``: the Triton
    kernel on CUDA, PyTorch elsewhere), constructed as ``TritonRMSNorm(dim, eps)``."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__(dim, eps)


def fla_gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    alpha: torch.Tensor,
    beta: torch.Tensor,
    D: torch.Tensor | None = None,
    num_heads: int | None = None,
) -> torch.Tensor:
    """``gated_delta_rule(q, k, v, alpha, beta, D, num_heads, backend="auto")``."""
    return gated_delta_rule(q, k, v, alpha, beta, D, num_heads, backend="auto")
