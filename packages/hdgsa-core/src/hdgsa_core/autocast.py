"""Keep ``torch.autocast`` out of the PyTorch backends' math.

The API fixes the compute dtype (float32 inside, outputs in the input dtype); an autocast region
around the caller would otherwise run the reference matmuls in bf16.
"""

from __future__ import annotations

import contextlib

import torch

__all__ = ["autocast_disabled"]

# Device types torch.autocast accepts. A plain set rather than torch.amp.is_autocast_available,
# which torch.compile (torch 2.11) cannot trace: the check must not break fullgraph graphs.
_AUTOCAST_DEVICE_TYPES = frozenset({"cpu", "cuda", "xpu", "mps", "hpu", "mtia", "xla"})


def autocast_disabled(device: torch.device) -> contextlib.AbstractContextManager:
    """A context that turns autocast off on ``device`` (a no-op where autocast does not exist,
    e.g. meta tensors, or is not on)."""
    # Entering and leaving torch.autocast costs ~30 us of Python on CPU: only where it matters.
    if device.type in _AUTOCAST_DEVICE_TYPES and torch.is_autocast_enabled(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()
