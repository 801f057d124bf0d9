"""CPU race: our fused-linear ops against every peer, interleaved in one process, fp32 fwd+bwd.

    python benchmarks/race.py --out benchmarks/results/cpu-epyc-2c/race.json
    python benchmarks/race.py --shapes 2048,32000,256 --ops jsd logprobs --providers torch cce liger_chunked \
        --rounds 3 --out /tmp/race.json

Ops: ``reverse_kl``, ``forward_kl``, ``jsd`` (``fused_linear_distill_loss`` with that divergence,
jsd at ``cases.BETA``) and ``logprobs`` (``fused_linear_token_logprobs``). Providers: ``torch``
(ours, ``impl="torch"``), ``naive`` and the peers of ``peers.py``; a provider that does not offer
an op is listed under the case's ``skipped`` with ``peers.missing``'s reason. Default shapes
(N, V, d): 2048 and 4096 at V=32000, d=256, and the real vocabulary N=1024, V=151936, d=896.

* **Phase A**, per (shape, op, provider), one fresh process with a new empty
  ``TORCHINDUCTOR_CACHE_DIR`` (a cold compile cache for every provider alike):
  ``first_call_ms`` is the wall time of the process's first full-size forward+backward (compile
  and lazy init included), then ``measure.measure`` takes the peak memory of one more step
  (peak RSS growth over a gc + malloc_trim baseline, ``VmHWM`` reset per phase).
* **Phase B**, per (shape, op), one process: every provider that passed phase A, plus the
  pseudo-provider ``floor`` (the op's bare GEMMs in torch: forward ``h_s @ W_s.T`` and, for
  distillation, ``h_t @ W_t.T``; backward ``G @ W_s`` and ``G.T @ h_s`` with a fixed random
  ``G [N, V]`` made before the timing), each warmed up with one full step, then ``--rounds``
  rounds in which every provider runs one timed step (``perf_counter``), round k starting at
  provider k mod P (the order rotates, so no provider always runs first or last).

Ratios, verdicts and the README table: ``race_report.py``. Results go to ``--out`` after each
(shape, op) (``meta.partial`` until the run ends). Workers over ``--timeout`` (phase A) or
``--race-timeout`` (phase B) seconds are killed; what they did not report is skipped with the reason.
"""
from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import torch  # noqa: E402

import cases  # noqa: E402
import measure  # noqa: E402
import peers  # noqa: E402
import race_report  # noqa: E402

RACE_OPS = {"reverse_kl": ("fused_linear_distill_loss", "reverse_kl"),
            "forward_kl": ("fused_linear_distill_loss", "forward_kl"),
            "jsd": ("fused_linear_distill_loss", "jsd"),
            "logprobs": ("fused_linear_token_logprobs", None)}
PROVIDERS = ("torch", cases.KEPT, "naive", "liger_chunked", "liger_chunked_eager", "cce", "trl", "trl_chunked")
SHAPES = ((2048, 32000, 256), (4096, 32000, 256), (1024, 151936, 896))
PACKAGES = ("torch", "triton", "liger-kernel", "cut-cross-entropy", "trl")
TAG = "@@race@@ "
DTYPE = torch.float32
MEMORY = ("peak RSS growth over the inputs (VmHWM reset per phase via /proc/self/clear_refs, over a gc + "
          "malloc_trim baseline), in the step after the first call, one fresh process per (shape, op, provider)")
COLD_CACHE = ("every phase A process starts with a new empty TORCHINDUCTOR_CACHE_DIR, so first_call_ms includes a "
              "cold inductor compile for every compiled provider, ours included; phase B shares one fresh cache "
              "per run and its warm-up step is not timed")


def default_rounds(V: int) -> int:
    return 5 if V <= 32000 else 3


# ----------------------------------------------------------------------------- the floor

class _FloorGemms(torch.autograd.Function):
    """The GEMMs of a fused-linear step and nothing else: logits of each model in forward
    (allocated, then dropped), ``dh = G @ W`` and ``dW = G.T @ h`` with a fixed ``G`` in backward."""

    @staticmethod
    def forward(ctx, h, w, g, *teacher):
        ctx.save_for_backward(h, w, g)
        ctx.n_teacher = len(teacher)
        h @ w.T
        if teacher:
            teacher[0] @ teacher[1].T
        return h.new_zeros(())

    @staticmethod
    def backward(ctx, _):
        h, w, g = ctx.saved_tensors
        return (g @ w, g.T @ h, None) + (None,) * ctx.n_teacher


def floor_fn(op: str, N: int, V: int):
    g = torch.randn(N, V, generator=torch.Generator().manual_seed(1), dtype=DTYPE)
    teacher = ("teacher_hidden", "teacher_weight") if op == "fused_linear_distill_loss" else ()
    return lambda x: _FloorGemms.apply(x["student_hidden"], x["student_weight"], g, *[x[k] for k in teacher])


# ----------------------------------------------------------------------------- workers

def _clear(x: dict) -> None:
    for t in cases.grad_leaves(x):
        t.grad = None


def first_call_worker(job: dict, emit) -> None:
    """Phase A: the first full-size fwd+bwd of a fresh process, then one memory step."""
    fn = cases.build(job["op"], job["divergence"], job["provider"], "cpu")
    x = cases.make_inputs(job["op"], job["N"], job["V"], job["d"], DTYPE, "cpu")
    t0 = time.perf_counter()
    cases.backward(fn(x))
    first = (time.perf_counter() - t0) * 1e3
    _clear(x)
    res = measure.measure(fn, x, device="cpu", warmup=0, repeat=0)
    emit(dict(first_call_ms=round(first, 1), peak_mem_mb=res["fwd+bwd"]["peak_mem_mb"],
              fwd_peak_mem_mb=res["fwd"]["peak_mem_mb"], bwd_peak_mem_mb=res["bwd"]["peak_mem_mb"]))


def race_worker(job: dict, emit) -> None:
    """Phase B: warm up every provider once, then rounds of one timed step each, rotated."""
    x = cases.make_inputs(job["op"], job["N"], job["V"], job["d"], DTYPE, "cpu")
    fns = {}
    for p in job["providers"]:
        try:
            fn = floor_fn(job["op"], job["N"], job["V"]) if p == race_report.FLOOR else \
                cases.build(job["op"], job["divergence"], p, "cpu")
            t0 = time.perf_counter()
            cases.backward(fn(x))
            emit(dict(warm=p, warmup_ms=round((time.perf_counter() - t0) * 1e3, 1)))
            fns[p] = fn
        except Exception as exc:  # noqa: BLE001 - the provider's own error is the reason
            emit(dict(warm=p, skipped=f"warm-up failed: {cases.describe(exc)}"))
        _clear(x)
    names = list(fns)
    for k in range(job["rounds"] if names else 0):
        order = names[k % len(names):] + names[:k % len(names)]
        ms = {}
        for p in order:
            try:
                ms[p] = [round(t, 3) for t in measure._timed_step(fns[p], x, False)]
            except Exception as exc:  # noqa: BLE001 - drop it from this and later rounds
                emit(dict(warm=p, skipped=f"failed in round {k + 1}: {cases.describe(exc)}"))
                names.remove(p)
            _clear(x)
        emit(dict(round=k, order=order, ms=ms))


def worker_main() -> None:
    job = json.load(sys.stdin)
    torch.manual_seed(0)
    emit = lambda r: print(TAG + json.dumps(r), flush=True)  # noqa: E731
    try:
        (first_call_worker if job["phase"] == "first" else race_worker)(job, emit)
    except Exception as exc:  # noqa: BLE001
        emit(dict(skipped=cases.describe(exc)))


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:  # it ended on its own meanwhile
        pass


def run_worker(job: dict, *, cache_dir: str, timeout: float) -> tuple[list[dict], str | None]:
    """Run ``race.py --worker`` on ``job`` in a fresh process (its own session, killed as a group
    on timeout) with ``TORCHINDUCTOR_CACHE_DIR=cache_dir``; returns (tagged lines, why it failed)."""
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache_dir)
    lines = []
    with tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--worker"], text=True, env=env,
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, start_new_session=True)
        killer = threading.Timer(timeout, _kill_group, (proc.pid,))
        killer.start()
        proc.stdin.write(json.dumps(job))
        proc.stdin.close()
        lines = [json.loads(line[len(TAG):]) for line in proc.stdout if line.startswith(TAG)]
        rc = proc.wait()
        timed_out = not killer.is_alive() and rc != 0
        killer.cancel()
        err.seek(0)
        last = (err.read().strip().splitlines() or [""])[-1]
    if timed_out:
        return lines, f"worker timed out after {timeout:.0f} s"
    return lines, None if rc == 0 else f"worker exited with code {rc}: {last[:300]}"


# ----------------------------------------------------------------------------- one (shape, op)

def run_case(name: str, shape: tuple, providers: list[str], rounds: int, args, race_cache: str, log) -> dict:
    op, div = RACE_OPS[name]
    N, V, d = shape
    entry = dict(op=name, kernel_op=op, divergence=div, N=N, V=V, d=d, rounds=rounds, providers={}, skipped=[])
    base = dict(op=op, divergence=div, N=N, V=V, d=d)

    def skip(p, phase, reason):
        entry["skipped"].append(dict(provider=p, phase=phase, reason=reason))
        log(f"{name} N={N} V={V}: skip {p} ({phase}): {reason}")

    racers = []
    for p in providers:
        why = peers.missing(op, p, "cpu") if p in peers.PEERS else cases.kept_missing(op) if p == cases.KEPT else None
        if why:
            skip(p, "plan", why)
            continue
        with tempfile.TemporaryDirectory(prefix="race-inductor-") as cache:
            lines, err = run_worker(dict(base, phase="first", provider=p), cache_dir=cache, timeout=args.timeout)
        res = next((r for r in lines if "first_call_ms" in r), None)
        if res is None:
            skip(p, "first_call", next((r["skipped"] for r in lines if "skipped" in r), err or "no result"))
            continue
        entry["providers"][p] = res
        racers.append(p)
        log(f"{name} N={N} V={V} {p:20s} first call {res['first_call_ms'] / 1e3:7.1f} s, "
            f"peak {res['peak_mem_mb']:8.1f} MB")
    if racers:
        race(entry, base, racers + [race_report.FLOOR], rounds, args, race_cache, skip, log)
    return race_report.analyze(entry)


def race(entry, base, racers, rounds, args, race_cache, skip, log) -> None:
    """Phase B for one (shape, op): per-round ms into ``entry['providers'][p]['rounds_ms']``."""
    job = dict(base, phase="race", providers=racers, rounds=rounds)
    lines, err = run_worker(job, cache_dir=race_cache, timeout=args.race_timeout)
    got = {p: [] for p in racers}
    for r in lines:
        if "skipped" in r:
            skip(r.get("warm", "race worker"), "race", r["skipped"])
        elif "round" in r:
            for p, ms in r["ms"].items():
                got[p].append(ms)
            log(f"{entry['op']} N={entry['N']} V={entry['V']} round {r['round'] + 1}/{rounds}: " +
                ", ".join(f"{p} {sum(ms):.0f}" for p, ms in r["ms"].items()) + " ms")
        elif "warmup_ms" in r:
            entry["providers"].setdefault(r["warm"], {})["warmup_ms"] = r["warmup_ms"]
    done = max((len(v) for v in got.values()), default=0)
    if err or done < rounds:
        skip("race worker", "race", f"{done} of {rounds} rounds reported" + (f"; {err}" if err else ""))
    for p, ms in got.items():
        if ms:
            tot = measure.series(ms)
            entry["providers"].setdefault(p, {}).update(
                rounds_ms=ms, **measure.summarize(tot["fwd+bwd"]), fwd_median_ms=statistics.median(tot["fwd"]),
                bwd_median_ms=statistics.median(tot["bwd"]))


# ----------------------------------------------------------------------------- meta, main

def _version(pkg: str) -> str | None:
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return None


def meta(args, argv: list[str]) -> dict:
    import run
    return {"device": run.device_name("cpu"), **{p: _version(p) for p in PACKAGES},
            "python": platform.python_version(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "git_sha": run.git_sha(), "command": " ".join(["python", "benchmarks/race.py", *argv]), "rounds": args.rounds,
            "default_rounds": "5 at V <= 32000, else 3", "dtype": "float32", "notes": args.note,
            "loadavg_start": [round(v, 2) for v in os.getloadavg()], "memory": MEMORY, "cold_cache": COLD_CACHE,
            "timeout_s": args.timeout, "race_timeout_s": args.race_timeout}


def main(argv=None) -> dict | None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=HERE / "results" / "cpu-epyc-2c" / "race.json")
    ap.add_argument("--shapes", nargs="+", metavar="N,V,d", help="default: " + " ".join(",".join(map(str, s))
                                                                                         for s in SHAPES))
    ap.add_argument("--ops", nargs="+", choices=list(RACE_OPS), default=list(RACE_OPS))
    ap.add_argument("--providers", nargs="+", choices=PROVIDERS, default=list(PROVIDERS))
    ap.add_argument("--rounds", type=int, default=None, help="interleaved rounds per (shape, op); "
                                                             "default 5 at V <= 32000, else 3")
    ap.add_argument("--timeout", type=float, default=900, help="seconds per phase A worker")
    ap.add_argument("--race-timeout", type=float, default=3600, help="seconds per phase B worker")
    ap.add_argument("--note", default="", help="free text stored in meta.notes")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return worker_main()
    shapes = [tuple(int(v) for v in s.split(",")) for s in args.shapes] if args.shapes else list(SHAPES)
    providers = [p for p in PROVIDERS if p in args.providers]  # ours first: the rotation starts from it
    t_start = time.time()

    def log(msg):
        print(f"[{time.time() - t_start:6.0f}s] {msg}", flush=True)

    m = meta(args, sys.argv[1:] if argv is None else argv)
    log(f"race on {m['device']}: {len(shapes)} shapes x {len(args.ops)} ops, providers {' '.join(providers)}")
    data = {"meta": dict(m, partial=True), "cases": []}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="race-inductor-b-") as race_cache:
        for shape in shapes:
            rounds = args.rounds or default_rounds(shape[1])
            for name in args.ops:
                data["cases"].append(run_case(name, shape, providers, rounds, args, race_cache, log))
                _log_verdicts(data["cases"][-1], log)
                args.out.write_text(json.dumps(data, indent=1) + "\n")
                log(f"load average {os.getloadavg()[0]:.2f}")
    data["meta"].pop("partial")
    data["meta"].update(wall_s=round(time.time() - t_start, 1), loadavg_end=[round(v, 2) for v in os.getloadavg()])
    args.out.write_text(json.dumps(data, indent=1) + "\n")
    print(race_report.summary(data))
    log(f"wrote {args.out}")
    return data


def _log_verdicts(e: dict, log) -> None:
    r, v = e["ours"] or {}, e["verdicts"]
    fmt = lambda x: "n/a" if x is None else f"{x:.2f}x"  # noqa: E731
    log(f"{e['op']} N={e['N']} V={e['V']} d={e['d']}: ours vs fastest peer {e['fastest_peer']} "
        f"{fmt(r.get('ratio_vs_fastest_peer'))} time, {fmt(r.get('mem_ratio'))} memory, "
        f"{fmt(r.get('floor_multiple'))} floor, {fmt(r.get('first_call_ratio'))} first call; " +
        ", ".join(f"{k} {race_report._verdict(x)}" for k, x in v.items()))


if __name__ == "__main__":
    main()
