"""Logit transforms as options of every public op: ``softcap=`` / ``logit_scale=`` (single-model ops)
and ``{student,teacher,ref}_softcap`` / ``_logit_scale`` (two/three-model ops), on logits and fused
with the lm_head, on every backend: torch (float64 and float32), triton (the interpreter on CPU,
small shapes, one case per op and side), cuda (marked, skipped without a GPU); plus the nn.Modules,
the TRL integration's heads and the compiled torch chunk path (vocab-parallel:
``test_transforms_parallel.py``; input errors: ``test_transforms_errors.py``).

Oracle: ``reference.softcap_f64`` (logit_scale first, then ``cap * tanh(x / cap)``) on the raw float64
logits, then the docs/design.md formulas at the temperature; gradients by float64 autograd through both,
so each transform's own gradient term (the chain rule) is checked. Banned (``-inf``) entries of the
student and the teacher stay banned: a banned target's logprob is ``-inf`` (a softcap applied to
``-inf`` would give ``-cap``), banned logits and bias entries get a zero gradient, and the values
equal the oracle's, in which a banned entry has zero probability.
"""
import math

import pytest
import torch

import opd_kernels as ok
import reference as oracle
from helpers import DEV, require_extra, require_impl
from reference import softcap_f64

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's tl.where
INF = math.inf
N, V, D, DT = 9, 331, 24, 16  # small: the triton interpreter runs every case
TEMP, LAM, BETA = 0.8, 1.4, 0.3
BAN = [3, 50]  # columns banned through the fused ops' biases (student and teacher)

# config -> {model: (softcap, logit_scale)}; None = absent
SINGLE = {"cap": {"student": (2.5, None)}, "scale": {"student": (None, 0.6)}, "both": {"student": (2.0, 1.7)}}
PAIR = {"cap_s": {"student": (2.5, None)}, "scale_s": {"student": (None, 0.6)}, "both_s": {"student": (2.0, 1.7)},
        "cap_t": {"teacher": (1.5, None)}, "scale_t": {"teacher": (None, 1.8)}, "both_t": {"teacher": (3.0, 0.5)}}
GOPD = dict(PAIR, ref={"ref": (1.2, 0.9)}, all={"student": (2.0, 1.7), "teacher": (3.0, 0.5), "ref": (4.0, 0.7)})
TRITON = {"both", "both_s", "both_t"}  # the interpreter is slow: these cover every model's transform


def _params(configs, triton=TRITON):
    out = []
    for name in configs:
        out += [pytest.param("torch", name, torch.float64, id=f"torch-f64-{name}"),
                pytest.param("torch", name, torch.float32, id=f"torch-f32-{name}"),
                pytest.param("cuda", name, torch.float32, marks=pytest.mark.cuda, id=f"cuda-{name}")]
        if name in triton:
            out.append(pytest.param("triton", name, torch.float32, marks=pytest.mark.triton, id=f"triton-{name}"))
    return out


def _kw(cfg, single=False) -> dict:
    """The public keyword arguments of ``cfg``."""
    out = {}
    for side, (cap, scale) in cfg.items():
        p = "" if single else f"{side}_"
        if cap is not None:
            out[p + "softcap"] = cap
        if scale is not None:
            out[p + "logit_scale"] = scale
    return out


def _tf(x, cfg, side):
    """The oracle's transform of ``side``'s float64 logits."""
    cap, scale = cfg.get(side, (None, None))
    return softcap_f64(x, 1.0 if scale is None else scale, cap or 0.0)


def _logits(seed, dtype, dev=DEV):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, V, generator=g, dtype=torch.float64) * 3
    x[3, :10] = -INF  # banned by every model (student, teacher, reference)
    x[5, 100:105] = -INF
    return x.to(dev, dtype)


def _models(dtype, dev=DEV):
    """(hs, ws, bs, ht, wt, bt, hr, wr): banned columns through the student's and teacher's bias."""
    g = torch.Generator().manual_seed(5)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    hs, ws, bs = r(N, D), r(V, D) * (2 / D ** 0.5), r(V)
    ht, wt, bt = r(N, DT), r(V, DT) * (2 / DT ** 0.5), r(V)
    hr, wr = r(N, D), r(V, D) * (2 / D ** 0.5)
    bs[BAN] = -INF
    bt[BAN] = -INF
    return [x.to(dev, dtype) for x in (hs, ws, bs, ht, wt, bt, hr, wr)]


def _targets(banned, dev=DEV):
    """Targets of no banned token (see ``_logits``, ``BAN``), but in row 3: ``banned`` (logprob -inf)."""
    y = torch.randint(11, 100, (N,), generator=torch.Generator().manual_seed(3))
    y[1] = -100
    y[3] = banned
    return y.to(dev)


def _leaves(xs, grad_of):
    """(op inputs, float64 oracle inputs), the ones in ``grad_of`` requiring grad."""
    ours = [x.detach().clone().requires_grad_(i in grad_of) for i, x in enumerate(xs)]
    refs = [x.detach().double().cpu().requires_grad_(i in grad_of) for i, x in enumerate(xs)]
    return ours, refs


def _check(out, want, ours, refs, dtype, keep=None):
    """Values, then gradients of ``sum(up * out)`` (a random non-unit ``up``; entries outside
    ``keep`` weigh 0) w.r.t. the inputs that require grad, against the float64 oracle."""
    oracle.close(out, want, dtype)
    up = torch.randn(want.shape, generator=torch.Generator().manual_seed(11), dtype=torch.float64) + 0.5
    if keep is not None:
        keep = keep.cpu()
        out, want = torch.where(keep.to(out.device), out, 0.0), torch.where(keep, want, 0.0)
    leaves = [i for i, x in enumerate(ours) if x.requires_grad]
    gs = torch.autograd.grad((out.double() * up.to(out.device)).sum(), [ours[i] for i in leaves])
    rs = torch.autograd.grad((want * up).sum(), [refs[i] for i in leaves])
    for g, r in zip(gs, rs):
        assert g.dtype == dtype
        oracle.close(g, r, dtype, "grad")
    return gs


# ------------------------------------------------------------------------- single-model ops
@pytest.mark.parametrize("impl,cfg,dtype", _params(SINGLE))
def test_token_logprobs(impl, cfg, dtype):
    require_impl(impl)
    cfg = SINGLE[cfg]
    (s,), (x,) = _leaves([_logits(0, dtype)], {0})
    y = _targets(banned=4)
    lp, ent = ok.token_logprobs(s, y, temperature=TEMP, return_entropy=True, impl=impl, **_kw(cfg, True))
    assert lp[3] == -INF  # the banned target stays banned
    wlp, went = oracle.token_logprobs(_tf(x, cfg, "student"), y.cpu(), TEMP)
    keep = torch.arange(N) != 3
    (gs,) = _check(torch.stack([lp, ent]), torch.stack([wlp, went]), [s], [x], dtype, keep)
    assert (gs[5, 100:105] == 0).all()


@pytest.mark.parametrize("impl,cfg,dtype", _params(SINGLE))
def test_fused_linear_token_logprobs(impl, cfg, dtype):
    require_impl(impl, fused=True)
    cfg = SINGLE[cfg]
    ours, refs = _leaves(_models(dtype)[:3], {0, 1, 2})
    y = _targets(banned=BAN[0])
    lp, ent = ok.fused_linear_token_logprobs(ours[0], ours[1], y, bias=ours[2], temperature=TEMP, return_entropy=True,
                                             chunk_size=4, impl=impl, **_kw(cfg, True))
    assert lp[3] == -INF
    s = refs[0] @ refs[1].T + refs[2]
    wlp, went = oracle.token_logprobs(_tf(s, cfg, "student"), y.cpu(), TEMP)
    _, _, db = _check(torch.stack([lp, ent]), torch.stack([wlp, went]), ours, refs, dtype, torch.arange(N) != 3)
    assert (db[BAN] == 0).all()


def _topk(seed, ban_col):
    """Random distinct top-k ids (row 3 holds a column the student bans) and finite teacher logprobs."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(V, generator=g)[:6] for _ in range(N)])
    ids[3, 0] = ban_col if ban_col not in ids[3, 1:] else ids[3, 0]
    tlp = torch.log_softmax(torch.randn(N, V, generator=g, dtype=torch.float64), -1).gather(1, ids)
    return ids.to(DEV), tlp


@pytest.mark.parametrize("impl,cfg,dtype", _params(SINGLE))
def test_sparse_distill_loss(impl, cfg, dtype):
    require_impl(impl)
    cfg = SINGLE[cfg]
    (s,), (x,) = _leaves([_logits(0, dtype)], {0})
    ids, tlp = _topk(1, ban_col=2)
    out = ok.sparse_distill_loss(s, ids, tlp.to(DEV, dtype), divergence="jsd", beta=BETA, temperature=TEMP,
                                 reduction="none", impl=impl, **_kw(cfg, True))
    want = oracle.sparse_rows(_tf(x, cfg, "student"), ids.cpu(), tlp.to(dtype).double(), "jsd", BETA, TEMP)
    (gs,) = _check(out, want, [s], [x], dtype)
    assert (gs[3, :10] == 0).all() and (gs[5, 100:105] == 0).all()


@pytest.mark.parametrize("impl,cfg,dtype", _params(SINGLE))
def test_fused_linear_sparse_distill_loss(impl, cfg, dtype):
    require_impl(impl, fused=True)
    cfg = SINGLE[cfg]
    ours, refs = _leaves(_models(dtype)[:3], {0, 1, 2})
    ids, tlp = _topk(2, ban_col=BAN[1])
    mask = (torch.arange(N) % 4 != 1).to(DEV)
    out = ok.fused_linear_sparse_distill_loss(ours[0], ours[1], ids, tlp.to(DEV, dtype), bias=ours[2],
                                              divergence="reverse_kl", temperature=TEMP, mask=mask, chunk_size=4,
                                              impl=impl, **_kw(cfg, True))
    s = refs[0] @ refs[1].T + refs[2]
    rows = oracle.sparse_rows(_tf(s, cfg, "student"), ids.cpu(), tlp.to(dtype).double(), "reverse_kl", T=TEMP)
    _, _, db = _check(out, oracle.reduce(rows, mask.cpu(), "mean"), ours, refs, dtype)
    assert (db[BAN] == 0).all()


# -------------------------------------------------------------------------- two/three-model ops
def _divergences(impl):
    return ("jsd",) if impl == "triton" else ("forward_kl", "reverse_kl", "jsd")


@pytest.mark.parametrize("impl,cfg,dtype", _params(PAIR))
def test_distill_loss(impl, cfg, dtype):
    require_impl(impl)
    cfg = PAIR[cfg]
    t = _logits(1, dtype)
    for div in _divergences(impl):
        (s,), (x,) = _leaves([_logits(0, dtype)], {0})
        out = ok.distill_loss(s, t, divergence=div, beta=BETA, temperature=TEMP, reduction="none", impl=impl,
                              **_kw(cfg))
        want = oracle.divergence_rows(_tf(x, cfg, "student"), _tf(t.cpu(), cfg, "teacher"), div, BETA, TEMP)
        (gs,) = _check(out, want, [s], [x], dtype)
        assert torch.isfinite(out).all() and (gs[3, :10] == 0).all(), div


@pytest.mark.parametrize("impl,cfg,dtype", _params(GOPD, triton={"all"}))
def test_gopd_loss(impl, cfg, dtype):
    require_impl(impl)
    cfg = GOPD[cfg]
    t, r = _logits(1, dtype), _logits(2, dtype)
    (s,), (x,) = _leaves([_logits(0, dtype)], {0})
    out = ok.gopd_loss(s, t, r, reward_scale=LAM, temperature=TEMP, reduction="none", impl=impl, **_kw(cfg))
    want = oracle.divergence_rows(_tf(x, cfg, "student"), _tf(t.cpu(), cfg, "teacher"), "reverse_kl", T=TEMP,
                                  r=_tf(r.cpu(), cfg, "ref"), lam=LAM)
    (gs,) = _check(out, want, [s], [x], dtype)
    assert (gs[3, :10] == 0).all()


def _fused_runs(impl, cfg_name):
    """(divergence, reduction) pairs: every divergence with a masked mean (gradients computed in
    forward) and per-token (gradients in backward); in the interpreter one pair per config."""
    if impl == "triton":
        return [("jsd", "mean" if cfg_name.endswith("_s") else "none")]
    return [(div, red) for div in _divergences(impl) for red in ("mean", "none")]


def _fused_oracle(refs, cfg, div, mask, reduction, ref_model=False):
    s = refs[0] @ refs[1].T + refs[2]
    t = refs[3] @ refs[4].T + refs[5]
    extra = {}
    if ref_model:
        extra = dict(r=_tf(refs[6] @ refs[7].T, cfg, "ref"), lam=LAM)
    rows = oracle.divergence_rows(_tf(s, cfg, "student"), _tf(t, cfg, "teacher"), div, BETA, TEMP, **extra)
    return oracle.reduce(rows, mask.cpu(), reduction)


@pytest.mark.parametrize("impl,cfg,dtype", _params(PAIR))
def test_fused_linear_distill_loss(impl, cfg, dtype):
    require_impl(impl, fused=True)
    name, cfg = cfg, PAIR[cfg]
    mask = (torch.arange(N) % 4 != 1).to(DEV)
    for div, red in _fused_runs(impl, name):
        ours, refs = _leaves(_models(dtype)[:6], {0, 1, 2})
        out = ok.fused_linear_distill_loss(ours[0], ours[1], ours[3], ours[4], student_bias=ours[2],
                                           teacher_bias=ours[5], divergence=div, beta=BETA, temperature=TEMP,
                                           mask=mask, reduction=red, chunk_size=4, impl=impl, **_kw(cfg))
        _, _, db = _check(out, _fused_oracle(refs, cfg, div, mask, red), ours, refs, dtype)
        assert (db[BAN] == 0).all(), (div, red)


@pytest.mark.parametrize("impl,cfg,dtype", _params(GOPD, triton={"all"}))
def test_fused_linear_gopd_loss(impl, cfg, dtype):
    require_impl(impl, fused=True)
    name, cfg = cfg, GOPD[cfg]
    mask = (torch.arange(N) % 4 != 1).to(DEV)
    for _, red in _fused_runs(impl, name):
        ours, refs = _leaves(_models(dtype), {0, 1, 2})
        hs, ws, bs, ht, wt, bt, hr, wr = ours
        out = ok.fused_linear_gopd_loss(hs, ws, ht, wt, hr, wr, student_bias=bs, teacher_bias=bt, reward_scale=LAM,
                                        temperature=TEMP, mask=mask, reduction=red, chunk_size=4, impl=impl,
                                        **_kw(cfg))
        _, _, db = _check(out, _fused_oracle(refs, cfg, "reverse_kl", mask, red, ref_model=True), ours, refs, dtype)
        assert (db[BAN] == 0).all(), red


def test_modules_carry_the_transforms():
    kw = dict(student_softcap=2.0, teacher_logit_scale=0.5, teacher_softcap=3.0)
    s, t = _logits(0, torch.float64), _logits(1, torch.float64)
    m = ok.DistillLoss(divergence="jsd", beta=BETA, temperature=TEMP, **kw)
    assert "student_softcap=2.0" in repr(m) and "student_logit_scale" not in repr(m)
    want = oracle.divergence_rows(softcap_f64(s, 1.0, 2.0), softcap_f64(t, 0.5, 3.0), "jsd", BETA, TEMP).mean()
    oracle.close(m(s, t), want, torch.float64)
    hs, ws, bs, ht, wt, bt, *_ = _models(torch.float64)
    fm = ok.FusedLinearDistillLoss(divergence="forward_kl", chunk_size=4, **kw)
    want = oracle.divergence_rows(softcap_f64(hs @ ws.T + bs, 1.0, 2.0), softcap_f64(ht @ wt.T + bt, 0.5, 3.0),
                                  "forward_kl").mean()
    oracle.close(fm(hs, ws, ht, wt, student_bias=bs, teacher_bias=bt), want, torch.float64)


def test_identity_transforms_equal_no_transform():
    """softcap=None, logit_scale=1 is exactly the plain op (the identity costs nothing)."""
    s, y = _logits(0, torch.float32), _targets(banned=4)
    assert torch.equal(ok.token_logprobs(s, y, logit_scale=1.0, impl="torch"), ok.token_logprobs(s, y, impl="torch"))


def test_trl_gkd_loss_passes_the_heads_transforms():
    """``integrations.trl.gkd_loss`` builds its kwargs from ``hf.Head.kwargs(side)``: a Gemma-like
    softcap student head and a Cohere-like scaled teacher head reach the fused op."""
    require_extra("trl", "trl")
    from opd_kernels.integrations import trl as trl_int
    hs, ws, bs, ht, wt, bt, *_ = _models(torch.float64, "cpu")
    student = ok.hf.Head(weight=ws, softcap=2.0)
    teacher = ok.hf.Head(weight=wt, bias=bt, logit_scale=0.5)
    assert set(student.kwargs("student")) == {"student_softcap"}
    assert set(teacher.kwargs("teacher")) == {"teacher_bias", "teacher_logit_scale"}
    labels = _targets(banned=0, dev="cpu")[None]
    x = hs[None].clone().requires_grad_()
    loss = trl_int.gkd_loss(x, student, ht[None], teacher, labels, beta=BETA, temperature=TEMP)
    x64 = hs.clone().requires_grad_()
    mask = labels[0] != -100
    rows = oracle.divergence_rows(softcap_f64(x64 @ ws.T, 1.0, 2.0), softcap_f64(ht @ wt.T + bt, 0.5), "jsd", BETA,
                                  TEMP)
    want = oracle.reduce(rows, mask, "sum") / mask.sum()
    oracle.close(loss, want, torch.float64)
    oracle.close(torch.autograd.grad(loss, x)[0][0], torch.autograd.grad(want, x64)[0], torch.float64, "grad")


# --------------------------------------------------------------------------- the compiled torch path
# (fixture ``compiled``: tests/conftest.py)
@pytest.mark.filterwarnings("ignore")
def test_compiled_fused_scalar_loss(compiled):
    """fp32 CPU torch above the (lowered) threshold: statistics and gradient in one compiled pass."""
    cfg = PAIR["both_s"] | PAIR["cap_t"]
    mask = torch.arange(N) % 4 != 1
    ours, refs = _leaves(_models(torch.float32, "cpu")[:6], {0, 1})
    out = ok.fused_linear_distill_loss(ours[0], ours[1], ours[3], ours[4], student_bias=ours[2], teacher_bias=ours[5],
                                       divergence="reverse_kl", temperature=TEMP, mask=mask, impl="torch", **_kw(cfg))
    _check(out, _fused_oracle(refs, cfg, "reverse_kl", mask, "mean"), ours, refs, torch.float32)
    assert compiled == ["both"]


@pytest.mark.filterwarnings("ignore")
def test_compiled_logits_token_logprobs(compiled):
    cfg = SINGLE["both"]
    (s,), (x,) = _leaves([_logits(0, torch.float32, "cpu")], {0})
    y = _targets(banned=4, dev="cpu")
    lp = ok.token_logprobs(s, y, temperature=TEMP, impl="torch", **_kw(cfg, True))
    assert lp[3] == -INF
    _check(lp, oracle.token_logprobs(_tf(x, cfg, "student"), y, TEMP)[0], [s], [x], torch.float32,
           torch.arange(N) != 3)
    assert compiled == ["rows", "grad"]
