"""``RMSNorm``: a thin ``nn.Module`` around :func:`hdgsa_rmsnorm.rms_norm`."""

from __future__ import annotations

import torch
from torch import nn

from hdgsa_core import FLOAT_DTYPES, check_bool, check_int

from .api import check_eps, rms_norm

__all__ = ["RMSNorm"]


class RMSNorm(nn.Module):
    """RMSNorm over the last dimension, with an optional fused residual add.

    ``forward(x, residual=None, prenorm=False)`` is :func:`rms_norm` with this module's
    ``weight`` and ``eps`` (backend ``auto``): ``y``, or ``(y, h)`` with ``prenorm``.

    Args:
        hidden_size: ``N``, the size of the normalized last dimension (an int >= 1).
        eps: added to the mean square, a finite number >= 0. Default ``1e-6``.
        elementwise_affine: (bool) learn a scale ``weight`` ``[N]`` (initialized to ones);
            False: no scale, ``weight`` is None.
        device, dtype: where and in which dtype ``weight`` is created (float32, float16 or
            bfloat16; None: PyTorch's defaults).

    Attributes:
        hidden_size, eps, elementwise_affine: as given; ``normalized_shape`` is
        ``(hidden_size,)`` (as in ``torch.nn.RMSNorm``); ``weight``: the ``[N]`` parameter or None.

    Raises:
        TypeError: ``hidden_size`` is not an int, ``eps`` not a real number,
            ``elementwise_affine`` not a bool, ``dtype`` not one of the three float dtypes.
        ValueError: ``hidden_size < 1``; ``eps`` negative, NaN or infinite.

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
        check_int("hidden_size", hidden_size)
        if hidden_size < 1:
            raise ValueError(f"hidden_size: expected an int >= 1, got {hidden_size}")
        check_eps(eps)
        check_bool("elementwise_affine", elementwise_affine)
        if dtype is not None and dtype not in FLOAT_DTYPES:
            names = ", ".join(str(allowed).removeprefix("torch.") for allowed in FLOAT_DTYPES)
            raise TypeError(f"dtype: {dtype} is not supported; expected one of {names}")
        self.hidden_size = int(hidden_size)
        self.normalized_shape = (self.hidden_size,)
        self.eps = float(eps)
        self.elementwise_affine = elementwise_affine
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
        """``rms_norm(x, self.weight, self.eps, residual, prenorm=prenorm)``.

        Args:
            x: ``[..., hidden_size]``.
            residual: like ``x``, or None.
            prenorm: (bool) also return ``h = x + residual``.

        Returns:
            ``y`` in ``x.dtype``; with ``prenorm``, ``(y, h)``, ``h`` in ``x.dtype``.

        Raises:
            The errors of :func:`rms_norm`; ValueError when ``x.shape[-1]`` is not
            ``hidden_size`` (with a weight, the error names the weight's shape ``[N]``).
        """
        no_weight = self.weight is None  # no weight [N] to catch a wrong N in rms_norm
        if no_weight and isinstance(x, torch.Tensor) and x.dim() >= 1 and x.shape[-1] != self.hidden_size:
            raise ValueError(
                f"x: expected shape [..., N] = [..., {self.hidden_size}] (hidden_size), "
                f"got shape {list(x.shape)}"
            )
        return rms_norm(x, self.weight, self.eps, residual, prenorm=prenorm)

    def extra_repr(self) -> str:
        return f"{self.hidden_size}, eps={self.eps}, elementwise_affine={self.elementwise_affine}"
