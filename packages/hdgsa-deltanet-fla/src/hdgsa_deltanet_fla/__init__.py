"""The gated delta rule (Gated DeltaNet) through fla's chunked kernels, with a chunked PyTorch fallback."""

__version__ = "0.1.0"

__all__ = ["__version__"]
