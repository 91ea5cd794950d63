"""Fused RMSNorm (+ residual, prenorm) forward and backward in Triton, with a PyTorch fallback."""

__version__ = "0.1.0"

__all__ = ["__version__"]
