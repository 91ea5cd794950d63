"""Argument checks that raise the errors SPEC section 2 promises, before any kernel runs.

Every message names the argument, what was expected and what was given. None of these
syncs with the device except :func:`check_index_range`, which reads a max/min back.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import torch

__all__ = [
    "FLOAT_DTYPES",
    "INDEX_DTYPES",
    "check_bool",
    "check_dtype",
    "check_index_range",
    "check_int",
    "check_ndim",
    "check_real",
    "check_same_device",
    "check_same_dtype",
    "check_shape",
    "check_tensor",
    "format_shape",
]

FLOAT_DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.float16, torch.bfloat16)
INDEX_DTYPES: tuple[torch.dtype, ...] = (torch.int32, torch.int64)


def format_shape(shape: Sequence[int | str | None]) -> str:
    """``(2, None, 'H')`` -> ``[2, *, H]``."""
    return "[" + ", ".join("*" if size is None else str(size) for size in shape) + "]"


def check_tensor(name: str, value: object) -> torch.Tensor:
    """``value`` must be a tensor (TypeError otherwise); returns it."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(value).__name__}")
    return value


def check_dtype(name: str, tensor: torch.Tensor, allowed: Sequence[torch.dtype] = FLOAT_DTYPES) -> None:
    """TypeError unless ``tensor.dtype`` is one of ``allowed``."""
    check_tensor(name, tensor)
    if tensor.dtype not in allowed:
        names = ", ".join(_dtype_name(dtype) for dtype in allowed)
        raise TypeError(
            f"{name}: dtype {_dtype_name(tensor.dtype)} is not supported; expected one of {names}"
        )


def check_ndim(name: str, tensor: torch.Tensor, ndims: int | Sequence[int], layout: str) -> None:
    """ValueError unless ``tensor.dim()`` is in ``ndims``; ``layout`` names the expected shape."""
    check_tensor(name, tensor)
    allowed = (ndims,) if isinstance(ndims, int) else tuple(ndims)
    if tensor.dim() not in allowed:
        raise ValueError(f"{name}: expected shape {layout}, got shape {list(tensor.shape)}")


def check_shape(
    name: str,
    tensor: torch.Tensor,
    expected: Sequence[int | None],
    layout: str | None = None,
) -> None:
    """ValueError unless ``tensor.shape`` matches ``expected`` (None matches any size).

    ``layout`` (e.g. ``"[B, T, H, D]"``) is added to the message to say what the sizes mean.
    """
    check_tensor(name, tensor)
    actual = tuple(tensor.shape)
    matches = len(actual) == len(expected) and all(
        want is None or want == got for want, got in zip(expected, actual, strict=False)
    )
    if not matches:
        what = f"{layout} = {format_shape(expected)}" if layout else format_shape(expected)
        raise ValueError(f"{name}: expected shape {what}, got shape {list(actual)}")


def check_same_device(**tensors: torch.Tensor | None) -> torch.device:
    """ValueError unless all given tensors (None skipped) share one device; returns it."""
    present = {name: tensor for name, tensor in tensors.items() if tensor is not None}
    devices = {name: tensor.device for name, tensor in present.items()}
    if len(set(devices.values())) > 1:
        listing = ", ".join(f"{name} on {device}" for name, device in devices.items())
        raise ValueError(f"expected all tensors on one device, got {listing}")
    return next(iter(devices.values()))


def check_same_dtype(reference: str, tensor: torch.Tensor, **others: torch.Tensor) -> None:
    """TypeError unless every tensor in ``others`` has the dtype of ``tensor`` (named ``reference``)."""
    expected = tensor.dtype
    for name, other in others.items():
        if other.dtype != expected:
            raise TypeError(
                f"{name}: dtype {_dtype_name(other.dtype)} differs from {reference}'s "
                f"{_dtype_name(expected)}; {', '.join((reference, *others))} must share one dtype"
            )


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def check_index_range(name: str, indices: torch.Tensor, upper: int) -> None:
    """ValueError if any index is ``>= upper``. Reads one value back: a host sync."""
    if indices.numel() == 0:
        return
    largest = int(indices.max())
    if largest >= upper:
        raise ValueError(f"{name}: index {largest} is out of range; indices must be < {upper}")


def check_int(name: str, value: object) -> None:
    """TypeError unless ``value`` is an integer (``bool`` is not)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")


def check_real(name: str, value: object) -> None:
    """TypeError unless ``value`` is a real number (``bool`` is not)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")


def check_bool(name: str, value: object) -> None:
    """TypeError unless ``value`` is a ``bool``."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
