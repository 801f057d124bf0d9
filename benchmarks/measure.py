"""Timing and peak-memory measurement of one case (forward, backward, forward+backward).

Peak memory is the *extra* memory a pass needs beyond its inputs: the highest usage during the
pass minus the usage with only the inputs allocated (after a warm-up, with ``.grad`` cleared).
Gradients, saved activations and outputs count; the inputs do not.

* CUDA: the caching allocator's ``max_memory_allocated`` (reset before each phase).
* CPU: resident set size from ``/proc/self/status``. ``VmHWM`` (peak RSS) is reset before each
  phase by writing ``5`` to ``/proc/self/clear_refs``, and the baseline ``VmRSS`` is taken after
  ``gc.collect()`` and glibc ``malloc_trim(0)`` so that memory freed by the warm-up is not
  counted as the inputs'. The runner executes each (op, provider) group in a fresh subprocess.

A backward phase's peak includes what the forward left alive for it (saved tensors, output),
as it does in training; the fwd+bwd peak is the larger of the two phase peaks.
"""
from __future__ import annotations

import ctypes
import gc
import statistics
import time

import torch

from cases import backward, grad_leaves

MB = 2.0 ** 20


def _proc_status(key: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024 / MB  # kB
    raise RuntimeError(f"{key} not in /proc/self/status")


def _malloc_trim():
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class CpuMemory:
    """Peak RSS growth over a baseline; needs Linux ``/proc`` (``clear_refs`` mode 5)."""

    def baseline(self):
        gc.collect()
        _malloc_trim()
        self.base = _proc_status("VmRSS")

    def reset(self):
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")

    def peak(self) -> float:
        return _proc_status("VmHWM") - self.base


class CudaMemory:
    """Peak of the CUDA caching allocator over a baseline."""

    def baseline(self):
        gc.collect()
        torch.cuda.synchronize()
        self.base = torch.cuda.memory_allocated() / MB

    def reset(self):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()

    def peak(self) -> float:
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() / MB - self.base


def _timed_step(fn, x, cuda: bool):
    """One forward + backward; returns (fwd_ms, bwd_ms). CUDA events on GPU, perf_counter on CPU."""
    if cuda:
        e = [torch.cuda.Event(enable_timing=True) for _ in range(3)]
        e[0].record()
        out = fn(x)
        e[1].record()
        backward(out)
        e[2].record()
        torch.cuda.synchronize()
        return e[0].elapsed_time(e[1]), e[1].elapsed_time(e[2])
    t0 = time.perf_counter()
    out = fn(x)
    t1 = time.perf_counter()
    backward(out)
    t2 = time.perf_counter()
    return (t1 - t0) * 1e3, (t2 - t1) * 1e3


def _quantile(xs, q):
    xs = sorted(xs)
    if len(xs) == 1:
        return xs[0]
    pos = q * (len(xs) - 1)  # linear interpolation, as numpy.percentile
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def measure(fn, x, *, device, warmup: int, repeat: int, tiny=None) -> dict:
    """``{pass: {median_ms, p20_ms, p80_ms, peak_mem_mb, tiny_step_ms, first_step_ms}}`` for fwd,
    bwd and fwd+bwd (the last two: wall time of the tiny step and of the first full-size step).

    Order: one step on ``tiny()`` inputs (few rows, same V and d: compiles, lazy init, code
    pages), ``warmup`` untimed full-size steps, one untimed memory step, then ``repeat`` timed
    steps (``repeat=0``: memory only, times ``None``). ``bwd`` is the backward alone, timed after an untimed forward of the same step;
    ``fwd+bwd`` is their sum within each step.
    """
    cuda = torch.device(device).type == "cuda"
    leaves = grad_leaves(x)

    def clear():
        for t in leaves:
            t.grad = None

    def wall(step):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize()
        return (time.perf_counter() - t0) * 1e3

    tiny_ms = wall(lambda: backward(fn(tiny()))) if tiny is not None else None
    first_ms = None  # the first full-size step (recompiles for a new shape land here)
    for _ in range(warmup):
        ms = wall(lambda: backward(fn(x)))
        first_ms = ms if first_ms is None else first_ms
        clear()

    mem = CudaMemory() if cuda else CpuMemory()
    t0 = time.perf_counter()
    mem.baseline()
    mem.reset()
    out = fn(x)
    peak_f = mem.peak()
    mem.reset()
    backward(out)
    peak_b = mem.peak()
    if first_ms is None:
        first_ms = (time.perf_counter() - t0) * 1e3  # includes the (cheap) /proc bookkeeping
    del out
    clear()

    times = []
    for _ in range(repeat):
        times.append(_timed_step(fn, x, cuda))
        clear()

    peaks = {"fwd": peak_f, "bwd": peak_b, "fwd+bwd": max(peak_f, peak_b)}
    steps = {"tiny_step_ms": None if tiny_ms is None else round(tiny_ms, 1), "first_step_ms": round(first_ms, 1)}
    return {p: dict(summarize(v), peak_mem_mb=round(peaks[p], 1), **steps) for p, v in series(times).items()}


def series(times: list) -> dict:
    """``[(fwd_ms, bwd_ms), ...]`` -> ``{pass: [ms, ...]}``."""
    return {"fwd": [f for f, _ in times], "bwd": [b for _, b in times], "fwd+bwd": [f + b for f, b in times]}


def summarize(v: list) -> dict:
    """median, p20, p80 of a list of times (all ``None`` for an empty list: not timed)."""
    if not v:
        return {"median_ms": None, "p20_ms": None, "p80_ms": None}
    return {"median_ms": statistics.median(v), "p20_ms": _quantile(v, 0.2), "p80_ms": _quantile(v, 0.8)}


def gemm_rates(N, V, d, dtype, device, repeat=10) -> dict:
    """Dense rates (TFLOP/s) of the three GEMM shapes of a fused-linear step, each ``2*N*V*d``
    flops: ``logits = h @ W.T`` (``[N,d] @ [d,V]``), ``dh = G @ W`` (``[N,V] @ [V,d]``),
    ``dW = G.T @ h`` (``[V,N] @ [N,d]``). The floor uses ``logits`` (the "dense GEMM rate for that
    shape" of the targets); the other two show how far the backward shapes run from it."""
    return {"logits": gemm_tflops(N, d, V, dtype, device, repeat),
            "dh": gemm_tflops(N, V, d, dtype, device, repeat, b_layout="kn"),
            "dW": gemm_tflops(V, N, d, dtype, device, repeat, a_layout="km", b_layout="kn")}


def gemm_tflops(M, K, Nn, dtype, device, repeat=10, a_layout="mk", b_layout="nk") -> float:
    """Dense ``[M, K] @ [K, Nn]`` rate (TFLOP/s) in ``dtype``: the matmul floor's denominator.
    ``a_layout="km"``: A is stored ``[K, M]`` and used transposed (``G.T``); ``b_layout="nk"``:
    B is stored ``[Nn, K]`` and used transposed (``W.T``), ``"kn"``: stored as used."""
    a = torch.randn(*((M, K) if a_layout == "mk" else (K, M)), device=device, dtype=dtype)
    b = torch.randn(*((Nn, K) if b_layout == "nk" else (K, Nn)), device=device, dtype=dtype)
    a = a if a_layout == "mk" else a.T
    b = b.T if b_layout == "nk" else b
    cuda = torch.device(device).type == "cuda"
    for _ in range(3):
        a @ b
    ts = []
    for _ in range(repeat):
        if cuda:
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            e0.record()
            a @ b
            e1.record()
            torch.cuda.synchronize()
            ts.append(e0.elapsed_time(e1) / 1e3)
        else:
            t0 = time.perf_counter()
            a @ b
            ts.append(time.perf_counter() - t0)
    return 2.0 * M * K * Nn / statistics.median(ts) / 1e12


def paired(fns: dict, x, *, device, rounds: int, tiny=None) -> dict:
    """Interleaved ``{provider: [[fwd_ms, bwd_ms] per round]}`` of several providers on the
    same inputs: every round times each provider once, so load drift on a shared machine hits
    all of them alike and per-round ratios stay meaningful."""
    cuda = torch.device(device).type == "cuda"
    leaves = grad_leaves(x)
    for fn in fns.values():
        if tiny is not None:
            backward(fn(tiny()))
        backward(fn(x))  # full-size warm-up (first-touch page faults)
        for t in leaves:
            t.grad = None
    times = {p: [] for p in fns}
    for _ in range(rounds):
        for p, fn in fns.items():
            times[p].append(_timed_step(fn, x, cuda))
            for t in leaves:
                t.grad = None
    return times
