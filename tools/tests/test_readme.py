"""The root README's two fresh-machine commands are the ones .ci/run runs, and it lists every tool."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text(encoding="utf-8")
CI_RUN = (ROOT / ".ci" / "run").read_text(encoding="utf-8")

INSTALL_COMMAND = "python3 tools/install_dev.py && .venv/bin/hdgsa-kernels check"
TEST_COMMAND = "python3 tools/run_tests.py"


def test_readme_shows_the_two_commands_in_code_blocks() -> None:
    assert f"```bash\n{INSTALL_COMMAND}\n```" in README
    assert f"```bash\n{TEST_COMMAND}\n```" in README


def test_ci_runs_the_readme_commands() -> None:
    assert "python3 tools/install_dev.py ||" in CI_RUN
    assert ".venv/bin/hdgsa-kernels check" in CI_RUN
    assert f'run "tests (tools/run_tests.py)" {TEST_COMMAND}\n' in CI_RUN


def test_readme_lists_every_tool_script() -> None:
    for script in sorted((ROOT / "tools").glob("*.py")):
        if not script.name.startswith("_"):
            assert f"`tools/{script.name}`" in README, script.name


def test_readme_lists_every_package() -> None:
    for pyproject in sorted((ROOT / "packages").glob("*/pyproject.toml")):
        assert f"[`{pyproject.parent.name}`](packages/{pyproject.parent.name})" in README
