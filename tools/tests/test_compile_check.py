"""tools/compile_check.py: kernels compiled for sm_90 without a GPU, resources read back, and a
kernel over the H100's shared memory reported as a failure (subprocesses: the check must run
outside the Triton interpreter that the other tests use)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("triton")

TOOL = Path(__file__).resolve().parent.parent / "compile_check.py"


def _run(args: list[str]) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, env=env, timeout=600, check=False
    )


def test_compiles_a_kernel_for_sm90_and_reads_its_registers():
    result = _run([str(TOOL), "sinkhorn", "-k", "n4 torch.float32", "-v"])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 cases" in result.stdout
    assert "0 failed" in result.stdout
    registers = [int(r) for r in re.findall(r"regs=(\d+)", result.stdout)]
    assert len(registers) == 2, result.stdout  # the forward and backward kernels
    assert all(0 < r <= 255 for r in registers), result.stdout


def test_a_kernel_over_the_shared_memory_limit_fails(tmp_path):
    script = tmp_path / "big_tiles.py"  # Triton reads a kernel's source from its file
    script.write_text(
        textwrap.dedent(
            f"""
        import sys
        sys.path.insert(0, {str(TOOL.parent)!r})
        import compile_check
        compile_check.install()
        import torch, triton, triton.language as tl
        from triton.runtime.errors import OutOfResources

        @triton.jit
        def big_tiles(a, b, c, K, BLOCK: tl.constexpr):
            o = tl.arange(0, BLOCK)
            acc = tl.zeros([BLOCK, BLOCK], dtype=tl.float32)
            for k0 in range(0, K, BLOCK):
                x = tl.load(a + o[:, None] * K + k0 + o[None, :])
                y = tl.load(b + (k0 + o[:, None]) * BLOCK + o[None, :])
                acc += tl.dot(x, y)
            tl.store(c + o[:, None] * BLOCK + o[None, :], acc)

        a = torch.randn(256, 1024)
        b = torch.randn(1024, 256)
        c = torch.empty(256, 256)
        try:
            big_tiles[(1,)](a, b, c, 1024, BLOCK=256, num_stages=4)
        except OutOfResources as error:
            print("out of resources:", error)
        else:
            print("launched", compile_check.REPORT.kernels)
        """
        )
    )
    result = _run([str(script)])
    assert "out of resources: out of resource: shared memory" in result.stdout, result.stdout + result.stderr
