#!/usr/bin/env python3
"""List the workspace packages a change touches, as a JSON matrix for CI.

A package is touched when a file under packages/<dist>/ changes, and so is every package that
depends on a touched one, directly or not: a change to hdgsa-core touches every package, a change
to an op touches that op and the meta-package hdgsa-kernels, a change to the meta touches only
itself. A change to shared build or CI files (pyproject.toml at the root, tools/, .github/, .ci/)
touches every package; documentation at the root (README.md, LICENSE, *.md) touches none.

The change is given as a git diff range, `BASE..HEAD` or `BASE...HEAD` (files changed on HEAD
since it forked from BASE), or as file paths with --files. It prints

  {"include": [{"package": "hdgsa-core", "path": "packages/hdgsa-core"}, ...]}

in dependency order, and with --github-output also writes `matrix=<that JSON>` and
`any=true|false` to $GITHUB_OUTPUT. Use --all for every package.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path, PurePosixPath

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _workspace import ROOT, Package, load_packages, topological_order

# Root files that change no package's build, tests or metadata.
DOC_ONLY_SUFFIXES = (".md", ".rst", ".txt")
DOC_ONLY_NAMES = {"LICENSE", ".gitignore", ".gitattributes"}


def packages_for_files(files: Iterable[str], packages: dict[str, Package]) -> set[str]:
    """The packages whose own files changed (before following reverse dependencies)."""
    by_dir = {pkg.rel_path: name for name, pkg in packages.items()}
    touched: set[str] = set()
    for file in files:
        path = PurePosixPath(file.strip())
        if not path.parts:
            continue
        if path.parts[0] == "packages":
            if len(path.parts) >= 2:
                owner = by_dir.get(f"packages/{path.parts[1]}")
                if owner is not None:
                    touched.add(owner)
                # A folder under packages/ that is not a package (yet) touches nothing.
            continue
        if len(path.parts) == 1 and (path.name in DOC_ONLY_NAMES or path.suffix in DOC_ONLY_SUFFIXES):
            continue
        if path.parts[0] == "tools" and path.parts[-1].endswith(".md"):
            continue
        # Shared build/CI configuration: root pyproject.toml, tools/, .ci/, .github/, anything else.
        return set(packages)
    return touched


def with_dependents(touched: set[str], packages: dict[str, Package]) -> set[str]:
    """`touched` plus every package that depends on one of them, transitively."""
    members = set(packages)
    dependents: dict[str, set[str]] = {name: set() for name in packages}
    for name, pkg in packages.items():
        for dep in pkg.member_dependencies(members):
            dependents[dep].add(name)
    result = set(touched)
    stack = list(touched)
    while stack:
        for user in dependents.get(stack.pop(), ()):
            if user not in result:
                result.add(user)
                stack.append(user)
    return result


def matrix(names: set[str], packages: dict[str, Package]) -> dict[str, list[dict[str, str]]]:
    order = [n for n in topological_order(packages) if n in names]
    return {"include": [{"package": n, "path": packages[n].rel_path} for n in order]}


def changed_files(diff_range: str) -> list[str]:
    result = subprocess.run(
        ["git", "diff", "--name-only", "--no-renames", diff_range, "--"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        sys.exit(f"git diff {diff_range} failed: {result.stderr.strip()}")
    return [line for line in result.stdout.splitlines() if line.strip()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("range", nargs="?", help="git diff range, e.g. origin/main...HEAD")
    source.add_argument(
        "--files", nargs="*", metavar="PATH", help="changed paths, relative to the repository root"
    )
    source.add_argument("--all", action="store_true", help="every package")
    parser.add_argument("--names", action="store_true", help="print one package name a line instead of JSON")
    parser.add_argument(
        "--github-output",
        action="store_true",
        help="also append matrix= and any= to the file named by $GITHUB_OUTPUT",
    )
    args = parser.parse_args(argv)

    packages = load_packages()
    if args.all:
        touched = set(packages)
    else:
        files = args.files if args.files is not None else changed_files(args.range)
        touched = with_dependents(packages_for_files(files, packages), packages)
    result = matrix(touched, packages)

    if args.names:
        for entry in result["include"]:
            print(entry["package"])
    else:
        print(json.dumps(result))
    if args.github_output:
        out = os.environ.get("GITHUB_OUTPUT")
        if not out:
            print("error: --github-output given but $GITHUB_OUTPUT is not set", file=sys.stderr)
            return 1
        with open(out, "a", encoding="utf-8") as f:
            f.write(f"matrix={json.dumps(result, separators=(',', ':'))}\n")
            f.write(f"any={'true' if result['include'] else 'false'}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
