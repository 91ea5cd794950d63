"""What the wrapper adds to fla's forward + backward, on a GPU (issue 5: <= 3%).

    python packages/hdgsa-deltanet-fla/benchmarks/fwd_bwd_overhead.py [--rounds 15] [--calls 20]
        [--filter TEXT]

fla's forward + backward launches some 60 kernels from Python, so on a slow host a do_bench
median of it is host time, and it swings between runs. For every ``fwd+bwd`` case of
``hdgsa-kernels bench deltanet`` (providers ``hdgsa``, our wrapper; ``fla``, fla called directly
with ``g`` precomputed; ``fla+log``, fla called directly with ``g = log(clamp(alpha))`` computed
in the step, as a user holding alpha must; ``hdgsa-public``, our wrapper made to call fla's public
function, with its own log-decay and D-skip nodes, instead of the one fused node), this prints:

- GPU ms: the sum of one call's kernel times (:func:`hdgsa_kernels.bench.kernel_times`), and
  ours over each peer: what the wrapper adds on the GPU;
- wall ms: ``calls`` calls back to back and a sync, per call, the three providers taking turns
  in a rotating order for ``rounds`` rounds; the median per provider and the median of the
  per-round ratios of ours to each peer: what a training step pays, host time included;
- per case, the kernels whose time per call differs between ours and ``fla`` by more than 1 us
  (launched by one side only, or more often): where the GPU difference comes from.

Needs fla-core and a Triton with which fla 0.6 runs its gated backward (on Hopper >= 3.7.1).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from hdgsa_core.registry import ProviderUnavailable
from hdgsa_deltanet_fla import _fla
from hdgsa_deltanet_fla.bench import bench_cases
from hdgsa_kernels.bench import kernel_times

_PROVIDERS = ("hdgsa", "fla", "fla+log", "hdgsa-public")


def _through_fla_public(step: Callable[[], object]) -> Callable[[], object]:
    """``step`` with the fla path sent through fla's public function (no fused node)."""

    def run() -> object:
        fused_entry_points = _fla.fused_entry_points
        _fla.fused_entry_points = lambda: None
        try:
            return step()
        finally:
            _fla.fused_entry_points = fused_entry_points

    return run


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
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--filter", default=None, help="only cases whose name contains this text")
    args = parser.parse_args()
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    rows = []
    for case in bench_cases():
        if "fwd+bwd" not in case.tags or (args.filter and args.filter not in case.name):
            continue
        try:
            runs = {provider: case.providers[provider]() for provider in _PROVIDERS[:3]}
            runs["hdgsa-public"] = _through_fla_public(case.providers["hdgsa"]())
        except ProviderUnavailable as why:
            print(f"{case.name}: unavailable: {why}")
            continue
        for fn in runs.values():  # compile and autotune outside the timing
            fn()
            fn()
        kernels = {provider: kernel_times(fn) for provider, fn in runs.items()}
        walls: dict[str, list[float]] = {provider: [] for provider in runs}
        for round_index in range(args.rounds):
            # The order rotates: no provider always runs right after the same other one.
            shift = round_index % len(_PROVIDERS)
            for provider in _PROVIDERS[shift:] + _PROVIDERS[:shift]:
                walls[provider].append(_wall_ms(runs[provider], args.calls))
        gpu = {provider: sum(times.values()) for provider, times in kernels.items()}
        wall = {provider: statistics.median(values) for provider, values in walls.items()}
        wall_ratio = {
            peer: statistics.median(a / b for a, b in zip(walls["hdgsa"], walls[peer], strict=True))
            for peer in _PROVIDERS[1:]
        }
        rows.append((case.name, gpu, wall, wall_ratio))
        print(
            f"\n{case.name}: GPU ms {', '.join(f'{p} {gpu[p]:.4f}' for p in _PROVIDERS)}; "
            f"wall ours / fla {wall_ratio['fla']:.3f}, ours / fla+log {wall_ratio['fla+log']:.3f}, "
            f"ours / ours-public {wall_ratio['hdgsa-public']:.3f}",
            flush=True,
        )
        for name in sorted(set(kernels["hdgsa"]) | set(kernels["fla"])):
            ours, theirs = kernels["hdgsa"].get(name, 0.0), kernels["fla"].get(name, 0.0)
            if abs(ours - theirs) > 1e-3:
                print(f"    {(ours - theirs) * 1e3:+8.1f} us  {name[:110]}")
        del runs
        torch.cuda.empty_cache()

    columns = (
        "GPU ours", "GPU fla", "x", "GPU f+log", "x",
        "wall ours", "wall fla", "x", "wall f+log", "x", "wall pub", "x",
    )  # fmt: skip
    print(f"\n{'case (fwd+bwd)':38s} " + " ".join(f"{column:>10s}" for column in columns))
    for name, gpu, wall, wall_ratio in rows:
        values = (
            gpu["hdgsa"], gpu["fla"], gpu["hdgsa"] / gpu["fla"],
            gpu["fla+log"], gpu["hdgsa"] / gpu["fla+log"],
            wall["hdgsa"], wall["fla"], wall_ratio["fla"],
            wall["fla+log"], wall_ratio["fla+log"],
            wall["hdgsa-public"], wall_ratio["hdgsa-public"],
        )  # fmt: skip
        print(f"{name.replace(' fwd+bwd', ''):38s} " + " ".join(f"{value:10.4f}" for value in values))
    print(
        "ms per call; x: ours / that peer (wall: the median of the per-round ratios); "
        "pub: ours through fla's public function (hdgsa-public)."
    )


if __name__ == "__main__":
    main()
