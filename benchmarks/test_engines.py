"""Smoke test of benchmarks/engines.py (needs vLLM: CI runs it in the vLLM venv): one tiny run
end to end, and its README table renders."""
import json

import pytest

pytest.importorskip("vllm", reason="needs vLLM in a venv of its own (the vllm extra)")

import engines  # noqa: E402


@pytest.mark.filterwarnings("ignore")
def test_tiny_run_writes_and_renders(tmp_path):
    engines.main(["--sizes", "tiny", "--repeat", "1", "--batch", "4", "--max-new-tokens", "4", "--out", str(tmp_path)])
    data = json.loads((tmp_path / "engines.json").read_text())
    assert {r["engine"] for r in data["rollout"]} == {"hf", "vllm"}
    assert {(r["k"], r["side"]) for r in data["scoring"]} == {(k, s) for k in (0, 20) for s in ("in-process", "server")}
    text = engines.summary(data)
    assert "| tiny (0.1M) | rollout, 4 prompts" in text and "weight sync tiny" in text
