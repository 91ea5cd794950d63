"""The benchmark runner behind ``hdgsa-kernels bench`` (SPEC section 6).

It measures the card's two ceilings first (device-to-device copy bandwidth, counting bytes read
plus written, and the bf16 matmul rate), then times every provider of every registered
:class:`~hdgsa_core.registry.BenchCase` with ``triton.testing.do_bench`` (median, CUDA events,
L2 flushed between repeats), and reports ms, GB/s, TFLOP/s, the share of the roofline, peak
memory and the speed-up of ours over each peer. Results go to a table, a JSON file and a PNG.

With ``gpu_time`` each row also gets the GPU time of one call replayed from a CUDA graph
(:func:`graph_ms`), or, for a call that cannot be captured (one that reads a device value on the
host, or whose autograd nodes were made on another stream), the sum of its kernels' times under
the PyTorch profiler (:func:`kernel_ms`). Neither has host time in it, so where a call's host
time exceeds its GPU time (small ops; a backward through the autograd engine on a slow host)
the two columns side by side say which one the do_bench median measured.
"""

from __future__ import annotations

import datetime
import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from hdgsa_core import capabilities
from hdgsa_core.registry import BenchCase, ProviderUnavailable

from .ops import import_op_module

__all__ = [
    "Ceilings",
    "Measurement",
    "gpu_ms",
    "graph_ms",
    "kernel_ms",
    "kernel_times",
    "measure_ceilings",
    "run_benchmarks",
    "summarize",
]

Timer = Callable[[Callable[[], object]], float]  # returns milliseconds


@dataclass(frozen=True)
class Ceilings:
    copy_gbps: float
    matmul_tflops: float


@dataclass
class Measurement:
    op: str
    case: str
    provider: str
    ms: float | None = None
    gpu_ms: float | None = None  # GPU time of one call (gpu_time runs only): graph or kernels
    gpu_source: str = ""  # "graph" (graph_ms), "kernels" (kernel_ms, not capturable) or ""
    gbps: float | None = None
    tflops: float | None = None
    roofline_pct: float | None = None
    peak_mib: float | None = None
    speedup: float | None = None  # peer ms / ours ms, on peer rows; best-peer ms / ours ms on ours
    ours: bool = False
    note: str = ""


def do_bench_timer(warmup_ms: float, rep_ms: float) -> Timer:
    """The default timer: ``triton.testing.do_bench``'s median, in milliseconds."""
    from triton.testing import do_bench

    def timer(fn: Callable[[], object]) -> float:
        return float(do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))

    return timer


def graph_ms(fn: Callable[[], object], replays: int = 20) -> float | None:
    """GPU milliseconds of one ``fn()`` replayed from a CUDA graph, or None when the call cannot
    be captured (a host sync, a host-side read of a device value, ...). The replays run back to
    back, so inputs that fit in L2 stay there (do_bench flushes L2 between calls). Random numbers
    drawn by the warm-up, the capture and the replays advance the CUDA generator as calls would;
    after a refused capture it is back where it was before this call."""
    previous_stream = torch.cuda.current_stream()
    generator = torch.cuda.default_generators[torch.cuda.current_device()]
    rng_state = generator.get_state()
    try:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        # Warm-up on a side stream, as capture requires. Most host syncs (a device value read on
        # the host) raise here under sync debug mode, before a capture they would break; others
        # (torch.cuda.synchronize) break the capture and are handled below.
        previous_sync_mode = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode("error")
        try:
            with torch.cuda.stream(stream):
                fn()
        finally:
            torch.cuda.set_sync_debug_mode(previous_sync_mode)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
    except Exception:  # not capturable: the row keeps its do_bench time only
        # torch.cuda.graph leaves its capture stream current when the capture fails
        torch.cuda.set_stream(previous_stream)
        _reset_generator(generator, rng_state)
        torch.cuda.synchronize()
        return None
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / replays


def kernel_times(fn: Callable[[], object], calls: int = 10) -> dict[str, float]:
    """GPU milliseconds per ``fn()`` of each kernel it launches (by name; memcpy and memset
    included), from the PyTorch profiler over ``calls`` calls run back to back."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as profiler:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    return {
        event.key: event.self_device_time_total / calls / 1e3
        for event in profiler.key_averages()
        if event.self_device_time_total > 0
    }


def kernel_ms(fn: Callable[[], object], calls: int = 10) -> float | None:
    """GPU milliseconds of one ``fn()``: the sum of its kernels' times (:func:`kernel_times`),
    for calls that :func:`graph_ms` cannot capture. Gaps between kernels (host time) are not in
    it. None when ``fn`` launches no kernel."""
    return sum(kernel_times(fn, calls).values()) or None


def gpu_ms(fn: Callable[[], object]) -> tuple[float | None, str]:
    """GPU milliseconds of one ``fn()`` and how they were measured: ``(ms, "graph")`` from
    :func:`graph_ms`, else ``(ms, "kernels")`` from :func:`kernel_ms`, else ``(None, "")``."""
    replayed = graph_ms(fn)
    if replayed is not None:
        return replayed, "graph"
    summed = kernel_ms(fn)
    return (summed, "kernels") if summed is not None else (None, "")


def _reset_generator(generator: torch.Generator, state: torch.Tensor) -> None:
    """Undo a failed capture's hold on the CUDA generator. The capture marks the generator's state
    as capturing and only a successful end unmarks it; left so, its next random op raises
    ("Offset increment outside graph capture encountered unexpectedly"), which broke every later
    row of a bench run. A fresh state object, holding the state from before graph_ms, replaces
    it (torch >= 2.4 has graph-safe generator states)."""
    if not hasattr(generator, "graphsafe_set_state"):
        return
    fresh = torch.Generator(device=generator.device)
    fresh.set_state(state)
    generator.graphsafe_set_state(fresh.graphsafe_get_state())


def measure_ceilings(timer: Timer, device: torch.device) -> Ceilings:
    """Copy bandwidth of a 1 GiB bf16 device-to-device copy (read + write bytes) and the bf16
    rate of an 8192^3 matrix product, both on random data."""
    copy_bytes, copy_ms = _time_copy(timer, device, numel=512 * 1024 * 1024)
    matmul_flops, matmul_ms = _time_matmul(timer, device, size=8192)
    torch.cuda.empty_cache()
    return Ceilings(
        copy_gbps=copy_bytes / (copy_ms * 1e-3) / 1e9,
        matmul_tflops=matmul_flops / (matmul_ms * 1e-3) / 1e12,
    )


def _time_copy(timer: Timer, device: torch.device, numel: int) -> tuple[float, float]:
    source = torch.randn(numel, device=device, dtype=torch.bfloat16)
    target = torch.empty_like(source)
    return 2.0 * numel * source.element_size(), timer(lambda: target.copy_(source))


def _time_matmul(timer: Timer, device: torch.device, size: int) -> tuple[float, float]:
    a = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    b = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    return 2.0 * size**3, timer(lambda: a @ b)


def summarize(case: BenchCase, measurement: Measurement, ceilings: Ceilings) -> None:
    """Fill the rates and the roofline share of a timed measurement in place."""
    if measurement.ms is None:
        return
    seconds = measurement.ms * 1e-3
    floors = []
    if case.bytes:
        measurement.gbps = case.bytes / seconds / 1e9
        floors.append(case.bytes / (ceilings.copy_gbps * 1e9))
    if case.flops:
        measurement.tflops = case.flops / seconds / 1e12
        floors.append(case.flops / (ceilings.matmul_tflops * 1e12))
    if floors:
        measurement.roofline_pct = 100.0 * max(floors) / seconds


def _add_speedups(case: BenchCase, rows: list[Measurement]) -> None:
    ours = next((row for row in rows if row.ours and row.ms), None)
    if ours is None:
        return
    peers = [row for row in rows if row is not ours and row.ms]
    for row in peers:
        row.speedup = row.ms / ours.ms
    if peers:
        ours.speedup = min(row.ms for row in peers) / ours.ms


def _time_provider(
    case: BenchCase, provider: str, timer: Timer, ceilings: Ceilings, gpu_time: bool = False
) -> Measurement:
    measurement = Measurement(op=case.op, case=case.name, provider=provider, ours=provider == case.ours)
    try:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        baseline = torch.cuda.memory_allocated()
        fn = case.providers[provider]()
        fn()  # compile / autotune outside the timing, and a peak-memory reading
        torch.cuda.synchronize()
        measurement.peak_mib = (torch.cuda.max_memory_allocated() - baseline) / 2**20
        measurement.ms = timer(fn)
        if gpu_time:
            measurement.gpu_ms, measurement.gpu_source = gpu_ms(fn)
        summarize(case, measurement, ceilings)
    except ProviderUnavailable as reason:
        measurement.note = f"skipped: {reason}"
    except Exception as error:  # a peer that crashes is reported, the run goes on
        measurement.note = (
            f"error: {type(error).__name__}: {str(error).splitlines()[0][:120] if str(error) else ''}"
        )
    return measurement


def _progress(done: int, total: int, label: str) -> None:
    if not sys.stderr.isatty():  # in logs the per-measurement lines show the progress
        return
    width = 30
    filled = width * done // max(total, 1)
    print(
        f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total} {label[:70]:<70}",
        end="",
        file=sys.stderr,
        flush=True,
    )


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def format_results(measurements: Sequence[Measurement]) -> str:
    """One table per op: ms, GB/s, TFLOP/s, % of roofline, peak MiB, speed-up of ours."""
    with_gpu_ms = any(m.gpu_ms is not None for m in measurements)
    headers = ["case", "provider", "ms", "GPU ms", "GB/s", "TFLOP/s", "% roof", "peak MiB", "ours x", "note"]
    if not with_gpu_ms:
        headers.remove("GPU ms")
    out = []
    for op in dict.fromkeys(m.op for m in measurements):
        rows = [
            [
                m.case,
                m.provider,
                _fmt(m.ms, ".4f"),
                *(
                    [_fmt(m.gpu_ms, ".4f") + ("k" if m.gpu_source == "kernels" else "")]
                    if with_gpu_ms
                    else []
                ),
                _fmt(m.gbps, ".0f"),
                _fmt(m.tflops, ".1f"),
                _fmt(m.roofline_pct, ".1f"),
                _fmt(m.peak_mib, ".0f"),
                _fmt(m.speedup, ".2f"),
                m.note,
            ]
            for m in measurements
            if m.op == op
        ]
        widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
        out.append(f"\n## {op}")
        out.append(" | ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)))
        out.append("-|-".join("-" * w for w in widths))
        out += [" | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    out.append("\n'ours x' on a peer row: peer ms / ours ms; on ours: best peer ms / ours ms.")
    if with_gpu_ms:
        out.append(
            "'GPU ms': one call replayed from a CUDA graph, or, marked k, the sum of its kernels'"
            " times (profiler) where it cannot be captured; no host time, L2 warm between calls."
        )
    return "\n".join(out)


def _plot(measurements: Sequence[Measurement], path: Path) -> str:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install 'hdgsa-kernels[bench]'): no plot"
    timed = [m for m in measurements if m.ms]
    cases = list(dict.fromkeys(f"{m.op}: {m.case}" for m in timed))
    providers = list(dict.fromkeys(m.provider for m in timed))
    figure, axis = plt.subplots(figsize=(12, max(3, 0.45 * len(cases) * max(1, len(providers)) / 2)))
    height = 0.8 / max(1, len(providers))
    for index, provider in enumerate(providers):
        values = {f"{m.op}: {m.case}": m.ms for m in timed if m.provider == provider}
        ys = [row + index * height for row, case in enumerate(cases) if case in values]
        axis.barh(ys, [values[case] for case in cases if case in values], height=height, label=provider)
    axis.set_yticks([row + 0.4 - height / 2 for row in range(len(cases))], cases, fontsize=7)
    axis.set_xscale("log")
    axis.set_xlabel("ms (median, log scale)")
    axis.invert_yaxis()
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return f"plot: {path}"


def run_benchmarks(
    ops: Sequence[str],
    *,
    output_dir: str | Path = "bench-results",
    providers: Sequence[str] | None = None,
    case_filter: str | None = None,
    warmup_ms: float = 25.0,
    rep_ms: float = 100.0,
    timer: Timer | None = None,
    gpu_time: bool = False,
) -> int:
    """Time the cases of ``ops``; print the table; write JSON and PNG. Returns an exit code:
    1 if one of our providers failed, else 0 (peers that are missing or fail are listed).
    ``gpu_time`` adds each call's GPU time (:func:`gpu_ms`)."""
    if not torch.cuda.is_available():
        print("hdgsa-kernels bench: needs a CUDA GPU (none found)", file=sys.stderr)
        return 1
    device = torch.device("cuda")
    timer = timer or do_bench_timer(warmup_ms, rep_ms)
    cases: list[BenchCase] = []
    for op in ops:
        for case in import_op_module(op, "bench").bench_cases():
            if case_filter is None or case_filter in case.name:
                cases.append(case)
    work = [(case, name) for case in cases for name in case.providers if not providers or name in providers]
    print("measuring the copy bandwidth and the matmul rate ...", file=sys.stderr, flush=True)
    ceilings = measure_ceilings(timer, device)
    print(
        f"ceilings: copy {ceilings.copy_gbps:.0f} GB/s, bf16 matmul {ceilings.matmul_tflops:.0f} TFLOP/s",
        flush=True,
    )

    output = Path(output_dir)
    output.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    json_path = output / f"bench-{stamp}.json"
    record = {
        "date": stamp,
        "device": torch.cuda.get_device_name(device),
        "capabilities": capabilities(),
        "ceilings": asdict(ceilings),
        "results": [],
    }
    measurements: list[Measurement] = []
    for done, (case, name) in enumerate(work):
        _progress(done, len(work), f"{case.op}: {case.name} / {name}")
        measurement = _time_provider(case, name, timer, ceilings, gpu_time)
        measurements.append(measurement)
        # one line and a JSON rewrite per measurement: a run cut short keeps what it measured
        line = f"[{done + 1}/{len(work)}] {case.op} | {case.name} | {name} | {_fmt(measurement.ms, '.4f')} ms"
        if gpu_time:
            line += f" (GPU {_fmt(measurement.gpu_ms, '.4f')} ms, {measurement.gpu_source})"
        print(f"\r{line} {measurement.note}", flush=True)
        record["results"] = [asdict(m) for m in measurements]
        json_path.write_text(json.dumps(record, indent=1, default=str))
    _progress(len(work), len(work), "done")
    for case in cases:
        _add_speedups(case, [m for m in measurements if m.op == case.op and m.case == case.name])
    record["results"] = [asdict(m) for m in measurements]
    json_path.write_text(json.dumps(record, indent=1, default=str))

    print(format_results(measurements))
    print(f"\njson: {json_path}")
    print(_plot(measurements, output / f"bench-{stamp}.png"))
    # ours skipped on purpose (ProviderUnavailable) is reported; ours crashing fails the run
    our_errors = [m for m in measurements if m.ours and m.note.startswith("error")]
    return 1 if our_errors else 0
