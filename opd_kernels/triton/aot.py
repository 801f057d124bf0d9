"""Ahead-of-time compile check: every Triton kernel, for real GPUs, on a machine without one.

    python -m opd_kernels.triton.aot [--arch 80,90] [--jobs N] [--full] [--report FILE]
                                     [--json FILE] [--filter RE] [--tf32]

What is compiled. The backend's own plans (``opd_kernels.backends.triton_backend.plan_*``, the
functions its launchers run) are asked, on ``meta`` tensors at the reference configurations and
with ``sms=`` the arch's SM count, what they would launch: each ``Launch`` carries exactly the
constexprs, ``num_warps`` and ``num_stages`` that ``triton_plan.logits_config`` /
``fused_config`` / ``vocab_splits`` and ``_precision`` pick (nothing here restates a kernel
signature or patches the launcher). Each launch is specialised as ``JITFunction.run`` would
(pointer dtypes, ``== 1`` and ``% 16`` argument attributes) and compiled with
``triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))`` down to a cubin with
Triton's bundled ``ptxas`` (sm_80 = A100, sm_90a = H100/H200).

Which variants. By default a covering set: per (kernel, input dtype, arch), every value of every
code-changing flag (teacher, reference, targets, bias, entropy, gradient kind, dW/db) appears at
least once, in the combinations the public ops use. ``--full`` compiles the cross product
(both reference shapes, fp16, every flag combination) instead.

What is reported. A table (one row per distinct compiled variant: registers, spill stores/loads,
stack frame, shared memory, config) from the ``ptxas -v`` log and the kernel metadata; it is
printed and, with ``--report``, written to a file. Exit status 1 if any variant fails to compile,
needs more shared memory than the arch allows per block, or spills where ``must_not_spill``
says it must not (the logits-level row kernels; the fused ones with 16-bit weights).
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import contextlib
import io
import os
import re
import subprocess
import sys
import tempfile
import time
import traceback

# SM counts (the plans' sms=, for the vocabulary splits) and the per-block shared-memory limit (launch fails above it).
ARCHS = {80: dict(name="A100", sms=108, smem_block=163 * 1024),
         90: dict(name="H100/H200", sms=132, smem_block=227 * 1024)}
# Reference shapes (docs/design.md, "GPU fused-linear path"): logits level [N, V]; fused level [N, d] x [V, d].
LOGITS_SHAPES = [(8192, 128256), (16384, 151936)]
FUSED_SHAPES = [(8192, 128256, 4096), (16384, 151936, 2048)]
FUSED_KERNELS = ("fused_row_stats_kernel", "fused_jsd_sums_kernel", "fused_grad_dh_kernel",
                 "fused_grad_dw_kernel")
# Must not spill at those shapes (exit status 1 if one does): the logits-level row kernels (the
# hot ones at the reference shapes), and the fused ones with 16-bit weights (fp32 weights use
# full-precision FMA dots, a correctness path, reported only).
SPILL_FREE = ("row_stats_kernel", "jsd_sums_kernel", "grad_logits_kernel")
SPILL_FREE_16BIT = FUSED_KERNELS

# (model set, has targets) as the public ops use them: logprobs / distill / gopd.
MODELS = {"student": (False, False), "teacher": (True, False), "teacher+ref": (True, True)}
STATS_CASES = [("student", True), ("teacher", False), ("teacher+ref", False)]
# (kind, models, targets, entropy): logprobs with and without entropy, each divergence, G-OPD.
GRAD_CASES = [("logprob", "student", True, True), ("logprob", "student", True, False),
              ("forward_kl", "teacher", False, False), ("reverse_kl", "teacher", False, False),
              ("reverse_kl", "teacher+ref", False, False), ("jsd", "teacher", False, False)]


# ------------------------------------------------------------------------------ capture
def cases(tb, torch, sms, full=False, tf32=False):
    """(label, thunk) pairs; each thunk returns the ``Plan`` of one launcher call with meta tensors
    at the reference shapes, for a GPU with ``sms`` SMs."""
    M = lambda *shape, dt: torch.empty(*shape, dtype=dt, device="meta")  # noqa: E731
    i64, f32 = torch.int64, torch.float32
    dtypes = {"bf16": torch.bfloat16, "fp32": torch.float32}
    if full:
        dtypes["fp16"] = torch.float16
    out = []
    for N, V in (LOGITS_SHAPES if full else LOGITS_SHAPES[-1:]):
        for dn, dt in dtypes.items():
            y, rs, g, AB = M(N, dt=i64), M(N, 4, dt=f32), M(N, 2, dt=f32), M(N, 2, dt=f32)
            mk = lambda on, dt=dt, N=N, V=V: M(N, V, dt=dt) if on else None  # noqa: E731
            tag = f"logits {dn} N={N} V={V}"
            stats = [(m, y_) for m in MODELS for y_ in (True, False)] if full else STATS_CASES
            for m, has_y in stats:
                ht, hr = MODELS[m]
                out.append((f"{tag} {m}{' targets' * has_y}", lambda s=mk(True), t=mk(ht), r=mk(hr),
                            yy=y if has_y else None: tb.plan_row_stats(s, t, r, yy, inv_temp=1.0, lam=0.7, sms=sms)))
            out.append((f"{tag} teacher jsd", lambda s=mk(True), t=mk(True), AB=AB:
                        tb.plan_jsd_sums(s, t, AB, inv_temp=1.0, beta=0.5, sms=sms)))
            grads = [(k, m, y_, e) for k, m, y_, _ in GRAD_CASES for e in (False, True)] if full \
                else GRAD_CASES
            for kind, m, has_y, ent in dict.fromkeys(grads):
                ht, hr = MODELS[m]
                out.append((f"{tag} {m} {kind}{' targets' * has_y}{' entropy' * ent}",
                            lambda s=mk(True), t=mk(ht), r=mk(hr), yy=y if has_y else None, kind=kind,
                            ent=ent, rs=rs, g=g: tb.plan_grad_logits(
                                s, t, r, yy, rs, g, kind=kind, inv_temp=1.0, lam=0.7, beta=0.5, out=s,
                                with_entropy=ent, sms=sms)))
    fdtypes = [(dn, dt, False) for dn, dt in dtypes.items()] + ([("fp32-tf32", f32, True)] if tf32 else [])
    for N, V, d in (FUSED_SHAPES if full else FUSED_SHAPES[:1]):
        for dn, dt, allow_tf32 in fdtypes:
            y, rs, g, AB = M(N, dt=i64), M(N, 4, dt=f32), M(N, 2, dt=f32), M(N, 2, dt=f32)

            def models(m, bias, dt=dt, N=N, V=V, d=d):
                ht, hr = MODELS[m]
                mk = lambda on: (M(N, d, dt=dt), M(V, d, dt=dt), M(V, dt=dt) if bias else None) \
                    if on else (None, None, None)  # noqa: E731
                return (*mk(True), *mk(ht), *mk(hr))

            def tf(thunk, allow=allow_tf32):
                def plan():  # the fp32 dot precision follows torch's TF32 setting
                    saved = torch.backends.cuda.matmul.allow_tf32
                    torch.backends.cuda.matmul.allow_tf32 = allow
                    try:
                        return thunk()
                    finally:
                        torch.backends.cuda.matmul.allow_tf32 = saved
                return plan

            tag = f"fused {dn} N={N} V={V} d={d}"
            # bias: on in one case per kernel (the teacher one), off elsewhere, all with --full
            biases = lambda m: (False, True) if full else (m == "teacher",)  # noqa: E731
            stats = [(m, y_) for m in MODELS for y_ in (True, False)] if full else STATS_CASES
            for m, has_y in stats:
                for bias in biases(m):
                    out.append((f"{tag} {m}{' bias' * bias}{' targets' * has_y}", tf(
                        lambda a=models(m, bias), yy=y if has_y else None:
                        tb.plan_fused_row_stats(*a, yy, inv_temp=1.0, lam=0.7, sms=sms))))
            for bias in biases("teacher"):
                out.append((f"{tag} teacher{' bias' * bias} jsd", tf(
                    lambda a=models("teacher", bias), AB=AB: tb.plan_fused_jsd_sums(*a[:6], AB, inv_temp=1.0,
                                                                                   beta=0.5, sms=sms))))
            grads = [(k, m, y_, e) for k, m, y_, _ in GRAD_CASES for e in (False, True)] if full \
                else GRAD_CASES
            for kind, m, has_y, ent in dict.fromkeys(grads):
                for bias in biases(m):
                    out.append((f"{tag} {m}{' bias' * bias} {kind}{' targets' * has_y}{' entropy' * ent}",
                                tf(lambda a=models(m, bias), yy=y if has_y else None, kind=kind, ent=ent,
                                   bias=bias, rs=rs, g=g: tb.plan_fused_grad(
                                       *a, yy, rs, g, kind=kind, inv_temp=1.0, lam=0.7, beta=0.5,
                                       need_dw=True, need_db=bias, with_entropy=ent, sms=sms))))
    return out


def capture(tb, torch, arch, full=False, tf32=False):
    """[(label, JITFunction, args, kwargs)] of every launch the cases plan for ``arch``."""
    return [(label, launch.kernel, launch.args, dict(launch.constexprs, **launch.options))
            for label, plan in cases(tb, torch, ARCHS[arch]["sms"], full, tf32)
            for launch in plan().launches]


def specialize(fn, args, kw, arch):
    """What ``JITFunction.run`` derives before compiling: (signature, constexprs, attrs, options)."""
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    backend = make_backend(GPUTarget("cuda", arch, 32))
    kw = dict(kw, debug=kw.get("debug", fn.debug) or knobs.runtime.debug)
    for knob in ("instrumentation_mode", "fpsan_homomorphic_casts"):  # knobs of triton 3.6+
        if hasattr(knobs.compilation, knob):
            kw[knob] = getattr(knobs.compilation, knob)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, spec, opts = binder(*args, **kw)
    options, signature, constexprs, attrs = fn._pack_args(backend, kw, bound, spec, opts)
    named = {fn.arg_names[k[0]]: v for k, v in constexprs.items() if len(k) == 1}
    return signature, constexprs, attrs, dict(options.__dict__), named


# ------------------------------------------------------------------------------ compile
_REGS = re.compile(r"Used (\d+) registers")
_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


def _cpu_seconds():
    """CPU time of this process and its waited-for children (ptxas)."""
    import resource
    return sum(getattr(resource.getrusage(who), f) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
               for f in ("ru_utime", "ru_stime"))


def compile_job(job):
    """Worker: compile one specialisation to a cubin; its ptxas resource usage, or the error."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    mod = sys.modules.get(job["module"]) or __import__(job["module"], fromlist=["_"])
    fn = getattr(mod, job["kernel"])
    knobs.nvidia.dump_ptxas_log = True  # ptxas -v goes to stdout
    buf, t0, c0 = io.StringIO(), time.time(), _cpu_seconds()
    try:
        with contextlib.redirect_stdout(buf):
            ck = triton.compile(ASTSource(fn, job["signature"], job["constexprs"], job["attrs"]),
                                target=GPUTarget("cuda", job["arch"], 32), options=job["options"])
    except Exception as exc:  # noqa: BLE001 - any failure is reported in full
        err = "".join(traceback.format_exception_only(type(exc), exc)).strip()
        return dict(ok=False, error=err + ("\n" + buf.getvalue()[-4000:] if buf.getvalue().strip() else ""),
                    seconds=time.time() - t0)
    log = buf.getvalue()
    regs, spill = _REGS.search(log), _SPILL.search(log)
    if regs is None or spill is None:
        return dict(ok=False, error=f"no ptxas -v resource line in the log:\n{log[-2000:]}",
                    seconds=time.time() - t0)
    return dict(ok=True, regs=int(regs.group(1)), stack=int(spill.group(1)),
                spill_st=int(spill.group(2)), spill_ld=int(spill.group(3)),
                smem=int(ck.metadata.shared or 0), seconds=time.time() - t0, cpu=_cpu_seconds() - c0)


def collect(tb, torch, archs, full=False, tf32=False, pattern=None, override=None):
    """(jobs by key, variants): distinct specialisations and the labelled launches using them.

    ``override`` ({name: int}) replaces launch options / block sizes the launches already pass
    (for trying configs: ``--config BLOCK_V=64,num_warps=8``)."""
    jobs, variants = {}, []
    for arch in archs:
        for label, fn, args, kw in capture(tb, torch, arch, full, tf32):
            name = fn.fn.__name__
            if pattern and not re.search(pattern, f"{name} {label}"):
                continue
            kw = dict(kw, **{k: v for k, v in (override or {}).items() if k in kw or k.startswith("num_")})
            sig, cx, attrs, opts, named = specialize(fn, args, kw, arch)
            key = repr((fn.fn.__module__, name, arch, sorted(sig.items()), sorted(cx.items()),
                        sorted(attrs.items()), sorted(opts.items())))
            jobs.setdefault(key, dict(module=fn.fn.__module__, kernel=name, arch=arch, signature=sig,
                                      constexprs=cx, attrs=attrs, options=opts))
            variants.append(dict(key=key, arch=arch, kernel=name, label=label, cx=named,
                                 num_warps=opts["num_warps"], num_stages=opts["num_stages"]))
    return jobs, variants


def compile_all(jobs, n_jobs):
    """{key: result}; the slow (fused) specialisations are started first."""
    order = sorted(jobs, key=lambda k: not jobs[k]["kernel"].startswith("fused"))
    if n_jobs <= 1:
        return {k: compile_job(jobs[k]) for k in order}
    import multiprocessing as mp
    out = {}
    with cf.ProcessPoolExecutor(n_jobs, mp_context=mp.get_context("fork")) as ex:
        futs = {ex.submit(compile_job, jobs[k]): k for k in order}
        for f in cf.as_completed(futs):
            try:
                out[futs[f]] = f.result()
            except Exception as exc:  # noqa: BLE001 - e.g. a worker killed by the OS
                out[futs[f]] = dict(ok=False, error=f"worker failed: {exc!r}", seconds=0.0)
    return out


# ------------------------------------------------------------------------------ report
def _config(v):
    cx = v["cx"]
    blocks = "x".join(str(cx[k]) for k in ("BLOCK_N", "BLOCK_V", "BLOCK_K") if k in cx)
    prec = f" {cx['PRECISION']}" if "PRECISION" in cx else ""
    return f"{blocks} w{v['num_warps']} s{v['num_stages']}{prec}"


def must_not_spill(v):
    """Logits-level row kernels always; fused kernels with bf16/fp16 inputs (labels: 'fused bf16 ...')."""
    return v["kernel"] in SPILL_FREE or (v["kernel"] in SPILL_FREE_16BIT and v["label"].split()[1] in
                                         ("bf16", "fp16"))


def table(variants, results):
    """Markdown table, one row per distinct specialisation (its first label), plus problems."""
    rows, problems, seen = [], [], set()
    head = ("| arch | kernel | variant | blocks warps stages | regs | spill st/ld B | stack B | smem B "
            "| cpu s |\n|---|---|---|---|---:|---:|---:|---:|---:|")
    for v in sorted(variants, key=lambda v: (v["arch"], v["kernel"])):
        if v["key"] in seen:
            continue
        seen.add(v["key"])
        r = results[v["key"]]
        arch = f"sm_{v['arch']}{'a' if v['arch'] >= 90 else ''}"
        where = f"[{arch}] {v['kernel']} {v['label']}"
        if not r["ok"]:
            rows.append(f"| {arch} | {v['kernel']} | {v['label']} | {_config(v)} | FAILED | | | | |")
            problems.append(f"{where}: compile error\n{r['error']}")
            continue
        rows.append(f"| {arch} | {v['kernel']} | {v['label']} | {_config(v)} | {r['regs']} | "
                    f"{r['spill_st']}/{r['spill_ld']} | {r['stack']} | {r['smem']} | {r['cpu']:.0f} |")
        if r["smem"] > ARCHS[v["arch"]]["smem_block"]:
            problems.append(f"{where}: {r['smem']} B of shared memory > the {ARCHS[v['arch']]['smem_block']}"
                            f" B per-block limit of {arch} (the launch would fail)")
        if must_not_spill(v) and r["spill_st"] + r["spill_ld"]:
            problems.append(f"{where}: spills {r['spill_st']} B / loads {r['spill_ld']} B "
                            f"({r['regs']} registers); {v['kernel']} must be spill-free")
    return head + "\n" + "\n".join(rows), problems


def summary(variants, results):
    """One line per (arch, kernel): variants, max registers, how many spill, max spill bytes."""
    agg = {}
    for key in dict.fromkeys(v["key"] for v in variants):
        v = next(x for x in variants if x["key"] == key)
        r = results[key]
        a = agg.setdefault((v["arch"], v["kernel"]), dict(n=0, regs=0, spilling=0, spill=0, smem=0, fail=0))
        a["n"] += 1
        if not r["ok"]:
            a["fail"] += 1
            continue
        a["regs"], a["smem"] = max(a["regs"], r["regs"]), max(a["smem"], r["smem"])
        sp = r["spill_st"] + r["spill_ld"]
        a["spilling"] += bool(sp)
        a["spill"] = max(a["spill"], sp)
    return "\n".join(f"sm_{arch:<3d} {k:<24s} {a['n']:3d} variants  max regs {a['regs']:3d}  "
                     f"spilling {a['spilling']:3d} (max {a['spill']} B)  max smem {a['smem']} B"
                     f"{'  FAILED ' + str(a['fail']) if a['fail'] else ''}"
                     for (arch, k), a in sorted(agg.items()))


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m opd_kernels.triton.aot",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", default="80,90", help="compute capabilities (default 80,90)")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="compile processes")
    ap.add_argument("--full", action="store_true", help="every flag combination, both shapes, fp16")
    ap.add_argument("--tf32", action="store_true", help="also fused fp32 with allow_tf32=True")
    ap.add_argument("--filter", default=None, help="regex on 'kernel label'")
    ap.add_argument("--config", default=None, help="try a config: e.g. BLOCK_V=64,num_warps=8")
    ap.add_argument("--report", default=None, help="also write the table to this file")
    ap.add_argument("--json", default=None, help="write every variant and result as JSON")
    a = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        # the kernels were defined for the interpreter: start over without it
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        rest = sys.argv[1:] if argv is None else list(argv)
        return subprocess.call([sys.executable, "-m", "opd_kernels.triton.aot", *rest], env=env)
    os.environ["OPD_TRITON_AUTOTUNE"] = "0"  # only read at import: checked below
    # a fresh cache, so that ptxas really runs and reports its resource usage
    os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="opd_aot_cache_")
    import torch
    import triton

    import opd_kernels.backends.triton_backend as tb
    if tb.triton is None:
        print(f"aot: the triton backend is not importable: {tb._IMPORT_ERROR}")
        return 2
    if tb.AUTOTUNE:
        print("aot: OPD_TRITON_AUTOTUNE=1 was set before import; unset it (heuristic configs are checked)")
        return 2
    archs = [int(x) for x in a.arch.split(",") if x.strip()]
    if any(x not in ARCHS for x in archs):
        print(f"aot: --arch {a.arch}: known compute capabilities are {sorted(ARCHS)}")
        return 2
    t0 = time.time()
    override = {k: int(v) for k, v in (kv.split("=") for kv in a.config.split(","))} if a.config else None
    jobs, variants = collect(tb, torch, archs, a.full, a.tf32, a.filter, override)
    print(f"aot: triton {triton.__version__}, {len(variants)} launches -> {len(jobs)} distinct "
          f"specialisations for {', '.join(f'sm_{x}' for x in archs)}, {a.jobs} processes", flush=True)
    results = compile_all(jobs, a.jobs)
    text, problems = table(variants, results)
    n_spill = sum(1 for k, r in results.items() if r["ok"] and r["spill_st"] + r["spill_ld"])
    n_fail = sum(1 for r in results.values() if not r["ok"])
    foot = (f"aot: compiled {len(jobs) - n_fail}/{len(jobs)} specialisations in {time.time() - t0:.0f} s, "
            f"{n_spill} spill, {len(problems)} problem(s)")
    report = "\n\n".join([text, summary(variants, results), *problems, foot]) + "\n"
    print(report, end="")
    if a.report:
        with open(a.report, "w") as f:
            f.write(report)
    if a.json:
        import json
        with open(a.json, "w") as f:
            json.dump([dict({k: v for k, v in x.items() if k != "key"}, **results[x["key"]])
                       for x in variants], f, indent=1, default=str)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
