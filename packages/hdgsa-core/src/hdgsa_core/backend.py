"""Backend choice shared by every op: ``auto`` / ``triton`` (``fla``) / ``torch``.

Rules (docs/api.md, "Backends"): ``auto`` picks the accelerated backend when it can run on
the tensors' device and is implemented, else PyTorch. ``HDGSA_BACKEND`` overrides ``auto``.
Asking for a backend that cannot run raises ``RuntimeError`` saying why; nothing falls
back silently.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch

from .capabilities import HAS_TRITON, NUMPY_VERSION, interpreter_enabled

__all__ = ["BACKEND_ENV_VAR", "resolve_backend", "runnable_backends", "triton_unavailable_reason"]

BACKEND_ENV_VAR = "HDGSA_BACKEND"


def triton_unavailable_reason(device: torch.device) -> str | None:
    """Why Triton kernels cannot run on ``device`` here, or None when they can."""
    if not HAS_TRITON:
        return "Triton is not installed (install the package's [triton] extra)"
    if device.type == "cuda":
        return None
    if device.type == "cpu":
        if interpreter_enabled():
            if NUMPY_VERSION is None:
                return (
                    "Triton's interpreter (TRITON_INTERPRET=1) needs numpy, which is not installed "
                    "(pip install numpy, or the package's [triton] extra)"
                )
            return None
        return "the tensors are on the CPU; Triton runs there only with TRITON_INTERPRET=1"
    return f"Triton does not run on {device.type} tensors"


def resolve_backend(
    backend: str,
    device: torch.device,
    *,
    op: str,
    accelerated: str = "triton",
    implemented: bool = True,
    unavailable_reason: Callable[[torch.device], str | None] = triton_unavailable_reason,
) -> str:
    """Return ``"torch"`` or ``accelerated`` for an op called with ``backend=...``.

    Args:
        backend: what the caller asked for: ``"auto"``, ``accelerated`` or ``"torch"``.
        device: the device of the op's tensors (already checked to agree).
        op: the public function's name, for messages.
        accelerated: the accelerated backend's name (``"triton"``, or ``"fla"``).
        implemented: False while the op has no accelerated kernel yet.
        unavailable_reason: says why the accelerated backend cannot run on ``device``.

    Raises:
        ValueError: unknown backend name (argument or ``HDGSA_BACKEND``).
        RuntimeError: the requested backend cannot run here; the message says why.
    """
    choices = ("auto", accelerated, "torch")
    if backend not in choices:
        raise ValueError(f"{op}: backend must be one of {choices}, got {backend!r}")
    if backend == "auto":
        override = os.environ.get(BACKEND_ENV_VAR)
        if override:
            # "triton" is accepted for every op, so one setting covers the whole library.
            override = accelerated if override in ("triton", accelerated) else override
            if override not in (accelerated, "torch"):
                names = (
                    "'torch' or 'triton'"
                    if accelerated == "triton"
                    else f"'torch', 'triton' or {accelerated!r}"
                )
                raise ValueError(
                    f"{op}: {BACKEND_ENV_VAR} must be {names}, got {os.environ[BACKEND_ENV_VAR]!r}"
                )
            backend = override
        else:
            can_run = implemented and unavailable_reason(device) is None
            return accelerated if can_run else "torch"
    if backend == "torch":
        return "torch"
    if not implemented:
        raise RuntimeError(f"{op}: backend={accelerated!r} is not implemented yet; use backend='torch'")
    reason = unavailable_reason(device)
    if reason is not None:
        raise RuntimeError(f"{op}: backend={accelerated!r} cannot run here: {reason}")
    return accelerated


def runnable_backends(
    device: torch.device,
    *,
    accelerated: str = "triton",
    implemented: bool = True,
    unavailable_reason: Callable[[torch.device], str | None] = triton_unavailable_reason,
) -> list[str]:
    """The backends an op can run on ``device`` here, PyTorch first (for self-checks)."""
    backends = ["torch"]
    if implemented and unavailable_reason(device) is None:
        backends.append(accelerated)
    return backends
