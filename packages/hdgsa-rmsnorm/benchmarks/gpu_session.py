"""One GPU session for hdgsa-rmsnorm: CUDA tests (sharded over processes), a tile sweep of our
kernels, then the peer table. Prints short tables; writes JSON logs to $OUT.

    python packages/hdgsa-rmsnorm/benchmarks/gpu_session.py --stages tests,sweep,bench --deadline 380
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

START = time.time()
OUT = Path(os.environ.get("OUT", "/tmp/rmsnorm-out"))
OUT.mkdir(parents=True, exist_ok=True)
PACKAGE = Path(__file__).resolve().parents[1]


def elapsed() -> float:
    return time.time() - START


def log(message: str) -> None:
    print(f"[{elapsed():6.1f}s] {message}", flush=True)


# ----------------------------------------------------------------------------- tests


def run_tests(shards: int, timeout: float, extra: list[str]) -> None:
    collect = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            str(PACKAGE),
            "--collect-only",
            "-q",
            "-p",
            "no:cacheprovider",
            *extra,
        ],
        capture_output=True,
        text=True,
        cwd=PACKAGE,
    )
    ids = [line for line in collect.stdout.splitlines() if "::" in line]
    log(f"tests: {len(ids)} collected, {shards} shards")
    if not ids:
        print((collect.stdout + collect.stderr)[-1500:])
        return
    procs = []
    for shard in range(shards):
        chunk = ids[shard::shards]
        logfile = open(OUT / f"tests_{shard}.log", "w")  # noqa: SIM115  (closed after the shard ends)
        procs.append(
            (
                subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "pytest",
                        "-q",
                        "-p",
                        "no:cacheprovider",
                        "-x",
                        "--durations=5",
                        *chunk,
                    ],
                    stdout=logfile,
                    stderr=subprocess.STDOUT,
                    cwd=PACKAGE,
                ),
                logfile,
                shard,
            )
        )
    deadline = time.time() + timeout
    for proc, logfile, shard in procs:
        try:
            proc.wait(timeout=max(1.0, deadline - time.time()))
        except subprocess.TimeoutExpired:
            proc.kill()
            log(f"tests shard {shard}: TIMEOUT")
        logfile.close()
        text = (OUT / f"tests_{shard}.log").read_text()
        tail = [line for line in text.splitlines() if line.strip()][-3:]
        failed = [line for line in text.splitlines() if line.startswith(("FAILED", "ERROR"))]
        log(f"tests shard {shard}: rc={proc.returncode} :: {' | '.join(tail)[-300:]}")
        for line in failed[:5]:
            print("   ", line[:300])
        if failed:
            errors = [line for line in text.splitlines() if line.startswith("E ")][:6]
            for line in errors:
                print("   ", line[:300])


# ----------------------------------------------------------------------------- timing


def bench_ms(fn, warmup=10, rep=40) -> float:
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))


def copy_gbps() -> float:
    import torch

    def measure() -> float:
        source = torch.randn(512 * 1024 * 1024, device="cuda", dtype=torch.bfloat16)
        target = torch.empty_like(source)
        return bench_ms(lambda: target.copy_(source), warmup=25, rep=100)

    ms = measure()
    torch.cuda.empty_cache()
    return 2 * 512 * 1024 * 1024 * 2 / (ms * 1e-3) / 1e9


SHAPES = [(32768, 4096), (16384, 8192), (65536, 2048), (4096, 65536), (1024, 262144)]


def _fits_bwd_configs(hidden: int) -> list[dict]:
    configs = []
    for tile, warps, pps in ((4096, 8, 2), (8192, 16, 1), (8192, 32, 1), (16384, 32, 1), (4096, 4, 4)):
        block_m = max(1, tile // hidden)
        for prefetch in (True, False):
            if warps == 32 and prefetch:
                continue
            configs.append(dict(block_m=block_m, num_warps=warps, programs_per_sm=pps, prefetch=prefetch))
    return configs


SPLIT_FWD_SWEEP = [
    dict(split_block_n=8192, split_num_warps=8, split_programs_per_sm=2),
    dict(split_block_n=16384, split_num_warps=16, split_programs_per_sm=1),
    dict(split_block_n=4096, split_num_warps=4, split_programs_per_sm=4),
    dict(split_block_n=8192, split_num_warps=16, split_programs_per_sm=1),
    dict(split_block_n=4096, split_num_warps=8, split_programs_per_sm=2),
]
SPLIT_BWD_SWEEP = [
    dict(split_block_n=4096, split_num_warps=8, split_programs_per_sm=2),
    dict(split_block_n=8192, split_num_warps=16, split_programs_per_sm=1),
    dict(split_block_n=2048, split_num_warps=4, split_programs_per_sm=4),
    dict(split_block_n=4096, split_num_warps=16, split_programs_per_sm=1),
    dict(split_block_n=4096, split_num_warps=8, split_programs_per_sm=2, one_pass=False),
]


def _close(a, b, tol=2e-2) -> bool:
    return bool(((a.float() - b.float()).norm() <= tol * b.float().norm()).item())


def _sweep_shape(rows: int, hidden: int, copy: float, deadline: float) -> list[dict]:
    import torch

    from hdgsa_rmsnorm._triton_bwd import rms_norm_bwd
    from hdgsa_rmsnorm._triton_common import MAX_FUSED_N, contiguous_layout
    from hdgsa_rmsnorm._triton_fwd import rms_norm_fwd

    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(rows, hidden, device="cuda", dtype=torch.bfloat16, generator=g)
    r = torch.randn(rows, hidden, device="cuda", dtype=torch.bfloat16, generator=g)
    w = 1 + 0.1 * torch.randn(hidden, device="cuda", dtype=torch.bfloat16, generator=g)
    dy = torch.randn_like(x)
    dh = torch.randn_like(x)
    y0, h0, rstd0 = rms_norm_fwd(x, w, r, 1e-6, False, True, True)
    yp0, _, _ = rms_norm_fwd(x, w, None, 1e-6, False, False, False)
    h_rows = contiguous_layout(h0)
    dx0, dw0, _ = rms_norm_bwd(dy, dh, h_rows, None, rstd0, w, torch.bfloat16, torch.bfloat16, True)
    torch.cuda.synchronize()
    elements = rows * hidden

    def forward(cfg):
        return rms_norm_fwd(x, w, r, 1e-6, False, True, True, config=cfg)

    def plain(cfg):
        return rms_norm_fwd(x, w, None, 1e-6, False, False, False, config=cfg)

    def backward(cfg):
        return rms_norm_bwd(dy, dh, h_rows, None, rstd0, w, torch.bfloat16, torch.bfloat16, True, config=cfg)

    def same_forward(out):
        return _close(out[0], y0) and torch.equal(out[1], h0) and _close(out[2], rstd0, 1e-5)

    def same_plain(out):
        return _close(out[0], yp0)

    def same_backward(out):
        return _close(out[0], dx0) and _close(out[1], dw0, 1e-3)

    split = hidden > MAX_FUSED_N
    results = []
    plans = [
        ("fwd", forward, same_forward, 8 * elements, [{}, {}, *(SPLIT_FWD_SWEEP if split else [])]),
        (
            "bwd",
            backward,
            same_backward,
            8 * elements,
            [{}, {}, *(SPLIT_BWD_SWEEP if split else _fits_bwd_configs(hidden))],
        ),
    ]
    if split:
        plans.append(("plain", plain, same_plain, 4 * elements, [{}, *SPLIT_FWD_SWEEP]))
    for kind, run, check, nbytes, cfgs in plans:
        first = run({})
        deterministic = all(torch.equal(a, b) for a, b in zip(first, run({}), strict=True) if a is not None)
        print(f"  {rows}x{hidden} {kind}: default config bitwise deterministic: {deterministic}", flush=True)
        for cfg in cfgs:
            if time.time() > deadline:
                break
            row = dict(shape=f"{rows}x{hidden}", kind=kind, cfg=cfg or "default")
            try:
                ok = check(run(cfg))
                ms = bench_ms(lambda run=run, cfg=cfg: run(cfg))
                gbps = nbytes / (ms * 1e-3) / 1e9
                row.update(ms=ms, gbps=gbps, pct=100 * gbps / copy, ok=ok)
                verdict = "ok" if ok else "WRONG"
                print(
                    f"  {row['shape']:>12} {kind:5} {ms:.4f} ms {gbps:6.0f} GB/s {row['pct']:5.1f}% {verdict} {row['cfg']}",
                    flush=True,
                )
            except Exception as error:  # a config that fails to compile or launch is reported
                row["error"] = f"{type(error).__name__}: {str(error)[:200]}"
                print(f"  {row['shape']:>12} {kind} ERROR {row['error']} {row['cfg']}", flush=True)
            results.append(row)
    return results


def profile(deadline: float) -> None:
    """Kernels of one forward+backward of ours (autograd, residual + prenorm) per shape."""
    import torch

    from hdgsa_rmsnorm import rms_norm

    for rows, hidden in SHAPES:
        if time.time() > deadline:
            break
        g = torch.Generator(device="cuda").manual_seed(0)
        x = torch.randn(rows, hidden, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
        r = torch.randn(rows, hidden, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
        w = (1 + 0.1 * torch.randn(hidden, device="cuda", dtype=torch.bfloat16, generator=g)).requires_grad_()
        dy = torch.randn_like(x)
        dh = torch.randn_like(x)

        def step(x=x, w=w, r=r, dy=dy, dh=dh):
            y, h = rms_norm(x, w, 1e-6, r, prenorm=True)
            return torch.autograd.grad((y, h), (x, w, r), (dy, dh))

        step()
        wall = bench_ms(step)
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                step()
            torch.cuda.synchronize()
        events = prof.key_averages()
        total = 0.0
        lines = []
        for event in sorted(
            events, key=lambda e: -getattr(e, "device_time_total", getattr(e, "cuda_time_total", 0))
        ):
            device_us = getattr(event, "device_time_total", getattr(event, "cuda_time_total", 0)) / 5
            if device_us <= 0:
                continue
            total += device_us
            lines.append(f"      {device_us:9.1f} us x{event.count / 5:.0f}  {event.key[:90]}")
        print(
            f"  profile {rows}x{hidden}: fwd+bwd {wall:.4f} ms (do_bench), kernels {total / 1000:.4f} ms per step",
            flush=True,
        )
        print("\n".join(lines[:8]), flush=True)


def sweep(copy: float, deadline: float) -> dict:
    import torch

    results = {}
    for rows, hidden in SHAPES:
        if time.time() > deadline:
            log("sweep: deadline reached")
            break
        results[f"{rows}x{hidden}"] = _sweep_shape(rows, hidden, copy, deadline)
        torch.cuda.empty_cache()
    (OUT / "sweep.json").write_text(json.dumps(results, indent=1, default=str))
    return results


def peer_table(
    copy: float, deadline: float, providers_filter: list[str] | None, modes: list[str] | None
) -> list[dict]:
    import torch

    from hdgsa_core.registry import ProviderUnavailable
    from hdgsa_rmsnorm.bench import bench_cases

    rows_out = []
    for case in bench_cases():
        if modes and not any(case.name.startswith(m) for m in modes):
            continue
        measured = {}
        for name, setup in case.providers.items():
            if providers_filter and name != "hdgsa" and name not in providers_filter:
                continue
            if time.time() > deadline:
                measured[name] = "deadline"
                continue
            try:
                torch.cuda.empty_cache()
                fn = setup()
                fn()
                torch.cuda.synchronize()
                measured[name] = bench_ms(fn, warmup=25, rep=100)
            except ProviderUnavailable as why:
                measured[name] = f"skipped: {why}"
            except Exception as error:
                measured[name] = (
                    f"error: {type(error).__name__}: {str(error).splitlines()[0][:100] if str(error) else ''}"
                )
            fn = None
        ours = measured.get("hdgsa")
        for name, value in measured.items():
            entry = dict(case=case.name, provider=name)
            if isinstance(value, float):
                gbps = case.bytes / (value * 1e-3) / 1e9
                entry.update(ms=value, gbps=gbps, pct=100 * gbps / copy)
                if isinstance(ours, float) and name != "hdgsa":
                    entry["ours_speedup"] = value / ours
            else:
                entry["note"] = value
            rows_out.append(entry)
        log(f"bench: {case.name} done")
    (OUT / "bench.json").write_text(json.dumps(rows_out, indent=1))
    return rows_out


def print_table(rows: list[dict], copy: float) -> None:
    import torch
    import triton

    print(
        f"\n## rmsnorm on {torch.cuda.get_device_name()} torch {torch.__version__} triton {triton.__version__}; copy {copy:.0f} GB/s"
    )
    print(f"{'case':<40} {'provider':<30} {'ms':>8} {'GB/s':>6} {'%copy':>6} {'peer/ours':>9}")
    for row in rows:
        if "ms" in row:
            speed = f"{row['ours_speedup']:.2f}" if "ours_speedup" in row else ""
            print(
                f"{row['case']:<40} {row['provider']:<30} {row['ms']:8.4f} {row['gbps']:6.0f} {row['pct']:6.1f} {speed:>9}"
            )
        else:
            print(f"{row['case']:<40} {row['provider']:<30} {row['note'][:90]}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--stages", default="tests,profile,sweep,bench")
    parser.add_argument(
        "--deadline", type=float, default=380.0, help="seconds from start; later work is skipped"
    )
    parser.add_argument("--test-timeout", type=float, default=170.0)
    parser.add_argument("--shards", type=int, default=6)
    parser.add_argument("--providers", default="", help="comma list of peers for the bench (empty: all)")
    parser.add_argument("--modes", default="", help="comma list of mode prefixes (empty: all)")
    parser.add_argument("--test-args", default="")
    args = parser.parse_args()
    stages = args.stages.split(",")
    deadline = START + args.deadline
    import torch
    import triton

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    log(f"device {device} torch {torch.__version__} triton {triton.__version__}")
    if "tests" in stages:
        run_tests(args.shards, args.test_timeout, args.test_args.split() if args.test_args else [])
    if not torch.cuda.is_available():
        log("no CUDA device: timing stages skipped")
        return
    copy = copy_gbps()
    log(f"copy bandwidth {copy:.0f} GB/s")
    if "profile" in stages:
        profile(deadline)
    if "sweep" in stages:
        sweep(copy, deadline - 60 if "bench" in stages else deadline)
    if "bench" in stages:
        rows = peer_table(
            copy,
            deadline,
            [p for p in args.providers.split(",") if p] or None,
            [m for m in args.modes.split(",") if m] or None,
        )
        print_table(rows, copy)
    log("done")


if __name__ == "__main__":
    main()
