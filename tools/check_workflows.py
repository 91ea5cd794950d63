#!/usr/bin/env python3
"""Check the GitHub Actions workflows like code, offline.

Runs
  check-jsonschema --builtin-schema vendor.github-workflows .github/workflows/*.yml
      (the schema ships inside check-jsonschema: no network), and
  zizmor --offline --min-severity medium .github/
      (security audit: unpinned actions, excessive permissions, credentials persisted by
      checkout, template injection...; offline skips only the audits that ask GitHub's API),
and fails when either reports anything. Both tools come from PyPI (tools/requirements-dev.txt);
they are looked up beside the running interpreter first, then on PATH.

Exit status 0 when the workflows are valid and no medium or high finding remains, 1 otherwise.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def find_tool(name: str) -> str | None:
    here = Path(sys.executable).parent / name
    if here.exists():
        return str(here)
    return shutil.which(name)


def run(cmd: list[str]) -> int:
    print("$ " + " ".join(str(c) for c in cmd), flush=True)
    return subprocess.run(cmd, cwd=ROOT, check=False).returncode


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--github-dir", type=Path, default=ROOT / ".github", help="folder to check (default: .github)"
    )
    parser.add_argument(
        "--min-severity",
        default="medium",
        choices=["informational", "low", "medium", "high"],
        help="lowest zizmor severity that fails the check (default: medium)",
    )
    args = parser.parse_args(argv)

    github_dir: Path = args.github_dir.resolve()
    workflows = sorted((github_dir / "workflows").glob("*.yml")) + sorted(
        (github_dir / "workflows").glob("*.yaml")
    )
    if not workflows:
        print(f"error: no workflows under {github_dir / 'workflows'}", file=sys.stderr)
        return 1

    failures: list[str] = []
    check_jsonschema = find_tool("check-jsonschema")
    zizmor = find_tool("zizmor")
    for name, path in (("check-jsonschema", check_jsonschema), ("zizmor", zizmor)):
        if path is None:
            failures.append(f"{name} is not installed (pip install -r tools/requirements-dev.txt)")
    if failures:
        for failure in failures:
            print(f"error: {failure}", file=sys.stderr)
        return 1

    if run([check_jsonschema, "--builtin-schema", "vendor.github-workflows", *map(str, workflows)]) != 0:
        failures.append("check-jsonschema: a workflow does not match the GitHub workflow schema")
    zizmor_cmd = [zizmor, "--offline", "--no-progress", "--min-severity", args.min_severity, str(github_dir)]
    if run(zizmor_cmd) != 0:
        failures.append(f"zizmor: findings of severity {args.min_severity} or higher (or an error)")

    for failure in failures:
        print(f"error: {failure}", file=sys.stderr)
    if failures:
        return 1
    print(f"ok: {len(workflows)} workflows valid, no zizmor findings at {args.min_severity} or above")
    return 0


if __name__ == "__main__":
    sys.exit(main())
