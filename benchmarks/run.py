"""Benchmark every op x provider x pass over a shape sweep; write results.json, results.csv, plots.

    python benchmarks/run.py --quick --out benchmarks/results/cpu-mybox     # CPU sizes, fp32, ours + peers
    python benchmarks/run.py --out results/h100                             # GPU sizes, bf16
    python benchmarks/run.py --quick --ops fused_linear_distill_loss --providers naive torch
    python benchmarks/run.py --ops fused_linear_distill_loss --providers torch liger liger_chunked \
        --shapes 8192,128256,4096 16384,151936,2048 --dtype bfloat16 --out results/h200

On CPU each (op, provider) group runs in a fresh subprocess (peak RSS is per process); on CUDA
everything runs in this process with the allocator's peak statistics. Unavailable providers
and failed cases (OOM, compile errors) are listed under ``skipped`` with the reason. The run
ends with the GEMM floor, the ratio check and the targets (pass / short), see README.md.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import platform
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
from report import add_floor, first_calls, targets  # noqa: E402
from cases import COMPILED, OPS, PASSES, PEERS, PROVIDERS, Unavailable  # noqa: E402

# (N, V, d) sweeps. d is ignored by the logits-level ops. The quick sweep is N = 128..512 at
# V = 32000 plus one smaller V (peers: V = 32000 only; a new V costs a compiled peer a
# recompile), one larger fused shape for ours and the peers (not naive: the ratio check
# measures naive larger still), and the ratio check's shape (N = 6144).
QUICK = {
    "logits": [(128, 32000, 0), (256, 32000, 0), (512, 32000, 0), (512, 8000, 0)],
    "fused": [(128, 32000, 256), (256, 32000, 256), (512, 32000, 256), (512, 8000, 256)],
    "large": [(4096, 32000, 256)],  # fused ops, every provider but naive / naive_compile (--no-large: drop)
    "peer_V": 32000,
    # the ratio-check shape, for this (op, divergence) only
    "check": ("fused_linear_distill_loss", "reverse_kl", (6144, 32000, 256)),
}
GPU = {
    "logits": [(2048, 128256, 0), (4096, 128256, 0), (8192, 128256, 0), (16384, 151936, 0)],
    "fused": [(2048, 128256, 4096), (4096, 128256, 4096), (8192, 128256, 4096), (16384, 151936, 2048)],
    "check": None,
}
FIELDS = ["op", "divergence", "provider", "pass", "N", "V", "d", "dtype",
          "median_ms", "p20_ms", "p80_ms", "peak_mem_mb", "floor_ms", "frac_of_floor", "floor_multiple",
          "first_call_ms", "first_step_ms", "decision"]
TAG = "@@bench@@ "  # worker result lines on stdout


# ----------------------------------------------------------------------------- planning

def plan(args) -> list[dict]:
    """Every (op, divergence, provider, shape) case to run, in order (small shapes first)."""
    sweep = dict(QUICK if args.quick else GPU)
    if args.shapes:
        shapes = [tuple(int(v) for v in s.split(",")) for s in args.shapes]
        sweep = {"logits": shapes, "fused": shapes, "check": None}
    if getattr(args, "no_large", False):
        sweep.pop("large", None)
    out = []
    # fused-linear ops first, compile last: what matters most runs before a --budget cuts in
    ops = sorted(args.ops, key=lambda op: not cases.is_fused(op))
    providers = sorted(args.providers, key=lambda p: p == "naive_compile")
    for op in ops:
        for div in cases.divergences(op):
            shapes = list(sweep["fused" if cases.is_fused(op) else "logits"])
            if sweep["check"] and sweep["check"][:2] == (op, div):
                shapes.append(sweep["check"][2])
            for prov in providers:
                for N, V, d in shapes + (sweep.get("large", []) if cases.is_fused(op) else []):
                    if (N, V, d) in sweep.get("large", []) and prov.startswith("naive"):
                        continue
                    if sweep.get("peer_V") and prov in PEERS and V != sweep["peer_V"]:
                        continue
                    c = dict(op=op, divergence=div, provider=prov, N=N, V=V, d=d if cases.is_fused(op) else 0,
                             dtype=args.dtype)
                    if sweep["check"] and (op, div, (N, V, d)) == sweep["check"] and not args.device.startswith("cuda"):
                        c["memory_only"] = True  # timed by ratio_check, interleaved with the other provider
                    out.append(c)
    return out


# ----------------------------------------------------------------------------- worker

def decision(c: dict, device: str) -> str | None:
    """What opd_kernels runs for an ``ours`` case (``opd_kernels.explain``: backend/path[/compiled]),
    recorded with its results; None for the other providers."""
    if c["provider"] not in ("torch", "triton", "cuda"):
        return None
    import opd_kernels as ok
    models = 1 if "logprobs" in c["op"] else 3 if "gopd" in c["op"] else 2
    try:
        return str(ok.explain(c["provider"], rows=c["N"], vocab=c["V"], hidden=c["d"] or None, models=models,
                              kind="jsd" if c["divergence"] == "jsd" else "reverse_kl",
                              dtype=getattr(torch, c["dtype"]), device=device))
    except ValueError as exc:  # the backend is not available here (the case reports why)
        return f"unavailable: {exc}"


def run_cases(todo: list[dict], *, device: str, warmup: int, repeat: int, emit, deadline=None):
    """Run cases of one process; calls ``emit(record)`` per measured pass or skipped case."""
    built, first = {}, {}
    for c in todo:
        if deadline and time.time() > deadline:
            emit(dict(c, skipped="time budget (--budget) exhausted before this case"))
            continue
        key = (c["op"], c["divergence"], c["provider"])
        dtype = getattr(torch, c["dtype"])
        try:
            tiny = lambda: cases.make_inputs(c["op"], 64, c["V"], c["d"], dtype, device)  # noqa: E731
            new = key not in built
            if new:
                timing = {}
                try:  # the first call of a library provider: at this case's V, d with 64 rows
                    built[key] = cases.probe(*key, device, dtype, inputs=tiny(), timing=timing)
                except Unavailable as exc:
                    built[key] = exc
            if isinstance(built[key], Unavailable):
                raise built[key]
            x = cases.make_inputs(c["op"], c["N"], c["V"], c["d"], dtype, device)
            # a compiled provider recompiles for dynamic shapes at its second shape: in a warm-up
            # step, not in the memory step
            w = max(warmup, 1) if new and c["provider"] in COMPILED else warmup
            res = measure.measure(built[key], x, device=device, warmup=w, tiny=tiny,
                                  repeat=0 if c.get("memory_only") else repeat)
            if new:  # naive_compile is not probed: its first call is this case's tiny step
                first[key] = round(timing.get("first_call_ms", res["fwd"]["tiny_step_ms"]), 1)
                for p in PASSES:
                    res[p]["first_call_ms"] = first[key]
        except Unavailable as exc:
            emit(dict(c, skipped=str(exc)))
            continue
        except Exception as exc:  # noqa: BLE001 - OOM, compile failure, op error: report, go on
            emit(dict(c, skipped=f"failed at N={c['N']} V={c['V']} d={c['d']}: {cases.describe(exc)}"))
            continue
        finally:
            x = None
            if device.startswith("cuda"):
                torch.cuda.empty_cache()
        for p in PASSES:
            emit(dict(c, **{"pass": p}, **res[p], decision=decision(c, device)))


def worker_main():
    """``run.py --worker``: read {cases, device, warmup, repeat} JSON on stdin, print results
    (or, for a ``paired`` job, the interleaved times of its providers on one case)."""
    job = json.load(sys.stdin)
    torch.manual_seed(0)
    if "paired" in job:
        c, dtype = job["paired"], getattr(torch, job["paired"]["dtype"])
        fns = {p: cases.build(c["op"], c["divergence"], p, job["device"]) for p in c["providers"]}
        x = cases.make_inputs(c["op"], c["N"], c["V"], c["d"], dtype, job["device"])
        tiny = lambda: cases.make_inputs(c["op"], 64, c["V"], c["d"], dtype, job["device"])  # noqa: E731
        print(TAG + json.dumps(measure.paired(fns, x, device=job["device"], rounds=job["repeat"], tiny=tiny)))
        return
    run_cases(job["cases"], device=job["device"], warmup=job["warmup"], repeat=job["repeat"],
              emit=lambda r: print(TAG + json.dumps(r), flush=True), deadline=job["deadline"])


def run_in_subprocess(todo, *, device, warmup, repeat, emit, timeout, deadline=None):
    """One fresh interpreter for ``todo``; cases it did not report are skipped with the reason."""
    job = json.dumps(dict(cases=todo, device=device, warmup=warmup, repeat=repeat, deadline=deadline))
    seen = set()
    with tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--worker"], text=True,
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err)
        killer = threading.Timer(timeout, proc.kill)
        killer.start()
        proc.stdin.write(job)
        proc.stdin.close()
        for line in proc.stdout:  # stream: results show up as each case finishes
            if line.startswith(TAG):
                r = json.loads(line[len(TAG):])
                seen.add(_case_key(r))
                emit(r)
        rc = proc.wait()
        timed_out = not killer.is_alive()
        killer.cancel()
        err.seek(0)
        last = (err.read().strip().splitlines() or [""])[-1]
    why = f"worker timed out after {timeout} s" if timed_out else f"worker exited with code {rc}: {last}"
    for c in todo:
        if _case_key(c) not in seen:
            emit(dict(c, skipped=why))


def _case_key(r):
    return tuple(r[k] for k in ("op", "divergence", "provider", "N", "V", "d"))


# ----------------------------------------------------------------------------- reporting

def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    model = platform.processor() or "cpu"
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{model} ({os.cpu_count()} logical cores, {torch.get_num_threads()} torch threads)"


def git_sha() -> str | None:
    """Short HEAD, with ``-dirty`` when the kernels or the benchmark scripts have uncommitted changes."""
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True,
                             text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "opd_kernels", "csrc", "benchmarks/*.py"],
                               cwd=HERE.parent, capture_output=True, text=True).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return None


def meta(args, device) -> dict:
    try:
        import triton
        triton_version = triton.__version__
    except Exception:  # noqa: BLE001
        triton_version = None
    return {
        "device": device_name(device), "torch": torch.__version__, "triton": triton_version,
        "python": platform.python_version(), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_sha": git_sha(), "mode": "quick" if args.quick else "default", "providers": args.providers, "warmup": args.warmup,
        "repeat": args.repeat, "command": " ".join(sys.argv), "notes": args.note,
        "loadavg_start": [round(v, 2) for v in os.getloadavg()],  # other jobs on the machine
        "memory": "CUDA allocator peak over the inputs" if device.startswith("cuda") else
                  "peak RSS growth over the inputs (VmHWM reset per phase, fresh process per op/provider)",
    }


def write(out: Path, data: dict):
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(data, indent=1) + "\n")
    with open(out / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS, extrasaction="ignore")
        w.writeheader()
        for r in data["results"]:
            w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in FIELDS})


def ratio_check(results, log, *, device=None, repeat=3, timeout=900) -> dict | None:
    """Chunked torch vs naive, fused-linear reverse KL fwd+bwd at the largest N measured for both.

    Memory comes from the sweep. On CPU the times come from the two providers interleaved in
    one fresh process (``repeat`` rounds after a full-size warm-up; the time ratio is the median
    of per-round ratios), since a sweep times them minutes apart and a shared machine's load
    drifts in between; those rounds are also the times recorded for that shape, which the
    sweep measured for memory only (``memory_only`` cases).
    """
    pick = {(r["provider"], r["N"]): r for r in results if r["op"] == "fused_linear_distill_loss"
            and r["divergence"] == "reverse_kl" and r["pass"] == "fwd+bwd" and r["provider"] in ("naive", "torch")}
    Ns = [n for (p, n) in pick if p == "torch" and ("naive", n) in pick]
    if not Ns:
        log("ratio check: needs fused_linear_distill_loss/reverse_kl with providers naive and torch")
        return None
    N = max(Ns)
    ours, naive = pick["torch", N], pick["naive", N]
    mem = ours["peak_mem_mb"] / naive["peak_mem_mb"]
    out = dict(N=N, V=ours["V"], d=ours["d"], dtype=ours["dtype"], torch_peak_mb=ours["peak_mem_mb"],
               naive_peak_mb=naive["peak_mem_mb"], mem_ratio=round(mem, 4))
    t, how, shown = None, "sweep medians", (ours["median_ms"], naive["median_ms"])
    if None not in shown:
        t = shown[0] / shown[1]
    if device is not None and not device.startswith("cuda"):
        job = dict(device=device, repeat=repeat, paired=dict(op=ours["op"], divergence="reverse_kl", N=N, V=ours["V"],
                                                            d=ours["d"], dtype=ours["dtype"], providers=["naive", "torch"]))
        try:
            p = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker"], input=json.dumps(job),
                               capture_output=True, text=True, timeout=timeout)
            times = json.loads(next(line[len(TAG):] for line in p.stdout.splitlines() if line.startswith(TAG)))
        except (subprocess.TimeoutExpired, StopIteration) as exc:
            log(f"ratio check: interleaved timing failed ({type(exc).__name__})")
        else:
            total = {prov: [f + b for f, b in ts] for prov, ts in times.items()}
            t = statistics.median(a / b for a, b in zip(total["torch"], total["naive"]))
            how = "interleaved rounds, median per-round ratio"
            shown = (statistics.median(total["torch"]), statistics.median(total["naive"]))
            out.update(paired_ms=times, paired_time_ratio=round(t, 3))
            for r in results:  # the shape's recorded times: these rounds (unless the sweep timed it)
                if (r["op"], r["divergence"], r["N"], r["V"], r["d"]) == (ours["op"], "reverse_kl", N, ours["V"], ours["d"]) \
                        and r["provider"] in times and r.get("memory_only"):
                    r.update(measure.summarize(measure.series(times[r["provider"]])[r["pass"]]), timed="ratio_check")
    ok = t is not None and mem <= 0.25 and t <= 1.5
    out.update(time_ratio=None if t is None else round(t, 3), passed=ok)
    t_txt = "not measured" if t is None else f"{t:.2f}x ({how}; medians {shown[0]:.0f}/{shown[1]:.0f} ms)"
    log(f"ratio check (fused_linear_distill_loss reverse_kl fwd+bwd, N={N} V={ours['V']} d={ours['d']} "
        f"{ours['dtype']}): torch/naive peak memory {ours['peak_mem_mb']:.0f}/{naive['peak_mem_mb']:.0f} MB "
        f"= {mem:.3f} (target <= 0.25), time {t_txt} (target <= 1.5x): {'PASS' if ok else 'FAIL'}")
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="CPU-sized shapes (fp32), incl. N=4096 fused for ours + peers (--no-large: without)")
    ap.add_argument("--out", type=Path, default=None, help="output directory (default benchmarks/results/<device>)")
    ap.add_argument("--ops", nargs="+", default=list(OPS), choices=OPS)
    ap.add_argument("--providers", nargs="+", default=None, choices=PROVIDERS,
                    help="default: all (naive_compile costs ~30 s of compile per op on 2 cores)")
    ap.add_argument("--shapes", nargs="+", metavar="N,V,d", help="replace the shape sweep (d unused by logits ops)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                    help="input dtype (default: float32 with --quick, else bfloat16)")
    ap.add_argument("--warmup", type=int, default=None,
                    help="untimed full-size steps per case after one tiny-N step (default 0 quick, 2 else)")
    ap.add_argument("--repeat", type=int, default=None, help="timed steps per case (default 3 quick, 10 else)")
    ap.add_argument("--timeout", type=int, default=900, help="seconds per CPU worker process")
    ap.add_argument("--budget", type=float, default=None,
                    help="seconds: cases not started by then are skipped (results so far are kept)")
    ap.add_argument("--note", default="", help="free text stored in meta.notes (e.g. 'CPU shared with other jobs')")
    ap.add_argument("--no-large", action="store_true",
                    help="--quick without its large fused shape (N=4096, V=32000, d=256: ours and the peers)")
    ap.add_argument("--no-floor", action="store_true", help="skip the GEMM-rate measurement (no floor columns)")
    ap.add_argument("--no-plots", action="store_true")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return worker_main()
    args.providers = args.providers or list(PROVIDERS)
    args.dtype = args.dtype or ("float32" if args.quick else "bfloat16")
    args.warmup = args.warmup if args.warmup is not None else (0 if args.quick else 2)
    args.repeat = args.repeat or (3 if args.quick else 10)
    cuda = args.device.startswith("cuda")
    tag = ("cpu" if not cuda else torch.cuda.get_device_name().split()[-1].lower()) + ("-quick" if args.quick else "")
    out = args.out or HERE / "results" / tag

    t_start = time.time()

    def log(msg):
        print(f"[{time.time() - t_start:6.0f}s] {msg}", flush=True)

    results, skipped = [], []

    def emit(r):
        if "skipped" in r:
            if not any((s["op"], s["provider"], s["skipped"]) == (r["op"], r["provider"], r["skipped"]) for s in skipped):
                log(f"skip {r['op']} {r['provider']}: {r['skipped']}")
            skipped.append(r)
            return
        results.append(r)
        if r["pass"] == "fwd+bwd":
            t = "(timed below)" if r["median_ms"] is None else f"{r['median_ms']:9.1f} ms"
            log(f"{r['op']:28s} {r['divergence'] or '-':10s} {r['provider']:13s} N={r['N']:<6d} V={r['V']:<6d} "
                f"d={r['d']:<5d} fwd+bwd {t:>12s}  peak {r['peak_mem_mb']:8.1f} MB")

    todo = plan(args)
    deadline = t_start + args.budget if args.budget else None
    m = meta(args, args.device)
    log(f"{len(todo)} cases on {m['device']}, {args.dtype}, warmup {args.warmup}, repeat {args.repeat}")

    def flush():  # partial results survive a kill
        write(out, {"meta": dict(m, partial=True), "results": results, "skipped": _dedupe_skips(skipped)})

    groups = {}
    for c in todo:  # a compiled provider gets a fresh process per divergence (its recompile limit)
        groups.setdefault((c["op"], c["provider"], c["divergence"] if c["provider"] in COMPILED else None),
                          []).append(c)
    for (op, prov, _), group in groups.items():
        if cuda:
            if prov in COMPILED:  # as a fresh process would: own compile, own recompile budget
                torch._dynamo.reset()
            run_cases(group, device=args.device, warmup=args.warmup, repeat=args.repeat, emit=emit, deadline=deadline)
        elif prov in PEERS and peers.missing(op, prov, args.device):  # known without a worker
            for c in group:
                emit(dict(c, skipped=peers.missing(op, prov, args.device)))
        elif prov in ("triton", "cuda"):  # build() refuses CPU with the reason: record it
            for c in group:
                try:
                    cases.build(op, c["divergence"], prov, args.device)
                except Unavailable as exc:
                    emit(dict(c, skipped=str(exc)))
                else:
                    emit(dict(c, skipped=f"{prov} is not benchmarked on CPU"))
        else:
            run_in_subprocess(group, device=args.device, warmup=args.warmup, repeat=args.repeat,
                              emit=emit, timeout=args.timeout, deadline=deadline)
        flush()
        if not cuda and prov not in ("triton", "cuda") and not (prov in PEERS and peers.missing(op, prov, args.device)):
            log(f"load average {os.getloadavg()[0]:.1f}")

    m["ratio_check"] = ratio_check(results, log, device=args.device, repeat=args.repeat, timeout=args.timeout)
    if not args.no_floor:
        m["gemm"] = add_floor(results, args.device, args.dtype, log, repeat=10 if cuda else 5)
    m["first_call"] = first_calls(results)
    for f in m["first_call"]:
        if f["provider"] in COMPILED:
            log(f"first call (compile) {f['op']} {f['divergence'] or '-'} {f['provider']}: {f['first_call_ms'] / 1e3:.1f} s; "
                f"first full-size step (N={f['N']}) {(f['first_step_ms'] or 0) / 1e3:.1f} s, "
                f"steady {(f['steady_ms'] or 0) / 1e3:.2f} s")
    m["targets"] = targets(results, log)
    m["wall_s"] = round(time.time() - t_start, 1)
    m["loadavg_end"] = [round(v, 2) for v in os.getloadavg()]
    data = {"meta": m, "results": results, "skipped": _dedupe_skips(skipped)}
    write(out, data)
    if not args.no_plots:
        import plot
        plot.plot_all(data, out)
    log(f"wrote {out}/results.json, results.csv and plots ({len(results)} rows, {len(data['skipped'])} skip reasons)")


def _dedupe_skips(skipped):
    """One entry per (op, divergence, provider, reason), with the Ns it covers."""
    merged = {}
    for s in skipped:
        k = (s["op"], s["divergence"], s["provider"], s["skipped"])
        merged.setdefault(k, dict(op=s["op"], divergence=s["divergence"], provider=s["provider"],
                                  reason=s["skipped"], N=[]))["N"].append(s["N"])
    return list(merged.values())


if __name__ == "__main__":
    main()
