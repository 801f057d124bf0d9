"""Logit transforms vocab-parallel: 2 gloo processes with uneven vocabulary shards reproduce the
float64 oracle (``reference.softcap_f64`` then the formulas) on every op family with a softcap and a
logit scale on each model, values and gradients, without host reads in the ops (the guards of
``test_parallel``)."""
import tempfile

import pytest
import torch
import torch.multiprocessing as mp

import opd_kernels as ok
import reference as oracle
from reference import softcap_f64
from test_transforms_ops import BETA, D, DT, INF, LAM, N, TEMP


def _worker(rank, world, port, sizes, errfile):
    import os

    import torch.distributed as dist
    from test_parallel import _ACTIVE, _check as check, _install_guards
    try:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=world)
        torch.set_num_threads(1)
        group, Vt = dist.group.WORLD, sum(sizes)
        lo, hi = sum(sizes[:rank]), sum(sizes[:rank + 1])
        shard, same = (lambda x: x[..., lo:hi]), (lambda x: x)
        g = torch.Generator().manual_seed(0)
        rnd = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
        S, Tt, R = rnd(N, Vt) * 3, rnd(N, Vt) * 3, rnd(N, Vt) * 3
        S[2, :4] = Tt[2, :4] = -INF  # banned, on rank 0's shard only
        y = torch.randint(0, Vt, (N,), generator=g)
        y[1], y[2] = -100, Vt - 1
        cap_s, cap_t, cap_r = (2.0, 1.3), (3.0, 0.6), (1.5, 1.0)  # (softcap, logit_scale)
        tf = lambda x, c: softcap_f64(x, c[1], c[0])  # noqa: E731
        side = lambda p, c: {f"{p}softcap": c[0], f"{p}logit_scale": c[1]}  # noqa: E731
        _install_guards()
        _ACTIVE.update(("all_gather_object", "item", "tolist"))  # no host reads in the ops
        s, x = shard(S).clone().requires_grad_(), S.clone().requires_grad_()
        lp = ok.token_logprobs(s, y, temperature=TEMP, process_group=group, **side("", cap_s))
        check("token_logprobs", lp, oracle.token_logprobs(tf(x, cap_s), y, TEMP)[0], [s], [x], [shard])
        s, x = shard(S).clone().requires_grad_(), S.clone().requires_grad_()
        out = ok.distill_loss(s, shard(Tt), divergence="jsd", beta=BETA, temperature=TEMP, reduction="none",
                              process_group=group, **side("student_", cap_s), **side("teacher_", cap_t))
        want = oracle.divergence_rows(tf(x, cap_s), tf(Tt, cap_t), "jsd", BETA, TEMP)
        check("distill jsd", out, want, [s], [x], [shard])
        s, x = shard(S).clone().requires_grad_(), S.clone().requires_grad_()
        out = ok.gopd_loss(s, shard(Tt), shard(R), reward_scale=LAM, reduction="none", process_group=group,
                           **side("student_", cap_s), **side("teacher_", cap_t), **side("ref_", cap_r))
        want = oracle.divergence_rows(tf(x, cap_s), tf(Tt, cap_t), "reverse_kl", r=tf(R, cap_r), lam=LAM)
        check("gopd", out, want, [s], [x], [shard])
        Hs, Ws, Ht, Wt = rnd(N, D), rnd(Vt, D) / 2, rnd(N, DT), rnd(Vt, DT) / 2
        loc = [Hs.clone().requires_grad_(), Ws[lo:hi].clone().requires_grad_()]
        glob = [Hs.clone().requires_grad_(), Ws.clone().requires_grad_()]
        out = ok.fused_linear_distill_loss(loc[0], loc[1], Ht, Wt[lo:hi], divergence="reverse_kl", reduction="none",
                                           chunk_size=4, process_group=group, **side("student_", cap_s),
                                           **side("teacher_", cap_t))
        want = oracle.divergence_rows(tf(glob[0] @ glob[1].T, cap_s), tf(Ht @ Wt.T, cap_t), "reverse_kl")
        check("fused reverse_kl", out, want, loc, glob, [same, lambda w: w[lo:hi]])
        loc = [Hs.clone().requires_grad_(), Ws[lo:hi].clone().requires_grad_()]
        glob = [Hs.clone().requires_grad_(), Ws.clone().requires_grad_()]
        tlp, ids = torch.log_softmax(Ht @ Wt.T, -1).topk(5, -1)
        out = ok.fused_linear_sparse_distill_loss(loc[0], loc[1], ids, tlp, divergence="jsd", reduction="none",
                                                  chunk_size=4, process_group=group, **side("", cap_s))
        want = oracle.sparse_rows(tf(glob[0] @ glob[1].T, cap_s), ids, tlp, "jsd")
        check("fused sparse jsd", out, want, loc, glob, [same, lambda w: w[lo:hi]])
        dist.destroy_process_group()
    except Exception:
        import traceback
        with open(errfile, "a") as f:
            f.write(f"rank {rank}:\n{traceback.format_exc()}\n")
        raise


def test_vocab_parallel():
    from test_parallel import _free_port
    sizes = [190, 141]
    with tempfile.NamedTemporaryFile("r", suffix=".log") as err:
        try:
            mp.spawn(_worker, args=(len(sizes), _free_port(), sizes, err.name), nprocs=len(sizes), join=True)
        except Exception as exc:
            pytest.fail(f"{exc}\n{open(err.name).read()}")
