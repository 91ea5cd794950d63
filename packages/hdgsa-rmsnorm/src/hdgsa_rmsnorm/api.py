"""The public function :func:`rms_norm`: argument checks and backend choice."""

from __future__ import annotations

import math

import torch

from hdgsa_core import (
    check_bool,
    check_dtype,
    check_real,
    check_same_device,
    check_shape,
    check_tensor,
    resolve_backend,
)

from .reference import rms_norm_reference

__all__ = ["rms_norm"]


def check_eps(eps: object) -> None:
    """``eps`` must be a finite real number ``>= 0`` (TypeError / ValueError otherwise)."""
    check_real("eps", eps)
    # comparisons, not math.isfinite, which torch.compile(dynamic=True) cannot trace (NaN fails both)
    if not (0.0 <= eps < math.inf):
        raise ValueError(f"eps: expected a finite number >= 0, got {eps}")


def _check_dense(name: str, tensor: torch.Tensor) -> None:
    """The kernels and the reference read strided (dense) tensors only."""
    check_tensor(name, tensor)
    if tensor.layout != torch.strided:
        raise TypeError(f"{name}: expected a dense (torch.strided) tensor, got layout {tensor.layout}")


def _check_arguments(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    eps: float,
    residual: torch.Tensor | None,
    prenorm: bool,
    residual_in_fp32: bool,
) -> torch.device:
    """Every argument check, before anything runs; returns the tensors' device."""
    _check_dense("x", x)
    check_dtype("x", x)
    if x.dim() < 1:
        raise ValueError(f"x: expected shape [..., N] (at least one dimension), got shape {list(x.shape)}")
    hidden = x.shape[-1]
    if weight is not None:
        _check_dense("weight", weight)
        check_dtype("weight", weight)
        check_shape("weight", weight, (hidden,), "[N]")
    if residual is not None:
        _check_dense("residual", residual)
        check_dtype("residual", residual)
        check_shape("residual", residual, tuple(x.shape), "like x")
    check_eps(eps)
    check_bool("prenorm", prenorm)
    check_bool("residual_in_fp32", residual_in_fp32)
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
        x: ``[..., N]``: any leading dimensions (also none, or a size 0) and strides; float32,
            float16 or bfloat16.
        weight: ``[N]`` scale, any of the three float dtypes and any stride; None means no scale.
        eps: a finite real number ``>= 0`` added to the mean square. Default ``1e-6``.
        residual: tensor of ``x``'s shape (any of the three float dtypes, e.g. a float32
            residual stream with bfloat16 ``x``), or None for plain RMSNorm.
        prenorm: (bool) also return ``h``.
        residual_in_fp32: (bool) return ``h`` in float32 (only matters with ``prenorm``).
        backend: ``"auto"`` (Triton on CUDA, or on CPU with ``TRITON_INTERPRET=1``; else
            PyTorch; the environment variable ``HDGSA_BACKEND=torch|triton`` overrides
            ``auto`` only), ``"triton"`` or ``"torch"``.

    Returns:
        ``y`` ``[..., N]`` in ``x.dtype``; with ``prenorm``, the pair ``(y, h)``. Outputs are
        new, contiguous tensors (``h`` is never ``x`` itself). Gradients flow to ``x``,
        ``residual`` and ``weight``, each in its own dtype, and into ``h`` when it is used.
        The same inputs give bitwise the same outputs and gradients on every call; the call
        never syncs with the host, and ``torch.autocast`` does not change the math.

    Raises:
        TypeError: a tensor argument is not a tensor, not a dense (strided) tensor, or has an
            unsupported dtype (float64, integers, ...); ``eps`` is not a real number;
            ``prenorm`` or ``residual_in_fp32`` is not a bool.
        ValueError: ``x`` has no dimension; ``weight`` is not ``[N]``; ``residual`` is not
            ``x``'s shape (the message names the argument, the expected and the actual shape);
            ``eps`` is negative, NaN or infinite; tensors on different devices; an unknown
            backend (argument or ``HDGSA_BACKEND``).
        RuntimeError: the requested backend cannot run here (the message says why).

    Example:
        >>> x = torch.randn(2, 16, 64)
        >>> residual = torch.randn(2, 16, 64)
        >>> weight = torch.ones(64)
        >>> y, h = rms_norm(x, weight, residual=residual, prenorm=True, backend="torch")
        >>> y.shape, h.shape
        (torch.Size([2, 16, 64]), torch.Size([2, 16, 64]))
    """
    device = _check_arguments(x, weight, eps, residual, prenorm, residual_in_fp32)
    chosen = resolve_backend(backend, device, op="rms_norm")
    if chosen == "torch":
        return rms_norm_reference(x, weight, float(eps), residual, prenorm, residual_in_fp32)
    from ._triton import rms_norm_triton  # Triton is imported only when its backend runs

    return rms_norm_triton(x, weight, float(eps), residual, prenorm, residual_in_fp32)
