"""Vocab-parallel: 2 and 3 gloo processes with uneven vocabulary shards must reproduce the
single-process float64 reference: loss, per-token values, and gradients of the local logits /
lm_head shard and of the replicated hidden states; without logit transforms, and with a softcap and
a logit scale on every model (``transform`` axis). With a bare group the ops read no tensor on
the host (``all_gather_object``, ``.item()``, ``.tolist()`` raise while they run); with a
``VocabShard`` (here in reverse rank order) they run no layout collective at all."""
import contextlib
import os
import socket
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import opd_kernels as ok
import reference as ref
from reference import softcap_f64

N, D, DT = 23, 16, 24


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_OWNERS = {"all_gather_object": dist, "all_gather": dist, "item": torch.Tensor, "tolist": torch.Tensor}
_ACTIVE = set()  # names that raise while the ops run


def _install_guards():
    """Wrap host reads (``all_gather_object``, ``item``, ``tolist``) and the layout collective
    (``all_gather``) so that they raise while their name is in ``_ACTIVE``."""
    for name, owner in _OWNERS.items():
        def guarded(*a, _name=name, _orig=getattr(owner, name), **k):
            if _name in _ACTIVE:
                raise AssertionError(f"an op called {_name} (a host sync or a layout collective)")
            return _orig(*a, **k)
        setattr(owner, name, guarded)


@contextlib.contextmanager
def _guards(*names):
    """Exactly ``names`` raise inside the block (none: lift the guards, e.g. for the reference)."""
    saved = set(_ACTIVE)
    _ACTIVE.clear()
    _ACTIVE.update(names)
    try:
        yield
    finally:
        _ACTIVE.clear()
        _ACTIVE.update(saved)


def _close(a, b, what):
    with _guards():
        torch.testing.assert_close(a.double(), b.double(), **ref.tol(torch.float64, "shards"), msg=what)


def _check(name, ours, expected, our_inputs, ref_inputs, shard_of):
    """Value + gradients (random upstream, same on all ranks) against the full reference."""
    _close(ours, expected, f"{name}: value")
    up = torch.randn(expected.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    gs = torch.autograd.grad((ours * up).sum(), our_inputs)
    rs = torch.autograd.grad((expected * up).sum(), ref_inputs)
    for k, (g, r) in enumerate(zip(gs, rs)):
        _close(g, shard_of[k](r), f"{name}: grad {k}")


def _worker(rank, world, port, sizes, errfile):
    try:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=world)
        torch.set_num_threads(1)
        group = dist.group.WORLD
        V = sum(sizes)
        lo, hi = sum(sizes[:rank]), sum(sizes[:rank + 1])
        shard = lambda x: x[..., lo:hi]  # noqa: E731
        wshard = lambda x: x[lo:hi]  # noqa: E731
        same = lambda x: x  # noqa: E731
        g = torch.Generator().manual_seed(0)
        rnd = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
        S, T, R = rnd(2, N, V) * 2, rnd(2, N, V) * 2, rnd(2, N, V) * 2
        S[0, 0, :3] = -float("inf")  # banned tokens, possibly on one shard only
        T[0, 0, :3] = -float("inf")
        mask = torch.rand(2, N, generator=g) > 0.2
        y = torch.randint(0, V, (2, N), generator=g)
        y[1, :4] = -100

        def local(x):
            return shard(x).clone().requires_grad_()

        def full(x):
            return x.clone().requires_grad_()

        _install_guards()
        _ACTIVE.update(("all_gather_object", "item", "tolist"))  # a bare group: no host reads in the ops
        # token logprobs + entropy
        s, x = local(S), full(S)
        lp, ent = ok.token_logprobs(s, y, temperature=0.7, return_entropy=True, process_group=group)
        rlp, rent = ref.token_logprobs(x, y, 0.7)
        _check("token_logprobs", torch.stack([lp, ent]), torch.stack([rlp, rent]), [s], [x], [shard])
        # divergences, reductions
        for div, beta in (("forward_kl", .5), ("reverse_kl", .5), ("jsd", .5), ("jsd", .2), ("jsd", 0.0)):
            for red in ("mean", "none"):
                s, x = local(S), full(S)
                ours = ok.distill_loss(s, shard(T), divergence=div, beta=beta, temperature=1.3, mask=mask,
                                       reduction=red, process_group=group)
                exp = ref.reduce(ref.divergence_rows(x, T, div, beta, 1.3), mask, red)
                _check(f"distill {div} {beta} {red}", ours, exp, [s], [x], [shard])
        # G-OPD
        s, x = local(S), full(S)
        ours = ok.gopd_loss(s, shard(T), shard(R), reward_scale=1.25, mask=mask, process_group=group)
        exp = ref.reduce(ref.divergence_rows(x, T, "reverse_kl", r=R, lam=1.25), mask, "mean")
        _check("gopd", ours, exp, [s], [x], [shard])
        # sparse top-k teacher (global ids)
        tlp, ids = torch.log_softmax(T[1] / 1.0, -1).topk(9, -1)
        s, x = local(S[1]), full(S[1])
        for div in ("forward_kl", "reverse_kl", "jsd"):
            ours = ok.sparse_distill_loss(s, ids, tlp, divergence=div, process_group=group)
            exp = ref.sparse_rows(x, ids, tlp, div).mean()
            _check(f"sparse {div}", ours, exp, [s], [x], [shard])
        # fused-linear: weight shards, replicated hidden states
        Hs, Ws, Bs = rnd(2, N, D), rnd(V, D) / 2, rnd(V)
        Ht, Wt, Hr, Wr = rnd(2, N, DT), rnd(V, DT) / 2, rnd(2, N, D), rnd(V, D) / 2
        loc = [full(Hs), wshard(Ws).clone().requires_grad_(), wshard(Bs).clone().requires_grad_()]
        glob = [full(Hs), full(Ws), full(Bs)]
        logits = lambda xs: xs[0] @ xs[1].T + xs[2]  # noqa: E731
        lp = ok.fused_linear_token_logprobs(*loc[:2], y, bias=loc[2], chunk_size=7, process_group=group)
        exp, _ = ref.token_logprobs(logits(glob), y)
        _check("fused token_logprobs", lp, exp, loc, glob, [same, wshard, wshard])
        for div in ("forward_kl", "reverse_kl", "jsd"):
            for red in ("mean", "none"):
                loc = [full(Hs), wshard(Ws).clone().requires_grad_(), wshard(Bs).clone().requires_grad_()]
                glob = [full(Hs), full(Ws), full(Bs)]
                ours = ok.fused_linear_distill_loss(loc[0], loc[1], Ht, wshard(Wt), student_bias=loc[2],
                                                    divergence=div, mask=mask, reduction=red, chunk_size=10,
                                                    process_group=group)
                exp = ref.reduce(ref.divergence_rows(logits(glob), Ht @ Wt.T, div), mask, red)
                _check(f"fused {div} {red}", ours, exp, loc, glob, [same, wshard, wshard])
        for div in ("forward_kl", "jsd"):  # sparse top-k teacher, fused (global ids)
            loc = [full(Hs), wshard(Ws).clone().requires_grad_(), wshard(Bs).clone().requires_grad_()]
            glob = [full(Hs), full(Ws), full(Bs)]
            tlp, ids = torch.log_softmax(Ht @ Wt.T, -1).topk(9, -1)
            ours = ok.fused_linear_sparse_distill_loss(loc[0], loc[1], ids, tlp, bias=loc[2], divergence=div,
                                                       mask=mask, chunk_size=10, process_group=group)
            exp = ref.reduce(ref.sparse_rows(logits(glob).reshape(-1, V), ids.reshape(-1, 9), tlp.reshape(-1, 9),
                                             div), mask.reshape(-1), "mean")
            _check(f"fused sparse {div}", ours, exp, loc, glob, [same, wshard, wshard])
        loc, glob = [full(Hs), wshard(Ws).clone().requires_grad_()], [full(Hs), full(Ws)]
        ours = ok.fused_linear_gopd_loss(loc[0], loc[1], Ht, wshard(Wt), Hr, wshard(Wr), reward_scale=1.5,
                                         process_group=group)
        exp = ref.divergence_rows(glob[0] @ glob[1].T, Ht @ Wt.T, "reverse_kl", r=Hr @ Wr.T, lam=1.5).mean()
        _check("fused gopd", ours, exp, loc, glob, [same, wshard])
        # a different shard layout on the same group (e.g. a padded teacher shard): no stale offsets
        cut = [v - 3 if k == world - 1 else v for k, v in enumerate(sizes)]
        lo2 = sum(cut[:rank])
        y2 = torch.randint(0, sum(cut), (N,), generator=g)
        s2, x2 = S[0, :, lo2:lo2 + cut[rank]].clone().requires_grad_(), full(S[0, :, :sum(cut)])
        _check("token_logprobs, new layout", ok.token_logprobs(s2, y2, process_group=group),
               ref.token_logprobs(x2, y2)[0], [s2], [x2], [lambda x: x[:, lo2:lo2 + cut[rank]]])
        _vocab_shard_checks(rank, world, sizes, group, S, T, y, mask, (Hs, Ws, Bs, Ht, Wt))
        dist.destroy_process_group()
    except Exception:
        import traceback
        with open(errfile, "a") as f:
            f.write(f"rank {rank}:\n{traceback.format_exc()}\n")
        raise


def _vocab_shard_checks(rank, world, sizes, group, S, T, y, mask, weights):
    """``process_group=VocabShard(...)``: rank r holds the shard at position world-1-r (not rank
    order), and no op runs the layout all-gather (it raises, as do the host reads)."""
    pos = world - 1 - rank
    lo = sum(sizes[:pos])
    hi, V = lo + sizes[pos], sum(sizes)
    shard, wshard, same = (lambda x: x[..., lo:hi]), (lambda x: x[lo:hi]), (lambda x: x)
    vs = ok.VocabShard(lo, V, group)
    Hs, Ws, Bs, Ht, Wt = weights
    logits = lambda xs: xs[0] @ xs[1].T + xs[2]  # noqa: E731
    tlp, ids = torch.log_softmax(T[1], -1).topk(9, -1)
    with _guards("all_gather_object", "item", "tolist", "all_gather"):
        s, x = shard(S).clone().requires_grad_(), S.clone().requires_grad_()
        lp, ent = ok.token_logprobs(s, y, temperature=0.7, return_entropy=True, process_group=vs)
        rlp, rent = ref.token_logprobs(x, y, 0.7)
        _check("VocabShard token_logprobs", torch.stack([lp, ent]), torch.stack([rlp, rent]), [s], [x], [shard])
        s, x = shard(S).clone().requires_grad_(), S.clone().requires_grad_()
        ours = ok.distill_loss(s, shard(T), divergence="jsd", beta=0.2, mask=mask, process_group=vs)
        _check("VocabShard distill", ours, ref.reduce(ref.divergence_rows(x, T, "jsd", 0.2), mask, "mean"),
               [s], [x], [shard])
        s, x = shard(S[1]).clone().requires_grad_(), S[1].clone().requires_grad_()
        ours = ok.sparse_distill_loss(s, ids, tlp, divergence="jsd", process_group=vs)
        _check("VocabShard sparse", ours, ref.sparse_rows(x, ids, tlp, "jsd").mean(), [s], [x], [shard])

        def linear():
            return ([Hs.clone().requires_grad_(), wshard(Ws).clone().requires_grad_(),
                     wshard(Bs).clone().requires_grad_()], [Hs.clone().requires_grad_(), Ws.clone().requires_grad_(),
                                                            Bs.clone().requires_grad_()])

        loc, glob = linear()
        lp = ok.fused_linear_token_logprobs(*loc[:2], y, bias=loc[2], chunk_size=7, process_group=vs)
        _check("VocabShard fused token_logprobs", lp, ref.token_logprobs(logits(glob), y)[0], loc, glob,
               [same, wshard, wshard])
        loc, glob = linear()
        ours = ok.fused_linear_distill_loss(loc[0], loc[1], Ht, wshard(Wt), student_bias=loc[2], mask=mask,
                                            chunk_size=10, process_group=vs)
        exp = ref.reduce(ref.divergence_rows(logits(glob), Ht @ Wt.T, "reverse_kl"), mask, "mean")
        _check("VocabShard fused reverse_kl", ours, exp, loc, glob, [same, wshard, wshard])
        loc, glob = linear()
        tlp2, ids2 = torch.log_softmax(Ht @ Wt.T, -1).topk(9, -1)
        ours = ok.fused_linear_sparse_distill_loss(loc[0], loc[1], ids2, tlp2, bias=loc[2], divergence="forward_kl",
                                                   chunk_size=10, process_group=vs)
        exp = ref.sparse_rows(logits(glob).reshape(-1, V), ids2.reshape(-1, 9), tlp2.reshape(-1, 9),
                              "forward_kl").mean()
        _check("VocabShard fused sparse", ours, exp, loc, glob, [same, wshard, wshard])


def _transforms_worker(rank, world, port, sizes, errfile):
    """Every op family with a softcap and a logit scale on each model (``reference.softcap_f64``, then the
    formulas), values and gradients, with the host-read guards."""
    N, D, DT, TEMP, LAM, BETA, INF = 9, 24, 16, 0.8, 1.4, 0.3, float("inf")
    check = _check
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
        check("token_logprobs", lp, ref.token_logprobs(tf(x, cap_s), y, TEMP)[0], [s], [x], [shard])
        s, x = shard(S).clone().requires_grad_(), S.clone().requires_grad_()
        out = ok.distill_loss(s, shard(Tt), divergence="jsd", beta=BETA, temperature=TEMP, reduction="none",
                              process_group=group, **side("student_", cap_s), **side("teacher_", cap_t))
        want = ref.divergence_rows(tf(x, cap_s), tf(Tt, cap_t), "jsd", BETA, TEMP)
        check("distill jsd", out, want, [s], [x], [shard])
        s, x = shard(S).clone().requires_grad_(), S.clone().requires_grad_()
        out = ok.gopd_loss(s, shard(Tt), shard(R), reward_scale=LAM, reduction="none", process_group=group,
                           **side("student_", cap_s), **side("teacher_", cap_t), **side("ref_", cap_r))
        want = ref.divergence_rows(tf(x, cap_s), tf(Tt, cap_t), "reverse_kl", r=tf(R, cap_r), lam=LAM)
        check("gopd", out, want, [s], [x], [shard])
        Hs, Ws, Ht, Wt = rnd(N, D), rnd(Vt, D) / 2, rnd(N, DT), rnd(Vt, DT) / 2
        loc = [Hs.clone().requires_grad_(), Ws[lo:hi].clone().requires_grad_()]
        glob = [Hs.clone().requires_grad_(), Ws.clone().requires_grad_()]
        out = ok.fused_linear_distill_loss(loc[0], loc[1], Ht, Wt[lo:hi], divergence="reverse_kl", reduction="none",
                                           chunk_size=4, process_group=group, **side("student_", cap_s),
                                           **side("teacher_", cap_t))
        want = ref.divergence_rows(tf(glob[0] @ glob[1].T, cap_s), tf(Ht @ Wt.T, cap_t), "reverse_kl")
        check("fused reverse_kl", out, want, loc, glob, [same, lambda w: w[lo:hi]])
        loc = [Hs.clone().requires_grad_(), Ws[lo:hi].clone().requires_grad_()]
        glob = [Hs.clone().requires_grad_(), Ws.clone().requires_grad_()]
        tlp, ids = torch.log_softmax(Ht @ Wt.T, -1).topk(5, -1)
        out = ok.fused_linear_sparse_distill_loss(loc[0], loc[1], ids, tlp, divergence="jsd", reduction="none",
                                                  chunk_size=4, process_group=group, **side("", cap_s))
        want = ref.sparse_rows(tf(glob[0] @ glob[1].T, cap_s), ids, tlp, "jsd")
        check("fused sparse jsd", out, want, loc, glob, [same, lambda w: w[lo:hi]])
        dist.destroy_process_group()
    except Exception:
        import traceback
        with open(errfile, "a") as f:
            f.write(f"rank {rank}:\n{traceback.format_exc()}\n")
        raise


@pytest.mark.parametrize("transform,sizes", [("none", [600, 413]), ("none", [400, 400, 213]),
                                            ("softcap", [190, 141])])
def test_vocab_parallel(transform, sizes):
    with tempfile.NamedTemporaryFile("r", suffix=".log") as err:
        try:
            worker = _worker if transform == "none" else _transforms_worker
            mp.spawn(worker, args=(len(sizes), _free_port(), sizes, err.name), nprocs=len(sizes), join=True)
        except Exception as exc:
            pytest.fail(f"{exc}\n{open(err.name).read()}")
