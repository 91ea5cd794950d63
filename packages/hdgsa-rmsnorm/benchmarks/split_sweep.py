"""Split-row tile sweep at the long-row shapes on a GPU (dev script, not shipped).

    python3 packages/hdgsa-rmsnorm/benchmarks/split_sweep.py

Forward (residual, prenorm, bf16) and backward (dy, dh, saved h; dw) launchers alone, with
``config`` overrides of the split path's columns per program, warps and programs per SM; each
do_bench median against the copy bandwidth measured here. The current defaults come first.
"""

from __future__ import annotations

import torch
from triton.testing import do_bench

from hdgsa_rmsnorm._triton_bwd import rms_norm_bwd
from hdgsa_rmsnorm._triton_common import row_layout
from hdgsa_rmsnorm._triton_fwd import rms_norm_fwd

SHAPES = [(4096, 65536), (1024, 262144)]
FWD = [(8192, 4, 2), (4096, 2, 4), (16384, 8, 1), (8192, 2, 2), (16384, 4, 1)]
BWD = [(8192, 8, 1), (4096, 4, 2), (2048, 2, 4), (4096, 2, 2), (2048, 4, 2), (8192, 16, 1)]


def ms(fn) -> float:
    return do_bench(fn, warmup=5, rep=40, return_mode="median")


def copy_gbps() -> float:
    source = torch.randn(2**29, device="cuda", dtype=torch.bfloat16)
    target = torch.empty_like(source)
    return 2 * source.numel() * 2 / (ms(lambda: target.copy_(source)) * 1e-3) / 1e9


def sweep(rows: int, cols: int, gbps: float) -> None:
    x, r, w = (torch.randn(rows, cols, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    w = w[0].contiguous()
    dy, dh = torch.randn_like(x), torch.randn_like(x)
    roof_ms = 8 * x.numel() / (gbps * 1e9) * 1e3
    _, h, rstd = rms_norm_fwd(x, w, r, 1e-6, False, True, True)
    expected = {  # the default configs' outputs: every swept config must agree bitwise-close
        "fwd": rms_norm_fwd(x, w, r, 1e-6, False, True, False)[0],
        "bwd": rms_norm_bwd(dy, dh, row_layout(h), None, rstd, w, x.dtype, None, True)[0],
    }
    runs = {
        "fwd": (FWD, lambda c: rms_norm_fwd(x, w, r, 1e-6, False, True, False, config=c)),
        "bwd": (
            BWD,
            lambda c: rms_norm_bwd(dy, dh, row_layout(h), None, rstd, w, x.dtype, None, True, config=c),
        ),
    }
    for name, (configs, launch) in runs.items():
        for block_n, warps, per_sm in configs:
            config = dict(split_block_n=block_n, split_num_warps=warps, split_programs_per_sm=per_sm)
            label = f"{name} {rows}x{cols} {block_n}/{warps}/{per_sm}"
            try:
                t = ms(lambda c=config, run=launch: run(c))
                got = launch(config)[0]
                error = (got.float() - expected[name].float()).abs().max().item()
                print(
                    f"{label}: {t:.4f} ms, {100 * roof_ms / t:.1f}% of copy, max diff vs default {error:.2e}"
                )
            except Exception as error:  # a config that does not compile or launch
                print(f"{label}: failed: {str(error)[:120]}")


def main() -> None:
    gbps = copy_gbps()
    torch.cuda.empty_cache()
    print(f"copy {gbps:.0f} GB/s")
    for rows, cols in SHAPES:
        sweep(rows, cols, gbps)


if __name__ == "__main__":
    main()
