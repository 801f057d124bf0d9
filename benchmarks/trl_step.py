"""TRL's stable ``DistillationTrainer`` (its loss: TRL's chunked kernel) against
``opd_kernels.integrations.trl.FusedDistillationTrainer``, step by step in TRL's own loop, at a
real vocabulary.

    python benchmarks/trl_step.py --out benchmarks/results/cpu-epyc-2c     # both trainers
    python benchmarks/trl_step.py --trainer fused --steps 2                 # one, quick

Config-built Qwen2-style student and teacher (no download) with Qwen2's vocabulary (151936 rows)
and small hidden sizes, so that the vocabulary projection dominates. Each trainer runs in a fresh
process: ``--steps`` optimizer steps after one untimed warm-up step (optimizer state). A step is
on-policy generation (HF ``generate``, ``--completion`` new tokens; the random models rarely stop
early) plus the loss, backward and the SGD update. Reported per step: wall time, the time without
generation (``_generate_and_score_completions`` timed apart), peak RSS growth over the RSS at the
step's start (``VmHWM`` reset through ``/proc/self/clear_refs``), and the loss (the two trainers
see the same samples at the first timed step, so the losses there are comparable).
Writes ``trl_step.json`` into ``--out``. Needs the trl extra.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from subproc import run_worker, write_rows  # noqa: E402
VOCAB = 151936


def build(vocab, hidden, seed):
    from transformers import Qwen2Config, Qwen2ForCausalLM
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(Qwen2Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                                        num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                        max_position_embeddings=512, tie_word_embeddings=False, pad_token_id=0,
                                        eos_token_id=1, bos_token_id=None))


def tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {"<pad>": 0, "<eos>": 1, **{f"t{i}": i for i in range(2, 1000)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")


def worker(args) -> dict:
    import transformers as T
    from datasets import Dataset
    from measure import CpuMemory
    from opd_kernels.integrations.trl import DistillationConfig, FusedDistillationTrainer
    from trl import DistillationTrainer

    base = FusedDistillationTrainer if args.trainer == "fused" else DistillationTrainer
    rec = {"gen": [], "loss": []}

    class Timed(base):
        def _generate_and_score_completions(self, inputs):
            t0 = time.perf_counter()
            out = super()._generate_and_score_completions(inputs)
            rec["gen"].append(time.perf_counter() - t0)
            return out

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            rec["loss"].append(float(loss))
            return loss

    mem, steps = CpuMemory(), []

    class Step(T.TrainerCallback):
        def on_step_begin(self, a, state, control, **kw):
            mem.baseline(), mem.reset()
            self.t0, self.g0 = time.perf_counter(), len(rec["gen"])

        def on_step_end(self, a, state, control, **kw):
            dt = time.perf_counter() - self.t0
            steps.append(dict(step_s=dt, no_gen_s=dt - sum(rec["gen"][self.g0:]), peak_mb=mem.peak()))

    g = torch.Generator().manual_seed(0)
    prompts = [" ".join(f"t{i}" for i in torch.randint(2, 1000, (args.prompt,), generator=g).tolist())
               for _ in range(args.batch * (args.steps + 1))]
    with tempfile.TemporaryDirectory() as out:
        cfg = DistillationConfig(output_dir=out, per_device_train_batch_size=args.batch, max_steps=args.steps + 1,
                                 optim="sgd", learning_rate=1e-3, beta=args.beta, report_to=[], use_cpu=True,
                                 save_strategy="no", seed=0, data_seed=0, max_completion_length=args.completion,
                                 dataloader_num_workers=0, bf16=False, logging_steps=1, shuffle_dataset=False)
        trainer = Timed(model=build(args.vocab, args.d_student, 0), teacher_model=build(args.vocab, args.d_teacher, 1),
                        args=cfg, train_dataset=Dataset.from_dict({"prompt": prompts}), processing_class=tokenizer(),
                        callbacks=[Step()])
        t0 = time.perf_counter()
        trainer.train()
        total = time.perf_counter() - t0
    timed = steps[1:]  # step 0 also allocates the optimizer state

    def med(k):
        return round(statistics.median(s[k] for s in timed), 3)

    return dict(trainer=args.trainer, V=args.vocab, d_student=args.d_student, d_teacher=args.d_teacher,
                batch=args.batch, prompt=args.prompt, completion=args.completion, beta=args.beta,
                steps=len(timed), step_s_median=med("step_s"), no_gen_s_median=med("no_gen_s"),
                peak_mb_median=round(statistics.median(s["peak_mb"] for s in timed), 1),
                peak_mb_max=round(max(s["peak_mb"] for s in timed), 1), total_s=round(total, 1),
                losses=[round(x, 6) for x in rec["loss"]])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trainer", choices=["stock", "fused", "both"], default="both")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--prompt", type=int, default=16, help="prompt tokens")
    p.add_argument("--completion", type=int, default=64, help="generated tokens per completion")
    p.add_argument("--vocab", type=int, default=VOCAB)
    p.add_argument("--d-student", type=int, default=64)
    p.add_argument("--d-teacher", type=int, default=128)
    p.add_argument("--beta", type=float, default=1.0, help="TRL's default: reverse KL")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--out", type=Path, default=None, help="directory for trl_step.json")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print("@@trl_step@@ " + json.dumps(worker(args)), flush=True)
        return 0
    rows = []
    for name in (["stock", "fused"] if args.trainer == "both" else [args.trainer]):
        rows.append(run_worker(__file__, "trl_step", name, {"trainer": name, **{k: getattr(args, k) for k in (
            "batch", "prompt", "completion", "vocab", "d_student", "d_teacher", "beta", "steps")}}))
        r = rows[-1]
        print(f"{name:5s} V={r['V']} B={r['batch']} completion={r['completion']}: step {r['step_s_median']} s, "
              f"without generation {r['no_gen_s_median']} s, peak +{r['peak_mb_median']} MB "
              f"(max {r['peak_mb_max']}), losses {r['losses']}", flush=True)
    if args.out:
        write_rows(args.out, "trl_step.json", "cpu", rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
