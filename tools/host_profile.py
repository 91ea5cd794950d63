"""Where the host time of a benchmarked call goes (a GPU machine's diagnosis, not a benchmark).

    python3 tools/host_profile.py sinkhorn --filter "M=65536 " --providers hdgsa liger

For every matching case and provider of ``hdgsa-kernels bench``: the do_bench median, the GPU
time of one call replayed from a CUDA graph (when the call can be captured) and the sum of its
kernels' times (PyTorch profiler), the host time per
call (many calls back to back, without synchronising, while the GPU keeps up), and a cProfile
of those calls (the functions with the most own time). A do_bench median well above the GPU
time is host time; the profile says whose.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import time

import torch

from hdgsa_core.registry import ProviderUnavailable
from hdgsa_kernels.bench import graph_ms, kernel_ms
from hdgsa_kernels.ops import import_op_module, resolve_op_names


def _host_us(run, calls: int) -> float:
    torch.cuda.synchronize()
    begin = time.perf_counter()
    for _ in range(calls):
        run()
    host = time.perf_counter() - begin
    torch.cuda.synchronize()
    return host / calls * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("ops", nargs="*")
    parser.add_argument("--filter", default=None, help="only cases whose name contains this text")
    parser.add_argument("--providers", nargs="*", default=["hdgsa"])
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--top", type=int, default=18)
    args = parser.parse_args()
    from triton.testing import do_bench

    for op in resolve_op_names(args.ops):
        for case in import_op_module(op, "bench").bench_cases():
            if args.filter and args.filter not in case.name:
                continue
            for provider in args.providers:
                if provider not in case.providers:
                    continue
                try:
                    run = case.providers[provider]()
                except ProviderUnavailable as why:
                    print(f"{case.op} {case.name} [{provider}]: unavailable: {why}")
                    continue
                bench_ms = do_bench(run, warmup=5, rep=30, return_mode="median")
                host_us = _host_us(run, args.calls)
                profile = cProfile.Profile()
                profile.enable()
                for _ in range(args.calls):
                    run()
                profile.disable()
                torch.cuda.synchronize()
                replayed_ms = graph_ms(run)
                graph = "- (not capturable)" if replayed_ms is None else f"{replayed_ms * 1e3:.1f} us"
                kernel_total = kernel_ms(run, calls=20)
                kernels = "-" if kernel_total is None else f"{kernel_total * 1e3:.1f} us"
                print(
                    f"\n{case.op} {case.name} [{provider}]: do_bench {bench_ms * 1e3:.1f} us, "
                    f"GPU (graph) {graph}, kernels {kernels}, host {host_us:.1f} us/call"
                )
                text = io.StringIO()
                pstats.Stats(profile, stream=text).sort_stats("tottime").print_stats(args.top)
                lines = [line for line in text.getvalue().splitlines() if line.strip()]
                print("\n".join(lines[3:]))
                del run
                torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
