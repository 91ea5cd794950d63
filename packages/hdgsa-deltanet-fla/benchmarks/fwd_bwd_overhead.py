"""What the wrapper adds to fla's forward + backward, on a GPU (issue 5: <= 3%).

    python packages/hdgsa-deltanet-fla/benchmarks/fwd_bwd_overhead.py [--rounds 15] [--calls 10]
        [--filter TEXT]

fla's backward reads device values on the host, so it cannot be captured in a CUDA graph, and a
do_bench median of it includes host time. For every ``fwd+bwd`` case of ``hdgsa-kernels bench
deltanet`` (providers ``hdgsa``, our wrapper, and ``fla``, fla called directly), this prints:

- GPU ms: the sum of one call's kernel times (:func:`hdgsa_kernels.bench.kernel_ms`), and their
  ratio: what the wrapper adds on the GPU;
- wall ms: ``calls`` calls back to back and a sync, per call, the two providers alternating for
  ``rounds`` rounds; the median per provider and the median of the per-round ratios: what a
  training step pays, host time included;
- per case, the kernels whose time per call differs between the two by more than 1 us (launched
  by one side only, or more often): where the GPU difference comes from.

Needs fla-core and a Triton with which fla 0.6 runs its gated backward (on Hopper >= 3.7.1).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from hdgsa_core.registry import ProviderUnavailable
from hdgsa_deltanet_fla.bench import bench_cases
from hdgsa_kernels.bench import kernel_times

_PROVIDERS = ("hdgsa", "fla")


def _wall_ms(fn: Callable[[], object], calls: int) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / calls * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--calls", type=int, default=10)
    parser.add_argument("--filter", default=None, help="only cases whose name contains this text")
    args = parser.parse_args()
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    rows = []
    for case in bench_cases():
        if "fwd+bwd" not in case.tags or (args.filter and args.filter not in case.name):
            continue
        try:
            runs = {provider: case.providers[provider]() for provider in _PROVIDERS}
        except ProviderUnavailable as why:
            print(f"{case.name}: unavailable: {why}")
            continue
        for fn in runs.values():  # compile and autotune outside the timing
            fn()
            fn()
        kernels = {provider: kernel_times(fn) for provider, fn in runs.items()}
        walls: dict[str, list[float]] = {provider: [] for provider in runs}
        for _ in range(args.rounds):
            for provider, fn in runs.items():
                walls[provider].append(_wall_ms(fn, args.calls))
        gpu = {provider: sum(times.values()) for provider, times in kernels.items()}
        wall = {provider: statistics.median(values) for provider, values in walls.items()}
        wall_ratio = statistics.median(a / b for a, b in zip(walls["hdgsa"], walls["fla"], strict=True))
        rows.append((case.name, gpu["hdgsa"], gpu["fla"], wall["hdgsa"], wall["fla"], wall_ratio))
        print(
            f"\n{case.name}: GPU {gpu['hdgsa']:.4f} / {gpu['fla']:.4f} ms, wall {wall_ratio:.3f}x", flush=True
        )
        names = sorted(set(kernels["hdgsa"]) | set(kernels["fla"]))
        for name in names:
            ours, theirs = kernels["hdgsa"].get(name, 0.0), kernels["fla"].get(name, 0.0)
            if abs(ours - theirs) > 1e-3:
                print(f"    {(ours - theirs) * 1e3:+8.1f} us  {name[:110]}")
        del runs
        torch.cuda.empty_cache()

    print(
        f"\n{'case (fwd+bwd)':42s} {'ours GPU':>9s} {'fla GPU':>9s} {'ratio':>6s}  {'ours wall':>9s} {'fla wall':>9s} {'ratio':>6s}"
    )
    for name, gpu_ours, gpu_fla, wall_ours, wall_fla, wall_ratio in rows:
        label = name.replace(" fwd+bwd", "")
        print(
            f"{label:42s} {gpu_ours:9.4f} {gpu_fla:9.4f} {gpu_ours / gpu_fla:6.3f}  "
            f"{wall_ours:9.4f} {wall_fla:9.4f} {wall_ratio:6.3f}"
        )
    print("ms per call; wall ratio: median of the per-round ratios.")


if __name__ == "__main__":
    main()
