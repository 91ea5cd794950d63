"""The direct-launch cache (``hdgsa_sinkhorn._launch``), with a mock kernel on CPU: keys, the
first-use bitwise check against the JIT launch, and the error when they disagree. (On CUDA the
real Triton launcher is exercised by every test of ``test_sinkhorn_knopp.py``.)"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from hdgsa_sinkhorn._launch import DirectLauncher, _knobs

pytestmark = pytest.mark.skipif(
    _knobs is None, reason="Triton without knobs: always launches through the JIT"
)


class _Compiled:
    def __init__(self, log, bad=False):
        self.log, self.bad = log, bad
        self.function, self.packed_metadata = "function", "metadata"

    @property
    def run(self):
        def launch(grid0, grid1, grid2, stream, function, metadata, launch_metadata, enter, exit_, *args):
            self.log.append(("direct", grid0, args[2]))
            args[1].copy_(args[0] * 2 + (1 if self.bad else 0))

        return launch


class _Kernel:
    __name__ = "mock_kernel"

    def __init__(self, bad=False):
        self.log, self.bad = [], bad

    def __getitem__(self, grid):
        def launch(*args, num_warps):
            self.log.append(("jit", grid[0], args[2]))
            args[1].copy_(args[0] * 2)
            return _Compiled(self.log, self.bad)

        return launch


def test_direct_launch_caches_and_checks_the_first_launch():
    kernel = _Kernel()
    launcher = DirectLauncher(kernel, out_index=1, device_type="cpu")
    x = torch.randn(8)
    for _ in range(3):
        out = torch.empty(8)
        launcher(4, 2, (x, out, 7, 1.5, 4))
        assert torch.equal(out, x * 2)
    # first call: the JIT launch, then a checked direct launch; later calls: direct only
    assert [entry[0] for entry in kernel.log] == ["jit", "direct", "direct", "direct"]
    launcher(4, 2, (x, torch.empty(8), 16, 1.5, 4))  # another int specialization: JIT again
    assert kernel.log[-2][0] == "jit"
    assert len(launcher.compiled) == 2


def test_direct_launch_mismatch_raises():
    launcher = DirectLauncher(_Kernel(bad=True), out_index=1, device_type="cpu")
    with pytest.raises(RuntimeError, match="disagrees"):
        launcher(4, 2, (torch.randn(8), torch.empty(8), 7, 1.5, 4))


def test_other_devices_use_the_jit():
    kernel = _Kernel()
    launcher = DirectLauncher(kernel, out_index=1, device_type="cuda")
    launcher(4, 2, (torch.randn(8), torch.empty(8), 7, 1.5, 4))
    launcher(4, 2, (torch.randn(8), torch.empty(8), 7, 1.5, 4))
    assert [entry[0] for entry in kernel.log] == ["jit", "jit"]


def test_launch_hooks_force_the_jit():
    """A profiler's launch hook must see every launch: then every call goes through the JIT."""
    kernel = _Kernel()
    launcher = DirectLauncher(kernel, out_index=1, device_type="cpu")

    def hook(metadata):
        return None

    _knobs.runtime.launch_enter_hook.add(hook)
    try:
        for _ in range(2):
            launcher(4, 2, (torch.randn(8), torch.empty(8), 7, 1.5, 4))
    finally:
        _knobs.runtime.launch_enter_hook.remove(hook)
    assert [entry[0] for entry in kernel.log] == ["jit", "jit"]
