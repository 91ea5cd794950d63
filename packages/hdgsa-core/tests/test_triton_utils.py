import importlib.util
from types import SimpleNamespace

import pytest
import torch

from hdgsa_core.triton_utils import autotune_configs, cdiv, device_guard, next_power_of_2, on_input_device


def test_autotune_configs_keeps_one_under_the_interpreter(monkeypatch):
    configs = ["small", "medium", "large"]
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert autotune_configs(configs) == ["small"]
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert autotune_configs(configs) == configs


@pytest.mark.parametrize(
    ("a", "b", "expected"), [(0, 4, 0), (1, 4, 1), (4, 4, 1), (5, 4, 2), (2**40 + 1, 2**20, 2**20 + 1)]
)
def test_cdiv(a, b, expected):
    assert cdiv(a, b) == expected


@pytest.mark.parametrize(("n", "expected"), [(0, 1), (1, 1), (2, 2), (3, 4), (64, 64), (65, 128)])
def test_next_power_of_2(n, expected):
    assert next_power_of_2(n) == expected


def test_device_guard_is_a_no_op_off_cuda():
    with device_guard(torch.device("cpu")):
        pass

    @on_input_device
    def launcher(tensor, scale):
        return tensor * scale

    assert torch.equal(launcher(torch.ones(2), 3.0), torch.full((2,), 3.0))


class _FakeCompiled:
    """What Triton's launch returns: launches through ``run`` with the full argument list."""

    def __init__(self, calls):
        self.function, self.packed_metadata, self._calls = "function", "metadata", calls

    def run(self, *launch):
        self._calls.append(("direct", launch))


class _FakeKernel:
    """A stand-in for a ``@triton.jit`` function with parameters ``x`` (tensor), ``n`` (int),
    ``scale`` (float) and ``BLOCK`` (constexpr)."""

    class _Param:
        def __init__(self, name, is_constexpr=False):
            self.name, self.is_constexpr = name, is_constexpr

    def __init__(self):
        self.params = [self._Param("x"), self._Param("n"), self._Param("scale"), self._Param("BLOCK", True)]
        self.calls = []

    def __getitem__(self, grid):
        def launch(**arguments):
            self.calls.append(("triton", grid, arguments))
            return _FakeCompiled(self.calls)

        return launch


@pytest.fixture
def fake_triton(monkeypatch):
    from types import SimpleNamespace

    from hdgsa_core import launch

    # Triton 3.6's hooks: chains of callables, empty when none is set.
    runtime = SimpleNamespace(launch_enter_hook=SimpleNamespace(calls=[]), launch_exit_hook=None)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(launch, "_runtime_knobs", lambda: runtime)
    monkeypatch.setattr(launch, "_current_device", lambda: 0)
    monkeypatch.setattr(launch, "_current_stream", lambda device: 1234)
    return runtime


def test_cached_launcher_keys_every_specialization(fake_triton):
    from hdgsa_core.launch import CachedLauncher

    kernel = _FakeKernel()
    launcher = CachedLauncher(kernel)
    x = torch.randn(64)
    launcher((3,), x=x, n=32, scale=0.5, BLOCK=16, num_warps=4)
    launcher((5,), x=x, n=48, scale=2.0, BLOCK=16, num_warps=4)  # same key: direct
    assert [call[0] for call in kernel.calls] == ["triton", "direct"]
    assert kernel.calls[1][1] == (5, 1, 1, 1234, "function", "metadata", None, None, None, x, 48, 2.0, 16)
    # Each of these differs from the first launch in one thing Triton specializes on.
    variants = [
        dict(x=x, n=32, scale=0.5, BLOCK=32, num_warps=4),  # a constexpr value
        dict(x=x, n=32, scale=0.5, BLOCK=16, num_warps=8),  # a launch option
        dict(x=x.double(), n=32, scale=0.5, BLOCK=16, num_warps=4),  # a dtype
        dict(x=x[1:], n=32, scale=0.5, BLOCK=16, num_warps=4),  # pointer alignment
        dict(x=x, n=33, scale=0.5, BLOCK=16, num_warps=4),  # divisibility by 16
        dict(x=x, n=1, scale=0.5, BLOCK=16, num_warps=4),  # the value 1
        dict(x=x, n=2**40, scale=0.5, BLOCK=16, num_warps=4),  # 64-bit ints
    ]
    for arguments in variants:
        kernel.calls.clear()
        launcher((1,), **arguments)
        launcher((1,), **arguments)
        assert [call[0] for call in kernel.calls] == ["triton", "direct"], arguments


def test_cached_launcher_goes_through_triton_when_it_cannot_key(fake_triton):
    from hdgsa_core.launch import CachedLauncher

    kernel = _FakeKernel()
    launcher = CachedLauncher(kernel)
    for _ in range(2):  # n left to a default, then None: never cached
        launcher((1,), x=torch.randn(4), scale=1.0, BLOCK=4)
        launcher((1,), x=torch.randn(4), n=None, scale=1.0, BLOCK=4)
    fake_triton.launch_enter_hook.calls.append(print)  # a profiler's hook: Triton must call it
    launcher((1,), x=torch.randn(4), n=4, scale=1.0, BLOCK=4)
    launcher((1,), x=torch.randn(4), n=4, scale=1.0, BLOCK=4)
    assert [call[0] for call in kernel.calls] == ["triton"] * 6


@pytest.mark.parametrize(
    ("variable", "value"),
    [("TRITON_INTERPRET", "1"), ("HDGSA_CACHED_LAUNCH", "0")],  # the interpreter; switched off
)
def test_cached_launcher_always_goes_through_triton(fake_triton, monkeypatch, variable, value):
    from hdgsa_core.launch import CachedLauncher

    monkeypatch.setenv(variable, value)
    kernel = _FakeKernel()
    launcher = CachedLauncher(kernel)
    for _ in range(2):
        launcher((1,), x=torch.randn(4), n=4, scale=1.0, BLOCK=4)
    assert [call[0] for call in kernel.calls] == ["triton", "triton"]


# CachedLauncher calls Triton's private launch API. Every Triton the package allows must have the
# names it needs; this runs without a GPU (a GPU test of the launcher itself is in hdgsa-sinkhorn's
# CUDA suite, whose kernels launch through it).
_needs_triton = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None, reason="Triton is not installed: no launcher to check"
)


@_needs_triton
def test_the_installed_triton_has_the_private_names_the_cached_launcher_needs():
    from hdgsa_core.launch import triton_private_api_problems

    problems = triton_private_api_problems()
    assert not problems, "\n".join(problems)


@_needs_triton
def test_a_missing_private_name_is_reported_clearly(monkeypatch):
    import triton.compiler.compiler

    from hdgsa_core import launch

    monkeypatch.setattr(launch, "_runtime_knobs", lambda: SimpleNamespace(launch_enter_hook=None))

    class CompiledKernel:  # launches with another argument order
        def __getitem__(self, grid):
            return lambda *args: self.run(grid, *args)

    monkeypatch.setattr(triton.compiler.compiler, "CompiledKernel", CompiledKernel)
    problems = launch.triton_private_api_problems()
    assert len(problems) == 2, problems
    assert problems[0].startswith(
        "hdgsa_core.launch.CachedLauncher needs triton.knobs.runtime.launch_exit_hook"
    )
    assert "a compiled kernel's run(grid0, grid1, grid2, stream, function, packed_metadata" in problems[1]
    assert all("Triton's private launch API" in problem for problem in problems)
    monkeypatch.setattr(launch, "_runtime_knobs", lambda: None)
    assert "Triton before 3.4" in launch.triton_private_api_problems()[0]
