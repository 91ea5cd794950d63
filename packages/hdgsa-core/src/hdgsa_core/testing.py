"""Test helpers shared by every package's tests (and the ``check`` command).

Errors are relative norms, ``||actual - expected|| / ||expected||`` in float64 (fla's
``assert_close`` ratio). A kernel is held to FlashAttention's rule: its error against the
float64 reference may be at most ``factor`` times the error of the PyTorch reference run
in the same low precision, and never above an absolute ceiling.

Use from a package's ``tests/conftest.py``::

    from hdgsa_core.testing import poison_empty, strict_launches  # noqa: F401  (autouse fixtures)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence

import torch

__all__ = [
    "DEFAULT_TOLERANCE",
    "assert_close",
    "assert_matches_reference",
    "assert_self_check_passes",
    "error_report",
    "grads_of",
    "make_tensor",
    "must_not_run",
    "poison_empty",
    "poisoned_empty",
    "rel_error",
    "strict_kernel_launches",
    "strict_launches",
    "strided_rows",
]

# Relative-norm error allowed against float64, by input dtype (METHOD: fp32 far under 1e-3,
# tf32 near 3e-4, bf16 operands between 1e-3 and 1e-2).
DEFAULT_TOLERANCE: dict[torch.dtype, float] = {
    torch.float64: 1e-10,
    torch.float32: 1e-4,
    torch.float16: 5e-3,
    torch.bfloat16: 2e-2,
}


def rel_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """``||actual - expected|| / ||expected||`` in float64; inf if ``actual`` is not finite
    where ``expected`` is. Infinities that agree (e.g. masked scores) count as equal."""
    actual = actual.detach().to(device="cpu", dtype=torch.float64)
    expected = expected.detach().to(device="cpu", dtype=torch.float64)
    if actual.shape != expected.shape:
        raise AssertionError(f"shape {list(actual.shape)} != expected {list(expected.shape)}")
    same_inf = torch.isinf(expected) & (actual == expected)
    if (~torch.isfinite(actual) & ~same_inf).any() or (~torch.isfinite(expected) & ~same_inf).any():
        return float("inf")
    actual = torch.where(same_inf, 0.0, actual)
    expected = torch.where(same_inf, 0.0, expected)
    denominator = expected.norm().item()
    difference = (actual - expected).norm().item()
    if denominator == 0.0:
        return difference
    return difference / denominator


def error_report(actual: torch.Tensor, expected: torch.Tensor) -> str:
    """Where ``actual`` and ``expected`` differ most, for failure messages."""
    actual64 = actual.detach().to(device="cpu", dtype=torch.float64)
    expected64 = expected.detach().to(device="cpu", dtype=torch.float64)
    nonfinite = int((~torch.isfinite(actual64) & torch.isfinite(expected64)).sum())
    difference = (actual64 - expected64).abs().nan_to_num(float("inf"))
    if difference.numel() == 0:
        return "empty tensors"
    flat = int(difference.argmax())
    where = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), difference.shape))
    return (
        f"max |diff| {difference.max().item():.3e} at {list(where)}: "
        f"got {actual64.flatten()[flat].item():.6g}, expected {expected64.flatten()[flat].item():.6g}; "
        f"{nonfinite} non-finite where the reference is finite; shape {list(actual.shape)}"
    )


def assert_close(name: str, actual: torch.Tensor, expected: torch.Tensor, tol: float) -> float:
    """Assert ``rel_error(actual, expected) <= tol``; returns the error."""
    error = rel_error(actual, expected)
    if not error <= tol:
        raise AssertionError(
            f"{name}: relative error {error:.3e} > {tol:.1e}; {error_report(actual, expected)}"
        )
    return error


def assert_matches_reference(
    name: str,
    actual: torch.Tensor,
    reference64: torch.Tensor,
    reference_lowp: torch.Tensor | None = None,
    *,
    tol: float | None = None,
    factor: float = 2.0,
) -> float:
    """Assert ``actual`` is as close to the float64 reference as the low-precision reference.

    The allowed error is ``max(floor, factor * rel_error(reference_lowp, reference64))``,
    ``floor`` being ``tol`` or the default for ``actual.dtype``; capped at the dtype's
    default ceiling times 5 so a bad low-precision reference cannot excuse a broken kernel.
    """
    floor = tol if tol is not None else DEFAULT_TOLERANCE.get(actual.dtype, 1e-4)
    allowed = floor
    if reference_lowp is not None:
        allowed = max(floor, min(factor * rel_error(reference_lowp, reference64), 5 * floor))
    return assert_close(name, actual, reference64, allowed)


def assert_self_check_passes(
    self_check: Callable[[torch.device], Sequence[object]], device: torch.device | str, outputs: Iterable[str]
) -> None:
    """Run an op package's ``selfcheck.self_check(device)`` and assert that it compared exactly
    ``outputs`` on the PyTorch backend and that every comparison (of every backend) passed."""
    results = self_check(torch.device(device))
    compared = {result.output for result in results if result.backend == "torch"}
    if compared != set(outputs):
        raise AssertionError(f"self_check compared {sorted(compared)} on torch, expected {sorted(outputs)}")
    failed = [result for result in results if not result.passed]
    if failed:
        raise AssertionError(f"self_check failed: {failed}")


def must_not_run(*args: object, **kwargs: object) -> None:
    """Stand-in for a backend in bad-input tests (``monkeypatch.setattr(..., must_not_run)``):
    the arguments must be rejected before any computation starts."""
    raise AssertionError("computed before the arguments were checked")


def make_tensor(
    *shape: int,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    seed: int = 0,
    scale: float = 1.0,
    offset: float = 0.0,
    requires_grad: bool = False,
) -> torch.Tensor:
    """Seeded ``offset + scale * randn(shape)``: the same values on every device and run."""
    generator = torch.Generator().manual_seed(seed)
    values = torch.randn(*shape, generator=generator, dtype=torch.float64) * scale + offset
    tensor = values.to(device=device, dtype=dtype)
    return tensor.requires_grad_(requires_grad)


def strided_rows(tensor: torch.Tensor, pad: int = 7) -> torch.Tensor:
    """The same values with rows that are not packed: a view into a wider buffer whose last
    dimension has ``pad`` extra columns (stride(-1) stays 1, stride(-2) grows)."""
    wide = torch.empty(*tensor.shape[:-1], tensor.shape[-1] + pad, dtype=tensor.dtype, device=tensor.device)
    wide.fill_(float("nan") if tensor.is_floating_point() else -1)
    view = wide[..., : tensor.shape[-1]]
    view.copy_(tensor.detach())
    return view.requires_grad_(tensor.requires_grad)


def grads_of(
    output: torch.Tensor, inputs: Sequence[torch.Tensor | None], grad_output: torch.Tensor
) -> list[torch.Tensor | None]:
    """Gradients of ``(output * grad_output).sum()`` for each input (None where not given
    or not reached)."""
    present = [tensor for tensor in inputs if tensor is not None]
    grads = torch.autograd.grad(output, present, grad_output, allow_unused=True)
    it = iter(grads)
    return [next(it) if tensor is not None else None for tensor in inputs]


_EMPTY_FACTORIES = ("empty", "empty_like", "empty_strided")


def _poison(tensor: torch.Tensor) -> torch.Tensor:
    if tensor.requires_grad:  # a leaf that requires grad cannot be filled in place (inductor makes some)
        return tensor
    if tensor.is_floating_point():
        tensor.fill_(float("nan"))
    elif tensor.dtype in (torch.int32, torch.int64, torch.int16, torch.int8, torch.uint8):
        tensor.fill_(torch.iinfo(tensor.dtype).max)
    return tensor


def _build_dynamo_function_map() -> None:
    """torch.compile maps torch's functions to trace rules once per process, at its first use.
    Built while ``torch.empty`` is our wrapper, the map would lack the real factory, and every
    later compile that allocates would fail; so build it before the first swap."""
    try:
        from torch._dynamo import trace_rules

        trace_rules.get_torch_obj_rule_map()
    except (ImportError, AttributeError):  # private API: without it, compile tests may just fail
        pass


class poisoned_empty:
    """Context manager: ``torch.empty`` / ``empty_like`` / ``empty_strided`` return tensors
    filled with NaN (floats) or the dtype's max (ints), so an element a kernel forgets to
    write fails the comparison instead of passing by luck."""

    def __enter__(self) -> poisoned_empty:
        _build_dynamo_function_map()
        self._saved = {name: getattr(torch, name) for name in _EMPTY_FACTORIES}
        for name, factory in self._saved.items():

            def poisoned(*args: object, _factory=factory, **kwargs: object) -> torch.Tensor:
                return _poison(_factory(*args, **kwargs))

            setattr(torch, name, poisoned)
        return self

    def __exit__(self, *exc_info: object) -> None:
        for name, factory in self._saved.items():
            setattr(torch, name, factory)


def _poison_empty_fixture() -> Iterator[None]:
    with poisoned_empty():
        yield


# Launch options a GPU launch accepts besides the kernel's own arguments, if the CUDA backend's
# option list cannot be read.
_LAUNCH_OPTIONS = frozenset(
    {
        "num_warps",
        "num_stages",
        "num_ctas",
        "maxnreg",
        "enable_fp_fusion",
        "launch_cooperative_grid",
        "launch_pdl",
    }
)


def _launch_options() -> frozenset[str]:
    try:
        from triton.backends.nvidia.compiler import CUDAOptions

        return frozenset(CUDAOptions.__dataclass_fields__)
    except (ImportError, AttributeError):  # no CUDA backend in this Triton build
        return _LAUNCH_OPTIONS


class strict_kernel_launches:
    """Context manager: under ``TRITON_INTERPRET=1``, a kernel launched with a keyword that is
    neither one of its arguments nor a launch option raises ``TypeError``.

    The interpreter drops unknown keywords silently, where a GPU launch raises ``KeyError``:
    without this, a launch that passes every CPU test can fail on its first GPU call. Does
    nothing without Triton or outside the interpreter."""

    def __enter__(self) -> strict_kernel_launches:
        self._saved = None
        try:
            from triton.runtime import interpreter
        except ImportError:
            return self
        executor = getattr(interpreter, "GridExecutor", None)
        if executor is None:  # another Triton layout: nothing to check
            return self
        import inspect

        allowed_options = _launch_options()
        run = executor.__call__

        def checked(self_: object, *args: object, **kwargs: object) -> object:
            spec = inspect.getfullargspec(self_.fn)  # type: ignore[attr-defined]
            unknown = set(kwargs) - set(spec.args) - set(spec.kwonlyargs) - allowed_options
            if unknown:
                name = getattr(self_.fn, "__name__", "kernel")  # type: ignore[attr-defined]
                raise TypeError(f"{name} launched with keywords it does not take: {sorted(unknown)}")
            return run(self_, *args, **kwargs)

        self._executor, self._saved = executor, run
        executor.__call__ = checked
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._saved is not None:
            self._executor.__call__ = self._saved


def _strict_launches_fixture() -> Iterator[None]:
    with strict_kernel_launches():
        yield


try:  # pytest is a test-only dependency; the helpers above work without it.
    import pytest

    poison_empty = pytest.fixture(autouse=True)(_poison_empty_fixture)
    strict_launches = pytest.fixture(autouse=True)(_strict_launches_fixture)
except ImportError:  # pragma: no cover
    poison_empty = None  # type: ignore[assignment]
    strict_launches = None  # type: ignore[assignment]
