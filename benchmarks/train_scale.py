"""One trainer update at a real vocabulary and width: fused vs naive loss, 1 process vs FSDP, fp32 vs bf16.

    python benchmarks/train_scale.py --out benchmarks/results/cpu-epyc-2c   # every case below
    python benchmarks/train_scale.py --cases fused-fp32-1 --steps 1          # one, quick

Models: config-built Qwen3 (no download) at Qwen3's vocabulary (151936, tied embeddings as in
the small Qwen3 models): a student with d=512, 8 layers, and a teacher twice as wide (d=1024,
8 layers). One update is the trainer's full-vocabulary reverse-KL distillation step on a fixed
batch of token ids: student forward (with gradient), teacher forward (no gradient), loss,
backward, AdamW step. **The rollout (sampling) is not included**: the batch is given.

* ``fused``: the trainer's own path, `opd_train.lm.LM` (``opd_kernels.hf`` hidden states and head)
  and `opd_train.lm.distill_loss` (no ``[N, V]`` logits).
* ``naive``: ``model(...).logits`` of both models, ``log_softmax`` in fp32, the KL.
* ``fp32`` / ``bf16``: ``--dtype`` of the trainer (bf16 autocast, fp32 master weights and AdamW state;
  under FSDP ``MixedPrecisionPolicy(param_dtype=bf16)``).
* ``1`` / ``2``: one process, or FSDP2 (`opd_train.fsdp.shard`) on 2 ranks under torchrun (gloo
  on CPU), each rank half of the same global batch; the teacher is replicated on every rank.

Each case runs in fresh processes: one untimed warm-up update, then ``--steps`` timed ones
(median). Memory per process: the peak RSS of the process during a step (``VmHWM``: weights,
optimizer state and activations) and the peak growth during a step over the RSS before it; on
CUDA the allocator's peak. For 2 ranks: the larger rank's numbers (time and memory); ``losses``
are rank 0's, on its half of the batch. Writes ``train_scale.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
from subproc import write_rows  # noqa: E402
VOCAB = 151936  # Qwen2 / Qwen2.5 / Qwen3
CASES = ("naive-fp32-1", "fused-fp32-1", "fused-bf16-1", "fused-fp32-2")


def qwen3(d: int, layers: int, seed: int, vocab: int):
    from transformers import Qwen3Config, Qwen3ForCausalLM
    torch.manual_seed(seed)
    heads = d // 64
    cfg = Qwen3Config(vocab_size=vocab, hidden_size=d, intermediate_size=3 * d, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=max(1, heads // 2), head_dim=64,
                      max_position_embeddings=4096, tie_word_embeddings=True)
    return Qwen3ForCausalLM(cfg)


def _rss(key: str) -> float:
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(key)


def worker(args) -> dict:
    import torch.distributed as dist

    from opd_train import fsdp
    from opd_train.lm import LM, autocast, distill_loss
    provider, dtype_name, ranks = args.case.split("-")
    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    if world > 1:
        dist.init_process_group("gloo")
    torch.set_num_threads(max(1, args.threads // world))
    dev = torch.device(args.device)
    dtype = torch.bfloat16 if dtype_name == "bf16" else None
    student = qwen3(args.d_student, args.layers, 0, args.vocab).to(dev)
    teacher = qwen3(2 * args.d_student, args.layers, 1, args.vocab).to(dev).eval().requires_grad_(False)
    s_lm, t_lm = LM(student, compute_dtype=dtype), LM(teacher, compute_dtype=dtype)
    n_student = sum(p.numel() for p in student.parameters())
    if world > 1:
        fsdp.shard(student, dtype)
        s_lm.sharded = True
    opt = torch.optim.AdamW(student.parameters(), lr=1e-5)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=gen)
    per = args.batch // world
    ids = ids[rank * per:(rank + 1) * per].to(dev)
    am = torch.ones_like(ids)
    pos = torch.arange(args.seq, device=dev).expand_as(ids)

    def loss_fused():
        h = s_lm(ids, am, pos)[:, :-1]
        with torch.no_grad():
            h_t = t_lm(ids, am, pos)[:, :-1]
        return distill_loss(s_lm, h, t_lm, h_t, divergence="reverse_kl")

    def loss_naive():
        with autocast(dev, dtype):
            s = student(input_ids=ids, use_cache=False).logits[:, :-1].float()
            with torch.no_grad():
                t = teacher(input_ids=ids, use_cache=False).logits[:, :-1].float()
        lq, lp = torch.log_softmax(s, -1), torch.log_softmax(t, -1)
        return (lq.exp() * (lq - lp)).sum(-1).mean()

    fn = loss_fused if provider == "fused" else loss_naive

    def step():
        loss = fn()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    cuda = dev.type == "cuda"
    t0 = time.perf_counter()
    losses = [step()]
    first = time.perf_counter() - t0
    times, grow, total = [], [], []
    for _ in range(args.steps):
        if cuda:
            torch.cuda.synchronize(), torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated() / 2 ** 20
        else:
            import measure
            measure.CpuMemory().baseline()  # gc + malloc_trim
            base = _rss("VmRSS")
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        t0 = time.perf_counter()
        losses.append(step())
        if cuda:
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated() / 2 ** 20
        else:
            peak = _rss("VmHWM")
        times.append(time.perf_counter() - t0)
        grow.append(peak - base)
        total.append(peak)
    mine = torch.tensor([statistics.median(times), max(grow), max(total), first])
    if world > 1:  # the slowest / largest rank
        dist.all_reduce(mine, op=dist.ReduceOp.MAX)
        dist.destroy_process_group()
    return dict(case=args.case, provider=provider, dtype=dtype_name, ranks=world, batch=args.batch, seq=args.seq,
                V=args.vocab, d_student=args.d_student, d_teacher=2 * args.d_student, layers=args.layers,
                student_params_m=round(n_student / 1e6, 1), threads_per_rank=max(1, args.threads // world),
                first_step_s=round(mine[3].item(), 2), step_s_median=round(mine[0].item(), 3),
                peak_rss_mb=round(mine[2].item(), 1), peak_growth_mb=round(mine[1].item(), 1),
                rollout_included=False, losses=[round(x, 6) for x in losses])


def run_case(args, case: str) -> dict:
    ranks = int(case.split("-")[2])
    opts = [f"--{k.replace('_', '-')}={getattr(args, k)}" for k in
            ("batch", "seq", "vocab", "d_student", "layers", "steps", "device", "threads")]
    cmd = [sys.executable, __file__, "--worker", "--case", case, *opts]
    if ranks > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks),
               "--master_port", str(29600 + os.getpid() % 300), __file__, "--worker", "--case", case, *opts]
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    line = [x for x in out.stdout.splitlines() if x.startswith("@@train_scale@@ ")]
    if out.returncode or not line:
        raise SystemExit(f"{case} failed (exit {out.returncode}):\n{out.stderr[-3000:]}")
    return json.loads(line[0].split(" ", 1)[1])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES))
    p.add_argument("--batch", type=int, default=4, help="global batch (sequences)")
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--vocab", type=int, default=VOCAB)
    p.add_argument("--d-student", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--threads", type=int, default=2, help="torch threads in all (split between ranks)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", type=Path, default=None, help="directory for train_scale.json")
    p.add_argument("--case", help=argparse.SUPPRESS)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        row = worker(args)
        if int(os.environ.get("RANK", "0")) == 0:
            print("@@train_scale@@ " + json.dumps(row), flush=True)
        return 0
    rows, load_at_start = [], os.getloadavg()[0]
    for case in args.cases:
        rows.append(run_case(args, case))
        r = rows[-1]
        print(f"{case:13s} N={r['batch'] * r['seq']} V={r['V']}: step {r['step_s_median']} s, peak RSS "
              f"{r['peak_rss_mb']} MB (+{r['peak_growth_mb']} MB in the step), first {r['first_step_s']} s", flush=True)
    if args.out:
        write_rows(args.out, "train_scale.json", args.device, rows, load_average_at_start=load_at_start)
    return 0


if __name__ == "__main__":
    sys.exit(main())
