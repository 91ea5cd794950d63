"""Plain PyTorch Sinkhorn-Knopp: the ``torch`` backend and the reference the kernels are tested against.

Math (docs/api.md), per matrix ``L`` of ``logits[..., n, n]``::

    P = exp(L - max(L))                          # max over the whole matrix
    repeat num_iters times:
        P = P / (P.sum(-1, keepdim=True) + eps)  # rows
        P = P / (P.sum(-2, keepdim=True) + eps)  # columns

The steps run in the log domain, ``log P -= log(P.sum(-1) + eps)`` and so on, which is the same
function (``exp(log P - log(s + eps)) = P / (s + eps)``). Autograd through the literal division
steps overflows for extreme logits: a row whose entries underflow to 0 has its incoming gradient
multiplied by ``1 / eps`` at every step (1e8 per iteration) and ends as ``inf * 0 = NaN``. Through
the log domain the gradient flows as ``dP * P``, which stays finite, and is otherwise identical.
The Triton backward computes this same gradient, including the path through the max (``amax``
shares it evenly between tied maxima).
"""

from __future__ import annotations

import torch

from hdgsa_core import autocast_disabled

__all__ = ["sinkhorn_knopp_reference"]


def sinkhorn_knopp_reference(logits: torch.Tensor, num_iters: int = 20, eps: float = 1e-8) -> torch.Tensor:
    """Sinkhorn-Knopp in PyTorch, computed in float32 (float64 for float64 inputs), with autocast
    turned off so an autocast region cannot lower the precision. No argument checks (the public
    :func:`hdgsa_sinkhorn.sinkhorn_knopp` does them).

    Args:
        logits: ``[..., n, n]``, any strides.
        num_iters: number of (row, column) normalization pairs.
        eps: added to every row and column sum before dividing.

    Returns:
        ``P`` ``[..., n, n]`` in ``logits.dtype``, contiguous (like the Triton backend's).
    """
    compute_dtype = torch.promote_types(logits.dtype, torch.float32)
    with autocast_disabled(logits.device):
        values = logits.to(compute_dtype)
        log_probs = values - values.amax(dim=(-2, -1), keepdim=True)
        for _ in range(num_iters):
            log_probs = log_probs - torch.log(log_probs.exp().sum(dim=-1, keepdim=True) + eps)
            log_probs = log_probs - torch.log(log_probs.exp().sum(dim=-2, keepdim=True) + eps)
        return log_probs.exp().to(logits.dtype).contiguous()
