"""Public function :func:`sinkhorn_knopp`: argument checks and backend choice."""

from __future__ import annotations

import math

import torch

from hdgsa_core import (
    check_dtype,
    check_int,
    check_real,
    check_tensor,
    resolve_backend,
    triton_unavailable_reason,
)

from .reference import sinkhorn_knopp_reference

__all__ = ["TRITON_MAX_N", "sinkhorn_knopp"]

# Largest matrix side the Triton kernels take (each program keeps whole matrices in registers,
# unrolled row by row: n = 64 compiled for about 90 s, so larger n go to PyTorch).
TRITON_MAX_N = 32

_OP = "sinkhorn_knopp"


def _check_arguments(logits: torch.Tensor, num_iters: int, eps: float) -> None:
    """Every argument check, before any kernel runs."""
    check_tensor("logits", logits)
    if logits.dim() < 2 or logits.shape[-1] != logits.shape[-2] or logits.shape[-1] < 1:
        raise ValueError(
            f"logits: expected shape [..., n, n] (square matrices, n >= 1), got shape {list(logits.shape)}"
        )
    check_dtype("logits", logits)
    check_int(f"{_OP}: num_iters", num_iters)
    if num_iters < 0:
        raise ValueError(f"{_OP}: num_iters must be >= 0, got {num_iters}")
    check_real(f"{_OP}: eps", eps)
    # Comparisons rather than math.isfinite, which torch.compile(dynamic=True) cannot trace;
    # NaN fails both.
    if not 0 <= eps < math.inf:
        raise ValueError(f"{_OP}: eps must be finite and >= 0, got {eps}")


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

    Per matrix ``L``, computed in float32 (also under ``torch.autocast``)::

        P = exp(L - max(L))                          # max over the whole matrix
        repeat num_iters times:
            P = P / (P.sum(-1, keepdim=True) + eps)  # rows sum to ~1
            P = P / (P.sum(-2, keepdim=True) + eps)  # columns sum to 1 (up to eps)

    A fixed number of iterations, no early stop, no host sync: the same inputs give bitwise the
    same output, and the backward is bitwise deterministic too. The gradient is exactly that of
    the unrolled computation above (what autograd through the PyTorch reference gives), including
    the path through the max, which tied maxima share evenly. mHC uses ``n = 4`` and 20
    iterations on ``[B, T, 4, 4]`` logits.

    Special values follow the formula: ``-inf`` logits give ``P = 0`` there (a whole row of
    ``-inf`` gives a zero row when ``eps > 0``); a NaN anywhere in a matrix, a ``+inf``, or a
    matrix that is ``-inf`` everywhere makes that matrix's ``P`` (and gradient) NaN. With
    ``eps`` below float32's smallest normal number (``eps = 0`` included), a row or column whose
    sum is 0 gives NaN, and on the Triton backend (which multiplies by reciprocals) so does a sum
    that underflows below ``1.2e-38``.

    Args:
        logits: ``[..., n, n]`` float32, float16 or bfloat16, any leading dims (possibly none or
            empty), any strides, ``n >= 1``. Not modified.
        num_iters: number of (row, column) normalization pairs, an int ``>= 0``; 0 returns
            ``exp(L - max(L))``. Default 20. The Triton kernels are compiled once per value.
        eps: added to every row and column sum before dividing, a finite real ``>= 0``.
            Default 1e-8.
        backend: ``"auto"`` (Triton on CUDA, or on CPU under ``TRITON_INTERPRET=1``, for
            ``n <= TRITON_MAX_N`` (32); else PyTorch; ``HDGSA_BACKEND=torch|triton`` overrides),
            ``"triton"`` or ``"torch"``.

    Returns:
        ``P`` ``[..., n, n]`` in ``logits.dtype``, contiguous, differentiable with respect to
        ``logits`` (once: the Triton backward is not itself differentiable).

    Raises:
        TypeError: ``logits`` is not a tensor, or its dtype is not float32/float16/bfloat16;
            ``num_iters`` is not an int (bools and floats are not); ``eps`` is not a real number.
        ValueError: ``logits`` is not ``[..., n, n]`` with ``n >= 1``; ``num_iters < 0``;
            ``eps`` is negative or not finite; unknown ``backend`` or ``HDGSA_BACKEND``.
        RuntimeError: the requested backend cannot run here (no Triton, CPU without the
            interpreter, ``n > TRITON_MAX_N`` for Triton).

    Example:
        >>> import torch
        >>> from hdgsa_sinkhorn import sinkhorn_knopp
        >>> logits = torch.randn(2, 8, 4, 4)
        >>> P = sinkhorn_knopp(logits, num_iters=20, backend="torch")
        >>> torch.allclose(P.sum(-2), torch.ones(2, 8, 4), atol=1e-5)
        True
    """
    _check_arguments(logits, num_iters, eps)
    num_iters = int(num_iters)
    eps = float(eps)
    chosen = resolve_backend(
        backend,
        logits.device,
        op=_OP,
        unavailable_reason=_triton_reason(logits.shape[-1]),
    )
    if chosen == "torch":
        return sinkhorn_knopp_reference(logits, num_iters, eps)
    from ._triton import sinkhorn_knopp_triton  # imports Triton: only when it is asked for

    return sinkhorn_knopp_triton(logits, num_iters, eps)
