"""How far a served teacher's top-k (+ tail) falls from the full-vocabulary teacher, on the bundled task.

``python -m opd_train.topk_gap [--preset default] [--batches 4] [--k 1 5 10 20]``

With the preset's cached teacher and student (pre-trained on first use), it samples the
student's completions as OPD does (4 per prompt, T=1), then compares, per loss the server path
approximates (OPD ``fullvocab``: reverse KL; GKD: JSD beta=0.5), the sparse loss
``fused_linear_sparse_distill_loss`` on the teacher's top-k (what ``--teacher-server`` feeds it;
the scores are the in-process teacher's, which the server's equal, see
``tests/test_train_teacher_server.py``; with the server path's tail floor,
``opd_train.server_teacher.floor_tail``, unless ``--no-tail-floor``) with the exact
``fused_linear_distill_loss``: the loss
values and the gradient with respect to the student's hidden states (relative error, cosine).
Prints a markdown table and writes it as JSON with ``--json FILE``.
"""
from __future__ import annotations

import argparse
import json
import random

import torch

import opd_kernels as ok

from . import cli, inputs
from . import rollout as R
from .models import PRETRAIN_SEED, get_pretrained
from .server_teacher import floor_tail
from .task import ArithmeticTask

LOSSES = {"opd fullvocab (reverse KL)": ("reverse_kl", 0.5), "gkd (JSD, beta 0.5)": ("jsd", 0.5)}


def gap(args) -> list[dict]:
    preset = cli.PRESETS[args.preset]
    task = ArithmeticTask(preset["digits"], preset["ops"], eval_size=16)
    paths = {role: get_pretrained(role, preset[role], task, PRETRAIN_SEED) for role in ("teacher", "student")}
    tok = inputs.load_tokenizer("--student", paths["student"], print)
    student, teacher = (R.LM(inputs.load_model(f"--{r}", paths[r], torch.device("cpu")).eval()) for r in
                        ("student", "teacher"))
    rng = random.Random(args.seed)
    torch.manual_seed(args.seed)
    out = {(name, k): {"loss": [], "exact": [], "dot": [], "n2": [], "e2": []} for name in LOSSES for k in args.k}
    for _ in range(args.batches):
        exs = [ex for ex in task.sample(rng, args.prompts) for _ in range(4)]
        prompts = R.encode_prompts(tok, [ex.prompt for ex in exs])
        comp, mask = R.generate(student.model, tok, prompts, max_new_tokens=task.max_answer_chars + 2)
        s = R.pack(prompts, comp, mask, tok.pad_token_id)
        with torch.no_grad():
            ht = R.completion_hidden(teacher, s)
            hs0 = R.completion_hidden(student, s)
        for name, (div, beta) in LOSSES.items():
            hs = hs0.clone().requires_grad_()
            sh, th = student.head, teacher.head
            exact = ok.fused_linear_distill_loss(hs, sh.weight.detach(), ht, th.weight, divergence=div, beta=beta,
                                                 mask=s.mask, **sh.kwargs("student"), **th.kwargs("teacher"))
            (g_exact,) = torch.autograd.grad(exact, hs)
            for k in args.k:
                ids, lps = R.teacher_topk(th, ht, k)  # float32, as served
                if args.tail_floor:
                    lps = floor_tail(lps)
                hs = hs0.clone().requires_grad_()
                sparse = ok.fused_linear_sparse_distill_loss(hs, sh.weight.detach(), ids, lps, divergence=div,
                                                             beta=beta, mask=s.mask, **sh.kwargs())
                (g,) = torch.autograd.grad(sparse, hs)
                r = out[(name, k)]
                r["loss"].append(sparse.item())
                r["exact"].append(exact.item())
                r["dot"].append((g * g_exact).sum().item())
                r["n2"].append((g * g).sum().item())
                r["e2"].append((g_exact * g_exact).sum().item())
    rows = []
    for (name, k), r in out.items():
        exact, loss = sum(r["exact"]) / len(r["exact"]), sum(r["loss"]) / len(r["loss"])
        dot, n2, e2 = sum(r["dot"]), sum(r["n2"]), sum(r["e2"])
        rows.append({"loss": name, "k": k, "vocab": student.rows, "exact_loss": exact, "topk_loss": loss,
                     "loss_rel_err": abs(loss - exact) / exact, "grad_cosine": dot / (n2 * e2) ** 0.5,
                     "grad_rel_err": max(0.0, n2 - 2 * dot + e2) ** 0.5 / e2 ** 0.5})
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m opd_train.topk_gap", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="default", choices=sorted(cli.PRESETS))
    ap.add_argument("--batches", type=int, default=4)
    ap.add_argument("--prompts", type=int, default=16, help="prompts per batch (4 samples each)")
    ap.add_argument("--k", type=int, nargs="+", default=[1, 5, 10, 20])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-tail-floor", dest="tail_floor", action="store_false",
                    help="feed the top-k as computed, without the server path's tail floor (TAIL_FLOOR)")
    ap.add_argument("--json", help="also write the rows to this file")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    rows = gap(args)
    print("| loss | k of V | exact loss | top-k loss | loss rel. error | grad cosine | grad rel. error |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['loss']} | {r['k']} of {r['vocab']} | {r['exact_loss']:.4f} | {r['topk_loss']:.4f} | "
              f"{r['loss_rel_err']:.3f} | {r['grad_cosine']:.4f} | {r['grad_rel_err']:.3f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
