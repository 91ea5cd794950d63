"""What every op's Triton code shares. Importing this module does not import Triton."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch

from .capabilities import interpreter_enabled

__all__ = ["autotune_configs", "cdiv", "device_guard", "next_power_of_2", "on_input_device"]

ConfigT = TypeVar("ConfigT")
LauncherT = TypeVar("LauncherT", bound=Callable[..., Any])


def autotune_configs(configs: Sequence[ConfigT]) -> list[ConfigT]:
    """All configs on a GPU; only the first under ``TRITON_INTERPRET=1``.

    Autotuning times each config, which means nothing (and takes long) in the interpreter:
    list the config that suits small test inputs first.
    """
    return list(configs[:1]) if interpreter_enabled() else list(configs)


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for ints, on the host. (``triton.cdiv`` is a ``@triton.jit`` function:
    calling it from Python costs microseconds per launch.)"""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """Smallest power of two >= n (1 for n <= 1)."""
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def device_guard(device: torch.device) -> contextlib.AbstractContextManager:
    """Make ``device`` current while launching: Triton launches on the current CUDA device,
    which need not be the tensors' (a model on ``cuda:1`` without ``torch.cuda.set_device``).
    A no-op when ``device`` is already current (the common case: costs no device switch)."""
    if device.type == "cuda" and device.index is not None and device.index != torch.cuda.current_device():
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def on_input_device(launcher: LauncherT) -> LauncherT:
    """Run ``launcher(tensor, ...)`` under :func:`device_guard` of its first argument's device."""

    @functools.wraps(launcher)
    def launch(first: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        with device_guard(first.device):
            return launcher(first, *args, **kwargs)

    return launch  # type: ignore[return-value]
