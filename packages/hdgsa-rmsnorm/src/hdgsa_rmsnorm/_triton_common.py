"""What the forward and backward launchers share: row layouts, tile and grid choices, the
device guard.

Imports Triton only for its option list (to know whether cooperative launches exist).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from hdgsa_core import interpreter_enabled
from hdgsa_core.triton_utils import next_power_of_2

# Rows up to this many elements are held whole in one program's registers (one pass, any
# number of rows per program). Longer rows are split over several programs (see below). The
# backward holds five row-sized blocks (dy, h, dh, weight, the dweight sum), so it splits
# sooner, keeping 16 float32 values per thread and block at 16 warps.
MAX_FUSED_N = 16384
BWD_MAX_FUSED_N = 8192

# Split rows: columns per program, warps, and programs kept resident per SM (a register cap of
# 65536 / (threads * programs) per thread guarantees residency, which the one-pass split kernels
# rely on: the programs of a row wait for each other's partial sums). The forward holds 64
# float32 values per thread and block (8192 columns, 4 warps, 2 programs per SM); the backward,
# with five blocks per chunk, 32 (8192 columns, 8 warps, 1 per SM; 2 per SM spills).
# Measured on an H100, bf16 (a sweep of these constants, 2026-11-27, fence-free exchange): forward
# 0.736 ms at [4096 x 65536] and 0.741 at [1024 x 262144] with 8192/4/2 (16384/8/1: 0.734 / 0.739;
# 4096/2/4: 0.742 / 0.761; 8192/2/2 and 16384/4/1 spill: 1.19-1.25); backward 0.835 / 0.967 with
# 8192/8/1 (4096/4/2: 0.816 / 1.109; 2048/2/4: 0.846 / 1.125; 8192/16/1: 0.943 / 1.207). The
# forward's 16384/8/1 is within 0.3% of 8192/4/2 (noise between runs): the default stays.
SPLIT_BLOCK_N = 8192
SPLIT_NUM_WARPS = 4
SPLIT_PROGRAMS_PER_SM = 2
BWD_SPLIT_BLOCK_N = 8192
BWD_SPLIT_NUM_WARPS = 8
BWD_SPLIT_PROGRAMS_PER_SM = 1

# A program spins at most this many times in all waiting for the partial sums of the other
# programs of its rows (about a second); past that its rows come out NaN rather than hang.
# Unreachable while the partner programs are resident (README, "Split rows: the wait"): a
# program cannot spin for longer than the kernel runs, at most tens of ms on a full GPU.
MAX_SPINS = 1 << 20

_REGISTERS_PER_SM = 65536


@dataclass(frozen=True)
class RowLayout:
    """Where row ``r`` of a ``[..., N]`` tensor seen as ``[M, N]`` starts:
    ``(r // inner) * stride_outer + (r % inner) * stride_inner`` elements from ``tensor``'s
    data pointer; columns are contiguous. Two row strides cover any 2-level leading layout
    (e.g. a transposed ``[T, B, N]`` view) without a copy."""

    tensor: torch.Tensor
    inner: int
    stride_outer: int
    stride_inner: int

    def kernel_args(self, prefix: str) -> dict[str, int]:
        """The kernels' ``<prefix>_inner``, ``<prefix>_stride_outer``, ``<prefix>_stride_inner``."""
        return {
            f"{prefix}_inner": self.inner,
            f"{prefix}_stride_outer": self.stride_outer,
            f"{prefix}_stride_inner": self.stride_inner,
        }


def row_layout(tensor: torch.Tensor) -> RowLayout:
    """The tensor's rows as they are in memory; copies only when the kernels cannot read the
    layout (``stride(-1) != 1``, or leading dims that need more than two row strides)."""
    hidden = tensor.shape[-1]
    if hidden > 1 and tensor.stride(-1) != 1:
        tensor = tensor.contiguous()
    # Merge leading dims (innermost first) where stride[i] == stride[i+1] * size[i+1].
    groups: list[list[int]] = []  # [size, stride], innermost first
    for size, stride in zip(reversed(tensor.shape[:-1]), reversed(tensor.stride()[:-1]), strict=True):
        if size == 1:
            continue
        if groups and stride == groups[-1][0] * groups[-1][1]:
            groups[-1][0] *= size
        else:
            groups.append([size, stride])
    if len(groups) > 2:
        tensor = tensor.contiguous()
        groups = [[math.prod(tensor.shape[:-1]), hidden]]
    rows = max(1, math.prod(tensor.shape[:-1]))
    if not groups:
        return RowLayout(tensor, rows, 0, hidden)
    if len(groups) == 1:
        return RowLayout(tensor, rows, 0, groups[0][1])
    (inner_size, inner_stride), (_, outer_stride) = groups
    return RowLayout(tensor, inner_size, outer_stride, inner_stride)


def unit_stride(vector: torch.Tensor) -> torch.Tensor:
    """``vector`` (e.g. the ``[N]`` weight) with ``stride(-1) == 1``, as the kernels index it;
    copied only when it is not (a strided slice, or an ``expand``-ed scalar)."""
    if vector.shape[-1] > 1 and vector.stride(-1) != 1:
        return vector.contiguous()
    return vector


def contiguous_layout(tensor: torch.Tensor) -> RowLayout:
    """Layout of a tensor this package allocated (rows packed, stride N)."""
    rows = max(1, tensor.numel() // max(1, tensor.shape[-1]))
    return RowLayout(tensor, rows, 0, tensor.shape[-1])


@functools.lru_cache(maxsize=16)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def sm_count(device: torch.device) -> int:
    """Multiprocessors of ``device``; a small stand-in (4) for the CPU interpreter, so the
    persistent loops still run several iterations in tests."""
    if device.type != "cuda":
        return 4
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


@dataclass(frozen=True)
class RowTile:
    """A ``[BLOCK_M, BLOCK_N]`` tile of whole rows and the warps that handle it."""

    block_m: int
    block_n: int
    num_warps: int


def row_tile(n_cols: int, n_rows: int, elems_per_thread: int = 16, tile_elems: int = 4096) -> RowTile:
    """Whole rows per program: at least ``tile_elems`` elements per tile (several short rows per
    program), about ``elems_per_thread`` per thread (two 16-byte loads of bf16 per tensor)."""
    block_n = next_power_of_2(n_cols)
    block_m = max(1, min(256, tile_elems // block_n, next_power_of_2(n_rows)))
    num_warps = max(1, min(16, block_m * block_n // (32 * elems_per_thread)))
    return RowTile(block_m, block_n, num_warps)


@dataclass(frozen=True)
class BwdRowTile:
    """Tile of the persistent backward: rows per tile, warps, resident programs per SM, and
    whether the next tile's loads are issued before the current tile's math."""

    block_m: int
    block_n: int
    num_warps: int
    programs_per_sm: int
    prefetch: bool


def bwd_row_tile(n_cols: int, n_rows: int) -> BwdRowTile:
    """Backward tiles of 4096 elements (rows up to 2048) or 8192 (longer rows) at 16 elements
    per thread, 16 warps per SM. Measured on an H100 (bf16, 2048-8192 columns): prefetching
    pays when a tile holds several rows, and costs (registers) when it holds one."""
    block_n = next_power_of_2(n_cols)
    tile_elems = 4096 if block_n <= 2048 else 8192
    block_m = max(1, min(256, tile_elems // block_n, next_power_of_2(n_rows)))
    num_warps = max(1, min(16, block_m * block_n // (32 * 16)))
    return BwdRowTile(block_m, block_n, num_warps, max(1, 16 // num_warps), block_m > 1)


@functools.lru_cache(maxsize=1)
def cooperative_launch_supported() -> bool:
    """Whether this Triton can launch a grid cooperatively on an NVIDIA GPU (all programs
    resident at once, or a launch error instead of a hang): Triton 3.3 and later."""
    if torch.version.hip is not None:  # ROCm builds: NVIDIA launch options do not apply
        return False
    try:
        from triton.backends.nvidia.compiler import CUDAOptions
    except ImportError:  # pragma: no cover - non-NVIDIA Triton builds
        return False
    return "launch_cooperative_grid" in getattr(CUDAOptions, "__dataclass_fields__", {})


def resident_launch_options(device: torch.device, num_warps: int, programs_per_sm: int) -> dict[str, object]:
    """A register cap that lets ``programs_per_sm`` programs of ``num_warps`` warps be resident
    on one SM at once (persistent grids are sized to that). NVIDIA only: Triton's ROCm
    backend rejects ``maxnreg``."""
    if device.type != "cuda" or torch.version.hip is not None:
        return {}
    cap = _REGISTERS_PER_SM // (num_warps * 32 * programs_per_sm) // 8 * 8
    return {"maxnreg": max(24, min(255, cap))}


def split_launch_options(device: torch.device, num_warps: int, programs_per_sm: int) -> dict[str, object]:
    """Launch options of a one-pass split kernel: the register cap of
    :func:`resident_launch_options`, and a cooperative launch where Triton has one (all
    programs resident at once, or a launch error instead of a hang)."""
    options = resident_launch_options(device, num_warps, programs_per_sm)
    if options and cooperative_launch_supported():
        options["launch_cooperative_grid"] = True
    return options


def use_one_pass_split(device: torch.device, n_chunks: int, programs_per_sm: int) -> bool:
    """One-pass split rows need every program of a row resident at once: on a GPU with room
    for them, launched cooperatively so that CUDA guarantees it (or fails the launch). Without
    a cooperative launch (Triton before 3.3) residency is only likely: another kernel on the
    GPU (another stream, another MPS client) can hold SMs, and the waiting programs would time
    out into NaN; so those Triton versions take two passes. So does the CPU interpreter, which
    runs programs one after another."""
    if device.type != "cuda" or interpreter_enabled() or not cooperative_launch_supported():
        return False
    return n_chunks <= sm_count(device) * programs_per_sm
