import os
import sys

import pytest
import torch

if not torch.cuda.is_available():
    # Triton kernels run in the interpreter on CPU; this must precede the first triton import.
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, os.path.dirname(__file__))

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def compiled(monkeypatch):
    """Lower the compiled torch path's threshold to 0 (small shapes take it) and record which
    entry points ran (``"rows"``, ``"grad"``, ``"both"``)."""
    from opd_kernels.backends import torch_compiled
    monkeypatch.setattr(torch_compiled, "MIN_ELEMENTS", 0)
    calls = []
    real = torch_compiled._call
    monkeypatch.setattr(torch_compiled, "_call", lambda *a, **k: calls.append(a[0]) or real(*a, **k))
    return calls
