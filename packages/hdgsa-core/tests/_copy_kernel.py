"""A minimal Triton kernel body for the launch-check test (imported only where Triton is)."""

import triton.language as tl


def copy_kernel(x, y, n, BLOCK: tl.constexpr):
    offsets = tl.arange(0, BLOCK)
    tl.store(y + offsets, tl.load(x + offsets, mask=offsets < n), mask=offsets < n)
