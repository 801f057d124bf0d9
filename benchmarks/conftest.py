"""pytest-benchmark set over the same cases as ``run.py`` (small shapes).

``pytest benchmarks/ --benchmark-only`` times them; plain ``pytest benchmarks/`` runs each case
once as a smoke test (benchmarking is switched off unless --benchmark-only/--benchmark-enable).
The default ``pytest`` run (testpaths = tests) does not collect this folder.
"""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))


@pytest.hookimpl(trylast=True)
def pytest_configure(config):
    session = getattr(config, "_benchmarksession", None)
    if session is not None and not (config.getoption("benchmark_only") or config.getoption("benchmark_enable")):
        session.disabled = True
