"""``RMSNorm``: a thin ``nn.Module`` around :func:`hdgsa_rmsnorm.rms_norm`."""

from __future__ import annotations

import numbers

import torch
from torch import nn

from .api import rms_norm

__all__ = ["RMSNorm"]


class RMSNorm(nn.Module):
    """RMSNorm over the last dimension, with an optional fused residual add.

    ``forward(x, residual=None, prenorm=False)`` is :func:`rms_norm` with this module's
    ``weight`` and ``eps`` (backend ``auto``): ``y``, or ``(y, h)`` with ``prenorm``.

    Args:
        hidden_size: ``N``, the size of the normalized last dimension (>= 1).
        eps: added to the mean square. Default ``1e-6``.
        elementwise_affine: learn a scale ``weight`` ``[N]`` (initialized to ones); False: no
            scale, ``weight`` is None.
        device, dtype: where and in which dtype ``weight`` is created.

    Example:
        >>> norm = RMSNorm(64)
        >>> norm(torch.randn(2, 8, 64)).shape
        torch.Size([2, 8, 64])
    """

    def __init__(
        self,
        hidden_size: int,
        eps: float = 1e-6,
        elementwise_affine: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if isinstance(hidden_size, bool) or not isinstance(hidden_size, numbers.Integral):
            raise TypeError(f"hidden_size: expected an int, got {type(hidden_size).__name__}")
        if hidden_size < 1:
            raise ValueError(f"hidden_size: expected an int >= 1, got {hidden_size}")
        if isinstance(eps, bool) or not isinstance(eps, numbers.Real):
            raise TypeError(f"eps: expected a real number, got {type(eps).__name__}")
        if not eps >= 0.0:
            raise ValueError(f"eps: expected a number >= 0, got {eps}")
        self.hidden_size = int(hidden_size)
        self.eps = float(eps)
        self.elementwise_affine = bool(elementwise_affine)
        if self.elementwise_affine:
            self.weight = nn.Parameter(torch.ones(self.hidden_size, device=device, dtype=dtype))
        else:
            self.register_parameter("weight", None)

    def reset_parameters(self) -> None:
        """Set ``weight`` back to ones."""
        if self.weight is not None:
            nn.init.ones_(self.weight)

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None, prenorm: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """``rms_norm(x, self.weight, self.eps, residual, prenorm=prenorm)``."""
        return rms_norm(x, self.weight, self.eps, residual, prenorm=prenorm)

    def extra_repr(self) -> str:
        return f"{self.hidden_size}, eps={self.eps}, elementwise_affine={self.elementwise_affine}"
