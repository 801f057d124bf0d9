"""The README's benchmark table is what the committed results render to (no hand edits)."""
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import table  # noqa: E402

README = (ROOT / "README.md").read_text()
BLOCKS = table.readme_blocks(README)


def test_readme_has_a_benchmark_table():
    assert BLOCKS, "README.md has no <!-- bench-table: DIR --> block"


@pytest.mark.parametrize("run_dir,shown", BLOCKS, ids=[b[0] for b in BLOCKS])
def test_readme_table_matches_results(run_dir, shown):
    data = json.loads((ROOT / run_dir / "results.json").read_text())
    assert not data["meta"].get("partial"), f"{run_dir} holds a partial (killed) run"
    assert shown == table.render(data), (
        f"README table for {run_dir} differs from its results.json: "
        f"run `python benchmarks/table.py {run_dir} --readme README.md`")


COMPARE = table.readme_blocks(README, tag="compare")


@pytest.mark.parametrize("name,shown", COMPARE, ids=[c[0] for c in COMPARE])
def test_readme_compare_table_matches_its_file(name, shown):
    """Each `<!-- compare: NAME -->` block is the table `opd_train.compare` wrote to docs/compare/NAME.md."""
    written = (ROOT / "docs" / "compare" / f"{name}.md").read_text().split("\n\n", 1)[1].strip()
    assert shown == written, f"README compare table {name!r} differs from docs/compare/{name}.md"


def test_readme_examples_are_the_tested_ones():
    """The README's "use it in your trainer" blocks are copies of blocks of docs/examples.md, which
    tests/test_examples.py executes."""
    import re

    section = README.split("<!-- examples: docs/examples.md -->", 1)[1].split("<!-- examples: end -->", 1)[0]
    shown = re.findall(r"^```python\n(.*?)^```$", section, flags=re.S | re.M)
    doc = (ROOT / "docs" / "examples.md").read_text()
    tested = re.findall(r"^```python\n(.*?)^```$", doc, flags=re.S | re.M)
    assert len(shown) >= 3 and all(b in tested for b in shown)


TRAIN_STEP = table.readme_blocks(README, tag="train-step")


def test_readme_has_a_train_step_line():
    assert TRAIN_STEP, "README.md has no <!-- train-step: DIR --> block"


@pytest.mark.parametrize("run_dir,shown", TRAIN_STEP, ids=[b[0] for b in TRAIN_STEP])
def test_readme_train_step_matches_results(run_dir, shown):
    """The real-vocabulary training-step sentence (first step included) is what its train_step.json renders to."""
    import train_step

    data = json.loads((ROOT / run_dir / "train_step.json").read_text())
    assert shown == train_step.summary(data), f"README train-step line for {run_dir} differs from its train_step.json"


def test_readme_main_job_table_is_the_committed_runs():
    """The "what to expect" table is rendered from the committed run summaries (docs/measurements/)."""
    from opd_train.summarize import readme_table

    shown = table.readme_blocks(README, tag="main-job")
    assert shown, "README.md has no <!-- main-job: ... --> block"
    for pattern, text in shown:
        files = sorted((ROOT / "docs" / "measurements").glob(pattern))
        assert files, f"no committed summaries match docs/measurements/{pattern}"
        assert text == readme_table([json.loads(f.read_text()) for f in files]), (
            "README main-job table differs from docs/measurements: rerun its rendering")


ENGINES = table.readme_blocks(README, tag="engines")


def test_readme_engines_table_matches_results():
    """The HF-vs-vLLM throughput table is what engines.json renders to."""
    import engines

    assert ENGINES, "README.md has no <!-- engines: DIR --> block"
    for run_dir, shown in ENGINES:
        data = json.loads((ROOT / run_dir / "engines.json").read_text())
        assert shown == engines.summary(data), f"README engines table differs from {run_dir}/engines.json"


RACE = table.readme_blocks(README, tag="race")


def check_race_blocks(blocks: list[tuple[str, str]], root: Path) -> None:
    """Each `<!-- race: DIR -->` block is what DIR/race.json renders to (benchmarks/race_report.py)."""
    import race_report

    for run_dir, shown in blocks:
        path = root / run_dir / "race.json"
        assert path.is_file(), f"README.md has a race block for {run_dir}, but {run_dir}/race.json is not committed"
        data = json.loads(path.read_text())
        assert not data["meta"].get("partial"), f"{run_dir}/race.json holds a partial (killed) race"
        assert shown == race_report.summary(data), (
            f"README race table differs from {run_dir}/race.json: "
            f"run `python benchmarks/race_report.py {run_dir} --readme README.md`")


def test_readme_race_table_matches_results():
    """The CPU race table, where the README has one (none until a race.json is committed)."""
    check_race_blocks(RACE, ROOT)
