"""What ``hdgsa-kernels bench`` does with its measurements: tables, JSON records, baselines,
comparisons and the Markdown page. Nothing here needs a GPU (``bench --from-json`` renders and
compares saved records on any machine).

A record (the JSON a run writes, and each baseline file) is::

    {"format": 1, "date": ..., "device": ..., "command": ..., "commit": ..., "versions": {...},
     "ceilings": {"copy_gbps": ..., "matmul_tflops": ...}, "note": ..., "results": [Measurement...]}

``note`` is optional free text (where carried figures came from). Records written before these
fields existed load too (versions then come from their ``capabilities``).
"""

from __future__ import annotations

import datetime
import json
import re
import subprocess
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

__all__ = [
    "Ceilings",
    "Comparison",
    "Measurement",
    "baseline_path",
    "compare_results",
    "device_slug",
    "format_comparison",
    "format_markdown",
    "format_results",
    "load_records",
    "save_baselines",
]

RECORD_FORMAT = 1


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
    host_ms: float | None = None  # host time of one call (host_time runs only)
    top_kernels: list[tuple[str, float]] = field(default_factory=list)  # (name, ms per call)

    @classmethod
    def from_dict(cls, row: dict) -> Measurement:
        """A row of a saved record (unknown keys ignored, missing ones at their defaults)."""
        known = {f.name for f in fields(cls)}
        values = {key: value for key, value in row.items() if key in known}
        values["top_kernels"] = [tuple(item) for item in values.get("top_kernels") or ()]
        return cls(**values)


# ----------------------------------------------------------------------------- records


def device_slug(device_name: str) -> str:
    """A file-name part for a device: "NVIDIA H100 80GB HBM3" -> "h100-80gb-hbm3"."""
    name = re.sub(r"^nvidia\s+", "", device_name.strip().lower())
    return re.sub(r"[^a-z0-9]+", "-", name).strip("-") or "device"


def baseline_path(directory: str | Path, op: str, device_name: str) -> Path:
    """``<directory>/<op>-<device slug>.json``: one baseline per op and device."""
    return Path(directory) / f"{op}-{device_slug(device_name)}.json"


def git_commit(cwd: str | Path | None = None) -> str:
    """The checkout's short commit, with ``+changes`` when tracked files are modified; "unknown"
    outside a git checkout (an installed package run elsewhere)."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=cwd, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=cwd,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + ("+changes" if dirty else "")


def package_versions(capabilities: dict[str, object]) -> dict[str, str]:
    """torch, Triton, fla-core (from ``capabilities``), this package and the installed peers."""
    from importlib.metadata import PackageNotFoundError, version

    versions = {
        name: str(capabilities[name]) for name in ("torch", "triton", "fla-core") if capabilities.get(name)
    }
    for name in ("hdgsa-kernels", "liger-kernel", "quack-kernels"):
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            continue
    return versions


def make_record(
    *,
    device: str,
    command: str,
    capabilities: dict[str, object],
    ceilings: Ceilings | None,
    measurements: Sequence[Measurement],
    options: dict[str, object] | None = None,
) -> dict:
    """A run's record (see the module docstring), dated now, at the current git commit."""
    return {
        "format": RECORD_FORMAT,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": device,
        "command": command,
        "commit": git_commit(),
        "versions": package_versions(capabilities),
        "capabilities": capabilities,
        "ceilings": asdict(ceilings) if ceilings else None,
        "options": options or {},
        "results": [asdict(m) for m in measurements],
    }


def write_record(path: str | Path, record: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1, default=str) + "\n", encoding="utf-8")


def save_baselines(directory: str | Path, record: dict) -> list[Path]:
    """Split a run's record by op and write ``<directory>/<op>-<device>.json`` for each,
    replacing the previous baseline of that op and device."""
    written = []
    ops = dict.fromkeys(row["op"] for row in record["results"])
    for op in ops:
        path = baseline_path(directory, op, record["device"])
        write_record(path, {**record, "results": [r for r in record["results"] if r["op"] == op]})
        written.append(path)
    return written


def load_records(paths: Iterable[str | Path]) -> list[dict]:
    """Saved records, each with ``results`` as :class:`Measurement` objects and the fields of
    older records filled in (``versions`` from ``capabilities``, "unknown" commit and command)."""
    records = []
    for path in paths:
        record = json.loads(Path(path).read_text(encoding="utf-8"))
        record["results"] = [Measurement.from_dict(row) for row in record.get("results", [])]
        record.setdefault("versions", package_versions(record.get("capabilities", {})))
        for key in ("command", "commit", "date", "device"):
            record[key] = record.get(key) or "unknown"
        record["path"] = str(path)
        records.append(record)
    return records


# ----------------------------------------------------------------------------- comparison


@dataclass
class Comparison:
    """Rows of a run against a baseline. Each entry is one readable line."""

    regressions: list[str] = field(default_factory=list)  # ours, slower beyond the threshold
    peer_regressions: list[str] = field(default_factory=list)  # a peer slower: not a failure
    improvements: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # in the baseline, not timed now
    new: list[str] = field(default_factory=list)  # timed now, not in the baseline
    compared: int = 0

    @property
    def failed(self) -> bool:
        return bool(self.regressions)


def _is_ours(row: Measurement, ours_provider: dict[tuple[str, str], str]) -> bool:
    """Our provider of the case, or a variant of it named ``<ours>-...`` (``hdgsa-direct``)."""
    name = ours_provider.get((row.op, row.case))
    return row.ours or (name is not None and row.provider.startswith(name + "-"))


def compare_results(
    current: Sequence[Measurement],
    baseline: Sequence[Measurement],
    threshold_pct: float = 5.0,
    selected: Callable[[Measurement], bool] | None = None,
) -> Comparison:
    """Compare the ``ms`` of every (op, case, provider) row timed now with the baseline's.

    A row slower than its baseline by more than ``threshold_pct`` percent is a regression
    (ours) or a peer regression (any other provider); faster by as much, an improvement.
    Baseline rows of ops this run did not time are ignored; of the others, those that
    ``selected`` keeps (default all) and that have no time now are reported missing.
    """
    factor = 1.0 + threshold_pct / 100.0
    now = {(m.op, m.case, m.provider): m for m in current}
    ours_provider = {(m.op, m.case): m.provider for m in (*baseline, *current) if m.ours}
    ops_now = {m.op for m in current}
    result = Comparison()
    for old in baseline:
        key = (old.op, old.case, old.provider)
        if old.op not in ops_now or old.ms is None or (selected is not None and not selected(old)):
            continue
        label = f"{old.op} | {old.case} | {old.provider}"
        row = now.get(key)
        if row is None or row.ms is None:
            why = f" ({row.note})" if row is not None and row.note else ""
            result.missing.append(f"{label}: {old.ms:.4f} ms in the baseline, not timed now{why}")
            continue
        result.compared += 1
        change = f"{label}: {old.ms:.4f} -> {row.ms:.4f} ms ({100.0 * (row.ms / old.ms - 1.0):+.1f}%)"
        if row.ms > old.ms * factor:
            (result.regressions if _is_ours(row, ours_provider) else result.peer_regressions).append(change)
        elif row.ms * factor < old.ms:
            result.improvements.append(change)
    known = {(m.op, m.case, m.provider) for m in baseline}
    result.new = [
        f"{m.op} | {m.case} | {m.provider}: {m.ms:.4f} ms, not in the baseline"
        for m in current
        if m.ms is not None and (m.op, m.case, m.provider) not in known and m.op in {b.op for b in baseline}
    ]
    return result


def format_comparison(comparison: Comparison, threshold_pct: float, sources: Sequence[str]) -> str:
    lines = [
        f"\ncompared with {', '.join(sources)}: {comparison.compared} rows, threshold {threshold_pct:g}%"
    ]
    sections = (
        ("REGRESSION (ours, slower)", comparison.regressions),
        ("slower peer (not a failure)", comparison.peer_regressions),
        ("faster", comparison.improvements),
        ("missing", comparison.missing),
        ("new", comparison.new),
    )
    for title, entries in sections:
        lines += [f"  {title}: {entry}" for entry in entries]
    lines.append(
        f"{len(comparison.regressions)} regression(s), {len(comparison.peer_regressions)} slower peer row(s),"
        f" {len(comparison.improvements)} faster, {len(comparison.missing)} missing, {len(comparison.new)} new"
    )
    return "\n".join(lines)


# ----------------------------------------------------------------------------- text table


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def format_results(measurements: Sequence[Measurement]) -> str:
    """One table per op: ms, GPU ms and host ms (when measured), GB/s, TFLOP/s, % of roofline,
    peak MiB, speed-up of ours; then each row's top kernels (when profiled)."""
    with_gpu_ms = any(m.gpu_ms is not None for m in measurements)
    with_host = any(m.host_ms is not None for m in measurements)
    headers = ["case", "provider", "ms"]
    headers += ["GPU ms"] * with_gpu_ms + ["host ms"] * with_host
    headers += ["GB/s", "TFLOP/s", "% roof", "peak MiB", "ours x", "note"]
    out = []
    for op in dict.fromkeys(m.op for m in measurements):
        rows = [
            [
                m.case,
                m.provider,
                _fmt(m.ms, ".4f"),
                *([_fmt(m.gpu_ms, ".4f") + ("k" if m.gpu_source == "kernels" else "")] * with_gpu_ms),
                *([_fmt(m.host_ms, ".4f")] * with_host),
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
        out += _kernel_lines(m for m in measurements if m.op == op)
    out.append("\n'ours x' on a peer row: peer ms / ours ms; on ours: best peer ms / ours ms.")
    if with_gpu_ms:
        out.append(
            "'GPU ms': one call replayed from a CUDA graph, or, marked k, the sum of its kernels'"
            " times (profiler) where it cannot be captured; no host time, L2 warm between calls."
        )
    if with_host:
        out.append(f"'host ms': {HOST_TIME_MEANING}")
    return "\n".join(out)


HOST_TIME_MEANING = (
    "median wall time of one call as Python sees it, the GPU idle when the call starts and not"
    " waited for when it returns: the Python, dispatch and kernel-launch cost that a step pays"
    " per call whatever the shape (a call that synchronizes the host also counts its GPU time)."
)


def _kernel_lines(rows: Iterable[Measurement], bullet: str = "  ") -> list[str]:
    lines = []
    for m in rows:
        if m.top_kernels:
            total = sum(ms for _, ms in m.top_kernels)
            lines.append(f"{bullet}{m.case} / {m.provider}: top kernels, ms per call (shown: {total:.4f})")
            lines += [f"{bullet}    {ms:.4f}  {name[:100]}" for name, ms in m.top_kernels]
    return lines


# ----------------------------------------------------------------------------- Markdown page


def _ms_text(ms: float) -> str:
    return f"{ms:.0f}" if ms >= 1000 else f"{ms:.4g}"


def _cell(m: Measurement, ours: Measurement | None) -> str:
    if m.ms is None:
        return "-"
    text = _ms_text(m.ms)
    if m is ours:
        text = f"**{text}**"
    extras = []
    if m.gpu_ms is not None:
        extras.append(f"GPU {_ms_text(m.gpu_ms)}{'k' if m.gpu_source == 'kernels' else ''}")
    if m.host_ms is not None:
        extras.append(f"host {_ms_text(m.host_ms)}")
    if extras:
        text += f" ({', '.join(extras)})"
    if m is not ours and m.speedup is not None:
        text += f" {m.speedup:.2f}x"
    return text


def _markdown_table(rows: Sequence[Measurement]) -> list[str]:
    cases = list(dict.fromkeys(m.case for m in rows))
    providers = list(dict.fromkeys(m.provider for m in sorted(rows, key=lambda m: not m.ours)))
    by_key = {(m.case, m.provider): m for m in rows}
    lines = [
        "| case | % roof | " + " | ".join(providers) + " |",
        "|---|---:|" + "---:|" * len(providers),
    ]
    for case in cases:
        ours = next(
            (by_key[case, p] for p in providers if (case, p) in by_key and by_key[case, p].ours), None
        )
        roof = _fmt(ours.roofline_pct if ours else None, ".1f")
        cells = [_cell(by_key[case, p], ours) if (case, p) in by_key else "" for p in providers]
        lines.append(f"| {case} | {roof} | " + " | ".join(cells) + " |")
    untimed = dict.fromkeys(f"{m.provider}: {m.note}" for m in rows if m.ms is None and m.note)
    if untimed:
        lines.append("")
        lines.append("Not timed: " + "; ".join(note[:160] for note in untimed) + ".")
    kernels = _kernel_lines(rows, bullet="")
    if kernels:
        lines += ["", "```", *kernels, "```"]
    return lines


def _run_lines(record: dict) -> list[str]:
    ceilings = record.get("ceilings") or {}
    versions = ", ".join(f"{name} {value}" for name, value in record["versions"].items())
    device = record["device"]
    if ceilings:
        device += (
            f" (measured at the start of the run: copy {ceilings['copy_gbps']:.0f} GB/s,"
            f" bf16 matmul {ceilings['matmul_tflops']:.0f} TFLOP/s)"
        )
    lines = [
        f"- device: {device}",
        f"- versions: {versions}",
        f"- commit: `{record['commit']}`",
        f"- command: `{record['command']}`",
        f"- date: {record['date']}",
    ]
    if record.get("note"):
        lines.append(f"- source: {record['note']}")
    return lines


LEGEND = (
    "Each cell: the `triton.testing.do_bench` median in ms (L2 flushed between calls; ours in"
    " bold), then in brackets the GPU time of one call where measured (`--gpu-time`: replayed"
    " from a CUDA graph, or, marked k, the sum of its kernels' times) and the host time of one"
    " call (`--host-time`), then, on a peer, that peer's ms over ours (above 1: ours is faster)."
    " `% roof`: the op's minimum bytes over the copy bandwidth (or FLOPs over the matmul rate,"
    " whichever bounds it) divided by our time. Where the do_bench ms is well above the GPU time,"
    " it measured host time."
)


def format_markdown(
    sections: Sequence[tuple[str, Sequence[tuple[Sequence[Measurement], dict]]]],
    *,
    readings_dir: str | Path | None = None,
    rendered_by: str | None = None,
) -> str:
    """The benchmark page: a header naming the run (device, versions, commit, exact command),
    then one section per op: its table (one per run that timed it, e.g. one per device) and the
    op's reading, ``<readings_dir>/<op>.md``, when that file exists (``<readings_dir>/intro.md``
    goes under the header).

    ``sections``: ``(op, [(rows, record), ...])`` in page order; ``record`` holds the run's
    metadata. An op without runs gets its reading only. When the tables come from different
    runs, each names its own.
    """
    readings = Path(readings_dir) if readings_dir else None
    runs = list({id(record): record for _, tables in sections for _, record in tables}.values())
    lines = ["# Benchmarks", ""]
    if len(runs) == 1:
        lines += ["Generated by `hdgsa-kernels bench --markdown` from one run:", "", *_run_lines(runs[0])]
    elif runs:
        lines.append(
            "Generated by `hdgsa-kernels bench --markdown` from several runs; each table names its run."
        )
    if rendered_by:
        lines += ["", f"Rendered from the saved records with `{rendered_by}`."]
    lines += ["", LEGEND]
    if readings is not None and (readings / "intro.md").is_file():
        lines += ["", (readings / "intro.md").read_text(encoding="utf-8").strip()]
    for op, tables in sections:
        lines += ["", f"## {op}", ""]
        if not tables:
            lines.append("No figures in this run.")
        for index, (rows, record) in enumerate(tables):
            if index:
                lines.append("")
            if len(runs) > 1:
                lines += [*_run_lines(record), ""]
            lines += _markdown_table(rows)
        reading = readings / f"{op}.md" if readings is not None else None
        if reading is not None and reading.is_file():
            lines += ["", reading.read_text(encoding="utf-8").strip()]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- plot


def plot(measurements: Sequence[Measurement], path: Path) -> str:
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
