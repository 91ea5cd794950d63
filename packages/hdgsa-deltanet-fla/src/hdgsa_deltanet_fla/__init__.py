"""The gated delta rule (Gated DeltaNet) through fla's chunked kernels, with a chunked PyTorch fallback."""

from .api import gated_delta_rule, gated_delta_rule_backends

__version__ = "0.1.0"

__all__ = ["__version__", "gated_delta_rule", "gated_delta_rule_backends"]
