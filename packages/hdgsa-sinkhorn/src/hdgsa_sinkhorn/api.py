"""Public function :func:`sinkhorn_knopp`: argument checks and backend choice."""

from __future__ import annotations

import math
import numbers

import torch

from hdgsa_core import check_dtype, check_tensor, resolve_backend, triton_unavailable_reason

from .reference import sinkhorn_knopp_reference

__all__ = ["TRITON_IMPLEMENTED", "TRITON_MAX_N", "sinkhorn_knopp"]

TRITON_IMPLEMENTED = True
# Largest matrix side the Triton kernels take (each program keeps whole matrices in registers).
TRITON_MAX_N = 64

_OP = "sinkhorn_knopp"


def _check_inputs(logits: torch.Tensor, num_iters: int, eps: float) -> None:
    """Raise SPEC section 2's errors before any kernel runs."""
    check_tensor("logits", logits)
    if logits.dim() < 2 or logits.shape[-1] != logits.shape[-2] or logits.shape[-1] < 1:
        raise ValueError(
            f"logits: expected shape [..., n, n] (square matrices, n >= 1), got shape {list(logits.shape)}"
        )
    check_dtype("logits", logits)
    if isinstance(num_iters, bool) or not isinstance(num_iters, numbers.Integral) or num_iters < 0:
        raise ValueError(f"{_OP}: num_iters must be an int >= 0, got {num_iters!r}")
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not math.isfinite(eps) or eps < 0:
        raise ValueError(f"{_OP}: eps must be a finite real number >= 0, got {eps!r}")


def _triton_reason(n: int):
    """``unavailable_reason`` for :func:`resolve_backend`: the device's reason, or the size limit."""

    def reason(device: torch.device) -> str | None:
        why = triton_unavailable_reason(device)
        if why is None and n > TRITON_MAX_N:
            why = f"the Triton kernels take n <= {TRITON_MAX_N}, got n = {n}"
        return why

    return reason


def sinkhorn_knopp(
    logits: torch.Tensor,
    num_iters: int = 20,
    eps: float = 1e-8,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """Project each ``n x n`` matrix of logits towards the doubly stochastic matrices (Birkhoff polytope).

    Per matrix ``L``, computed in float32::

        P = exp(L - max(L))                          # max over the whole matrix
        repeat num_iters times:
            P = P / (P.sum(-1, keepdim=True) + eps)  # rows sum to ~1
            P = P / (P.sum(-2, keepdim=True) + eps)  # columns sum to 1 (up to eps)

    A fixed number of iterations, no early stop, no host sync: the same inputs give bitwise the
    same output. The gradient is exactly that of the unrolled computation above (what autograd
    through the PyTorch reference gives). mHC uses ``n = 4`` and 20 iterations on
    ``[B, T, 4, 4]`` logits.

    Args:
        logits: ``[..., n, n]`` float32, float16 or bfloat16, any leading dims (possibly empty),
            any strides, ``n >= 1``.
        num_iters: number of (row, column) normalization pairs, an int ``>= 0``. Default 20.
        eps: added to every row and column sum before dividing, finite and ``>= 0``. Default 1e-8.
        backend: ``"auto"`` (Triton on CUDA, or on CPU under ``TRITON_INTERPRET=1``; else
            PyTorch; ``HDGSA_BACKEND`` overrides), ``"triton"`` or ``"torch"``.

    Returns:
        ``P`` ``[..., n, n]`` in ``logits.dtype``, contiguous.

    Raises:
        TypeError: ``logits`` is not a tensor, or its dtype is not float32/float16/bfloat16.
        ValueError: ``logits`` is not ``[..., n, n]`` with ``n >= 1``; ``num_iters`` is not an
            int ``>= 0``; ``eps`` is negative or not finite; unknown ``backend``.
        RuntimeError: the requested backend cannot run here (no Triton, CPU without the
            interpreter, ``n`` above the Triton kernels' limit).

    Example:
        >>> import torch
        >>> from hdgsa_sinkhorn import sinkhorn_knopp
        >>> logits = torch.randn(2, 8, 4, 4)
        >>> P = sinkhorn_knopp(logits, num_iters=20, backend="torch")
        >>> torch.allclose(P.sum(-2), torch.ones(2, 8, 4), atol=1e-5)
        True
    """
    _check_inputs(logits, num_iters, eps)
    num_iters = int(num_iters)
    eps = float(eps)
    chosen = resolve_backend(
        backend,
        logits.device,
        op=_OP,
        implemented=TRITON_IMPLEMENTED,
        unavailable_reason=_triton_reason(logits.shape[-1]),
    )
    if chosen == "torch":
        return sinkhorn_knopp_reference(logits, num_iters, eps)
    from ._triton import sinkhorn_knopp_triton  # imports Triton: only when it is asked for

    return sinkhorn_knopp_triton(logits, num_iters, eps)
