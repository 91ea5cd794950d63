"""Batched Sinkhorn-Knopp (doubly stochastic projection for mHC) forward and backward in one Triton
launch each, with a PyTorch fallback."""

from .api import sinkhorn_knopp
from .reference import sinkhorn_knopp_reference

__version__ = "0.1.0"

__all__ = ["__version__", "sinkhorn_knopp", "sinkhorn_knopp_reference"]
