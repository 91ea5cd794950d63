#!/usr/bin/env python3
"""Run every package's tests (and the tools' own tests), one pytest process per package.

  python3 tools/run_tests.py

first makes sure .venv holds every package (tools/install_dev.py: a no-op when nothing changed),
then runs `python -m pytest tests` inside each packages/<dist>/ (dependencies first, the
meta-package last) and `pytest tools/tests` at the root, with TRITON_INTERPRET=1 so that the
Triton kernels run on CPU tensors through Triton's interpreter. It stops nowhere: every package
runs, and a summary table comes last.

Modes (--mode): `interpret` (default; Triton must import, so the Triton tests can never be
skipped by a missing install), `plain` (TRITON_INTERPRET unset: the PyTorch backends only on a
CPU machine, the compiled Triton kernels on a GPU one), or `both`.

A package without tests (pytest exit code 5) is reported as "no tests", not as a failure, unless
--require-tests. Arguments after `--` go to every pytest run, e.g. `-- -x -k rmsnorm`.
Exit status 0 when every run passed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import install_dev
from _workspace import ROOT, canonicalize_name, load_packages, topological_order

NO_TESTS_COLLECTED = 5


def test_targets(selected: list[str] | None) -> list[tuple[str, Path, list[str]]]:
    """(label, working directory, pytest paths) for each run, in dependency order."""
    packages = load_packages()
    targets = []
    for name in topological_order(packages):
        if selected is not None and name not in selected:
            continue
        pkg = packages[name]
        targets.append((name, pkg.path, ["tests"]))
    if selected is None or "examples" in selected:
        targets.append(("examples", ROOT, ["examples/tests"]))
    if selected is None or "tools" in selected:
        targets.append(("tools", ROOT, ["tools/tests"]))
    return targets


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    pytest_extra: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, pytest_extra = argv[:cut], argv[cut + 1 :]

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--package",
        "-p",
        action="append",
        metavar="NAME",
        help="only this package (repeatable; 'tools' for tools/tests)",
    )
    parser.add_argument("--mode", choices=["interpret", "plain", "both"], default="interpret")
    parser.add_argument(
        "--no-install",
        action="store_true",
        help="do not touch .venv; run with --python or the interpreter running this script",
    )
    parser.add_argument(
        "--python", help="interpreter to test with (default: .venv's, or this one with --no-install)"
    )
    parser.add_argument("--require-tests", action="store_true", help="a package without tests fails")
    args = parser.parse_args(argv)

    if args.python:
        # Tests run inside each package folder: a relative path must not depend on that.
        python = str(Path(args.python).absolute()) if os.sep in args.python else args.python
    elif args.no_install:
        python = sys.executable
    else:
        if install_dev.main([]) != 0:
            return 1
        python = str(install_dev.venv_python(ROOT / ".venv"))

    selected = None
    if args.package:
        selected = [
            p if p == "tools" else canonicalize_name(p.removeprefix("packages/").rstrip("/"))
            for p in args.package
        ]

    modes = ["interpret", "plain"] if args.mode == "both" else [args.mode]
    if "interpret" in modes:
        probe = subprocess.run([python, "-c", "import triton"], capture_output=True, text=True, check=False)
        if probe.returncode != 0:
            print(
                f"error: triton does not import in {python}; the interpreter mode needs it:", file=sys.stderr
            )
            print(probe.stderr.strip().splitlines()[-1] if probe.stderr.strip() else "", file=sys.stderr)
            return 1

    results: list[tuple[str, str, str, float]] = []
    for mode in modes:
        env = dict(os.environ)
        if mode == "interpret":
            env["TRITON_INTERPRET"] = "1"
        else:
            env.pop("TRITON_INTERPRET", None)
        for label, cwd, paths in test_targets(selected):
            if not all((cwd / p).is_dir() for p in paths):
                results.append((label, mode, "no tests", 0.0))
                continue
            cmd = [python, "-m", "pytest", *paths, *pytest_extra]
            print(
                f"\n=== {label} [{mode}]: {' '.join(cmd[1:])} (in {cwd.relative_to(ROOT) or '.'})", flush=True
            )
            start = time.monotonic()
            code = subprocess.run(cmd, cwd=cwd, env=env, check=False).returncode
            elapsed = time.monotonic() - start
            if code == 0:
                status = "passed"
            elif code == NO_TESTS_COLLECTED:
                status = "no tests"
            else:
                status = f"FAILED (exit {code})"
            results.append((label, mode, status, elapsed))

    print("\n=== summary")
    failed = False
    for label, mode, status, elapsed in results:
        print(f"  {label:22s} {mode:10s} {status:18s} {elapsed:7.1f} s")
        if status.startswith("FAILED") or (status == "no tests" and args.require_tests):
            failed = True
    print("FAILED" if failed else "ok")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
