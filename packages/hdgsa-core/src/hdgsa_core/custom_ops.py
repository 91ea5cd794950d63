"""Helpers for registering kernels as ``torch.library`` custom ops.

Custom ops keep ``torch.compile(fullgraph=True)`` from breaking the graph, but the
dispatcher costs tens of microseconds per eager call, more than a small kernel. Ops call
the custom op only while compiling and the autograd Function directly otherwise.
"""

from __future__ import annotations

import torch

__all__ = ["OP_NAMESPACE", "is_compiling", "op_name"]

OP_NAMESPACE = "hdgsa"


def op_name(name: str) -> str:
    """Qualified custom-op name: ``rms_norm_fwd`` -> ``hdgsa::rms_norm_fwd``."""
    return f"{OP_NAMESPACE}::{name}"


def is_compiling() -> bool:
    """True while ``torch.compile`` (dynamo) traces the caller."""
    return torch.compiler.is_compiling()
