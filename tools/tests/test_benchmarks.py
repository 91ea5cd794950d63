"""benchmarks/ holds only what `hdgsa-kernels bench` reads and writes again: one baseline JSON per op
and card, and the hand-written readings that BENCHMARKS.md includes under each op's table."""

from __future__ import annotations

import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BENCHMARKS = ROOT / "benchmarks"
PAGE = (ROOT / "BENCHMARKS.md").read_text(encoding="utf-8")


def _baselines() -> list[Path]:
    return sorted(BENCHMARKS.glob("*.json"))


def test_benchmarks_holds_baselines_and_readings_only() -> None:
    allowed = set(_baselines()) | set((BENCHMARKS / "readings").glob("*.md")) | {BENCHMARKS / "readings"}
    stray = [str(p.relative_to(ROOT)) for p in BENCHMARKS.rglob("*") if p not in allowed]
    assert not stray, f"per-run files do not belong in benchmarks/: {stray}"
    assert _baselines(), "no baseline in benchmarks/"


def test_each_baseline_is_one_op_on_one_card() -> None:
    for path in _baselines():
        record = json.loads(path.read_text(encoding="utf-8"))
        for key in ("device", "command", "commit", "date", "versions", "results"):
            assert record.get(key), f"{path.name}: no {key}"
        ops = {row["op"] for row in record["results"]}
        assert len(ops) == 1, f"{path.name}: ops {ops}"
        (op,) = ops
        slug = re.sub(r"[^a-z0-9]+", "-", re.sub(r"^nvidia\s+", "", record["device"].lower())).strip("-")
        assert path.name == f"{op}-{slug}.json"
        assert any(row["ours"] and row["ms"] for row in record["results"]), f"{path.name}: ours never timed"


def test_the_page_has_a_section_per_op_with_its_reading() -> None:
    ops = {json.loads(p.read_text())["results"][0]["op"] for p in _baselines()}
    readings = {p.stem: p for p in (BENCHMARKS / "readings").glob("*.md") if p.stem != "intro"}
    for op in ops | set(readings):
        assert f"\n## {op}\n" in PAGE, op
    for op, path in readings.items():
        section = PAGE.split(f"\n## {op}\n", 1)[1].split("\n## ", 1)[0]
        assert path.read_text(encoding="utf-8").strip() in section, (
            f"BENCHMARKS.md's reading of {op} differs from benchmarks/readings/{op}.md: edit the"
            " reading there and regenerate the page (hdgsa-kernels bench --markdown)"
        )
    for op in ops:
        section = PAGE.split(f"\n## {op}\n", 1)[1].split("\n## ", 1)[0]
        assert "| case | % roof |" in section, f"{op}: no table"
        assert "- command: `hdgsa-kernels bench" in PAGE.split(f"\n## {op}\n", 1)[0] + section
