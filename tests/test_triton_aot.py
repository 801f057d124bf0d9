"""Every Triton kernel compiles ahead of time for sm_80 (A100) and sm_90a (H100/H200), no GPU needed.

Runs ``python -m opd_kernels.triton.aot`` (the variants the launchers pick at the reference
shapes, compiled to cubins with Triton's bundled ptxas) in a subprocess: the kernels must be
defined without ``TRITON_INTERPRET``, which this test session sets for the other Triton tests.
Its table of registers / spills / shared memory per kernel is printed in the terminal summary
(with or without ``-s``) and kept in ``$OPD_AOT_REPORT`` when that is set.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.triton


class _Summary:
    """A plugin registered at run time: prints the report after the test session's summary."""

    def __init__(self, text):
        self.text = text

    def pytest_terminal_summary(self, terminalreporter):
        terminalreporter.section("Triton AOT compile check (sm_80, sm_90a)")
        terminalreporter.write(self.text)


def test_triton_kernels_compile_for_sm80_and_sm90(request, tmp_path):
    report = Path(os.environ.get("OPD_AOT_REPORT") or tmp_path / "aot.md")
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "OPD_TRITON_AUTOTUNE")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    cmd = [sys.executable, "-W", "ignore", "-m", "opd_kernels.triton.aot", "--arch", "80,90",
           "--report", str(report)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    text = report.read_text() if report.exists() else proc.stdout
    request.config.pluginmanager.register(_Summary(text + (proc.stderr[-3000:] if proc.returncode else "")))
    assert proc.returncode == 0, (
        f"AOT compile check failed (exit {proc.returncode}); problems:\n{text[-6000:]}\n{proc.stderr[-3000:]}")
    assert "aot: compiled" in text and "FAILED" not in text, text[-3000:]
