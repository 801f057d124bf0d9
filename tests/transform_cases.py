"""The logit-transform axis of the op suites (``test_ops.py``, ``test_fused_linear.py``,
``test_compiled.py``, ``test_trl.py``): ``softcap=`` / ``logit_scale=`` (single-model ops) and
``{student,teacher,ref}_softcap`` / ``_logit_scale`` (two/three-model ops) as parametrize cases
``(impl, transform, dtype)``: torch (float64 and float32), triton (the interpreter on CPU, small
shapes, the configs in ``TRITON``), cuda (marked, skipped without a GPU).

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

import reference as oracle
from helpers import DEV
from reference import softcap_f64

INF = math.inf
INTERPRETER_WARNINGS = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's tl.where
N, V, D, DT = 9, 331, 24, 16  # small: the triton interpreter runs every case
TEMP, LAM, BETA = 0.8, 1.4, 0.3
BAN = [3, 50]  # columns banned through the fused ops' biases (student and teacher)

# config -> {model: (softcap, logit_scale)}; None = absent
SINGLE = {"cap": {"student": (2.5, None)}, "scale": {"student": (None, 0.6)}, "both": {"student": (2.0, 1.7)}}
PAIR = {"cap_s": {"student": (2.5, None)}, "scale_s": {"student": (None, 0.6)}, "both_s": {"student": (2.0, 1.7)},
        "cap_t": {"teacher": (1.5, None)}, "scale_t": {"teacher": (None, 1.8)}, "both_t": {"teacher": (3.0, 0.5)}}
GOPD = dict(PAIR, ref={"ref": (1.2, 0.9)}, all={"student": (2.0, 1.7), "teacher": (3.0, 0.5), "ref": (4.0, 0.7)})
TRITON = {"both", "both_s", "both_t"}  # the interpreter is slow: these cover every model's transform


def params(configs, triton=TRITON):
    """``(impl, transform, dtype)`` cases of ``configs`` (a dict above)."""
    out = []
    for name in configs:
        out += [pytest.param("torch", name, torch.float64, id=f"torch-f64-{name}"),
                pytest.param("torch", name, torch.float32, id=f"torch-f32-{name}"),
                pytest.param("cuda", name, torch.float32, marks=pytest.mark.cuda, id=f"cuda-{name}")]
        if name in triton:
            out.append(pytest.param("triton", name, torch.float32, marks=[pytest.mark.triton, INTERPRETER_WARNINGS],
                                    id=f"triton-{name}"))
    return out


def kw(cfg, single=False) -> dict:
    """The public keyword arguments of ``cfg``."""
    out = {}
    for side, (cap, scale) in cfg.items():
        p = "" if single else f"{side}_"
        if cap is not None:
            out[p + "softcap"] = cap
        if scale is not None:
            out[p + "logit_scale"] = scale
    return out


def tf(x, cfg, side):
    """The oracle's transform of ``side``'s float64 logits."""
    cap, scale = cfg.get(side, (None, None))
    return softcap_f64(x, 1.0 if scale is None else scale, cap or 0.0)


def logits(seed, dtype, dev=DEV):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, V, generator=g, dtype=torch.float64) * 3
    x[3, :10] = -INF  # banned by every model (student, teacher, reference)
    x[5, 100:105] = -INF
    return x.to(dev, dtype)


def models(dtype, dev=DEV):
    """(hs, ws, bs, ht, wt, bt, hr, wr): banned columns through the student's and teacher's bias."""
    g = torch.Generator().manual_seed(5)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    hs, ws, bs = r(N, D), r(V, D) * (2 / D ** 0.5), r(V)
    ht, wt, bt = r(N, DT), r(V, DT) * (2 / DT ** 0.5), r(V)
    hr, wr = r(N, D), r(V, D) * (2 / D ** 0.5)
    bs[BAN] = -INF
    bt[BAN] = -INF
    return [x.to(dev, dtype) for x in (hs, ws, bs, ht, wt, bt, hr, wr)]


def targets(banned, dev=DEV):
    """Targets of no banned token (see ``logits``, ``BAN``), but in row 3: ``banned`` (logprob -inf)."""
    y = torch.randint(11, 100, (N,), generator=torch.Generator().manual_seed(3))
    y[1] = -100
    y[3] = banned
    return y.to(dev)


def leaves(xs, grad_of):
    """(op inputs, float64 oracle inputs), the ones in ``grad_of`` requiring grad."""
    ours = [x.detach().clone().requires_grad_(i in grad_of) for i, x in enumerate(xs)]
    refs = [x.detach().double().cpu().requires_grad_(i in grad_of) for i, x in enumerate(xs)]
    return ours, refs


def check(out, want, ours, refs, dtype, keep=None):
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


def topk(seed, ban_col):
    """Random distinct top-k ids (row 3 holds a column the student bans) and finite teacher logprobs."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(V, generator=g)[:6] for _ in range(N)])
    ids[3, 0] = ban_col if ban_col not in ids[3, 1:] else ids[3, 0]
    tlp = torch.log_softmax(torch.randn(N, V, generator=g, dtype=torch.float64), -1).gather(1, ids)
    return ids.to(DEV), tlp


def divergences(impl):
    return ("jsd",) if impl == "triton" else ("forward_kl", "reverse_kl", "jsd")


def fused_runs(impl, cfg_name):
    """(divergence, reduction) pairs: every divergence with a masked mean (gradients computed in
    forward) and per-token (gradients in backward); in the interpreter one pair per config."""
    if impl == "triton":
        return [("jsd", "mean" if cfg_name.endswith("_s") else "none")]
    return [(div, red) for div in divergences(impl) for red in ("mean", "none")]


def fused_oracle(refs, cfg, div, mask, reduction, ref_model=False):
    s = refs[0] @ refs[1].T + refs[2]
    t = refs[3] @ refs[4].T + refs[5]
    extra = {}
    if ref_model:
        extra = dict(r=tf(refs[6] @ refs[7].T, cfg, "ref"), lam=LAM)
    rows = oracle.divergence_rows(tf(s, cfg, "student"), tf(t, cfg, "teacher"), div, BETA, TEMP, **extra)
    return oracle.reduce(rows, mask.cpu(), reduction)


