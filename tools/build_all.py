#!/usr/bin/env python3
"""Build every package's wheel and sdist into dist/ and check them.

For each package (all by default, or those named with --package) it runs `python -m build`
(isolated, hatchling) into the output folder, then checks:
  * exactly one wheel and one sdist per package, the wheel tagged py3-none-any (pure Python;
    nothing about the platform is decided at build time);
  * the wheel's METADATA has the package's name and version, and every Requires-Dist is a
    plain requirement with a version range where it names a workspace member: no file paths
    or URLs in published metadata;
  * the sdist holds pyproject.toml, PKG-INFO and the package's src/ folder;
  * `twine check --strict` on everything built and `check-wheel-contents` on the wheels.

Needs `build`, `twine` and `check-wheel-contents` in the running interpreter's environment
(tools/requirements-dev.txt; tools/install_dev.py installs them into .venv). Exit status 0 when
every package builds and passes, 1 otherwise.
"""

from __future__ import annotations

import argparse
import email.parser
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _workspace import (
    ROOT,
    InvalidRequirement,
    Package,
    Requirement,
    canonicalize_name,
    load_packages,
    topological_order,
)


def tool(name: str) -> list[str]:
    """Command prefix for a console tool installed beside this interpreter, else on PATH."""
    here = Path(sys.executable).parent / name
    if here.exists():
        return [str(here)]
    found = shutil.which(name)
    if found:
        return [found]
    sys.exit(f"error: {name} is not installed (pip install -r tools/requirements-dev.txt)")


def build(pkg: Package, outdir: Path) -> bool:
    print(f"--- building {pkg.name} {pkg.version} ({pkg.rel_path})", flush=True)
    cmd = [sys.executable, "-m", "build", "--sdist", "--wheel", "--outdir", str(outdir), str(pkg.path)]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        print(result.stdout[-4000:], result.stderr[-4000:], sep="\n")
        print(f"error: building {pkg.name} failed", file=sys.stderr)
        return False
    return True


def dist_files(pkg: Package, outdir: Path) -> tuple[list[Path], list[Path]]:
    stem = f"{pkg.import_name}-{pkg.version}"
    wheels = sorted(outdir.glob(f"{stem}-*.whl"))
    sdists = sorted(outdir.glob(f"{stem}.tar.gz"))
    return wheels, sdists


def check_wheel_metadata(pkg: Package, wheel: Path, members: set[str]) -> list[str]:
    problems: list[str] = []
    if not wheel.name.endswith("-py3-none-any.whl"):
        problems.append(f"{wheel.name}: not a pure-Python py3-none-any wheel")
    with zipfile.ZipFile(wheel) as zf:
        meta_name = f"{pkg.import_name}-{pkg.version}.dist-info/METADATA"
        try:
            text = zf.read(meta_name).decode()
        except KeyError:
            return [*problems, f"{wheel.name}: no {meta_name}"]
        names = zf.namelist()
    if not any(n.startswith(f"{pkg.import_name}/__init__.py") for n in names):
        problems.append(f"{wheel.name}: {pkg.import_name}/__init__.py missing")
    if f"{pkg.import_name}/py.typed" not in names:
        problems.append(f"{wheel.name}: {pkg.import_name}/py.typed missing")
    meta = email.parser.Parser().parsestr(text)
    if canonicalize_name(meta["Name"] or "") != pkg.name:
        problems.append(f"{wheel.name}: METADATA Name {meta['Name']!r} != {pkg.name}")
    if meta["Version"] != pkg.version:
        problems.append(f"{wheel.name}: METADATA Version {meta['Version']!r} != {pkg.version}")
    for text_req in meta.get_all("Requires-Dist") or []:
        try:
            req = Requirement(text_req)
        except InvalidRequirement as exc:
            problems.append(f"{wheel.name}: unparsable Requires-Dist {text_req!r}: {exc}")
            continue
        if req.url:
            problems.append(f"{wheel.name}: Requires-Dist {text_req!r} is a path or URL, not a version range")
        elif canonicalize_name(req.name) in members and not req.specifier:
            problems.append(
                f"{wheel.name}: Requires-Dist {text_req!r} on a workspace member has no version range"
            )
    return problems


def check_sdist(pkg: Package, sdist: Path) -> list[str]:
    top = f"{pkg.import_name}-{pkg.version}"
    with tarfile.open(sdist) as tf:
        names = set(tf.getnames())
    problems = [
        f"{sdist.name}: {top}/{required} missing"
        for required in ("pyproject.toml", "PKG-INFO", f"src/{pkg.import_name}/__init__.py")
        if f"{top}/{required}" not in names
    ]
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--package", "-p", action="append", metavar="NAME", help="only this package (repeatable)"
    )
    parser.add_argument("--outdir", type=Path, default=ROOT / "dist", help="output folder (default: dist/)")
    parser.add_argument("--keep", action="store_true", help="do not empty the output folder first")
    parser.add_argument(
        "--no-build", action="store_true", help="only check what is already in the output folder"
    )
    args = parser.parse_args(argv)

    packages = load_packages()
    names = topological_order(packages)
    if args.package:
        wanted = {canonicalize_name(p.removeprefix("packages/").rstrip("/")) for p in args.package}
        unknown = wanted - set(packages)
        if unknown:
            print(f"error: unknown package(s): {', '.join(sorted(unknown))}", file=sys.stderr)
            return 1
        names = [n for n in names if n in wanted]

    outdir: Path = args.outdir.resolve()
    if not args.no_build:
        if outdir.exists() and not args.keep:
            shutil.rmtree(outdir)
        outdir.mkdir(parents=True, exist_ok=True)
        failed = [n for n in names if not build(packages[n], outdir)]
        if failed:
            print(f"error: build failed for {', '.join(failed)}", file=sys.stderr)
            return 1

    problems: list[str] = []
    built: list[Path] = []
    for name in names:
        pkg = packages[name]
        wheels, sdists = dist_files(pkg, outdir)
        if len(wheels) != 1 or len(sdists) != 1:
            problems.append(f"{name}: expected one wheel and one sdist in {outdir}, found {wheels + sdists}")
            continue
        problems += check_wheel_metadata(pkg, wheels[0], set(packages))
        problems += check_sdist(pkg, sdists[0])
        built += [wheels[0], sdists[0]]

    if built:
        print("--- twine check --strict", flush=True)
        if (
            subprocess.run([*tool("twine"), "check", "--strict", *map(str, built)], check=False).returncode
            != 0
        ):
            problems.append("twine check --strict failed")
        print("--- check-wheel-contents", flush=True)
        wheels = [str(p) for p in built if p.suffix == ".whl"]
        if subprocess.run([*tool("check-wheel-contents"), *wheels], check=False).returncode != 0:
            problems.append("check-wheel-contents failed")

    for problem in problems:
        print(f"error: {problem}", file=sys.stderr)
    if problems:
        return 1
    print(f"ok: {len(built) // 2} packages built and checked in {outdir}")
    for path in built:
        print(f"  {path.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
