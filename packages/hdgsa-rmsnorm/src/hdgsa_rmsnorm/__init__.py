"""Fused RMSNorm (+ residual, prenorm) forward and backward in Triton, with a PyTorch fallback.

``rms_norm(x, weight, eps, residual, prenorm=..., residual_in_fp32=..., backend=...)`` and the
``RMSNorm`` module. Importing this package does not import Triton.
"""

from .api import rms_norm
from .module import RMSNorm
from .reference import rms_norm_reference

__version__ = "0.1.0"

__all__ = ["RMSNorm", "__version__", "rms_norm", "rms_norm_reference"]
