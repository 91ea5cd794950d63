"""What every op's Triton code shares. Importing this module does not import Triton."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

from .capabilities import interpreter_enabled

__all__ = ["autotune_configs", "next_power_of_2"]

ConfigT = TypeVar("ConfigT")


def autotune_configs(configs: Sequence[ConfigT]) -> list[ConfigT]:
    """All configs on a GPU; only the first under ``TRITON_INTERPRET=1``.

    Autotuning times each config, which means nothing (and takes long) in the interpreter:
    list the config that suits small test inputs first.
    """
    return list(configs[:1]) if interpreter_enabled() else list(configs)


def next_power_of_2(n: int) -> int:
    """Smallest power of two >= n (1 for n <= 1)."""
    return 1 if n <= 1 else 1 << (n - 1).bit_length()
