"""Every backend's primitives (``row_stats``, ``jsd_sums``, ``grad_logits``, and the Triton fused ones)
against float64 formulas, with the logit transform (``tf_s``/``tf_t``/``tf_r`` = (logit_scale, softcap)) as
an axis (``TFS``: none, a student cap or scale, every model's, the teacher's and reference's):
``reference.softcap_f64`` then the docs/design.md definitions, and gradients by float64 autograd through
both (independent of the package's code paths); and the row-statistics algebra they feed
(``_stats.rebase`` over vocabulary shards, the saved row state of the ops).

Backends: ``torch`` (fp32 and float64 inputs), ``triton`` (the interpreter on CPU, small shapes;
the GPU with CUDA), ``cuda`` (the built extension, marked ``cuda``) and ``emulated`` (the CUDA
kernels' per-thread code, csrc/emulate/host_emulation.cu, built with nvcc and run on the CPU).
Every kind (logprob, forward_kl, reverse_kl, jsd, the G-OPD target) with -inf entries and a
non-unit upstream gradient (one masked row).
"""
import math
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton

import pytest  # noqa: E402

import reference  # noqa: E402
from helpers import EmulatedTransforms  # noqa: E402
from reference import softcap_f64  # noqa: E402
from opd_kernels._stats import finish  # noqa: E402
from opd_kernels.backends import IDENTITY, transform_consts  # noqa: E402
from opd_kernels.backends import torch_backend  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's tl.where
GPU = torch.cuda.is_available()
DEV = "cuda" if GPU else "cpu"
INF = float("inf")

# name: (tf_s, tf_t, tf_r)
TFS = {
    "none": (IDENTITY, IDENTITY, IDENTITY),
    "cap_s": ((1.0, 5.0), IDENTITY, IDENTITY),
    "scale_s": ((0.6, 0.0), IDENTITY, IDENTITY),
    "all": ((0.5, 4.0), (1.3, 6.0), (0.8, 3.0)),
    "teacher_ref": (IDENTITY, (1.0, 3.0), (2.0, None)),
}
KINDS = ("logprob", "forward_kl", "reverse_kl", "jsd", "gopd")
TEMP, LAM, BETA, START = 0.8, 1.4, 0.3, 5
BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.triton),
            pytest.param("cuda", marks=pytest.mark.cuda), "emulated"]


# ------------------------------------------------------------------------------ backends
@pytest.fixture(scope="session")
def emulated_tf(host_emulation):
    return EmulatedTransforms(host_emulation)


@pytest.fixture(params=BACKENDS)
def be(request):
    name = request.param
    if name == "torch":
        return torch_backend
    if name == "emulated":
        return request.getfixturevalue("emulated_tf")
    if name == "triton":
        pytest.importorskip("triton")
        from opd_kernels.backends import triton_backend as mod
    else:
        from opd_kernels.backends import cuda_backend as mod
    ok, why = mod.available()
    if not ok:
        pytest.skip(f"{name} backend unavailable: {why}")
    return mod


def dev_of(be):
    return "cpu" if getattr(be, "NAME", "") == "emulated" else DEV


# ------------------------------------------------------------------------------ data
def case(dev, N=9, V=301, dtype=torch.float32, infinite=False):
    """Student (a strided view), teacher, reference logits of std 6 (the caps bend them).

    -inf entries: row 1 is banned by the student on 0:20, by the teacher on 10:20 and by the
    reference on 0:15 (all losses stay finite). ``infinite`` adds bans that make them +inf:
    row 2, a token the student supports and the teacher bans (reverse KL = +inf); row 3, one
    the teacher supports and the student bans (forward KL = +inf).
    """
    s = (torch.randn(N, V + 3, device=dev) * 6)[:, :V]
    t, r = torch.randn(N, V, device=dev) * 6, torch.randn(N, V, device=dev) * 6
    s[1, :20], t[1, 10:20], r[1, :15] = -INF, -INF, -INF
    if infinite:
        t[2, 7] = -INF
        s[3, 50] = -INF
    y = torch.randint(0, V, (N,), device=dev) + START
    y[0] = -100                    # ignored (its row has g = 0 below)
    y[1] = START + 5               # a target the student bans: logprob -inf
    return s.to(dtype), t.to(dtype), r.to(dtype), y


def upstream(dev, N):
    g = torch.randn(N, 2, device=dev, dtype=torch.float64)
    g[0] = 0.0  # a masked row
    return g


def f64_rows(s, t, r, y, kind, tfs):
    """float64 (main, entropy, A, B, C) per row from the formulas (differentiable w.r.t. s)."""
    a = softcap_f64(s, *tfs[0])
    lq = reference.log_softmax(a, TEMP)
    ent = -(lq.exp() * torch.where(lq.exp() > 0, lq, 0.0)).sum(-1)
    A = torch.logsumexp(a / TEMP, -1)
    if kind == "logprob":
        y_loc = torch.where(y >= 0, y - START, -100)
        main = reference.token_logprobs(a, y_loc, TEMP)[0]
        return main, ent, A, torch.zeros_like(A), torch.zeros_like(A)
    b_t = softcap_f64(t, *tfs[1])
    b_r = softcap_f64(r, *tfs[2]) if kind == "gopd" else None
    div = "reverse_kl" if kind == "gopd" else kind
    main = reference.divergence_rows(a, b_t, div, BETA, TEMP, r=b_r, lam=LAM)
    b = b_t / TEMP
    if b_r is not None:
        b = torch.where(torch.isneginf(b) | torch.isneginf(b_r), -INF, LAM * b + (1 - LAM) * b_r / TEMP)
    lp = torch.log_softmax(b, -1)
    C = torch.zeros_like(A)
    if div == "reverse_kl":
        C = main
    elif div == "jsd":
        C = reference._kl(lq, reference._log_mix(lp, lq, BETA))
    return main, ent, A, torch.logsumexp(b, -1), C


def call_kw(kind, tfs):
    tf = dict(tf_s=tfs[0], tf_t=tfs[1], tf_r=tfs[2])
    return dict(inv_temp=1 / TEMP, lam=LAM, vocab_start=START, **tf)


def operands(kind, s, t, r, y):
    """(s, t, r, targets) as the engine passes them for ``kind``."""
    if kind == "logprob":
        return s, None, None, y
    return s, t, r if kind == "gopd" else None, None


def backend_rows(be, kind, s, t, r, y, tfs):
    """(main, entropy) from the backend's row_stats (+ jsd_sums) -> finish."""
    kw = call_kw(kind, tfs)
    ss, tt, rr, yy = operands(kind, s, t, r, y)
    rows = finish(be.row_stats(ss, tt, rr, yy, **kw))
    if kind == "logprob":
        return rows.logprob, rows.entropy
    if kind == "jsd":
        AB = torch.stack([rows.A, rows.B], -1)
        sums = be.jsd_sums(s, t, AB, inv_temp=kw["inv_temp"], beta=BETA, tf_s=tfs[0], tf_t=tfs[1])
        return BETA * sums[:, 0] + (1 - BETA) * sums[:, 1], rows.entropy
    return (rows.forward_kl if kind == "forward_kl" else rows.reverse_kl), rows.entropy


def tol_dtype(x):
    return torch.float64 if x.dtype == torch.float64 else torch.float32


# ------------------------------------------------------------------------------ logits level
@pytest.mark.parametrize("tfname", list(TFS))
@pytest.mark.parametrize("kind", KINDS)
def test_row_values(be, kind, tfname):
    tfs = TFS[tfname]
    s, t, r, y = case(dev_of(be), infinite=True)
    main, ent = backend_rows(be, kind, s, t, r, y, tfs)
    want_main, want_ent = (x.to(main.device) for x in f64_rows(*(v.double() for v in (s, t, r)), y, kind, tfs)[:2])
    keep = torch.ones_like(main, dtype=torch.bool)
    keep[0] = kind != "logprob"  # ignored target: the engine masks the row (a_y = 0 here)
    reference.close(main[keep], want_main[keep], torch.float32)
    reference.close(ent, want_ent, torch.float32)
    # banned stays banned through the transform (c * tanh(-inf) = -c would make these finite)
    if kind == "logprob":
        assert main[1] == -INF
    if kind in ("reverse_kl", "gopd"):
        assert main[2] == INF
    if kind == "forward_kl":
        assert main[3] == INF


@pytest.mark.parametrize("tfname", list(TFS))
@pytest.mark.parametrize("kind", KINDS)
def test_grad_logits(be, kind, tfname):
    tfs = TFS[tfname]
    dev = dev_of(be)
    s, t, r, y = case(dev)
    g = upstream(dev, s.shape[0])
    s64 = s.double().requires_grad_()
    main, ent, A, B, C = f64_rows(s64, t.double(), r.double(), y, kind, tfs)
    want, = torch.autograd.grad((g[:, 0] * main + g[:, 1] * ent).sum(), s64)
    H = ent.detach()
    rs = torch.stack([A, B, C, H], -1).detach().float()
    ss, tt, rr, yy = operands(kind, s, t, r, y)
    kw = call_kw(kind, tfs)
    got = be.grad_logits(ss, tt, rr, yy, rs, g.float(), kind="reverse_kl" if kind == "gopd" else kind,
                         beta=BETA, with_entropy=True, **kw)
    assert got.shape == s.shape and got.dtype == s.dtype
    reference.close(got, want, torch.float32, "grad")


def test_vocab_shards(be):
    """Two uneven vocabulary shards (vocab_start = the shard's first id), merged like ranks'
    shards, give the full-vocabulary values: the transforms are per element."""
    from opd_kernels._stats import rebase

    tfs = TFS["all"]
    s, t, r, y = case(dev_of(be))
    s, y = s.contiguous(), y - START  # global ids 0..V-1 (and -105: ignored)
    cut = 113
    parts = [be.row_stats(s[:, a:b].contiguous(), t[:, a:b].contiguous(), r[:, a:b].contiguous(), y,
                          inv_temp=1 / TEMP, lam=LAM, vocab_start=a, tf_s=tfs[0], tf_t=tfs[1], tf_r=tfs[2])
             for a, b in ((0, cut), (cut, s.shape[1]))]
    part = torch.stack(parts)
    m_a, m_b = part[:, :, 0].amax(0), part[:, :, 3].amax(0)
    merged = rebase(part, m_a, m_b).sum(0)
    merged[:, 0], merged[:, 3] = m_a, m_b
    rows = finish(merged)
    want = f64_rows(*(v.double() for v in (s, t, r)), y + START, "gopd", tfs)
    reference.close(rows.reverse_kl, want[0].to(rows.A.device), torch.float32)
    reference.close(rows.entropy, want[1].to(rows.A.device), torch.float32)
    keep = torch.arange(s.shape[0], device=y.device) != 0
    want_lp = f64_rows(*(v.double() for v in (s, t, r)), y + START, "logprob", tfs)[0].to(rows.A.device)
    reference.close(rows.logprob[keep], want_lp[keep], torch.float32)


def test_torch_float64_is_the_formula():
    """The torch backend on float64 inputs agrees with the formulas at float64 tolerance."""
    tfs = TFS["all"]
    s, t, r, y = (x.double() if x.is_floating_point() else x for x in case("cpu", infinite=True))
    for kind in KINDS:
        main, ent = backend_rows(torch_backend, kind, s, t, r, y, tfs)
        want_main, want_ent = f64_rows(s, t, r, y, kind, tfs)[:2]
        keep = torch.arange(s.shape[0]) != 0
        reference.close(main[keep], want_main[keep], torch.float64)
        reference.close(ent, want_ent, torch.float64)


def test_grad_without_entropy_and_in_place(be):
    """with_entropy=False drops the entropy term; out=s writes the gradient over the logits."""
    tfs = TFS["all"]
    dev = dev_of(be)
    s, t, r, y = case(dev)
    s = s.contiguous()
    g = upstream(dev, s.shape[0])
    s64 = s.double().requires_grad_()
    main, ent, A, B, C = f64_rows(s64, t.double(), r.double(), y, "forward_kl", tfs)
    want, = torch.autograd.grad((g[:, 0] * main).sum(), s64)
    rs = torch.stack([A, B, C, ent], -1).detach().float()
    buf = s.clone()
    got = be.grad_logits(buf, t, None, None, rs, g.float(), kind="forward_kl", out=buf, **call_kw("forward_kl", tfs))
    assert got.data_ptr() == buf.data_ptr()
    reference.close(got, want, torch.float32, "grad")


def test_identity_transform_changes_nothing(be):
    """Explicit identity transforms give bit-identical results to the defaults (old call sites)."""
    dev = dev_of(be)
    s, t, r, y = case(dev)
    ident = dict(tf_s=(1.0, 0.0), tf_t=(1.0, None), tf_r=None)
    kw = dict(inv_temp=1 / TEMP, lam=LAM, vocab_start=START)
    assert torch.equal(be.row_stats(s, t, r, y, **kw), be.row_stats(s, t, r, y, **kw, **ident))
    rs = reference.saved_row_state(s, t, r, "reverse_kl", 1 / TEMP, lam=LAM).float()
    g = upstream(dev, s.shape[0]).float()
    gkw = dict(kind="reverse_kl", with_entropy=True, **kw)
    assert torch.equal(be.grad_logits(s, t, r, None, rs, g, **gkw),
                       be.grad_logits(s, t, r, None, rs, g, **gkw, **ident))


@pytest.mark.parametrize("bad,match", [
    (dict(tf_s=(0.0, 1.0)), "tf_s: the logit scale must be finite and > 0, got 0.0"),
    (dict(tf_s=(-2.0, 0.0)), "tf_s: the logit scale must be finite and > 0, got -2.0"),
    (dict(tf_t=(1.0, -3.0)), "tf_t: the softcap must be finite and >= 0 .*, got -3.0"),
    (dict(tf_r=(1.0, math.inf)), "tf_r: the softcap must be finite and >= 0 .*, got inf"),
    (dict(tf_s=(math.nan, 1.0)), "tf_s: the logit scale must be finite and > 0, got nan"),
])
def test_bad_transform_errors(be, bad, match):
    s, t, r, _ = case(dev_of(be))
    with pytest.raises(ValueError, match=match):
        be.row_stats(s, t, r, None, inv_temp=1.0, **bad)
    rs = torch.zeros(s.shape[0], 4, device=s.device)
    with pytest.raises(ValueError, match=match):
        be.grad_logits(s, t, r, None, rs, rs[:, :2], kind="reverse_kl", inv_temp=1.0, **bad)


def test_transform_pair_type_error():
    with pytest.raises(TypeError, match="tf_s must be a \\(scale, cap\\) pair, got 'x'"):
        transform_consts("x", "tf_s")


def test_transform_consts():
    assert transform_consts(IDENTITY) == (False, 0.0, 1.0)
    assert transform_consts((2.0, None)) == (False, 0.0, 2.0)
    assert transform_consts((2.0, 4.0)) == (True, 0.5, 4.0)


# ------------------------------------------------------------------------------ fused (triton)
def _triton():
    pytest.importorskip("triton")
    from opd_kernels.backends import triton_backend as tb
    ok, why = tb.available()
    if not ok:
        pytest.skip(f"triton backend unavailable: {why}")
    return tb


def fused_models(N=11, V=203, ds=40, dt=24, dr=16):
    """(hs, ws, bs, ht, wt, bt, hr, wr, br): logits of std ~4; banned tokens through the biases
    (student and teacher 3, 77; reference 3), so every loss stays finite."""
    def model(d, ban):
        h = torch.randn(N, d, device=DEV)
        w = torch.randn(V, d, device=DEV) / math.sqrt(d) * 4
        b = torch.randn(V, device=DEV)
        b[ban] = -INF
        return h, w, b
    return (*model(ds, [3, 77]), *model(dt, [3, 77]), *model(dr, [3]))


FUSED_TFS = {"all": ((1.5, 3.0), (0.7, 2.0), (1.2, 5.0)), "scale_s": ((0.6, 0.0), (1.0, 3.0), IDENTITY)}


@pytest.mark.triton
@pytest.mark.parametrize("tfname", list(FUSED_TFS))
@pytest.mark.parametrize("kind", KINDS)
def test_fused(kind, tfname):
    """fused_row_stats (+ fused_jsd_sums) values and fused_grad (dh, dw, db) vs float64 autograd."""
    tb = _triton()
    tfs = FUSED_TFS[tfname]
    args = fused_models()
    N, V = args[0].shape[0], args[1].shape[0]
    y = torch.randint(0, V, (N,), device=DEV) + START
    y[0] = -100
    y[1] = START + 3  # banned by the student's bias: logprob -inf
    g = upstream(DEV, N)
    a64 = [x.double().requires_grad_(i < 3) for i, x in enumerate(args)]
    s, t, r = (a64[k] @ a64[k + 1].T + a64[k + 2] for k in (0, 3, 6))
    main, ent, A, B, C = f64_rows(s, t, r, y, kind, tfs)
    loss = (g[:, 0] * main + g[:, 1] * ent).sum()
    want = torch.autograd.grad(loss, a64[:3])

    on = list(args)
    if kind == "logprob":
        on[3:] = [None] * 6
    elif kind != "gopd":
        on[6:] = [None] * 3
    kw = call_kw(kind, tfs)
    yy = y if kind == "logprob" else None
    rows = finish(tb.fused_row_stats(*on, yy, **kw))
    if kind == "logprob":
        got_main = rows.logprob
        assert got_main[1] == -INF
    elif kind == "jsd":
        sums = tb.fused_jsd_sums(*on[:6], torch.stack([rows.A, rows.B], -1), inv_temp=kw["inv_temp"], beta=BETA,
                                 tf_s=tfs[0], tf_t=tfs[1])
        got_main = BETA * sums[:, 0] + (1 - BETA) * sums[:, 1]
    else:
        got_main = rows.forward_kl if kind == "forward_kl" else rows.reverse_kl
    keep = torch.arange(N, device=DEV) != 0
    reference.close(got_main[keep], main.detach()[keep], torch.float32)
    reference.close(rows.entropy, ent.detach(), torch.float32)

    rs = torch.stack([A, B, C, ent], -1).detach().float()
    dh, dw, db = tb.fused_grad(*on, yy, rs, g.float(), kind="reverse_kl" if kind == "gopd" else kind, beta=BETA,
                               need_dw=True, need_db=True, with_entropy=True, **kw)
    for got, exp in zip((dh, dw, db), want):
        reference.close(got, exp, torch.float32, "gemm_grad")
