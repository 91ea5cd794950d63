"""tools/changed_packages.py: which packages a change touches."""

from __future__ import annotations

import json

import changed_packages
import pytest
from _workspace import load_packages

PACKAGES = load_packages()
OPS = sorted(set(PACKAGES) - {"hdgsa-core", "hdgsa-kernels"})


def touched(*files: str) -> list[str]:
    names = changed_packages.with_dependents(changed_packages.packages_for_files(files, PACKAGES), PACKAGES)
    return [entry["package"] for entry in changed_packages.matrix(names, PACKAGES)["include"]]


def test_core_touches_every_package_core_first_meta_last() -> None:
    result = touched("packages/hdgsa-core/src/hdgsa_core/checks.py")
    assert set(result) == set(PACKAGES)
    assert result[0] == "hdgsa-core"
    assert result[-1] == "hdgsa-kernels"


@pytest.mark.parametrize("op", OPS)
def test_an_op_touches_itself_and_the_meta(op: str) -> None:
    assert touched(f"{PACKAGES[op].rel_path}/src/x.py") == [op, "hdgsa-kernels"]


def test_meta_touches_only_itself() -> None:
    assert touched("packages/hdgsa-kernels/src/hdgsa_kernels/cli.py") == ["hdgsa-kernels"]


@pytest.mark.parametrize(
    "path", ["pyproject.toml", "tools/build_all.py", ".github/workflows/ci.yml", ".ci/run"]
)
def test_shared_build_files_touch_everything(path: str) -> None:
    assert set(touched(path)) == set(PACKAGES)


@pytest.mark.parametrize("path", ["README.md", "LICENSE", "BENCHMARKS.md", ".gitignore"])
def test_root_docs_touch_nothing(path: str) -> None:
    assert touched(path) == []


def test_cli_prints_a_json_matrix(capsys: pytest.CaptureFixture[str]) -> None:
    assert changed_packages.main(["--files", "packages/hdgsa-kernels/README.md"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out == {"include": [{"package": "hdgsa-kernels", "path": "packages/hdgsa-kernels"}]}


def test_cli_writes_github_output(tmp_path, monkeypatch, capsys) -> None:
    out_file = tmp_path / "out"
    monkeypatch.setenv("GITHUB_OUTPUT", str(out_file))
    assert changed_packages.main(["--files", "README.md", "--github-output"]) == 0
    capsys.readouterr()
    assert out_file.read_text().splitlines() == ['matrix={"include":[]}', "any=false"]
