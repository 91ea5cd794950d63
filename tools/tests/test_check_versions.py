"""tools/check_versions.py: member ranges, the meta-package's pins, release tags."""

from __future__ import annotations

from pathlib import Path

import check_versions
import pytest
from _workspace import Package, load_packages


def make(name: str, version: str = "0.1.0", deps: list[str] | None = None) -> Package:
    return Package(name=name, version=version, path=Path("/nowhere") / name, requirements=deps or [])


def workspace(**overrides: Package) -> dict[str, Package]:
    packages = {
        "hdgsa-core": make("hdgsa-core", deps=["torch>=2.4"]),
        "hdgsa-rmsnorm": make("hdgsa-rmsnorm", deps=["hdgsa-core>=0.1,<0.2", "torch>=2.4"]),
        "hdgsa-kernels": make(
            "hdgsa-kernels", deps=["hdgsa-core~=0.1.0", "hdgsa-rmsnorm~=0.1.0", "torch>=2.4"]
        ),
    }
    packages.update(overrides)
    return packages


def test_the_repository_passes() -> None:
    assert check_versions.check_packages(load_packages()) == []


def test_consistent_workspace_passes() -> None:
    assert check_versions.check_packages(workspace()) == []


@pytest.mark.parametrize(
    ("dep", "fragment"),
    [
        ("hdgsa-core @ file:///work/packages/hdgsa-core", "points at a path or URL"),
        ("hdgsa-core", "has no version range"),
        ("hdgsa-core>=0.2", "does not admit"),
    ],
    ids=["path", "bare-name", "range-excludes-current"],
)
def test_bad_member_dependency_is_reported(dep: str, fragment: str) -> None:
    packages = workspace(**{"hdgsa-rmsnorm": make("hdgsa-rmsnorm", deps=[dep])})
    problems = check_versions.check_packages(packages)
    assert any(fragment in p and p.startswith("hdgsa-rmsnorm") for p in problems), problems


@pytest.mark.parametrize(
    ("pins", "fragment"),
    [
        (["hdgsa-core~=0.1.0"], "does not depend on workspace member hdgsa-rmsnorm"),
        (["hdgsa-core~=0.1.0", "hdgsa-rmsnorm>=0.1"], "single compatible-release pin"),
        (["hdgsa-core~=0.1.0", "hdgsa-rmsnorm~=0.2.0"], "does not admit"),
    ],
    ids=["missing", "not-compatible-release", "stale"],
)
def test_bad_meta_pin_is_reported(pins: list[str], fragment: str) -> None:
    problems = check_versions.check_packages(workspace(**{"hdgsa-kernels": make("hdgsa-kernels", deps=pins)}))
    assert any(fragment in p for p in problems), problems


def test_minor_bump_of_a_member_needs_a_new_meta_pin() -> None:
    bumped = make("hdgsa-rmsnorm", version="0.2.0", deps=["hdgsa-core>=0.1,<0.2"])
    problems = check_versions.check_packages(workspace(**{"hdgsa-rmsnorm": bumped}))
    assert any("hdgsa-kernels: pin 'hdgsa-rmsnorm~=0.1.0'" in p for p in problems), problems


@pytest.mark.parametrize(
    "tag",
    ["hdgsa-rmsnorm-v0.1.0", "refs/tags/hdgsa-rmsnorm-v0.1.0", "hdgsa-core-v0.1.0", "hdgsa-kernels-v0.1.0"],
)
def test_matching_tag(tag: str) -> None:
    pkg, why = check_versions.check_tag(tag, workspace())
    assert why is None
    assert pkg is not None
    assert tag.endswith(f"{pkg.name}-v{pkg.version}")


@pytest.mark.parametrize(
    ("tag", "fragment"),
    [
        ("hdgsa-rmsnorm-v0.1.1", "has 0.1.0"),
        ("hdgsa-rmsnorm-0.1.0", "not of the form"),
        ("v0.1.0", "not of the form"),
        ("hdgsa-nosuch-v0.1.0", "not a workspace package"),
        ("hdgsa-rmsnorm-v0.1", "has 0.1.0"),
    ],
)
def test_mismatching_tag(tag: str, fragment: str) -> None:
    pkg, why = check_versions.check_tag(tag, workspace())
    assert pkg is None
    assert why is not None
    assert fragment in why


def test_every_repository_package_has_a_matching_tag() -> None:
    packages = load_packages()
    for name, pkg in packages.items():
        assert check_versions.check_tag(f"{name}-v{pkg.version}", packages) == (pkg, None)


def test_module_version_must_match_pyproject(tmp_path: Path) -> None:
    init = tmp_path / "hdgsa-core" / "src" / "hdgsa_core" / "__init__.py"
    init.parent.mkdir(parents=True)
    init.write_text('"""Doc."""\n\n__version__ = "0.1.1"\n')
    core = Package(name="hdgsa-core", version="0.1.0", path=tmp_path / "hdgsa-core", requirements=[])
    problems = check_versions.check_packages(workspace(**{"hdgsa-core": core}))
    assert any("__version__ = '0.1.1'" in p for p in problems), problems
    init.write_text('__version__ = "0.1.0"\n')
    assert check_versions.check_packages(workspace(**{"hdgsa-core": core})) == []
