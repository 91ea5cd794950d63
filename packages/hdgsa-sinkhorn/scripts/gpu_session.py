"""One GPU call for hdgsa-sinkhorn (dev script, not shipped): the CUDA tests (sharded over
processes, so Triton compiles in parallel), a tuning sweep of the n = 4 kernels, then the timing
table against every peer. Prints a short table last; full logs and JSON go to $OUT.

Run from the repository root with the packages on PYTHONPATH; DEADLINE (seconds) bounds it.
"""

# ruff: noqa: SIM115, PIE810  (a throwaway dev script: open log files, startswith chains)
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

T0 = time.time()
OUT = os.environ.get("OUT") or "/tmp/sinkhorn-out"
os.makedirs(OUT, exist_ok=True)
DEADLINE = float(os.environ.get("DEADLINE", "380"))
PKG = "packages/hdgsa-sinkhorn"
SHARDS = int(os.environ.get("SHARDS", "10"))
LOG = open(os.path.join(OUT, "session.log"), "w")


def left() -> float:
    return DEADLINE - (time.time() - T0)


def say(*parts: object) -> None:
    line = " ".join(str(p) for p in parts)
    print(line, flush=True)
    LOG.write(line + "\n")
    LOG.flush()


# ---- phase 1: tests (background) + precompiling the tuning variants --------------------------

# (BLOCK, num_warps, RESTART, PAIR_ROWS): RESTART 1 is the plain form, 4 the scaling form.
SCALINGS = [(1, False), (4, False), (4, True)]
FWD_VARIANTS = [
    (b, w, r, p) for (b, w) in ((64, 2), (128, 4), (128, 2), (256, 4), (256, 8)) for (r, p) in SCALINGS
]
BWD_VARIANTS = [(10, 32, 1), (20, 32, 1), (10, 64, 2)]
# Other sizes: the forward in plain against scaling form at the default tiles.
OTHER_N = [(8, 65_536), (16, 65_536), (32, 16_384)]

WARM_SNIPPET = """
import sys, torch
from hdgsa_sinkhorn._triton import sinkhorn_knopp_fwd, sinkhorn_knopp_bwd
kind, a, b, c, r, p = sys.argv[1], *map(int, sys.argv[2:7])
x = torch.randn(1024, 4, 4, device="cuda")
if kind == "fwd":
    sinkhorn_knopp_fwd(x, 20, 1e-8, config=(a, b), restart=r, pair_rows=bool(p))
elif kind == "bwd":
    sinkhorn_knopp_bwd(x, torch.randn_like(x), 20, 1e-8, seg=a, config=(b, c))
else:  # "n": another size at its default tile
    sinkhorn_knopp_fwd(torch.randn(64, a, a, device="cuda"), 20, 1e-8, restart=r)
torch.cuda.synchronize()
"""


def start_tests() -> list[subprocess.Popen]:
    # From the package folder: node ids are relative to its pyproject (pytest's rootdir there).
    collected = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", "tests"],
        capture_output=True,
        text=True,
        cwd=PKG,
    ).stdout.splitlines()
    ids = [line for line in collected if "::" in line]
    say(f"collected {len(ids)} tests")
    procs = []
    for shard in range(SHARDS):
        chunk = ids[shard::SHARDS]
        log = open(f"/tmp/pytest_{shard}.log", "w")
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rf", *chunk],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=PKG,
            )
        )
    return procs


def precompile() -> None:
    jobs = [("fwd", b, w, 0, r, int(p)) for (b, w, r, p) in FWD_VARIANTS]
    jobs += [("bwd", s, b, w, 1, 0) for (s, b, w) in BWD_VARIANTS]
    jobs += [("n", n, 0, 0, r, 0) for (n, _) in OTHER_N for r in (1, 4)]
    running: list[subprocess.Popen] = []
    for job in jobs:
        while len(running) >= 5:
            running = [p for p in running if p.poll() is None]
            time.sleep(0.2)
        running.append(
            subprocess.Popen(
                [sys.executable, "-c", WARM_SNIPPET, *map(str, job)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )
    for p in running:
        p.wait()


def finish_tests(procs: list[subprocess.Popen], budget: float) -> None:
    end = time.time() + budget
    for p in procs:
        try:
            p.wait(timeout=max(1.0, end - time.time()))
        except subprocess.TimeoutExpired:
            p.kill()
    summary = []
    with open(os.path.join(OUT, "pytest.log"), "w") as merged:
        for shard in range(SHARDS):
            text = open(f"/tmp/pytest_{shard}.log").read()
            merged.write(f"==== shard {shard}\n{text}\n")
            tail = [
                line
                for line in text.splitlines()
                if " passed" in line or " failed" in line or "error" in line.lower()
            ]
            summary.append(tail[-1] if tail else "(no summary: killed?)")
            for line in text.splitlines():
                if line.startswith("FAILED") or line.startswith("ERROR"):
                    say("  ", line[:300])
    say("pytest shards:", " | ".join(summary))


# ---- timing helpers ----------------------------------------------------------------------------


def graph_us(fn) -> float:
    """Kernel time per call (us), replayed from a CUDA graph (hdgsa-kernels' ``graph_ms``)."""
    from hdgsa_kernels.bench import graph_ms

    ms = graph_ms(fn)
    if ms is None:
        raise RuntimeError("not capturable in a CUDA graph")
    return ms * 1e3


def bench_ms(fn) -> float:
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))


# ---- phase 2: tuning ---------------------------------------------------------------------------


def tune() -> dict:
    import torch

    from hdgsa_sinkhorn import _triton as K

    best = {}
    for count in (65_536, 1_048_576):
        x = torch.randn(16, count // 16, 4, 4, device="cuda")
        g = torch.randn_like(x)
        rows = []
        for cfg in FWD_VARIANTS:
            b, w, r, p = cfg
            try:
                rows.append(
                    (
                        graph_us(
                            lambda b=b, w=w, r=r, p=p, x=x: K.sinkhorn_knopp_fwd(
                                x, 20, 1e-8, config=(b, w), restart=r, pair_rows=p
                            )
                        ),
                        cfg,
                    )
                )
            except Exception as error:
                say("fwd", cfg, "failed:", repr(error)[:200])
        rows.sort()
        say(f"tune fwd M={count}: " + ", ".join(f"{c}:{t:.1f}us" for t, c in rows))
        best[("fwd", count)] = rows[0][1]
        rows = []
        for seg, b, w in BWD_VARIANTS:
            if left() < 150:
                break
            try:
                rows.append(
                    (
                        graph_us(
                            lambda seg=seg, b=b, w=w, x=x, g=g: K.sinkhorn_knopp_bwd(
                                x, g, 20, 1e-8, seg=seg, config=(b, w)
                            )
                        ),
                        (seg, b, w),
                    )
                )
            except Exception as error:
                say("bwd", (seg, b, w), "failed:", repr(error)[:200])
        rows.sort()
        say(f"tune bwd M={count}: " + ", ".join(f"{c}:{t:.1f}us" for t, c in rows))
        if rows:
            best[("bwd", count)] = rows[0][1]
    for n, count in OTHER_N:
        x = torch.randn(16, count // 16, n, n, device="cuda")
        cells = []
        for r in (1, 4):
            cells.append(
                f"restart {r}: {graph_us(lambda r=r, x=x: K.sinkhorn_knopp_fwd(x, 20, 1e-8, restart=r)):.1f} us"
            )
        say(f"fwd n={n} M={count}: " + "; ".join(cells))
    return best


# ---- phase 3: the table --------------------------------------------------------------------------


def overhead() -> None:
    import torch

    from hdgsa_sinkhorn import _triton as K
    from hdgsa_sinkhorn import sinkhorn_knopp

    x = torch.randn(16, 64, 4, 4, device="cuda")
    for name, fn in (
        ("sinkhorn_knopp (eager API)", lambda: sinkhorn_knopp(x, 20)),
        ("launcher only", lambda: K.sinkhorn_knopp_fwd(x, 20, 1e-8)),
        ("custom op (dispatcher)", lambda: torch.ops.hdgsa.sinkhorn_knopp_fwd(x, 20, 1e-8)),
    ):
        for _ in range(50):
            fn()
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(2000):
            fn()
        cpu = (time.perf_counter() - t) / 2000 * 1e6
        torch.cuda.synchronize()
        say(f"host time per call, {name}: {cpu:.1f} us (kernel at 1,024 matrices: {graph_us(fn):.1f} us)")


def table(order: list[str], results: dict[str, dict], only: str | None = None) -> None:
    """Fill ``results[case][provider]`` (us) for ``order``'s providers, case by case."""
    import torch

    from hdgsa_core.registry import ProviderUnavailable
    from hdgsa_sinkhorn.bench import bench_cases

    for case in bench_cases():
        if only is not None and not any(part in case.name for part in only.split("|")):
            continue
        row = results.setdefault(case.name, {"case": case.name, "bytes": case.bytes})
        for name in order:
            if name not in case.providers:
                continue
            if left() < (90 if name == "torch.compile" else 25):
                row[name] = "skipped (time)"
                continue
            try:
                fn = case.providers[name]()
                row[name] = bench_ms(fn) * 1000
                if name == "hdgsa":
                    try:
                        row["hdgsa_graph"] = graph_us(fn)
                    except Exception as error:
                        row["hdgsa_graph"] = f"graph failed: {error!r}"[:80]
                del fn
            except ProviderUnavailable as why:
                row[name] = f"unavailable: {why}"[:60]
            except Exception as error:
                row[name] = f"error: {error!r}"[:100]
            torch.cuda.empty_cache()
        say(json.dumps(row))
        json.dump(list(results.values()), open(os.path.join(OUT, "results.json"), "w"), indent=1)


def print_table(results: list[dict]) -> None:
    results = list(results)
    say("\n| case | hdgsa us (graph us) | GB/s | liger us (x) | fla us (x) | eager us (x) | compile us (x) |")
    say("|---|---|---|---|---|---|---|")
    for row in results:
        ours = row.get("hdgsa")
        cells = []
        if isinstance(ours, float):
            graph = row.get("hdgsa_graph")
            graph_text = f"{graph:.1f}" if isinstance(graph, float) else "-"
            cells.append(f"{ours:.1f} ({graph_text})")
            cells.append(f"{row['bytes'] / (ours * 1e-6) / 1e9:.0f}")
        else:
            cells += [str(ours), "-"]
        for name in ("liger", "fla", "torch", "torch.compile"):
            value = row.get(name)
            if isinstance(value, float) and isinstance(ours, float):
                cells.append(f"{value:.1f} ({value / ours:.1f}x)")
            else:
                cells.append(str(value)[:40])
        say(f"| {row['case']} | " + " | ".join(cells) + " |")


def main() -> None:
    import torch
    import triton

    say(
        f"device {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}, "
        f"date {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"
    )
    procs = start_tests() if os.environ.get("SKIP_TESTS") != "1" else []
    if os.environ.get("SKIP_TUNE") != "1":
        precompile()
        say(f"precompiled tuning variants at {time.time() - T0:.0f}s")
    if procs:
        finish_tests(procs, budget=float(os.environ.get("TEST_BUDGET", "200")) - (time.time() - T0))
        say(f"tests done at {time.time() - T0:.0f}s")
    from hdgsa_sinkhorn import _triton as K

    if os.environ.get("SKIP_TUNE") != "1":
        best = tune()
        say("best:", best)
        # The 1M forward's choice of tile, RESTART and PAIR_ROWS for every n = 4 forward.
        if ("fwd", 1_048_576) in best:
            b, w, r, p = best[("fwd", 1_048_576)]
            K._FWD_CONFIGS[4] = (b, w)
            K._RESTART, K._PAIR_ROWS = r, p
        if ("bwd", 1_048_576) in best:
            seg, b, w = best[("bwd", 1_048_576)]
            K._BWD_CONFIGS[4] = (b, w)
            K._SEG[4] = seg
        say(
            f"tuned at {time.time() - T0:.0f}s; using fwd {K._FWD_CONFIGS[4]} restart {K._RESTART}"
            f" pair_rows {K._PAIR_ROWS}, bwd {K._BWD_CONFIGS[4]} seg {K._SEG[4]}"
        )
    overhead()
    results: dict[str, dict] = {}
    table(["hdgsa", "liger", "fla", "torch"], results)
    print_table(results.values())
    compile_cases = os.environ.get("COMPILE_CASES", "n=4 M=65536 |n=4 M=1048576 ")
    table(["torch.compile"], results, only=compile_cases)
    print_table(results.values())
    say(f"total {time.time() - T0:.0f}s")


if __name__ == "__main__":
    main()
