"""docs/api.md, the API contract, documents every public name of every package."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
API = (ROOT / "docs" / "api.md").read_text(encoding="utf-8")
INITS = sorted(ROOT.glob("packages/*/src/*/__init__.py"))


def _public_names(init: Path) -> list[str]:
    """The package's ``__all__``, read without importing it."""
    for node in ast.parse(init.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.Assign) and any(
            isinstance(target, ast.Name) and target.id == "__all__" for target in node.targets
        ):
            return [name for name in ast.literal_eval(node.value) if name != "__version__"]
    return []


@pytest.mark.parametrize("init", INITS, ids=[init.parent.name for init in INITS])
def test_every_public_name_is_documented(init: Path) -> None:
    names = _public_names(init)
    assert names, f"{init} has no __all__"
    missing = [name for name in names if f"`{name}" not in API]
    assert not missing, f"docs/api.md does not mention {missing} ({init.parent.name})"
