"""The GitHub workflows are checked like code: schema-valid, no medium/high zizmor finding, and
the shape the release process relies on. Runs offline (CI has no GitHub API)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import check_workflows

ROOT = Path(__file__).resolve().parents[2]
WORKFLOWS = ROOT / ".github" / "workflows"
USES = re.compile(r"^\s*(?:-\s*)?uses:\s*(\S+)(.*)$", re.MULTILINE)


def test_schema_and_zizmor_pass() -> None:
    # Through a subprocess so the tools' output lands in the test report on failure.
    result = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "check_workflows.py")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_check_workflows_finds_its_tools() -> None:
    assert check_workflows.find_tool("check-jsonschema") is not None
    assert check_workflows.find_tool("zizmor") is not None


def test_every_action_is_pinned_to_a_commit_with_a_version_comment() -> None:
    found = 0
    for workflow in sorted(WORKFLOWS.glob("*.yml")):
        for ref, rest in USES.findall(workflow.read_text()):
            found += 1
            if ref.startswith("./"):
                continue
            assert re.fullmatch(r"[\w.-]+/[\w./-]+@[0-9a-f]{40}", ref), (
                f"{workflow.name}: {ref} is not pinned to a SHA"
            )
            assert re.search(r"#\s*v\d", rest), f"{workflow.name}: {ref} has no '# vX.Y.Z' comment"
    assert found > 0


def test_top_level_permissions_are_empty_and_id_token_only_in_publish() -> None:
    for workflow in sorted(WORKFLOWS.glob("*.yml")):
        text = workflow.read_text()
        assert re.search(r"^permissions: \{\}$", text, re.MULTILINE), (
            f"{workflow.name}: top-level permissions not {{}}"
        )
        if workflow.name != "release.yml":
            assert "id-token" not in text, f"{workflow.name} must not ask for id-token"
    release = (WORKFLOWS / "release.yml").read_text()
    grants = re.findall(r"^\s+id-token: write", release, re.MULTILINE)
    assert len(grants) == 1
    publish = release[release.index("\n  publish:") :]
    assert re.search(r"^\s+id-token: write", publish, re.MULTILINE)
    assert "environment:" in publish


def test_checkouts_do_not_persist_credentials() -> None:
    for workflow in sorted(WORKFLOWS.glob("*.yml")):
        text = workflow.read_text()
        assert text.count("actions/checkout@") == text.count("persist-credentials: false"), workflow.name
