#!/usr/bin/env python3
"""Install every package of this checkout, editable, into a virtual environment (.venv).

  python3 tools/install_dev.py && .venv/bin/hdgsa-kernels check

creates .venv with the interpreter that runs this script (Python 3.10 or newer) if it is not
there, then installs in one pip command:
  * every packages/<dist> editable, with its `triton` and `test` extras (the meta-package also
    with `bench`), so `import hdgsa_kernels` and the `hdgsa-kernels` command work;
  * the pinned development tools of tools/requirements-dev.txt (pytest, ruff, build, twine,
    check-wheel-contents, check-jsonschema, zizmor);
under the constraints of tools/constraints-cpu.txt (torch==2.13.0, triton==3.9.0). pip, not uv:
on CPU machines where a CPU build of torch 2.13.0 lies in pip's find-links, pip takes it; an
unconstrained `torch` (or uv) would download a multi-GB CUDA build instead.

On a CPU-only machine without a local CPU build of torch in pip's find-links, `--cpu` adds
PyTorch's CPU wheel index (PYTORCH_CPU_INDEX, as PyTorch's install instructions give), so that
pip takes the CPU build of the pinned torch (`2.13.0+cpu`, a few hundred MB) instead of the
multi-GB CUDA build from PyPI.

It records what it installed in .venv/.hdgsa-install-stamp and does nothing the next time unless
a pyproject.toml, the requirements, the constraints or the options changed (or --force).
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import subprocess
import sys
import venv
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _workspace import load_packages, topological_order

ROOT = Path(__file__).resolve().parent.parent
TOOLS = ROOT / "tools"
CONSTRAINTS = TOOLS / "constraints-cpu.txt"
DEV_REQUIREMENTS = TOOLS / "requirements-dev.txt"
# PyTorch's index of CPU-only wheels (https://pytorch.org/get-started/locally/, "CPU").
PYTORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"
META_PACKAGE_DIR = "hdgsa-kernels"
STAMP_NAME = ".hdgsa-install-stamp"


def venv_python(venv_dir: Path) -> Path:
    if sys.platform == "win32":
        return venv_dir / "Scripts" / "python.exe"
    return venv_dir / "bin" / "python"


def package_dirs() -> list[Path]:
    """Package folders, each after the members it depends on: pip 23.2 (Python 3.11's ensurepip)
    fails to match `hdgsa-rmsnorm~=0.1.0` to an editable `hdgsa-rmsnorm[...]` given after the
    package that asks for it, and looks it up on the index instead."""
    packages = load_packages()
    return [packages[name].path for name in topological_order(packages)]


def install_args(*, triton: bool, constraints: bool, cpu_index: bool = False) -> list[str]:
    args: list[str] = []
    if cpu_index:
        # An extra index, not the only one: everything but torch still comes from PyPI. The CPU
        # build's local version (2.13.0+cpu) sorts above PyPI's 2.13.0 and matches torch==2.13.0.
        args += ["--extra-index-url", PYTORCH_CPU_INDEX]
    if constraints:
        args += ["-c", str(CONSTRAINTS)]
    args += ["-r", str(DEV_REQUIREMENTS)]
    for pkg_dir in package_dirs():
        extras = ["test"]
        if triton:
            extras.append("triton")
        if pkg_dir.name == META_PACKAGE_DIR:
            extras.append("bench")
        args += ["-e", f"{pkg_dir}[{','.join(sorted(extras))}]"]
    return args


def stamp_of(args: list[str]) -> str:
    digest = hashlib.sha256()
    digest.update("\0".join(args).encode())
    for path in [CONSTRAINTS, DEV_REQUIREMENTS, *(d / "pyproject.toml" for d in package_dirs())]:
        digest.update(path.read_bytes())
    return digest.hexdigest()


def ensure_venv(venv_dir: Path, *, recreate: bool) -> Path:
    python = venv_python(venv_dir)
    if recreate and venv_dir.exists():
        shutil.rmtree(venv_dir)
    if not python.exists():
        print(f"--- creating {venv_dir} with Python {sys.version.split()[0]}", flush=True)
        venv.EnvBuilder(with_pip=True, clear=venv_dir.exists()).create(venv_dir)
    return python


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--venv", type=Path, default=ROOT / ".venv", help="environment folder (default: .venv)"
    )
    parser.add_argument("--no-triton", action="store_true", help="leave Triton out (PyTorch backends only)")
    parser.add_argument(
        "--no-constraints",
        action="store_true",
        help="do not pin torch/triton with tools/constraints-cpu.txt (e.g. on a GPU machine with its own torch)",
    )
    parser.add_argument(
        "--cpu",
        action="store_true",
        help=f"take torch's CPU-only build from PyTorch's wheel index ({PYTORCH_CPU_INDEX}): for CPU "
        "machines without a local CPU build of torch",
    )
    parser.add_argument("--force", action="store_true", help="reinstall even if nothing changed")
    parser.add_argument("--recreate", action="store_true", help="delete the environment and start over")
    parser.add_argument("--verbose", "-v", action="store_true", help="show pip's full output")
    args = parser.parse_args(argv)

    if sys.version_info < (3, 10):  # noqa: UP036 (a clear message for an old python3)
        print(f"error: Python 3.10 or newer is needed, this is {sys.version.split()[0]}", file=sys.stderr)
        return 1

    venv_dir: Path = args.venv.resolve()
    python = ensure_venv(venv_dir, recreate=args.recreate)
    pip_args = install_args(
        triton=not args.no_triton, constraints=not args.no_constraints, cpu_index=args.cpu
    )
    stamp_file = venv_dir / STAMP_NAME
    stamp = stamp_of(pip_args)
    if not args.force and stamp_file.exists() and stamp_file.read_text().strip() == stamp:
        print(f"--- {venv_dir} is up to date (use --force to reinstall)")
        return 0

    cmd = [str(python), "-m", "pip", "install", "--progress-bar", "off"]
    if not args.verbose:
        cmd.append("-q")
    cmd += pip_args
    print(
        f"--- installing {len(package_dirs())} packages (editable) and the dev tools into {venv_dir}",
        flush=True,
    )
    print("$ " + " ".join(cmd), flush=True)
    if subprocess.run(cmd, cwd=ROOT, check=False).returncode != 0:
        print("error: pip install failed", file=sys.stderr)
        return 1
    stamp_file.write_text(stamp + "\n")
    subprocess.run(
        [str(python), "-c", "import torch, sys; print(f'--- torch {torch.__version__} in', sys.prefix)"],
        check=False,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
