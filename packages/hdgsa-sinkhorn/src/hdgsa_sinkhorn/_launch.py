"""Launching a Triton kernel without the JIT's per-call work, for microsecond kernels.

Measured on an H100 host (Triton 3.6, 2026-11-26): ``kernel[grid](...)`` costs about 36 us of host
time per call (argument binding, specialization, cache key, global-value checks), several times
the Sinkhorn kernel itself (5-9 us at 1K-65K matrices). :class:`DirectLauncher` keeps the
:class:`CompiledKernel` that the JIT returns, keyed by everything the JIT specializes on
(constexpr values, pointer dtypes and 16-byte alignment, int arguments equal to 1, divisible by 16,
or beyond int32), and later calls its launcher directly: the same call the JIT makes
(``kernel.run(grid, stream, function, packed_metadata, hooks, *args)``).

Guards: used only on CUDA with Triton's ``knobs`` API (3.4+) and no launch hooks installed (so
profilers still see every launch; the JIT otherwise builds launch metadata and calls its empty
hook chains on every launch); never while a CUDA graph is being captured on first use. The
first time a specialization is seen, the kernel runs through the JIT and once more through the
direct launch into a scratch output, and the two outputs must be bitwise equal (one host sync per
specialization, next to its compilation); a mismatch raises ``RuntimeError``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

try:  # Triton >= 3.4: launch hooks live in triton.knobs
    from triton import knobs as _knobs
except ImportError:  # pragma: no cover - older Triton: always launch through the JIT
    _knobs = None

__all__ = ["DirectLauncher"]

_INT32 = 2**31


def _hooks_installed() -> bool:
    """Whether a profiler hooked Triton's launches (Triton 3.6 keeps empty HookChains there)."""
    for hook in (_knobs.runtime.launch_enter_hook, _knobs.runtime.launch_exit_hook):
        if hook is not None and getattr(hook, "calls", True):
            return True
    return False


def _arg_key(value: object) -> object:
    """What the JIT specializes a launch argument on."""
    if isinstance(value, torch.Tensor):
        return (value.dtype, value.data_ptr() % 16 == 0)
    if isinstance(value, bool):
        return ("b", value)
    if isinstance(value, int):
        return (value == 1, value % 16 == 0, -_INT32 <= value < _INT32)
    if isinstance(value, float):
        return "f"
    return value


class DirectLauncher:
    """Launches ``kernel`` (a ``triton.jit`` function) with positional arguments in signature
    order, constexprs included; ``out_index`` is the position of the output tensor the kernel
    writes (used to check the first direct launch against the JIT's)."""

    def __init__(self, kernel, out_index: int, device_type: str = "cuda") -> None:
        self.kernel = kernel
        self.out_index = out_index
        self.device_type = device_type  # where direct launches apply (tests use "cpu" with a mock)
        self.compiled: dict[tuple, object] = {}

    def __call__(self, grid: int, num_warps: int, args: Sequence[object]) -> None:
        out = args[self.out_index]
        if _knobs is None or out.device.type != self.device_type or _hooks_installed():
            self.kernel[(grid,)](*args, num_warps=num_warps)
            return
        # compiled kernels belong to one device: its index is part of the key
        key = (out.device.index, num_warps, *(_arg_key(value) for value in args))
        compiled = self.compiled.get(key)
        if compiled is not None:
            self._launch(compiled, grid, out, args)
            return
        compiled = self.kernel[(grid,)](*args, num_warps=num_warps)
        if (out.is_cuda and torch.cuda.is_current_stream_capturing()) or not hasattr(
            compiled, "packed_metadata"
        ):
            return
        # First direct launch of this specialization: into a scratch output, compared bitwise.
        scratch = torch.empty_like(out)
        self._launch(compiled, grid, scratch, [*args[: self.out_index], scratch, *args[self.out_index + 1 :]])
        if not torch.equal(scratch.view(torch.uint8), out.view(torch.uint8)):  # bitwise: NaN == NaN
            raise RuntimeError(
                f"hdgsa_sinkhorn: the direct launch of {self.kernel.__name__} disagrees with Triton's "
                f"launcher (Triton {getattr(__import__('triton'), '__version__', '?')}); please report it"
            )
        self.compiled[key] = compiled

    @staticmethod
    def _launch(compiled, grid: int, out: torch.Tensor, args: Sequence[object]) -> None:
        stream = torch._C._cuda_getCurrentRawStream(out.device.index) if out.is_cuda else 0
        compiled.run(grid, 1, 1, stream, compiled.function, compiled.packed_metadata, None, None, None, *args)
