"""The benchmark runner behind ``hdgsa-kernels bench``.

It measures the card's two ceilings first (device-to-device copy bandwidth, counting bytes read
plus written, and the bf16 matmul rate), then times every provider of every registered
:class:`~hdgsa_core.registry.BenchCase` with ``triton.testing.do_bench`` (median, CUDA events,
L2 flushed between repeats), and reports ms, GB/s, TFLOP/s, the share of the roofline, peak
memory and the speed-up of ours over each peer. Each run writes its record (JSON) and a plot to
``output_dir``; the tables, baselines, comparisons and the Markdown page are in
:mod:`hdgsa_kernels.results`.

Options, each a column or a section of the report:

- ``gpu_time``: the GPU time of one call replayed from a CUDA graph (:func:`graph_ms`), or, for
  a call that cannot be captured (one that reads a device value on the host, or whose autograd
  nodes were made on another stream), the sum of its kernels' times under the PyTorch profiler
  (:func:`kernel_ms`). No host time in either, so where a call's host time exceeds its GPU time
  (small ops; a backward through the autograd engine on a slow host) the two columns side by
  side say which one the do_bench median measured.
- ``host_time``: the host time of one call (:func:`host_ms`): what Python spends in it before
  it returns, the GPU not waited for.
- ``profile``: the call's top kernels by GPU time (:func:`top_kernels`).
- ``device="cpu"`` (``--device cpu``): the cases that declare ``devices=("cpu",)`` (the PyTorch
  backends against per-step loops), timed by wall clock (:func:`wall_timer`).

Baselines and the benchmark page, from the repository root:

- ``hdgsa-kernels bench --save-baseline`` writes ``benchmarks/<op>-<device>.json`` for each op
  (replacing the previous one of that op and device; :func:`~hdgsa_kernels.results.save_baselines`).
- ``hdgsa-kernels bench OP --compare benchmarks/<op>-<device>.json`` flags our rows slower than
  the baseline by more than ``--compare-threshold`` percent (exit 1), and lists slower peers,
  faster rows, and rows missing from this run.
- ``hdgsa-kernels bench --save-baseline --markdown > BENCHMARKS.md`` writes the page from one
  run; ``hdgsa-kernels bench --markdown --from-json benchmarks/*.json > BENCHMARKS.md`` renders
  it again from the saved baselines, without a GPU. The hand-written reading under each op's
  table lives in ``benchmarks/readings/<op>.md`` (``intro.md`` goes under the page header), so
  it survives every regeneration: edit the reading there, never in BENCHMARKS.md.
"""

from __future__ import annotations

import datetime
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path

import torch

from hdgsa_core import capabilities
from hdgsa_core.registry import BenchCase, ProviderUnavailable

from .ops import import_op_module
from .results import (
    Ceilings,
    Measurement,
    compare_results,
    format_comparison,
    format_markdown,
    format_results,
    load_records,
    make_record,
    plot,
    save_baselines,
    write_record,
)

__all__ = [
    "Ceilings",
    "Measurement",
    "collect_cases",
    "cpu_name",
    "gpu_ms",
    "graph_ms",
    "host_ms",
    "kernel_ms",
    "kernel_times",
    "measure_ceilings",
    "render_records",
    "run_benchmarks",
    "summarize",
    "top_kernels",
    "wall_timer",
]

Timer = Callable[[Callable[[], object]], float]  # returns milliseconds


def do_bench_timer(warmup_ms: float, rep_ms: float) -> Timer:
    """The default timer: ``triton.testing.do_bench``'s median, in milliseconds."""
    from triton.testing import do_bench

    def timer(fn: Callable[[], object]) -> float:
        return float(do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))

    return timer


def wall_timer(warmup_ms: float, rep_ms: float, min_calls: int = 5) -> Timer:
    """The CPU timer (``--device cpu``): calls for ``warmup_ms``, then for ``rep_ms`` (at least
    ``min_calls`` calls), and the median wall time of one call, in milliseconds."""

    def timer(fn: Callable[[], object]) -> float:
        start = time.perf_counter()
        while (time.perf_counter() - start) * 1e3 < warmup_ms:
            fn()
        samples: list[float] = []
        start = time.perf_counter()
        while len(samples) < min_calls or (time.perf_counter() - start) * 1e3 < rep_ms:
            begin = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - begin) * 1e3)
        return statistics.median(samples)

    return timer


def cpu_name() -> str:
    """ "CPU <model>, <n> threads": the processor's model name (Linux) and torch's thread count."""
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            model = next(line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"CPU {model}, {torch.get_num_threads()} threads"


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


def kernel_times(
    fn: Callable[[], object], calls: int = 10, device: torch.device | str = "cuda"
) -> dict[str, float]:
    """Milliseconds per ``fn()`` of each kernel it launches (by name; memcpy and memset
    included), from the PyTorch profiler over ``calls`` calls run back to back. On a CPU
    ``device``, the CPU time of each operator instead (what the tests of the runner use)."""
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.device(device).type == "cuda"
    _synchronize(device)
    with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as profiler:
        for _ in range(calls):
            fn()
        _synchronize(device)
    times = {}
    for event in profiler.key_averages():
        total = event.self_device_time_total if cuda else event.self_cpu_time_total
        if total > 0:
            times[event.key] = total / calls / 1e3
    return times


def top_kernels(
    fn: Callable[[], object], top: int = 5, device: torch.device | str = "cuda"
) -> list[tuple[str, float]]:
    """The ``top`` kernels of one ``fn()`` by GPU time (:func:`kernel_times`), slowest first."""
    times = sorted(kernel_times(fn, device=device).items(), key=lambda item: -item[1])
    return times[:top]


def host_ms(
    fn: Callable[[], object],
    calls: int = 50,
    device: torch.device | str = "cuda",
    budget_ms: float = 1000.0,
    min_calls: int = 5,
) -> float:
    """Host milliseconds of one ``fn()``: the median over ``calls`` calls of the wall time that
    Python spends in the call, the device synchronized before each call (outside the timing) and
    not waited for after it. That is the Python, dispatch and kernel-launch cost a training step
    pays per call whatever the shape; the GPU work runs behind it. A call that synchronizes the
    host (reads a device value) also counts the GPU time it waits for. On a CPU ``device`` it is
    the call's whole time. Slow calls stop after ``budget_ms`` of waiting and calling (at least
    ``min_calls`` calls)."""
    samples = []
    start = time.perf_counter()
    while len(samples) < calls:
        if len(samples) >= min_calls and (time.perf_counter() - start) * 1e3 > budget_ms:
            break
        _synchronize(device)
        begin = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - begin)
    _synchronize(device)
    return statistics.median(samples) * 1e3


def _synchronize(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


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


def summarize(case: BenchCase, measurement: Measurement, ceilings: Ceilings | None) -> None:
    """Fill the rates and the roofline share of a timed measurement in place (no roofline
    without ``ceilings``)."""
    if measurement.ms is None:
        return
    seconds = measurement.ms * 1e-3
    floors = []
    if case.bytes:
        measurement.gbps = case.bytes / seconds / 1e9
        if ceilings:
            floors.append(case.bytes / (ceilings.copy_gbps * 1e9))
    if case.flops:
        measurement.tflops = case.flops / seconds / 1e12
        if ceilings:
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
    case: BenchCase,
    provider: str,
    timer: Timer,
    ceilings: Ceilings | None,
    gpu_time: bool = False,
    *,
    host_time: bool = False,
    profile: int = 0,
    device: torch.device | str = "cuda",
) -> Measurement:
    measurement = Measurement(op=case.op, case=case.name, provider=provider, ours=provider == case.ours)
    cuda = torch.device(device).type == "cuda"
    try:
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            baseline = torch.cuda.memory_allocated()
        fn = case.providers[provider]()
        fn()  # compile / autotune outside the timing, and a peak-memory reading
        _synchronize(device)
        if cuda:
            measurement.peak_mib = (torch.cuda.max_memory_allocated() - baseline) / 2**20
        measurement.ms = timer(fn)
        if gpu_time and cuda:
            measurement.gpu_ms, measurement.gpu_source = gpu_ms(fn)
        if host_time:
            measurement.host_ms = host_ms(fn, device=device)
        if profile:
            measurement.top_kernels = top_kernels(fn, profile, device=device)
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


def collect_cases(ops: Sequence[str], case_filter: str | None = None) -> list[BenchCase]:
    """The registered cases of ``ops`` (short names), those whose name contains ``case_filter``."""
    return [
        case
        for op in ops
        for case in import_op_module(op, "bench").bench_cases()
        if case_filter is None or case_filter in case.name
    ]


def _compare(
    measurements: Sequence[Measurement],
    files: Sequence[str | Path],
    threshold_pct: float,
    selected: Callable[[Measurement], bool] | None,
    out,
    device_name: str | None = None,
) -> int:
    """Print the comparison with the baselines in ``files``; 1 on a regression of ours."""
    records = load_records(files)
    for record in records:
        if device_name is not None and record["device"] not in (device_name, "unknown"):
            print(
                f"note: {record['path']} was measured on {record['device']}, this run on {device_name}:"
                " the comparison says more about the cards than about the code",
                file=out,
            )
    baseline = [row for record in records for row in record["results"]]
    comparison = compare_results(measurements, baseline, threshold_pct, selected)
    print(format_comparison(comparison, threshold_pct, [str(f) for f in files]), file=out)
    return 1 if comparison.failed else 0


def _sections(
    cases: Sequence[BenchCase], records: Sequence[dict]
) -> list[tuple[str, list[tuple[list[Measurement], dict]]]]:
    """``(op, [(rows, record), ...])`` for the Markdown page: the cases' ops in order, each with
    its rows from every record that has some (``record["results"]``: Measurements)."""
    ops = dict.fromkeys([*(case.op for case in cases), *(m.op for r in records for m in r["results"])])
    sections = []
    for op in ops:
        tables = [
            (rows, record) for record in records if (rows := [m for m in record["results"] if m.op == op])
        ]
        sections.append((op, tables))
    return sections


def run_benchmarks(
    ops: Sequence[str],
    *,
    output_dir: str | Path | None = "bench-results",
    providers: Sequence[str] | None = None,
    case_filter: str | None = None,
    warmup_ms: float = 25.0,
    rep_ms: float = 100.0,
    timer: Timer | None = None,
    gpu_time: bool = False,
    host_time: bool = False,
    profile: int = 0,
    markdown: bool = False,
    compare: Sequence[str | Path] | None = None,
    compare_threshold: float = 5.0,
    save_baseline: str | Path | None = None,
    readings_dir: str | Path | None = "benchmarks/readings",
    command: str | None = None,
    cases: Sequence[BenchCase] | None = None,
    device: torch.device | str = "cuda",
) -> int:
    """Time the cases of ``ops``; print the table (or, with ``markdown``, the page); write the
    run's JSON and plot to ``output_dir`` (None: neither) and, with ``save_baseline``, one
    baseline per op there; with ``compare``, diff against those baseline files.

    Returns an exit code: 1 if one of our providers failed or (``compare``) got slower than its
    baseline by more than ``compare_threshold`` percent, else 0 (peers that are missing or fail
    are listed). ``gpu_time`` adds each call's GPU time (:func:`gpu_ms`), ``host_time`` its host
    time (:func:`host_ms`), ``profile`` its top ``profile`` kernels (:func:`top_kernels`).
    ``device="cpu"`` times the cases that run on the CPU (``BenchCase.devices``) with
    :func:`wall_timer`: no ceilings, peak memory or GPU time. ``cases`` replaces the registered
    cases of ``ops`` (how the tests drive the runner with stub cases).
    """
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("hdgsa-kernels bench: needs a CUDA GPU (none found)", file=sys.stderr)
        return 1
    log = sys.stderr if markdown else sys.stdout  # with markdown, stdout holds the page only
    if timer is None:
        timer = do_bench_timer(warmup_ms, rep_ms) if device.type == "cuda" else wall_timer(warmup_ms, rep_ms)
    if cases is None:
        cases = [case for case in collect_cases(ops, case_filter) if device.type in case.devices]
        if not cases:
            print(
                f"hdgsa-kernels bench: no benchmark case of {', '.join(ops)} runs on {device.type}",
                file=sys.stderr,
            )
            return 1
    work = [(case, name) for case in cases for name in case.providers if not providers or name in providers]
    ceilings = None
    device_name = cpu_name()
    if device.type == "cuda":
        device_name = torch.cuda.get_device_name(device)
        print("measuring the copy bandwidth and the matmul rate ...", file=sys.stderr, flush=True)
        ceilings = measure_ceilings(timer, device)
        print(
            f"ceilings: copy {ceilings.copy_gbps:.0f} GB/s, bf16 matmul {ceilings.matmul_tflops:.0f} TFLOP/s",
            file=log,
            flush=True,
        )

    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    json_path = Path(output_dir) / f"bench-{stamp}.json" if output_dir is not None else None
    command = command or "hdgsa-kernels bench " + shlex.join(ops)

    record = make_record(
        device=device_name,
        command=command,
        capabilities=capabilities(),
        ceilings=ceilings,
        measurements=[],
        options={"warmup_ms": warmup_ms, "rep_ms": rep_ms},
    )

    measurements: list[Measurement] = []
    for done, (case, name) in enumerate(work):
        _progress(done, len(work), f"{case.op}: {case.name} / {name}")
        measurement = _time_provider(
            case, name, timer, ceilings, gpu_time, host_time=host_time, profile=profile, device=device
        )
        measurements.append(measurement)
        # one line and a JSON rewrite per measurement: a run cut short keeps what it measured
        line = f"[{done + 1}/{len(work)}] {case.op} | {case.name} | {name} | {_fmt(measurement.ms, '.4f')} ms"
        if measurement.gpu_ms is not None:
            line += f" (GPU {_fmt(measurement.gpu_ms, '.4f')} ms, {measurement.gpu_source})"
        if measurement.host_ms is not None:
            line += f" (host {measurement.host_ms:.4f} ms)"
        print(f"\r{line} {measurement.note}", file=log, flush=True)
        record["results"] = [asdict(m) for m in measurements]
        if json_path is not None:
            write_record(json_path, record)
    _progress(len(work), len(work), "done")
    for case in cases:
        _add_speedups(case, [m for m in measurements if m.op == case.op and m.case == case.name])
    record["results"] = [asdict(m) for m in measurements]

    if markdown:
        page_record = {**record, "results": measurements}
        print(format_markdown(_sections(cases, [page_record]), readings_dir=readings_dir))
    else:
        print(format_results(measurements))
    if json_path is not None:
        write_record(json_path, record)
        print(f"\njson: {json_path}", file=log)
        print(plot(measurements, json_path.with_suffix(".png")), file=log)
    if save_baseline is not None:
        for path in save_baselines(save_baseline, record):
            print(f"baseline: {path}", file=log)
    status = 0
    if compare:

        def selected(row: Measurement) -> bool:
            return (case_filter is None or case_filter in row.case) and (
                not providers or row.provider in providers
            )

        status = _compare(measurements, compare, compare_threshold, selected, log, device_name)
    # ours skipped on purpose (ProviderUnavailable) is reported; ours crashing fails the run
    our_errors = [m for m in measurements if m.ours and m.note.startswith("error")]
    return 1 if our_errors else status


def render_records(
    ops: Sequence[str],
    files: Sequence[str | Path],
    *,
    markdown: bool = False,
    compare: Sequence[str | Path] | None = None,
    compare_threshold: float = 5.0,
    readings_dir: str | Path | None = "benchmarks/readings",
    rendered_by: str | None = None,
    cases: Sequence[BenchCase] | None = None,
) -> int:
    """``bench --from-json``: the tables (or the page) of saved records, and their comparison
    with ``compare``'s baselines, without timing anything. The page lists the ops of ``ops``
    (short names) in their order, each with its rows from ``files`` or, if none, its reading.
    Returns 1 on a regression of ours against ``compare``, else 0."""
    records = load_records(files)
    if cases is None:
        cases = collect_cases(ops)
    wanted = dict.fromkeys(case.op for case in cases)
    for record in records:
        record["results"] = [m for m in record["results"] if m.op in wanted]
    measurements = [m for record in records for m in record["results"]]
    log = sys.stderr if markdown else sys.stdout
    if markdown:
        print(format_markdown(_sections(cases, records), readings_dir=readings_dir, rendered_by=rendered_by))
    else:
        print(format_results(measurements))
    if compare:
        devices = {record["device"] for record in records}
        device_name = devices.pop() if len(devices) == 1 else None
        return _compare(measurements, compare, compare_threshold, None, log, device_name)
    return 0
