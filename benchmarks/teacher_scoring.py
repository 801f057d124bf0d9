"""Teacher scoring throughput: the in-process teacher against the same model behind a vLLM server.

    python benchmarks/teacher_scoring.py --model DIR --url http://127.0.0.1:8000 [--batch 64] [--repeat 5]

``DIR`` is the served model's directory (a causal LM with the student's tokenizer, e.g. one built
by ``tests/test_vllm_teacher_server.py``'s ``build_teacher``), so both sides score the same
sequences with the same weights: bundled-task prompts (3-digit addition) and their answers,
``--batch`` sequences per call. In-process: the teacher's hidden states and the fused token
logprobs (``K=0``) or, with ``K>0``, also the top-K (``rollout.teacher_topk``), as
``opd_train`` computes them. Server: ``ServerTeacher.score`` (HTTP, JSON, validation included).
Prints, per K, the median seconds per call over ``--repeat`` calls and the scored tokens per second
(all tokens of the sequences, and the completion tokens alone).
"""
from __future__ import annotations

import argparse
import random
import statistics
import time
from types import SimpleNamespace

import torch


def timed(fn, repeat: int) -> list[float]:
    """Seconds of each of ``repeat`` calls of ``fn``, after one warm-up call."""
    fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def measure(model_dir, url: str, batch: int = 64, repeat: int = 5, ks=(0, 20), log=print) -> list[dict]:
    """One row per (K, side): median seconds per call and scored tokens per second."""
    from opd_train import rollout as R
    from opd_train.server_teacher import ServerTeacher
    from opd_train.task import ArithmeticTask
    from opd_train.tokenizer import load_tokenizer
    from transformers import AutoModelForCausalLM

    tok = load_tokenizer(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    params = sum(x.numel() for x in model.parameters())
    exs = ArithmeticTask(3, "+").sample(random.Random(0), batch)
    comp, mask = R.pad_completions(R.encode_answers(tok, [ex.answer for ex in exs]), tok.pad_token_id)
    s = R.pack(R.encode_prompts(tok, [ex.prompt for ex in exs]), comp, mask, tok.pad_token_id)
    n_all, n_comp = int(s.attention_mask.sum()), int(s.mask.sum())
    lm = R.LM(model)

    def local(k):
        with torch.no_grad():
            h = R.completion_hidden(lm, s)
            R.token_logprobs(lm, h, s)
            if k:
                R.teacher_topk(lm.head, h, k)

    log(f"model {model_dir}: {params / 1e6:.1f}M parameters; {batch} sequences, {n_all} tokens "
        f"({n_comp} completion tokens) per call; {torch.get_num_threads()} torch thread(s) in this process")
    rows = []
    for k in ks:
        server = ServerTeacher.connect(SimpleNamespace(teacher_server=url, teacher_model=None, teacher_topk=k,
                                                       teacher_timeout=120.0, teacher_retries=0,
                                                       method="gkd" if k else "opd", opd_loss="sampled"),
                                       tok, model.get_output_embeddings().weight.shape[0], log=lambda m: None)
        for name, fn in (("in-process", lambda: local(k)), ("server", lambda: server.score(s))):
            times = timed(fn, repeat)
            t = statistics.median(times)
            rows.append({"k": k, "side": name, "params": params, "seconds_per_call": t, "tokens": n_all,
                         "completion_tokens": n_comp, "tokens_per_s": n_all / t,
                         "completion_tokens_per_s": n_comp / t, "seconds_min": min(times), "seconds_max": max(times)})
            log(f"K={k:<3d} {name:10s} {t * 1e3:8.1f} ms per call  {n_all / t:9.0f} tokens/s  "
                f"{n_comp / t:8.0f} completion tokens/s")
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--url", required=True)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--k", type=int, nargs="+", default=[0, 20])
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    measure(args.model, args.url, args.batch, args.repeat, args.k, log=lambda m: print(m, flush=True))


if __name__ == "__main__":
    main()
