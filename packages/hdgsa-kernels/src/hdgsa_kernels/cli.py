"""``hdgsa-kernels`` / ``python -m hdgsa_kernels``: info, check, bench."""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import traceback
from collections.abc import Sequence

import torch

from hdgsa_core import capabilities
from hdgsa_core.backend import BACKEND_ENV_VAR
from hdgsa_core.capabilities import fla_unusable_reason
from hdgsa_core.registry import CheckResult

from . import __version__
from .ops import OP_PACKAGES, import_op_module, resolve_op_names

__all__ = ["build_parser", "main"]


def _format_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    cells = [[str(cell) for cell in row] for row in rows]
    widths = [max([len(header)] + [len(row[i]) for row in cells]) for i, header in enumerate(headers)]
    lines = ["  ".join(header.ljust(width) for header, width in zip(headers, widths, strict=True))]
    lines.append("  ".join("-" * width for width in widths))
    lines += ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(lines)


def _info(_: argparse.Namespace) -> int:
    from importlib.metadata import PackageNotFoundError, version

    print(f"hdgsa-kernels {__version__}")
    for name in [
        "hdgsa-core",
        *(f"hdgsa-{op}" if op != "deltanet" else "hdgsa-deltanet-fla" for op in OP_PACKAGES),
    ]:
        try:
            print(f"  {name:<20} {version(name)}")
        except PackageNotFoundError:
            print(f"  {name:<20} not installed")
    for key, value in capabilities().items():
        print(f"{key:<20} {value}")
    reason = fla_unusable_reason()
    if reason is not None:
        print(f"HAS_FLA is False: {reason}")
    override = os.environ.get(BACKEND_ENV_VAR)
    if override and override not in _BACKEND_NAMES:
        print(
            f"warning: {BACKEND_ENV_VAR}={override!r} is not a backend name ({', '.join(_BACKEND_NAMES)}):"
            f" every call with backend='auto' will raise ValueError; unset it or pick one of those",
            file=sys.stderr,
        )
    return 0


# What HDGSA_BACKEND may hold: "triton" covers every op ("fla" is the deltanet op's name for it).
_BACKEND_NAMES = ("torch", "triton", "fla")


def _check_devices(requested: str) -> list[torch.device]:
    if requested == "all":
        return [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    return [torch.device(requested)]


def _check(args: argparse.Namespace) -> int:
    ops = resolve_op_names(args.ops)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("hdgsa-kernels check: --device cuda needs a CUDA GPU (none found)", file=sys.stderr)
        return 1
    rows: list[list[object]] = []
    failures = 0
    for device in _check_devices(args.device):
        for op in ops:
            print(f"checking {op} on {device} ...", file=sys.stderr, flush=True)
            try:
                results: list[CheckResult] = import_op_module(op, "selfcheck").self_check(device)
            except Exception as error:  # a crash is a failed check, reported and counted
                traceback.print_exc()
                rows.append(
                    [op, "-", str(device), "-", "-", "-", "-", f"ERROR {type(error).__name__}: {error}"]
                )
                failures += 1
                continue
            if not results:
                rows.append([op, "-", str(device), "-", "-", "-", "-", "FAIL: no results"])
                failures += 1
            for result in results:
                status = "ok" if result.passed else "FAIL"
                failures += not result.passed
                rows.append(
                    [
                        result.op,
                        result.backend,
                        str(device),
                        result.case,
                        result.output,
                        f"{result.error:.2e}",
                        f"{result.tol:.0e}",
                        status,
                    ]
                )
    print(_format_table(["op", "backend", "device", "case", "output", "rel err", "tol", "status"], rows))
    print(f"\n{len(rows) - failures} passed, {failures} failed")
    return 1 if failures else 0


def _bench(args: argparse.Namespace) -> int:
    from .bench import render_records, run_benchmarks

    ops = resolve_op_names(args.ops)
    command = "hdgsa-kernels " + shlex.join(args.argv)
    if args.from_json:
        return render_records(
            ops,
            args.from_json,
            markdown=args.markdown,
            compare=args.compare,
            compare_threshold=args.compare_threshold,
            readings_dir=args.readings,
            rendered_by=command,
        )
    return run_benchmarks(
        ops,
        output_dir=args.output_dir,
        providers=args.providers,
        case_filter=args.filter,
        warmup_ms=args.warmup_ms,
        rep_ms=args.rep_ms,
        gpu_time=args.gpu_time,
        host_time=args.host_time,
        profile=args.profile,
        markdown=args.markdown,
        compare=args.compare,
        compare_threshold=args.compare_threshold,
        save_baseline=args.baseline_dir if args.save_baseline else None,
        readings_dir=args.readings,
        command=command,
        device=args.device,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hdgsa-kernels",
        description="Versions and flags (info), self-checks against float64 (check) and benchmarks (bench) of the hdgsa op packages.",
    )
    parser.add_argument("--version", action="version", version=f"hdgsa-kernels {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("info", help="versions, flags, devices").set_defaults(run=_info)

    check = commands.add_parser("check", help="every op, every backend that can run here, fwd+bwd vs float64")
    check.add_argument("ops", nargs="*", help=f"ops to check (default all): {', '.join(OP_PACKAGES)}")
    check.add_argument(
        "--device", default="all", help="cpu, cuda, or all (default: cpu, plus cuda if present)"
    )
    check.set_defaults(run=_check)

    bench = commands.add_parser(
        "bench",
        help="time every op against its peers on the GPU",
        description=(
            "Time every benchmark case of each op for every provider (ours, PyTorch, torch.compile,"
            " the installed peers) on the GPU with triton.testing.do_bench (median ms, L2 flushed"
            " between calls). Prints one table per op and writes the run's JSON and a plot."
            " Baselines: --save-baseline writes benchmarks/<op>-<device>.json per op (run from the"
            " repository root), --compare diffs a run against them. The benchmark page:"
            " hdgsa-kernels bench --save-baseline --markdown > BENCHMARKS.md, or, from saved"
            " baselines without a GPU, hdgsa-kernels bench --markdown --from-json benchmarks/*.json."
        ),
    )
    bench.add_argument("ops", nargs="*", help=f"ops to time (default all): {', '.join(OP_PACKAGES)}")
    bench.add_argument(
        "--output-dir",
        default="bench-results",
        help="where each run writes its JSON (every row, rewritten after each row) and its plot",
    )
    bench.add_argument(
        "--device",
        choices=("cuda", "cpu"),
        default="cuda",
        help="cuda (default): every case on the GPU; cpu: the cases that run on the CPU (the"
        " PyTorch backends against per-step loops), timed by wall clock",
    )
    bench.add_argument("--providers", nargs="*", default=None, help="only these providers (default all)")
    bench.add_argument("--filter", default=None, help="only cases whose name contains this text")
    bench.add_argument(
        "--warmup-ms",
        type=float,
        default=25.0,
        help="milliseconds of warm-up calls before each timing (do_bench's warmup; default 25)",
    )
    bench.add_argument(
        "--rep-ms",
        type=float,
        default=100.0,
        help="milliseconds of timed calls per measurement, whose median is reported (default 100)",
    )
    bench.add_argument(
        "--gpu-time",
        action="store_true",
        help="also time one call replayed from a CUDA graph (GPU time without host time), or, for"
        " a call that cannot be captured, the sum of its kernels' times (marked k)",
    )
    bench.add_argument(
        "--host-time",
        action="store_true",
        help="also measure the host time of one call: the median wall time Python spends in the"
        " call, the GPU idle when it starts and not waited for when it returns (the Python,"
        " dispatch and kernel launches a step pays per call whatever the shape)",
    )
    bench.add_argument(
        "--profile",
        nargs="?",
        type=int,
        const=5,
        default=0,
        metavar="N",
        help="also list each row's N slowest kernels (default 5) by GPU time, from the PyTorch profiler",
    )
    bench.add_argument(
        "--markdown",
        action="store_true",
        help="print the tables as the Markdown benchmark page (a header with the device, versions,"
        " commit and this command; one table per op with its reading from --readings); progress"
        " goes to stderr",
    )
    bench.add_argument(
        "--save-baseline",
        action="store_true",
        help="write one baseline JSON per op and device, <baseline dir>/<op>-<device>.json,"
        " replacing the previous one",
    )
    bench.add_argument(
        "--baseline-dir",
        default="benchmarks",
        metavar="DIR",
        help="where --save-baseline writes (default benchmarks: run from the repository root)",
    )
    bench.add_argument(
        "--compare",
        nargs="+",
        default=None,
        metavar="FILE",
        help="compare with these baseline JSON files: list rows slower or faster by more than"
        " --compare-threshold and rows not timed now; exit 1 if one of ours got slower (name the"
        " ops before this option)",
    )
    bench.add_argument(
        "--compare-threshold",
        type=float,
        default=5.0,
        metavar="PCT",
        help="percent of ms a row may lose against its baseline before it is flagged (default 5)",
    )
    bench.add_argument(
        "--from-json",
        nargs="+",
        default=None,
        metavar="FILE",
        help="time nothing: print the tables (or, with --markdown, the page) of these saved JSON"
        " files, and compare them with --compare's; needs no GPU (name the ops before this option)",
    )
    bench.add_argument(
        "--readings",
        default="benchmarks/readings",
        metavar="DIR",
        help="where --markdown finds the hand-written reading of each op, DIR/<op>.md, and"
        " DIR/intro.md for the page (default benchmarks/readings; missing files are left out)",
    )
    bench.set_defaults(run=_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    try:
        return args.run(args)
    except ValueError as error:  # bad op names and the like: a usage error, not a traceback
        print(f"hdgsa-kernels: error: {error}", file=sys.stderr)
        return 2
