"""What each op package declares for the command line: self-checks and benchmark cases.

An op package provides, in ``hdgsa_<op>/selfcheck.py``, ``self_check(device) -> list[CheckResult]``
(every backend that can run on ``device``, forward and backward against float64), and in
``hdgsa_<op>/bench.py``, ``bench_cases() -> list[BenchCase]``. The runner that times them
lives in the meta-package (``hdgsa-kernels bench``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .testing import rel_error

__all__ = ["BenchCase", "CheckResult", "ProviderUnavailable", "compare_outputs"]


@dataclass(frozen=True)
class CheckResult:
    """One compared output or gradient of one op on one backend."""

    op: str
    backend: str
    case: str
    output: str
    error: float
    tol: float

    @property
    def passed(self) -> bool:
        return self.error <= self.tol


def compare_outputs(
    op: str,
    backend: str,
    case: str,
    actual: dict[str, torch.Tensor],
    expected: dict[str, torch.Tensor],
    tol: float,
) -> list[CheckResult]:
    """A :class:`CheckResult` per named output, in ``expected``'s order."""
    return [
        CheckResult(op, backend, case, name, rel_error(actual[name], expected[name]), tol)
        for name in expected
    ]


class ProviderUnavailable(Exception):
    """Raised by a provider's setup when the peer cannot run here (not installed, refuses the
    shape); the runner lists the provider as skipped with this message."""


@dataclass(frozen=True)
class BenchCase:
    """One shape of one op, timed for every provider.

    ``providers`` maps a provider name (``"hdgsa"``, ``"liger"``, ``"torch.compile"``...) to a
    setup function that allocates inputs and returns the zero-argument callable to time; it may
    raise :class:`ProviderUnavailable`. ``bytes`` / ``flops`` are the minimum memory traffic and
    arithmetic of the op, for GB/s, TFLOP/s and the share of the roofline. ``devices``: where
    the case runs (``hdgsa-kernels bench --device``); CUDA unless the case says otherwise.
    """

    op: str
    name: str
    providers: dict[str, Callable[[], Callable[[], object]]]
    bytes: float | None = None
    flops: float | None = None
    ours: str = "hdgsa"
    tags: tuple[str, ...] = field(default_factory=tuple)
    devices: tuple[str, ...] = ("cuda",)
