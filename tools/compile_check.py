"""Compile every Triton kernel for an H100 (sm_90) on a machine without a GPU.

Runs the ops on CPU tensors with a stand-in for Triton's CUDA driver: each launch compiles its
kernel for ``cuda:90`` (Triton's own compiler and its bundled ``ptxas``) and then does nothing,
so the kernels' outputs are never computed and only the compilation is checked. Autotuned
kernels compile every config. What it catches before a GPU run: compile errors on the GPU's
code paths (the interpreter runs other branches: ``tl.sort``, inline assembly, vector stores),
shared memory over the H100's 227 KiB, more threads than the registers allow, and register
local memory (a stack frame: spilled registers or run-time indexed arrays). The table lists each
compiled kernel with its registers, stack-frame bytes and shared memory; the exit code is 1 when
a case failed (and with ``--fail-on-stack``, when a kernel has a stack frame).

    python tools/compile_check.py                 # every package
    python tools/compile_check.py indexer -v      # one package, with the kernel table

Host code that reads a kernel's output (a plan's sizes, a fallback flag) sees zeros: the cases
force each path by calling the package's private entry points where the public op would choose.
Registers and stack frames come from ``cuobjdump -res-usage`` on the compiled binary; the Triton
version that compiles is this environment's, which may differ from the GPU machine's.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from unittest.mock import patch

# Before the packages import Triton: compiled kernels, never the interpreter; every launch
# through Triton (the cached launcher reads the CUDA device, which there is none of).
os.environ.pop("TRITON_INTERPRET", None)
os.environ["HDGSA_CACHED_LAUNCH"] = "0"

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler.errors import CompileTimeAssertionFailure
from triton.runtime import driver as triton_driver
from triton.runtime.autotuner import Autotuner
from triton.runtime.errors import OutOfResources, PTXASError

from hdgsa_core.testing import make_tensor

H100 = {
    "max_shared_mem": 232448,  # 227 KiB opt-in per block
    "multiprocessor_count": 132,
    "max_num_regs": 65536,
    "warpSize": 32,
    "sm_clock_rate": 1980000,
    "mem_clock_rate": 2619000,
    "mem_bus_width": 5120,
}
REGISTER_FILE = 65536  # per multiprocessor (and per block)
_SKIPPED_BY_AUTOTUNER = (OutOfResources, CompileTimeAssertionFailure, PTXASError)


@dataclass
class CompiledKernel:
    """One compiled specialization: what the report lists."""

    name: str
    constants: dict
    num_warps: int
    num_stages: int
    shared: int
    registers: int = -1
    stack_bytes: int = -1

    @property
    def max_threads(self) -> int:
        # Registers are allocated per warp in units of 256.
        per_warp = -(-max(self.registers, 1) * 32 // 256) * 256
        return min(1024, REGISTER_FILE // per_warp * 32)


@dataclass
class Report:
    kernels: list[CompiledKernel] = field(default_factory=list)
    failures: list[tuple[str, str]] = field(default_factory=list)
    skipped_configs: set[tuple[str, str, str]] = field(default_factory=set)
    cases: int = 0
    dump_dir: Path | None = None


REPORT = Report()


def _resource_usage(cubin: bytes) -> tuple[int, int]:
    """(registers per thread, stack-frame bytes per thread) of a cubin's one kernel. A stack frame
    is local memory: spilled registers, or arrays the kernel indexes at run time."""
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as handle:
        handle.write(cubin)
        handle.flush()
        text = subprocess.run(
            [str(tool), "-res-usage", handle.name], capture_output=True, text=True, check=True
        ).stdout
    registers = re.search(r"REG:(\d+)", text)
    frame = max((int(n) for n in re.findall(r"(?:STACK|LOCAL):(\d+)", text)), default=-1)
    return int(registers.group(1)) if registers else -1, frame


class _Utils:
    def get_device_properties(self, device: int) -> dict:
        return dict(H100)

    def load_binary(self, name: str, cubin: bytes, shared: int, device: int):
        record = REPORT.kernels[-1]
        record.registers, record.stack_bytes = _resource_usage(cubin)
        if REPORT.dump_dir is not None:
            path = REPORT.dump_dir / f"{name}-{len(REPORT.kernels)}.cubin"
            path.write_bytes(cubin)
            record.constants["cubin"] = path.name
        # A module that is not None: Triton loads each compiled kernel once.
        return name, 0, record.registers, max(record.stack_bytes, 0) // 4, record.max_threads


class _Launcher:
    """Records the compiled kernel; launching it does nothing."""

    def __init__(self, src, metadata) -> None:
        fn = getattr(src, "fn", None)
        names = getattr(fn, "arg_names", [])
        constants = {}
        for path, value in getattr(src, "constants", {}).items():
            index = path[0] if isinstance(path, tuple) else path
            if isinstance(index, int) and index < len(names):
                constants[names[index]] = value
        for path in getattr(src, "attrs", {}):  # ints and pointers specialized by alignment
            index = path[0] if isinstance(path, tuple) else path
            if isinstance(index, int) and index < len(names):
                constants.setdefault(names[index], "%16")
        REPORT.kernels.append(
            CompiledKernel(
                name=getattr(fn, "__name__", "?"),
                constants=constants,
                num_warps=metadata.num_warps,
                num_stages=getattr(metadata, "num_stages", 0),
                shared=metadata.shared,
            )
        )

    def __call__(self, *args, **kwargs) -> None:
        return None


class _H100Driver:
    """Enough of Triton's CUDA driver to compile for sm_90 and 'launch' without a device."""

    def __init__(self) -> None:
        self.utils = _Utils()
        self.launcher_cls = _Launcher

    def is_active(self) -> bool:
        return True

    def get_current_target(self) -> GPUTarget:
        return GPUTarget("cuda", 90, 32)

    def get_current_device(self) -> int:
        return 0

    def set_current_device(self, device: int) -> None:
        pass

    def get_current_stream(self, device: int | None = None) -> int:
        return 0

    def get_device_capability(self, device: int = 0) -> tuple[int, int]:
        return 9, 0

    def get_active_torch_device(self) -> torch.device:
        return torch.device("cpu")

    def map_python_to_cpp_type(self, ty: str) -> str:  # pragma: no cover - launcher codegen only
        raise NotImplementedError


def _autotuner_run(self: Autotuner, *args, **kwargs):
    """Compile (and 'launch') every config that the autotuner would time. As Triton's autotuner
    does, a config that does not fit (or fails in ptxas) is left out, and the call fails only
    when none is left; with one config, its failure is the call's."""
    self.nargs = dict(zip(self.arg_names, args, strict=False))
    configs = self.prune_configs(kwargs) if len(self.configs) > 1 else self.configs
    result, ran = None, False
    for config in configs:
        try:
            result = self.fn.run(*args, **kwargs, **config.all_kwargs())
            ran = True
        except _SKIPPED_BY_AUTOTUNER as error:
            if len(configs) == 1:
                raise
            REPORT.skipped_configs.add((self.base_fn.__name__, str(config), _summary(error)))
    self.nargs = None
    if not ran:
        raise RuntimeError(f"{self.base_fn.__name__}: no autotune config compiles or fits")
    return result


def install() -> None:
    """Swap in the H100 stand-in driver, and let the Triton backends take CPU tensors."""
    triton_driver.set_active(_H100Driver())
    Autotuner.run = _autotuner_run
    import hdgsa_core.backend

    hdgsa_core.backend.interpreter_enabled = lambda: True  # only the "can Triton run here" check


# ----------------------------------------------------------------------------- cases


def _randn(*shape: int, dtype: torch.dtype = torch.bfloat16, grad: bool = True) -> torch.Tensor:
    return make_tensor(*shape, dtype=dtype, requires_grad=grad)


@contextmanager
def _deterministic(enabled: bool) -> Iterator[None]:
    """``torch.use_deterministic_algorithms(enabled)`` inside the block (picks the backward)."""
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(enabled)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous)


def _backward(*outputs: torch.Tensor) -> None:
    tensors = [t for t in outputs if t.requires_grad]
    torch.autograd.backward(tensors, [torch.ones_like(t) for t in tensors])


def rmsnorm_cases() -> Iterator[tuple[str, Callable[[], None]]]:
    from hdgsa_rmsnorm import rms_norm

    for dtype in (torch.bfloat16, torch.float32):
        for hidden in (128, 4096, 8192 + 3):

            def run(hidden=hidden, dtype=dtype) -> None:
                x = _randn(64, hidden, dtype=dtype)
                weight = _randn(hidden, dtype=dtype)
                _backward(rms_norm(x, weight, backend="triton"))

            yield f"rms_norm N{hidden} {dtype}", run


def sinkhorn_cases() -> Iterator[tuple[str, Callable[[], None]]]:
    from hdgsa_sinkhorn import sinkhorn_knopp

    for n in (4, 8, 16):
        for dtype in (torch.float32, torch.bfloat16):

            def run(n=n, dtype=dtype) -> None:
                logits = _randn(4096, n, n, dtype=dtype)
                _backward(sinkhorn_knopp(logits, backend="triton"))

            yield f"sinkhorn n{n} {dtype}", run


def deltanet_fla_cases() -> Iterator[tuple[str, Callable[[], None]]]:
    """The two kernels around fla's gated delta rule (fla itself is not compiled here)."""
    from hdgsa_deltanet_fla._triton import d_skip, log_decay

    for dtype in (torch.bfloat16, torch.float32):

        def run(dtype=dtype) -> None:
            alpha = torch.rand(2, 1024, 8, dtype=dtype).add_(0.01).requires_grad_()
            o = _randn(2, 1024, 8, 128, dtype=torch.float32)
            v = _randn(2, 1024, 8, 128, dtype=dtype)
            skip = _randn(8, dtype=torch.float32)
            _backward(log_decay(alpha), d_skip(o, v, skip, dtype))

        yield f"log_decay and d_skip {dtype}", run


def _indexer_inputs(batch, seq, heads, dim, dtype, grad=True, num_keys=None):
    q = _randn(batch, seq, heads, dim, dtype=dtype, grad=grad)
    k = _randn(batch, num_keys or seq, dim, dtype=dtype, grad=grad)
    w = _randn(batch, seq, heads, dtype=dtype, grad=grad)
    bias = _randn(heads, dtype=dtype, grad=grad)
    return q, k, w, bias


def indexer_cases() -> Iterator[tuple[str, Callable[[], None]]]:
    from hdgsa_indexer import _triton_topk, gated_indexer, indexer_scores_at

    shapes = [(1, 8192, 4, 64), (1, 4096, 16, 128), (2, 1000, 8, 32), (1, 300, 1, 16)]
    for batch, seq, heads, dim in shapes:
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            for causal in (True, False):

                def run(batch=batch, seq=seq, heads=heads, dim=dim, dtype=dtype, causal=causal):
                    q, k, w, bias = _indexer_inputs(batch, seq, heads, dim, dtype)
                    _backward(gated_indexer(q, k, w, bias, 0.125, causal, backend="triton"))

                yield f"gated_indexer B{batch} T{seq} H{heads} d{dim} {dtype} causal={causal}", run

    for seq, topk in ((8192, 512), (32768, 2048), (1000, 100)):
        for dtype in (torch.bfloat16, torch.float32):
            for split in (False, True):
                for stats in (False, True):

                    def run(seq=seq, topk=topk, dtype=dtype, split=split, stats=stats):
                        q, k, w, bias = _indexer_inputs(1, seq, 4, 64, dtype, grad=False)
                        _triton_topk.indexer_topk_fwd(
                            q, k, w, bias, topk, 0.125, True, 0, 16, stats, split=split
                        )

                    yield f"indexer_topk T{seq} k{topk} {dtype} split={split} stats={stats}", run

    # The largest topk the Triton path takes (MAX_KEEP): it must still fit; compiles for minutes.
    def run_largest() -> None:
        q, k, w, bias = _indexer_inputs(1, 2 * _triton_topk.MAX_KEEP, 4, 64, torch.bfloat16, grad=False)
        _triton_topk.indexer_topk_fwd(q, k, w, bias, _triton_topk.MAX_KEEP, 0.125, True, 0, 16, True)

    yield f"indexer_topk k{_triton_topk.MAX_KEEP} (MAX_KEEP) torch.bfloat16 stats=True", run_largest

    for seq, slots, heads, dim in ((16384, 2048, 4, 64), (1000, 77, 8, 128), (64, 5, 16, 16)):
        for dtype in (torch.bfloat16, torch.float32):
            for deterministic in (False, True):

                def run(seq=seq, slots=slots, heads=heads, dim=dim, dtype=dtype, det=deterministic):
                    q, k, w, bias = _indexer_inputs(1, seq, heads, dim, dtype)
                    indices = torch.randint(0, seq, (1, seq, slots))
                    with _deterministic(det):
                        _backward(indexer_scores_at(q, k, w, bias, indices, 0.125, backend="triton"))

                yield (
                    f"indexer_scores_at T{seq} K{slots} H{heads} d{dim} {dtype} "
                    f"deterministic={deterministic}",
                    run,
                )


def sparse_attn_cases() -> Iterator[tuple[str, Callable[[], None]]]:
    from hdgsa_sparse_attn import _triton as sparse_triton
    from hdgsa_sparse_attn import sparse_attention

    # (name, T, Hq, Hkv, Hi, D, Dv, K)
    shapes = [
        ("per-head", 8192, 16, 16, 16, 128, 128, 512),
        ("per-head GQA", 4096, 16, 2, 16, 128, 128, 512),
        ("per-group", 8192, 16, 2, 2, 128, 128, 512),
        ("shared", 4096, 16, 2, 1, 128, 128, 512),
        ("model", 4096, 16, 16, 16, 256, 256, 1024),
        ("model per-group", 4096, 16, 4, 4, 256, 256, 1024),
        ("odd", 333, 8, 2, 2, 64, 32, 77),
        ("small", 100, 4, 4, 4, 32, 64, 13),
    ]
    for name, seq, hq, hkv, hi, dim, dim_v, slots in shapes:
        for dtype in (torch.bfloat16, torch.float32):
            for path in ("per-query", "block"):
                for deterministic in (False, True):

                    def run(
                        seq=seq,
                        hq=hq,
                        hkv=hkv,
                        hi=hi,
                        dim=dim,
                        dim_v=dim_v,
                        slots=slots,
                        dtype=dtype,
                        path=path,
                        det=deterministic,
                    ):
                        q = _randn(1, seq, hq, dim, dtype=dtype)
                        k = _randn(1, seq, hkv, dim, dtype=dtype)
                        v = _randn(1, seq, hkv, dim_v, dtype=dtype)
                        indices = torch.randint(-1, seq, (1, hi, seq, slots), dtype=torch.int32)

                        def forced(*args):  # the path's rule reads kernel output: choose here
                            return ("per-query", None) if path == "per-query" else _forced_block_plan(*args)

                        with patch.object(sparse_triton, "choose_triton_path", forced), _deterministic(det):
                            out = sparse_attention(q, k, v, indices, validate=False, backend="triton")
                            _backward(out)

                    yield (
                        f"sparse_attention {name} T{seq} Hq{hq} Hkv{hkv} Hi{hi} D{dim} Dv{dim_v} "
                        f"K{slots} {dtype} {path} deterministic={deterministic}",
                        run,
                    )


def _forced_block_plan(q, k, v, indices, mask, needs_grad):
    """``("block", plan)`` with the plan's sizes those of a GPU run, or ``("per-query", None)``
    where the block path cannot run (per-head lists with GQA, small inputs, tiles over the
    shared memory)."""
    from hdgsa_sparse_attn._block_plan import (
        BlockTiles,
        _mark,
        _structural_path,
        block_q_for,
        build_block_plan,
    )

    tiles = BlockTiles.of(q, v)
    if _structural_path(indices, k.shape[2], q.shape[2], tiles, needs_grad) == "per-query":
        return "per-query", None
    block_q = block_q_for(q.shape[2], k.shape[2])
    _mark(indices, mask, k.shape[1], block_q)  # compiled; its no-op launch leaves empty bitmaps
    marked = _block_marks(indices, mask, k.shape[1], block_q)
    return "block", build_block_plan(indices, mask, k.shape[1], block_q, _marked=marked)


def _block_marks(indices: torch.Tensor, mask: torch.Tensor | None, num_keys: int, block_q: int):
    """What the plan's marking pass computes, by PyTorch: ``(bits, word_base, union_size,
    valid_slots)``, so that the plan's sizes are those of a GPU run."""
    batch, num_lists, seq_len, _ = indices.shape
    num_blocks = -(-seq_len // block_q)
    num_words = max(1, -(-num_keys // 32))
    valid = (indices >= 0) & (indices < num_keys)
    if mask is not None:
        valid &= mask
    block_of = torch.arange(seq_len) // block_q
    marked = torch.zeros(batch, num_lists, num_blocks, num_words * 32, dtype=torch.bool)
    b, i, t, s = valid.nonzero(as_tuple=True)
    marked[b, i, block_of[t], indices[b, i, t, s].long()] = True
    weights = 2 ** torch.arange(32, dtype=torch.int64)
    words = (marked.view(batch, num_lists, num_blocks, num_words, 32).long() * weights).sum(-1)
    bits = (words - (words >= 2**31).long() * 2**32).to(torch.int32)
    popcount = marked.view(batch, num_lists, num_blocks, num_words, 32).sum(-1, dtype=torch.int32)
    ends = torch.cumsum(popcount, -1, dtype=torch.int32)
    valid_slots = torch.zeros(batch, num_lists, num_blocks, dtype=torch.int32)
    valid_slots.index_put_((b, i, block_of[t]), torch.ones_like(b, dtype=torch.int32), accumulate=True)
    return bits, ends - popcount, ends[..., -1].contiguous(), valid_slots


# --quick (CI): each kernel in 16-bit and float32, each path and backward mode once.
QUICK_CASES = (
    r"rms_norm N4096 ",
    r"sinkhorn n4 ",
    r"log_decay and d_skip ",
    r"gated_indexer B1 T8192 H4 d64 torch.bfloat16 causal=True",
    r"gated_indexer B2 T1000 H8 d32 torch.float(16|32) causal=False",
    r"indexer_topk T8192 k512 torch.bfloat16 .*stats=True",
    r"indexer_topk T1000 k100 torch.float32 split=True stats=False",
    r"indexer_scores_at T16384 K2048 H4 d64 torch.bfloat16",
    r"indexer_scores_at T1000 K77 H8 d128 torch.float32 deterministic=True",
    r"sparse_attention per-group .*torch.bfloat16 block",
    r"sparse_attention per-head T8192 .*torch.bfloat16 per-query",
    r"sparse_attention model T4096 .*torch.bfloat16 per-query deterministic=False",
    r"sparse_attention odd .*torch.float32 per-query deterministic=True",
)

PACKAGES = {
    "rmsnorm": rmsnorm_cases,
    "sinkhorn": sinkhorn_cases,
    "deltanet-fla": deltanet_fla_cases,
    "indexer": indexer_cases,
    "sparse-attn": sparse_attn_cases,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "packages",
        nargs="*",
        help=f"{', '.join(PACKAGES)} (or hdgsa-<name>; other members have no Triton kernels "
        "of their own and are skipped); default: all",
    )
    parser.add_argument("-k", dest="filter", default="", help="only cases whose name contains this")
    parser.add_argument("-v", "--verbose", action="store_true", help="print every compiled kernel")
    parser.add_argument(
        "--fail-on-stack",
        action="store_true",
        help="exit 1 when a kernel has a stack frame (local memory: spills or indexed arrays)",
    )
    parser.add_argument("--quick", action="store_true", help="the CI subset (QUICK_CASES)")
    parser.add_argument(
        "--dump-dir", type=Path, help="write each compiled kernel's cubin here (nvdisasm, cuobjdump -sass)"
    )
    args = parser.parse_args(argv)
    packages = [name.removeprefix("hdgsa-") for name in args.packages] or list(PACKAGES)
    if not any(name in PACKAGES for name in packages):
        print(f"no Triton kernels to compile in {', '.join(args.packages)}")
        return 0
    if args.dump_dir is not None:
        args.dump_dir.mkdir(parents=True, exist_ok=True)
        REPORT.dump_dir = args.dump_dir
    install()
    torch.manual_seed(0)
    started = time.perf_counter()
    for package in packages:
        for name, case in PACKAGES.get(package, tuple)():
            if args.filter not in name:
                continue
            if args.quick and not any(re.search(pattern, name) for pattern in QUICK_CASES):
                continue
            REPORT.cases += 1
            first = len(REPORT.kernels)
            try:
                case()
            except Exception as error:
                detail = _summary(error)
                REPORT.failures.append((name, detail))
                print(f"FAIL {name}: {detail}", flush=True)
                if args.verbose:
                    traceback.print_exc()
            else:
                print(f"ok   {name} ({len(REPORT.kernels) - first} new kernels)", flush=True)
    _print_table(args.verbose)
    stacks = [k for k in REPORT.kernels if k.stack_bytes > 0]
    print(
        f"\n{REPORT.cases} cases, {len(REPORT.kernels)} kernels compiled for sm_90 with Triton "
        f"{triton.__version__} in {time.perf_counter() - started:.0f} s; "
        f"{len(REPORT.failures)} failed, {len(stacks)} kernels with a stack frame (local memory)"
    )
    for name, config, detail in sorted(REPORT.skipped_configs):
        print(f"  config left out by the autotuner: {name} {config}: {detail}")
    for name, detail in REPORT.failures:
        print(f"  FAILED {name}: {detail}")
    return 1 if REPORT.failures or (args.fail_on_stack and stacks) else 0


def _summary(error: Exception) -> str:
    """The exception's type and its message's last informative line (Triton's compile errors
    end with a source excerpt and a caret)."""
    where = ""
    while error.__cause__ is not None:  # Triton wraps the compiler's error: report the root
        where = where or str(error).strip().splitlines()[0]
        error = error.__cause__
    lines = [line.strip() for line in str(error).splitlines() if line.strip().strip("^")]
    message = f"{type(error).__name__}: {lines[-1] if lines else ''}"
    return (f"{message} ({where})" if where else message)[:400]


def _print_table(verbose: bool) -> None:
    rows: dict[tuple, list[CompiledKernel]] = {}
    for kernel in REPORT.kernels:
        rows.setdefault((kernel.name,), []).append(kernel)
    print(f"\n{'kernel':48} {'variants':>8} {'regs max':>8} {'stack B max':>11} {'smem KiB max':>12}")
    for (name,), kernels in sorted(rows.items()):
        print(
            f"{name:48} {len(kernels):8d} {max(k.registers for k in kernels):8d} "
            f"{max(k.stack_bytes for k in kernels):11d} {max(k.shared for k in kernels) / 1024:12.1f}"
        )
        if verbose:
            for k in kernels:
                consts = " ".join(f"{n}={v}" for n, v in k.constants.items())
                print(
                    f"    warps={k.num_warps} stages={k.num_stages} regs={k.registers} "
                    f"stack={k.stack_bytes} smem={k.shared} {consts}"
                )


if __name__ == "__main__":
    sys.exit(main())
