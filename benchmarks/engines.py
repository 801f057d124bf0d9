"""Rollout and teacher-scoring throughput: HF against vLLM, on CPU, at two model sizes.

    python benchmarks/engines.py [--out benchmarks/results/cpu-epyc-2c] [--repeat 5]

Needs vLLM (the ``vllm`` extra, in a venv of its own: README, "Real engines"). For each size, a
Qwen2 built from a config (random weights, the bundled character tokenizer; head_dim 32 and 64,
which vLLM's CPU attention runs): ``tiny`` (2 layers, hidden 64) and ``mid`` (10 layers, hidden
512, about 30M parameters):

* **rollout**: one call samples one completion for each of ``--batch`` bundled-task prompts at
  temperature 1, ``--max-new-tokens`` tokens (random weights rarely stop early), with HF
  ``generate`` (`opd_train.rollout.generate`, KV cache) and with the colocated engine of
  ``--rollout-engine vllm`` (`opd_train.vllm_engine.VLLMEngine`). Completion tokens per second,
  median over ``--repeat`` calls after one warm-up; the engine's start-up and one weight sync are
  timed too (what a run pays once, and after every optimizer step).
* **teacher scoring**: `teacher_scoring.measure` against vLLM's OpenAI server started here on
  127.0.0.1 (its start-up to ``/health`` timed).

Writes ``OUT/engines.json`` (rows and the machine) and prints a summary. Torch runs 1 thread in
this process (as ``opd_train --threads 1``); vLLM's CPU worker binds its own threads.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from teacher_scoring import measure as measure_scoring, timed  # noqa: E402
from vllm_helpers import build_qwen2, serve, stop  # noqa: E402

SIZES = {  # name -> Qwen2 config fields (tests/vllm_helpers.build_qwen2)
    "tiny": {},
    "mid": dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=10, num_attention_heads=8,
                num_key_value_heads=4, head_dim=64),
}


def rollout_rows(size: str, path: Path, batch: int, max_new_tokens: int, repeat: int, log) -> list[dict]:
    from opd_train import rollout as R
    from opd_train.task import ArithmeticTask
    from opd_train.tokenizer import load_tokenizer
    from opd_train.vllm_engine import VLLMEngine
    from transformers import AutoModelForCausalLM
    tok = load_tokenizer(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    params = sum(p.numel() for p in model.parameters())
    prompts = R.encode_prompts(tok, [ex.prompt for ex in ArithmeticTask(3, "+").sample(random.Random(0), batch)])
    t0 = time.perf_counter()
    engine = VLLMEngine.start(path, model, tok, vocab_size=None, device=torch.device("cpu"), seed=0,
                              dtype="float32", gpu_memory_utilization=0.3, log=lambda m: None)
    start_s = time.perf_counter() - t0
    sync = timed(lambda: engine.load_weights(model), repeat)
    counts = {}

    def hf():
        counts["hf"] = int(R.generate(model, tok, prompts, max_new_tokens=max_new_tokens)[1].sum())

    def vllm():
        counts["vllm"] = int(engine.generate(prompts, max_new_tokens=max_new_tokens)[1].sum())

    rows = []
    for name, fn in (("hf", hf), ("vllm", vllm)):
        times = timed(fn, repeat)
        t = statistics.median(times)
        rows.append({"size": size, "params": params, "engine": name, "batch": batch, "max_new_tokens": max_new_tokens,
                     "completion_tokens": counts[name], "seconds_per_call": t, "seconds_min": min(times),
                     "seconds_max": max(times), "completion_tokens_per_s": counts[name] / t})
        log(f"{size} rollout {name:5s} {t * 1e3:8.1f} ms per call  {counts[name] / t:8.0f} completion tokens/s")
    rows[-1].update(engine_start_s=start_s, weight_sync_s=statistics.median(sync))
    log(f"{size} vLLM engine start {start_s:.1f} s, weight sync {statistics.median(sync) * 1e3:.1f} ms")
    engine.close()
    return rows


def summary(data: dict) -> str:
    """The README's engines table (``<!-- engines: DIR -->``; tests/test_readme.py checks it)."""
    m = data["meta"]
    rows = ["| model | what | HF / in-process | vLLM | vLLM ÷ HF time |", "|---|---|---|---|---|"]
    for size in dict.fromkeys(r["size"] for r in data["rollout"]):
        ro = {r["engine"]: r for r in data["rollout"] if r["size"] == size}
        params = f"{size} ({ro['hf']['params'] / 1e6:.1f}M)"
        rows.append(f"| {params} | rollout, {ro['hf']['batch']} prompts × ≤ {ro['hf']['max_new_tokens']} tokens "
                    f"| {ro['hf']['seconds_per_call'] * 1e3:.0f} ms ({ro['hf']['completion_tokens_per_s']:.0f} tok/s) "
                    f"| {ro['vllm']['seconds_per_call'] * 1e3:.0f} ms ({ro['vllm']['completion_tokens_per_s']:.0f} tok/s) "
                    f"| {ro['vllm']['seconds_per_call'] / ro['hf']['seconds_per_call']:.2f}× |")
        for k in dict.fromkeys(r["k"] for r in data["scoring"] if r["size"] == size):
            sc = {r["side"]: r for r in data["scoring"] if r["size"] == size and r["k"] == k}
            rows.append(f"| {params} | teacher scoring, K={k}, {sc['server']['tokens']} tokens "
                        f"| {sc['in-process']['seconds_per_call'] * 1e3:.0f} ms "
                        f"({sc['in-process']['tokens_per_s']:.0f} tok/s) "
                        f"| {sc['server']['seconds_per_call'] * 1e3:.0f} ms ({sc['server']['tokens_per_s']:.0f} tok/s) "
                        f"| {sc['server']['seconds_per_call'] / sc['in-process']['seconds_per_call']:.2f}× |")
    starts = ", ".join(f"{r['size']} {r['engine_start_s']:.1f} s" for r in data["rollout"] if "engine_start_s" in r)
    syncs = ", ".join(f"{r['size']} {r['weight_sync_s'] * 1e3:.0f} ms" for r in data["rollout"] if "weight_sync_s" in r)
    ups = ", ".join(f"{r['size']} {r['server_start_s']:.0f} s" for r in data["servers"])
    rows.append("")
    rows.append(f"Medians of {m['command']} on {m['device']}, torch {m['torch']}, vLLM {m['vllm']}, {m['date']} "
                f"(load average {m['load_average_at_start']:.1f} at the start, {m['load_average_at_end']:.1f} at the "
                f"end). Paid once or per step: engine start {starts}; weight sync {syncs}; server start to "
                f"/health {ups}.")
    return "\n".join(rows)


def main(argv=None) -> None:
    import run
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "cpu-epyc-2c")
    p.add_argument("--sizes", nargs="+", choices=sorted(SIZES), default=["tiny", "mid"])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--repeat", type=int, default=5)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    log = lambda m: print(m, flush=True)  # noqa: E731
    load0 = os.getloadavg()[0]
    rollout, scoring, servers = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            path = Path(tmp) / size
            build_qwen2(path, **SIZES[size])
            rollout += rollout_rows(size, path, args.batch, args.max_new_tokens, args.repeat, log)
            proc, url, up_s = serve(path, Path(tmp) / f"{size}.log")
            try:
                servers.append({"size": size, "server_start_s": up_s})
                log(f"{size} vLLM server healthy after {up_s:.1f} s")
                rows = measure_scoring(path, url, args.batch, args.repeat, (0, 20), log=log)
                scoring += [{"size": size, **r} for r in rows]
            finally:
                stop(proc)
    import vllm
    meta = {"device": run.device_name("cpu"), "torch": torch.__version__, "vllm": vllm.__version__,
            "date": time.strftime("%Y-%m-%d"), "command": " ".join(["python", *sys.argv]),
            "load_average_at_start": load0, "load_average_at_end": os.getloadavg()[0]}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "engines.json").write_text(json.dumps({"meta": meta, "rollout": rollout, "scoring": scoring,
                                                       "servers": servers}, indent=1) + "\n")
    log(f"wrote {args.out / 'engines.json'}")


if __name__ == "__main__":
    main()
