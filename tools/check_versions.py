#!/usr/bin/env python3
"""Check the versions and dependencies the workspace packages declare to each other.

Without arguments it checks that:
  * every package has a static PEP 440 `project.version`, and the `__version__ = "..."` literal in
    its src/<import>/__init__.py (when it has one) says the same;
  * every requirement on another workspace member is a version range (e.g.
    `hdgsa-core>=0.1,<0.2`), never a file path or URL, and admits that member's current version;
  * the meta-package (hdgsa-kernels) depends on every other member with a `~=` pin that admits the
    member's current version (`~=0.1.0` admits 0.1.x, so a minor bump of a member needs a new meta pin).

With `--tag TAG` it checks instead that a release tag `hdgsa-<name>-v<version>` (for example
hdgsa-rmsnorm-v0.1.0, hdgsa-core-v0.1.0, hdgsa-kernels-v0.1.0) names a workspace package and
equals its version, prints the package's folder, and with `--github-output` also writes
`package=`, `path=` and `version=` lines to $GITHUB_OUTPUT for the release workflow.

Exit status: 0 when everything holds, 1 with one line per problem otherwise.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _workspace import (
    META_PACKAGE,
    TAG_RE,
    InvalidRequirement,
    Package,
    Requirement,
    Version,
    canonicalize_name,
    load_packages,
)


def check_packages(packages: dict[str, Package], meta: str = META_PACKAGE) -> list[str]:
    """Problems with versions and member dependencies, one message each (empty when all is well)."""
    problems: list[str] = []
    members = set(packages)
    for pkg in packages.values():
        try:
            Version(pkg.version)
        except Exception:
            problems.append(f"{pkg.name}: version {pkg.version!r} is not a PEP 440 version")
            continue
        init_version = module_version(pkg)
        if init_version is not None and init_version != pkg.version:
            problems.append(
                f"{pkg.name}: src/{pkg.import_name}/__init__.py has __version__ = {init_version!r} "
                f"but pyproject.toml has version {pkg.version!r}"
            )
    for pkg in packages.values():
        for where, text in pkg.all_requirements():
            try:
                req = Requirement(text)
            except InvalidRequirement as exc:
                problems.append(f"{pkg.name}: [project] {where}: cannot parse {text!r}: {exc}")
                continue
            dep = canonicalize_name(req.name)
            if dep not in members:
                if req.url:
                    problems.append(f"{pkg.name}: {where}: {text!r} is a direct reference (URL or path)")
                continue
            if req.url:
                problems.append(
                    f"{pkg.name}: {where}: {text!r} points at a path or URL; published metadata needs "
                    f"a version range such as '{dep}>={_floor(packages[dep].version)}'"
                )
                continue
            if not req.specifier:
                problems.append(f"{pkg.name}: {where}: {text!r} has no version range")
                continue
            member_version = packages[dep].version
            if not req.specifier.contains(member_version, prereleases=True):
                problems.append(
                    f"{pkg.name}: {where}: {text!r} does not admit {dep}'s current version {member_version}"
                )
    if meta in packages:
        problems.extend(_check_meta_pins(packages, meta))
    else:
        problems.append(f"meta-package {meta} not found under packages/")
    return problems


VERSION_LITERAL = re.compile(r"""^__version__\s*(?::\s*str\s*)?=\s*["']([^"']+)["']""", re.MULTILINE)


def module_version(pkg: Package) -> str | None:
    """The `__version__` string literal of the package's __init__.py, or None if it has none."""
    init = pkg.path / "src" / pkg.import_name / "__init__.py"
    if not init.is_file():
        return None
    match = VERSION_LITERAL.search(init.read_text(encoding="utf-8"))
    return match.group(1) if match else None


def _floor(version: str) -> str:
    v = Version(version)
    return f"{v.major}.{v.minor}"


def _check_meta_pins(packages: dict[str, Package], meta: str) -> list[str]:
    problems: list[str] = []
    pins: dict[str, Requirement] = {}
    for text in packages[meta].requirements:
        try:
            req = Requirement(text)
        except InvalidRequirement:
            continue  # reported by check_packages
        name = canonicalize_name(req.name)
        if name in packages:
            pins[name] = req
    for name, pkg in sorted(packages.items()):
        if name == meta:
            continue
        req = pins.get(name)
        if req is None:
            problems.append(
                f"{meta}: does not depend on workspace member {name} (expected '{name}~={pkg.version}')"
            )
            continue
        specs = list(req.specifier)
        if len(specs) != 1 or specs[0].operator != "~=":
            problems.append(
                f"{meta}: pin {str(req)!r} should be a single compatible-release pin '{name}~={pkg.version}'"
            )
            continue
        if not req.specifier.contains(pkg.version, prereleases=True):
            problems.append(
                f"{meta}: pin {str(req)!r} does not admit {name}'s current version {pkg.version} "
                f"(expected '{name}~={pkg.version}')"
            )
    return problems


def check_tag(tag: str, packages: dict[str, Package]) -> tuple[Package | None, str | None]:
    """(package, None) when `tag` is `<dist>-v<version>` of a workspace package, else (None, why)."""
    tag = tag.removeprefix("refs/tags/")
    match = TAG_RE.match(tag)
    if not match:
        return None, f"tag {tag!r} is not of the form hdgsa-<name>-v<version> (e.g. hdgsa-rmsnorm-v0.1.0)"
    dist, version = canonicalize_name(match["dist"]), match["version"]
    pkg = packages.get(dist)
    if pkg is None:
        known = ", ".join(sorted(packages))
        return None, f"tag {tag!r} names {dist!r}, which is not a workspace package ({known})"
    try:
        same = Version(version) == Version(pkg.version) and version == pkg.version
    except Exception:
        same = False
    if not same:
        return None, f"tag {tag!r} says version {version} but {pkg.rel_path}/pyproject.toml has {pkg.version}"
    return pkg, None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--tag", help="a release tag to check, e.g. hdgsa-rmsnorm-v0.1.0 (refs/tags/ allowed)"
    )
    parser.add_argument(
        "--github-output",
        action="store_true",
        help="with --tag: append package=, path= and version= to the file named by $GITHUB_OUTPUT",
    )
    args = parser.parse_args(argv)
    packages = load_packages()

    if args.tag is not None:
        pkg, why = check_tag(args.tag, packages)
        if pkg is None:
            print(f"error: {why}", file=sys.stderr)
            return 1
        print(pkg.rel_path)
        if args.github_output:
            out = os.environ.get("GITHUB_OUTPUT")
            if not out:
                print("error: --github-output given but $GITHUB_OUTPUT is not set", file=sys.stderr)
                return 1
            with open(out, "a", encoding="utf-8") as f:
                f.write(f"package={pkg.name}\npath={pkg.rel_path}\nversion={pkg.version}\n")
        return 0

    problems = check_packages(packages)
    for problem in problems:
        print(f"error: {problem}", file=sys.stderr)
    if problems:
        return 1
    print(f"ok: {len(packages)} packages; member dependencies are ranges; {META_PACKAGE} pins match")
    for name, pkg in sorted(packages.items()):
        print(f"  {name:22s} {pkg.version}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
