"""One distillation training step at a real vocabulary: fused ops against the naive logits loss.

    python benchmarks/train_step.py --out benchmarks/results/cpu-epyc-2c      # both providers
    python benchmarks/train_step.py --provider fused --steps 2 --batch 2      # one, quick

A config-built Qwen2-style student and teacher (no download) with Qwen2's real vocabulary size
(151936 rows) and small hidden sizes, so that the logits, not the backbone, dominate memory —
as they do for real models at long sequences. One step: student forward, teacher forward
(no grad), full-vocabulary reverse KL on every position, backward, AdamW step.

* ``naive``: ``model(...).logits`` of both models, ``log_softmax`` in fp32, the KL, as a
  trainer writes it.
* ``fused``: ``ok.hf.hidden_states`` + ``ok.fused_linear_distill_loss`` on the heads from
  ``ok.hf.head`` (``impl="auto"``; on CPU the compiled torch path at this size).

Each provider runs in a fresh process: one untimed warm-up step (compiles), then ``--steps``
timed steps (median, min, max); peak memory is the peak RSS growth during a step over the
process's RSS before it (``VmHWM`` reset through ``/proc/self/clear_refs``), or the CUDA
allocator's peak on GPU. Writes ``train_step.json`` into ``--out``.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from subproc import run_worker, write_rows  # noqa: E402
VOCAB = 151936  # Qwen2 / Qwen2.5 lm_head rows


def build(vocab: int, hidden: int, layers: int, seed: int):
    from transformers import Qwen2Config, Qwen2ForCausalLM
    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
                      tie_word_embeddings=False)
    return Qwen2ForCausalLM(cfg)


def loss_naive(student, teacher, ids):
    s = student(input_ids=ids).logits.float()
    with torch.no_grad():
        t = teacher(input_ids=ids).logits.float()
    lq, lp = torch.log_softmax(s, -1), torch.log_softmax(t, -1)
    return (lq.exp() * (lq - lp)).sum(-1).mean()


def loss_fused(student, teacher, ids):
    import opd_kernels as ok
    hs = ok.hf.hidden_states(student, ids)
    with torch.no_grad():
        ht = ok.hf.hidden_states(teacher, ids)
    sh, th = ok.hf.head(student), ok.hf.head(teacher)
    return ok.fused_linear_distill_loss(hs, sh.weight, ht, th.weight, divergence="reverse_kl",
                                        **sh.kwargs("student"), **th.kwargs("teacher"))


def worker(args) -> dict:
    from measure import CpuMemory
    dev = torch.device(args.device)
    student = build(args.vocab, args.d_student, 2, 0).to(dev)
    teacher = build(args.vocab, args.d_teacher, 2, 1).to(dev).eval()
    opt = torch.optim.AdamW(student.parameters(), lr=1e-4)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(0)).to(dev)
    fn = loss_fused if args.provider == "fused" else loss_naive
    mem = CpuMemory() if dev.type == "cpu" else None

    def step():
        loss = fn(student, teacher, ids)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss)

    t0 = time.perf_counter()
    losses = [step()]  # warm-up: compiles, allocates optimizer state
    first = time.perf_counter() - t0
    times, peaks = [], []
    for _ in range(args.steps):
        if mem:
            mem.baseline(), mem.reset()
        else:
            torch.cuda.synchronize(), torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        t0 = time.perf_counter()
        losses.append(step())
        if not mem:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        peaks.append(mem.peak() if mem else (torch.cuda.max_memory_allocated() - base) / 2 ** 20)
    return dict(provider=args.provider, N=args.batch * args.seq, V=args.vocab, d_student=args.d_student,
                d_teacher=args.d_teacher, batch=args.batch, seq=args.seq, first_step_s=round(first, 2),
                step_s_median=round(statistics.median(times), 3), step_s_min=round(min(times), 3),
                step_s_max=round(max(times), 3), peak_mb_median=round(statistics.median(peaks), 1),
                peak_mb_max=round(max(peaks), 1), losses=[round(x, 6) for x in losses])


def summary(data: dict) -> str:
    """The README's sentence for a train_step.json (``<!-- train-step: DIR -->``; tests/test_readme.py
    checks it): per provider the median step, its spread, the peak, and the first step."""
    names = {"naive": "`model(...).logits` + `log_softmax`", "fused": "`ok.hf` + `fused_linear_distill_loss`"}
    parts = [f"{names.get(r['provider'], r['provider'])}: {r['step_s_median']} s per step (median of "
             f"{len(r['losses']) - 1}, {r['step_s_min']}-{r['step_s_max']} s), first step {r['first_step_s']} s, "
             f"+{r['peak_mb_median']:.0f} MB peak" for r in data["rows"]]
    return f"{data['meta']['device']}, torch {data['meta']['torch']}, {data['meta']['date']}: " + "; ".join(parts) + "."


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--provider", choices=["naive", "fused", "both"], default="both")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--vocab", type=int, default=VOCAB)
    p.add_argument("--d-student", type=int, default=64)
    p.add_argument("--d-teacher", type=int, default=128)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", type=Path, default=None, help="directory for train_step.json")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print("@@train_step@@ " + json.dumps(worker(args)), flush=True)
        return 0
    rows = []
    for prov in (["naive", "fused"] if args.provider == "both" else [args.provider]):
        rows.append(run_worker(__file__, "train_step", prov, {"provider": prov, **{k: getattr(args, k) for k in (
            "batch", "seq", "vocab", "d_student", "d_teacher", "steps", "device")}}))
        r = rows[-1]
        print(f"{prov:6s} N={r['N']} V={r['V']}: step {r['step_s_median']} s (min {r['step_s_min']}, "
              f"max {r['step_s_max']}), peak +{r['peak_mb_median']} MB, first step {r['first_step_s']} s", flush=True)
    if args.out:
        write_rows(args.out, "train_step.json", args.device, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
