"""Plain PyTorch RMSNorm (+ residual, prenorm): the ``backend="torch"`` path and the reference
the Triton kernels are tested against.

Math (docs/api.md), in float32 (or float64 when the inputs are float64)::

    h = x + residual                                   (h = x without a residual)
    y = h * rsqrt(mean(h ** 2, dim=-1) + eps) * weight (no weight: the factor is 1)

``y`` is returned in ``x.dtype``; with ``prenorm`` also ``h``, in ``x.dtype`` (float32 when
``residual_in_fp32``). Gradients come from autograd through these same steps. Autocast is
turned off inside, so an enclosing ``torch.autocast`` region does not change the math.
"""

from __future__ import annotations

import torch

from hdgsa_core import autocast_disabled

__all__ = ["rms_norm_reference"]


def rms_norm_reference(
    x: torch.Tensor,
    weight: torch.Tensor | None = None,
    eps: float = 1e-6,
    residual: torch.Tensor | None = None,
    prenorm: bool = False,
    residual_in_fp32: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm of ``x + residual`` over the last dimension, computed in float32 (or wider).

    No argument checks: :func:`hdgsa_rmsnorm.rms_norm` does them. Float64 inputs are computed
    in float64 (the tests' reference); ``h`` then stays float64 too.

    Args:
        x: ``[..., N]``.
        weight: ``[N]`` or None (no scale).
        eps: added to the mean square before the square root.
        residual: like ``x``, or None.
        prenorm: also return ``h = x + residual``.
        residual_in_fp32: ``h`` is returned in float32 (at least) instead of ``x.dtype``.

    Returns:
        ``y`` ``[..., N]`` in ``x.dtype``; with ``prenorm``, ``(y, h)``.
    """
    compute_dtype = torch.promote_types(x.dtype, torch.float32)
    with autocast_disabled(x.device):
        h = x.to(compute_dtype)
        if residual is not None:
            h = h + residual.to(compute_dtype)
        rstd = torch.rsqrt(h.square().mean(dim=-1, keepdim=True) + eps)
        y = h * rstd
        if weight is not None:
            y = y * weight.to(compute_dtype)
        y = y.to(x.dtype)
        if not prenorm:
            return y
        h_out = h.to(compute_dtype if residual_in_fp32 else x.dtype)
        if h_out is x:  # never hand the caller's tensor back as a new output
            h_out = h_out.clone()
        return y, h_out
