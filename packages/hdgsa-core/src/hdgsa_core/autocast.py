"""Keep ``torch.autocast`` out of the PyTorch backends' math.

SPEC fixes the compute dtype (float32 inside, outputs in the input dtype); an autocast region
around the caller would otherwise run the reference matmuls in bf16.
"""

from __future__ import annotations

import contextlib

import torch

__all__ = ["autocast_disabled"]


def autocast_disabled(device: torch.device) -> contextlib.AbstractContextManager:
    """A context that turns autocast off on ``device`` (a no-op where autocast does not exist,
    e.g. meta tensors)."""
    if torch.amp.is_autocast_available(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()
