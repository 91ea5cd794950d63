"""``hdgsa-kernels`` / ``python -m hdgsa_kernels``: info, check, bench (SPEC section 5)."""

from __future__ import annotations

import argparse
import sys
import traceback
from collections.abc import Sequence

import torch

from hdgsa_core import capabilities
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
    return 0


def _check_devices(requested: str) -> list[torch.device]:
    if requested == "all":
        return [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    return [torch.device(requested)]


def _check(args: argparse.Namespace) -> int:
    ops = resolve_op_names(args.ops)
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
    from .bench import run_benchmarks

    return run_benchmarks(
        resolve_op_names(args.ops),
        output_dir=args.output_dir,
        providers=args.providers,
        case_filter=args.filter,
        warmup_ms=args.warmup_ms,
        rep_ms=args.rep_ms,
        gpu_time=args.gpu_time,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hdgsa-kernels", description=__doc__)
    parser.add_argument("--version", action="version", version=f"hdgsa-kernels {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("info", help="versions, flags, devices").set_defaults(run=_info)

    check = commands.add_parser("check", help="every op, every backend that can run here, fwd+bwd vs float64")
    check.add_argument("ops", nargs="*", help=f"ops to check (default all): {', '.join(OP_PACKAGES)}")
    check.add_argument(
        "--device", default="all", help="cpu, cuda, or all (default: cpu, plus cuda if present)"
    )
    check.set_defaults(run=_check)

    bench = commands.add_parser("bench", help="time every op against its peers on the GPU")
    bench.add_argument("ops", nargs="*", help=f"ops to time (default all): {', '.join(OP_PACKAGES)}")
    bench.add_argument("--output-dir", default="bench-results", help="where the JSON and PNG go")
    bench.add_argument("--providers", nargs="*", default=None, help="only these providers (default all)")
    bench.add_argument("--filter", default=None, help="only cases whose name contains this text")
    bench.add_argument("--warmup-ms", type=float, default=25.0)
    bench.add_argument("--rep-ms", type=float, default=100.0)
    bench.add_argument(
        "--gpu-time",
        action="store_true",
        help="also time one call replayed from a CUDA graph (GPU time without host time)",
    )
    bench.set_defaults(run=_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except ValueError as error:  # bad op names and the like: a usage error, not a traceback
        print(f"hdgsa-kernels: error: {error}", file=sys.stderr)
        return 2
