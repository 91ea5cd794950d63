"""Launch a Triton kernel with less host time than ``kernel[grid](...)``.

Triton binds and specializes every argument on every launch, then looks the compiled kernel up
by a string key: on Triton 3.6 that costs tens of microseconds per launch with ~20 arguments,
more than tiny kernels (Sinkhorn on mHC's 65,536 4x4 matrices: 6 us) take on the GPU.
:class:`CachedLauncher` keeps the compiled kernel that Triton's own launch returned, under a key
computed here, and calls it directly afterwards.

Correctness rests on the key being at least as fine as Triton's specialization: for the argument
kinds passed here it holds, per tensor, its dtype and whether its data pointer is 16-byte aligned;
per int, whether it is 1, whether it divides by 16 and whether it fits 32 bits; per float and
bool, the type (bools also their value); every constexpr's value; the launch options; and the
current device. Anything else (``None``, tuples) makes the launch go through Triton every time.
Two launches with equal keys get the same compiled kernel from Triton, so the first launch of a
key goes through Triton (which compiles, or finds its cached kernel) and records what it returns.

Not taken (every launch goes through Triton): under ``TRITON_INTERPRET=1``, with a Triton
before 3.4 (no ``triton.knobs``), with ``HDGSA_CACHED_LAUNCH=0`` in the environment when the
launcher is made, and while a Triton launch hook is set (profilers such as proton rely on it). Skipping the binding also skips
Triton's launch-metadata object and its empty hook chain calls (Triton 3.6 makes both on every
launch even with no hook set).
"""

from __future__ import annotations

import importlib
import inspect
import os
import re
from collections.abc import Sequence
from typing import Any

import torch

from .capabilities import interpreter_enabled

__all__ = ["DISABLE_ENV_VAR", "CachedLauncher", "triton_private_api_problems"]

# HDGSA_CACHED_LAUNCH=0 (read when a launcher is made, i.e. when a kernel module is imported):
# every launch goes through Triton. For measuring what the launcher saves, and a way out if a
# Triton release breaks the private API it uses.
DISABLE_ENV_VAR = "HDGSA_CACHED_LAUNCH"

_I32_MIN, _I32_MAX = -(2**31), 2**31 - 1
_MISSING = object()


# The call a compiled kernel's own launcher makes (``CompiledKernel.__getitem__``'s runner), which
# CachedLauncher.__call__ repeats with the three launch-metadata and hook arguments as None.
_RUN_CALL = (
    "self.run(grid[0],grid[1],grid[2],stream,self.function,self.packed_metadata,launch_metadata,"
    "knobs.runtime.launch_enter_hook,knobs.runtime.launch_exit_hook,*args)"
)


def triton_private_api_problems() -> list[str]:
    """What :class:`CachedLauncher` needs from Triton's private API and the installed Triton
    lacks, one sentence each (an empty list: everything is there). Checked without a GPU, from
    Triton's modules and source: ``triton.knobs.runtime``'s launch hooks, the active driver's
    current device and stream, a JIT function's parameters (name, constexpr or not), and the
    argument order of a compiled kernel's ``run`` (what ``CompiledKernel.__getitem__`` passes).
    A Triton before 3.4 (no ``triton.knobs``) is reported too, though the launcher then simply
    launches through Triton every time."""
    try:
        triton = importlib.import_module("triton")
    except ImportError as error:
        return [f"Triton is not importable: {error}"]
    version = getattr(triton, "__version__", "?")
    problems = []

    def lacks(what: str, why: str) -> None:
        problems.append(
            f"hdgsa_core.launch.CachedLauncher needs {what}, which Triton {version} lacks ({why});"
            " it relies on Triton's private launch API: pin a Triton this check passes with, or"
            " remove the launcher from the kernels that use it"
        )

    knobs = _runtime_knobs()
    if knobs is None:
        lacks("triton.knobs.runtime", "Triton before 3.4: every launch goes through Triton")
    else:
        for hook in ("launch_enter_hook", "launch_exit_hook"):
            if not hasattr(knobs, hook):
                lacks(f"triton.knobs.runtime.{hook}", "launch hooks renamed or removed")
    driver = getattr(importlib.import_module("triton.runtime"), "driver", None)
    if driver is None or not hasattr(type(driver), "active"):
        lacks("triton.runtime.driver.active", "the driver registry changed")
    try:
        gpu_driver = importlib.import_module("triton.backends.driver").GPUDriver
        driver_source = inspect.getsource(gpu_driver.__init__)
    except (ImportError, AttributeError, OSError, TypeError) as error:
        lacks("triton.backends.driver.GPUDriver", f"{type(error).__name__}: {error}")
    else:
        for method in ("get_current_device", "get_current_stream"):
            if f"self.{method}" not in driver_source:
                lacks(f"the driver's {method}()", "no longer set by GPUDriver")
    kernel_param = getattr(importlib.import_module("triton.runtime.jit"), "KernelParam", None)
    if kernel_param is None or not all(hasattr(kernel_param, a) for a in ("name", "is_constexpr")):
        lacks("JITFunction.params with .name and .is_constexpr", "triton.runtime.jit.KernelParam changed")
    try:
        compiled = importlib.import_module("triton.compiler.compiler").CompiledKernel
        compiled_source = inspect.getsource(compiled)
    except (ImportError, AttributeError, OSError, TypeError) as error:
        lacks("triton.compiler.compiler.CompiledKernel", f"{type(error).__name__}: {error}")
    else:
        if _RUN_CALL not in re.sub(r"\s+", "", compiled_source):
            lacks(
                "a compiled kernel's run(grid0, grid1, grid2, stream, function, packed_metadata,"
                " launch_metadata, enter_hook, exit_hook, *arguments)",
                "CompiledKernel launches differently",
            )
    return problems


def _argument_key(value: Any) -> Any:
    """What Triton's specialization can depend on for one runtime argument (see module
    docstring), or ``None`` for kinds this launcher does not key (they disable the cache).
    Exact type checks first: this runs for every argument of every launch."""
    kind = type(value)
    if kind is int:
        return (value == 1, not value & 15, _I32_MIN <= value <= _I32_MAX)
    if kind is float:
        return float
    if kind is bool:
        return value
    if isinstance(value, torch.Tensor):
        return (value.dtype, not value.data_ptr() & 15)
    return None


def _runtime_knobs() -> Any:
    """``triton.knobs.runtime`` (launch hooks), or ``None`` on Triton before 3.4."""
    try:
        from triton import knobs
    except ImportError:
        return None
    return knobs.runtime


def _hook_set(hook: Any) -> bool:
    """Whether a Triton launch hook is set: ``None`` (Triton 3.4, 3.5) or an empty ``HookChain``
    (3.6 and later) means none."""
    return hook is not None and bool(getattr(hook, "calls", True))


def _current_device() -> int:
    """The device Triton launches on (its driver's notion, the current CUDA device)."""
    from triton.runtime import driver

    return driver.active.get_current_device()


def _current_stream(device: int) -> int:
    """The raw stream Triton launches on for ``device`` (the current PyTorch stream)."""
    from triton.runtime import driver

    return driver.active.get_current_stream(device)


class CachedLauncher:
    """``launcher(grid, **arguments, num_warps=..)`` runs ``kernel[grid](**arguments, ...)``,
    skipping Triton's per-launch binding after the first launch of each key.

    Args:
        kernel: a ``@triton.jit`` function (not autotuned: pass the config's values yourself).

    Every kernel parameter is passed by name; constexpr parameters are part of the key by value.
    Launch options (``num_warps``, ``num_stages``, ``launch_cooperative_grid``, ...) go as
    keywords too. Launch under the tensors' device (:func:`~hdgsa_core.triton_utils.device_guard`).
    """

    def __init__(self, kernel: Any) -> None:
        self._kernel = kernel
        params = getattr(kernel, "params", None)
        # Under the interpreter kernels are not JITFunctions, and Triton before 3.4 (no
        # ``triton.knobs``) launches compiled kernels differently: launch through Triton always.
        self._runtime = _runtime_knobs() if params is not None and not interpreter_enabled() else None
        self._enabled = self._runtime is not None and os.environ.get(DISABLE_ENV_VAR, "1") != "0"
        # (name, is_constexpr) per kernel parameter, in signature order.
        self._plan: tuple[tuple[str, bool], ...] = tuple((p.name, p.is_constexpr) for p in params or ())
        self._parameters = frozenset(name for name, _ in self._plan)
        self._compiled: dict[tuple, Any] = {}

    def __call__(self, grid: Sequence[int], **arguments: Any) -> None:
        if not self._enabled:
            self._kernel[tuple(grid)](**arguments)
            return
        runtime = self._runtime
        if _hook_set(runtime.launch_enter_hook) or _hook_set(runtime.launch_exit_hook):
            self._kernel[tuple(grid)](**arguments)
            return
        values = []
        key: list[Any] = [_current_device()]
        for name, is_constexpr in self._plan:
            value = arguments.get(name, _MISSING)
            values.append(value)
            if is_constexpr and value is not _MISSING:
                key.append(value)
                continue
            argument_key = _argument_key(value)
            if argument_key is None:  # also a parameter left to its default
                self._kernel[tuple(grid)](**arguments)
                return
            key.append(argument_key)
        # Launch options (num_warps, ...), in the caller's order: one order per call site.
        key.append(tuple((k, v) for k, v in arguments.items() if k not in self._parameters))
        cache_key = tuple(key)
        compiled = self._compiled.get(cache_key)
        if compiled is None:
            # First launch of this key: Triton binds, compiles or finds the kernel, launches it.
            compiled = self._kernel[tuple(grid)](**arguments)
            if hasattr(compiled, "packed_metadata") and hasattr(compiled, "function"):
                self._compiled[cache_key] = compiled
            else:  # a Triton whose compiled kernels launch differently: never skip its binding
                self._enabled = False
            return
        grid_0 = grid[0]
        grid_1 = grid[1] if len(grid) > 1 else 1
        grid_2 = grid[2] if len(grid) > 2 else 1
        stream = _current_stream(key[0])
        compiled.run(
            grid_0,
            grid_1,
            grid_2,
            stream,
            compiled.function,
            compiled.packed_metadata,
            None,
            None,
            None,
            *values,
        )
