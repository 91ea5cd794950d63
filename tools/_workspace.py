"""What the tools scripts share: where the repository is and what its packages declare.

Standard library only (plus `packaging`, which comes with pip, for version specifiers), so the
scripts run from a bare Python 3.10+ before anything is installed.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: pip vendors the same parser
    from pip._vendor import tomli as tomllib  # type: ignore[no-redef]

try:
    from packaging.requirements import InvalidRequirement, Requirement
    from packaging.specifiers import SpecifierSet
    from packaging.utils import canonicalize_name
    from packaging.version import Version
except ModuleNotFoundError:  # a bare interpreter: pip vendors the same library
    from pip._vendor.packaging.requirements import InvalidRequirement, Requirement  # type: ignore[no-redef]
    from pip._vendor.packaging.specifiers import SpecifierSet  # type: ignore[no-redef]
    from pip._vendor.packaging.utils import canonicalize_name  # type: ignore[no-redef]
    from pip._vendor.packaging.version import Version  # type: ignore[no-redef]

__all__ = [
    "META_PACKAGE",
    "PACKAGES_DIR",
    "ROOT",
    "InvalidRequirement",
    "Package",
    "Requirement",
    "SpecifierSet",
    "Version",
    "canonicalize_name",
    "load_packages",
    "topological_order",
]

ROOT = Path(__file__).resolve().parent.parent
PACKAGES_DIR = ROOT / "packages"
META_PACKAGE = "hdgsa-kernels"


@dataclass
class Package:
    """One distribution of the workspace, as its pyproject.toml declares it."""

    name: str  # canonical distribution name, e.g. "hdgsa-rmsnorm"
    version: str
    path: Path  # packages/<dist>
    requirements: list[str]  # [project].dependencies, verbatim
    optional: dict[str, list[str]] = field(default_factory=dict)  # [project.optional-dependencies]

    @property
    def rel_path(self) -> str:
        try:
            return self.path.relative_to(ROOT).as_posix()
        except ValueError:  # a package outside this checkout (the tools' tests make some)
            return self.path.as_posix()

    @property
    def import_name(self) -> str:
        return self.name.replace("-", "_")

    def all_requirements(self) -> list[tuple[str, str]]:
        """(where, requirement string) for every requirement, extras included."""
        found = [("dependencies", r) for r in self.requirements]
        for extra, reqs in self.optional.items():
            found.extend((f"optional-dependencies.{extra}", r) for r in reqs)
        return found

    def member_dependencies(self, members: set[str]) -> set[str]:
        """Names of the workspace members this package depends on (extras included)."""
        deps = set()
        for _, text in self.all_requirements():
            try:
                name = canonicalize_name(Requirement(text).name)
            except InvalidRequirement:
                continue
            if name in members and name != self.name:
                deps.add(name)
        return deps


def load_packages(packages_dir: Path = PACKAGES_DIR) -> dict[str, Package]:
    """Every packages/*/pyproject.toml with a [project] table, by canonical name."""
    packages: dict[str, Package] = {}
    for pyproject in sorted(packages_dir.glob("*/pyproject.toml")):
        with pyproject.open("rb") as f:
            data = tomllib.load(f)
        project = data.get("project")
        if not project:
            continue
        name = canonicalize_name(project["name"])
        if "version" not in project:
            sys.exit(f"{pyproject}: [project] has no static version (the tools need one)")
        packages[name] = Package(
            name=name,
            version=str(project["version"]),
            path=pyproject.parent,
            requirements=list(project.get("dependencies", [])),
            optional={k: list(v) for k, v in project.get("optional-dependencies", {}).items()},
        )
    return packages


def topological_order(packages: dict[str, Package]) -> list[str]:
    """Names with every package after the members it depends on (hdgsa-core first, the meta last)."""
    members = set(packages)
    order: list[str] = []
    done: set[str] = set()

    def visit(name: str, stack: tuple[str, ...]) -> None:
        if name in done:
            return
        if name in stack:
            sys.exit(f"dependency cycle between workspace packages: {' -> '.join((*stack, name))}")
        for dep in sorted(packages[name].member_dependencies(members)):
            visit(dep, (*stack, name))
        done.add(name)
        order.append(name)

    for name in sorted(packages):
        visit(name, ())
    return order


TAG_RE = re.compile(r"^(?P<dist>hdgsa(?:-[a-z0-9]+)*)-v(?P<version>\d[0-9A-Za-z.+!-]*)$")
