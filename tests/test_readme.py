"""The README's benchmark table is what the committed results render to (no hand edits)."""
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import table  # noqa: E402

BLOCKS = table.readme_blocks((ROOT / "README.md").read_text())


def test_readme_has_a_benchmark_table():
    assert BLOCKS, "README.md has no <!-- bench-table: DIR --> block"


@pytest.mark.parametrize("run_dir,shown", BLOCKS, ids=[b[0] for b in BLOCKS])
def test_readme_table_matches_results(run_dir, shown):
    data = json.loads((ROOT / run_dir / "results.json").read_text())
    assert not data["meta"].get("partial"), f"{run_dir} holds a partial (killed) run"
    assert shown == table.render(data), (
        f"README table for {run_dir} differs from its results.json: "
        f"run `python benchmarks/table.py {run_dir} --readme README.md`")
