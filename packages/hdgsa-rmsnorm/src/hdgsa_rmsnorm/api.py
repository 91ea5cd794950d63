"""The public function :func:`rms_norm`: argument checks and backend choice."""

from __future__ import annotations

import numbers

import torch

from hdgsa_core import check_dtype, check_same_device, check_shape, check_tensor, resolve_backend

from .reference import rms_norm_reference

__all__ = ["rms_norm"]

_TRITON_IMPLEMENTED = True


def _check_arguments(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    eps: float,
    residual: torch.Tensor | None,
) -> torch.device:
    check_tensor("x", x)
    check_dtype("x", x)
    if x.dim() < 1:
        raise ValueError(f"x: expected shape [..., N] (at least one dimension), got shape {list(x.shape)}")
    hidden = x.shape[-1]
    if weight is not None:
        check_tensor("weight", weight)
        check_dtype("weight", weight)
        check_shape("weight", weight, (hidden,), "[N]")
    if residual is not None:
        check_tensor("residual", residual)
        check_dtype("residual", residual)
        check_shape("residual", residual, tuple(x.shape), "like x")
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real):
        raise TypeError(f"eps: expected a real number, got {type(eps).__name__}")
    if not eps >= 0.0:
        raise ValueError(f"eps: expected a number >= 0, got {eps}")
    return check_same_device(x=x, weight=weight, residual=residual)


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor | None = None,
    eps: float = 1e-6,
    residual: torch.Tensor | None = None,
    *,
    prenorm: bool = False,
    residual_in_fp32: bool = False,
    backend: str = "auto",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm over the last dimension, with an optional residual added first (fused).

    Math, in float32 whatever the input dtype::

        h = x + residual                                  (h = x without a residual)
        y = h * rsqrt(mean(h ** 2, dim=-1) + eps) * weight

    ``y`` takes ``x.dtype``. With ``prenorm=True`` the sum ``h`` comes back too, ready to be the
    next layer's residual (the pre-norm transformer pattern ``h = x + residual;
    y = norm(h)``), in ``x.dtype`` or, with ``residual_in_fp32``, in float32.

    Args:
        x: ``[..., N]``: any leading dimensions and strides; float32, float16 or bfloat16.
        weight: ``[N]`` scale, any of the three float dtypes; None means no scale.
        eps: added to the mean square, ``>= 0``. Default ``1e-6``.
        residual: tensor of ``x``'s shape (any of the three float dtypes, e.g. a float32
            residual stream with bfloat16 ``x``), or None for plain RMSNorm.
        prenorm: also return ``h``.
        residual_in_fp32: return ``h`` in float32 (only matters with ``prenorm``).
        backend: ``"auto"`` (Triton on CUDA, or on CPU with ``TRITON_INTERPRET=1``; else
            PyTorch; ``HDGSA_BACKEND`` overrides), ``"triton"`` or ``"torch"``.

    Returns:
        ``y`` ``[..., N]`` in ``x.dtype``; with ``prenorm``, the pair ``(y, h)``. Outputs are
        new, contiguous tensors. Gradients flow to ``x``, ``residual`` and ``weight``.

    Raises:
        TypeError: a tensor argument is not a tensor or has an unsupported dtype; ``eps`` is
            not a number.
        ValueError: ``x`` has no dimension; ``weight`` is not ``[N]``; ``residual`` is not
            ``x``'s shape; ``eps < 0``; tensors on different devices; unknown backend.
        RuntimeError: the requested backend cannot run here (the message says why).

    Example:
        >>> x = torch.randn(2, 16, 64)
        >>> residual = torch.randn(2, 16, 64)
        >>> weight = torch.ones(64)
        >>> y, h = rms_norm(x, weight, residual=residual, prenorm=True, backend="torch")
        >>> y.shape, h.shape
        (torch.Size([2, 16, 64]), torch.Size([2, 16, 64]))
    """
    device = _check_arguments(x, weight, eps, residual)
    prenorm = bool(prenorm)
    residual_in_fp32 = bool(residual_in_fp32)
    chosen = resolve_backend(backend, device, op="rms_norm", implemented=_TRITON_IMPLEMENTED)
    if chosen == "torch":
        return rms_norm_reference(x, weight, float(eps), residual, prenorm, residual_in_fp32)
    from ._triton import rms_norm_triton  # Triton is imported only when its backend runs

    return rms_norm_triton(x, weight, float(eps), residual, prenorm, residual_in_fp32)
