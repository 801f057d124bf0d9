import os
import shutil
import subprocess
import sys

import pytest
import torch

if not torch.cuda.is_available():
    # Triton kernels run in the interpreter on CPU; this must precede the first triton import.
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, os.path.dirname(__file__))

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def _interpreter_problem():
    """Why Triton's CPU interpreter cannot run here, or None. Triton < 3.7's interpreter turns
    1-element arrays into loop bounds with ``int()``, which numpy >= 2.4 refuses; pin
    ``numpy<2.4`` beside such a Triton (as ``.ci/run``'s triton 3.6 venv does)."""
    try:
        import numpy
        import triton
    except ImportError:
        return None
    version = lambda v: tuple(int(x) for x in v.split(".")[:2])  # noqa: E731
    if version(triton.__version__) < (3, 7) and version(numpy.__version__) >= (2, 4):
        return (f"triton {triton.__version__}'s interpreter needs numpy<2.4 "
                f"(found numpy {numpy.__version__}): pip install 'numpy<2.4'")
    return None


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    problem = _interpreter_problem()
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
        elif problem and "triton" in item.keywords and "aot" not in item.nodeid:
            item.add_marker(pytest.mark.skip(reason=problem))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def compiled(monkeypatch):
    """Lower the compiled torch path's threshold to 0 (small shapes take it) and record which
    entry points ran (``"rows"``, ``"grad"``, ``"both"``)."""
    from opd_kernels.ops import _compiled
    from opd_kernels.ops import _decide
    monkeypatch.setattr(_decide, "COMPILE_MIN_ELEMENTS", 0)
    calls = []
    real = _compiled._call
    monkeypatch.setattr(_compiled, "_call", lambda *a, **k: calls.append(a[0]) or real(*a, **k))
    return calls


@pytest.fixture(scope="session")
def host_emulation(tmp_path_factory):
    """Path of csrc/emulate/host_emulation.cu built for the CPU with nvcc (the CUDA kernels'
    per-thread code; ``helpers.EmulatedLib`` loads it); skips without nvcc."""
    cands = [os.environ.get("CUDA_HOME", "") + "/bin/nvcc", shutil.which("nvcc") or "", "/usr/local/cuda/bin/nvcc"]
    nvcc = next((c for c in cands if c and os.path.isfile(c) and os.access(c, os.X_OK)), None)
    if nvcc is None:
        pytest.skip("nvcc not found: cannot build csrc/emulate/host_emulation.cu")
    so = str(tmp_path_factory.mktemp("emu") / "host_emulation.so")
    src = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "csrc", "emulate",
                       "host_emulation.cu")
    cmd = [nvcc, "-std=c++17", "-O2", "-shared", "-Xcompiler", "-fPIC", "--expt-relaxed-constexpr",
           "-D__CUDA_NO_HALF_CONVERSIONS__", "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", src, "-o", so]
    subprocess.run(cmd, check=True, timeout=900, capture_output=True)
    return so
