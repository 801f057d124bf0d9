"""Bad logit-transform options (``softcap`` / ``logit_scale``, per model ``student_`` / ``teacher_`` /
``ref_``) raise a ValueError/TypeError naming the argument and the value seen, on every public op
and module."""
import math

import pytest
import torch

import opd_kernels as ok

INF = math.inf
S2, T2 = torch.randn(4, 10), torch.randn(4, 10)
H, W, Y = torch.randn(4, 8), torch.randn(10, 8), torch.tensor([0, 1, 2, 3])
IDS, TLP = torch.zeros(4, 2, dtype=torch.long), torch.full((4, 2), -1.0)
POS = r"must be a finite number > 0 \(None: no softcap\), got "
SCALE = r": the logit scale must be finite and > 0, got "


@pytest.mark.parametrize("call,exc,pattern", [
    (lambda: ok.token_logprobs(S2, Y, softcap=0.0), ValueError, r"^softcap " + POS + r"0\.0$"),
    (lambda: ok.token_logprobs(S2, Y, softcap=-30), ValueError, r"^softcap " + POS + "-30$"),
    (lambda: ok.token_logprobs(S2, Y, softcap=INF), ValueError, r"^softcap " + POS + "inf$"),
    (lambda: ok.token_logprobs(S2, Y, softcap=math.nan), ValueError, r"^softcap " + POS + "nan$"),
    (lambda: ok.token_logprobs(S2, Y, logit_scale=0), ValueError, r"^logit_scale" + SCALE + r"0\.0$"),
    (lambda: ok.token_logprobs(S2, Y, logit_scale=-0.5), ValueError, r"^logit_scale" + SCALE + r"-0\.5$"),
    (lambda: ok.token_logprobs(S2, Y, logit_scale=math.nan), ValueError, r"^logit_scale" + SCALE + "nan$"),
    (lambda: ok.token_logprobs(S2, Y, softcap="30"), TypeError, r"^softcap must be a number or None, got str '30'$"),
    (lambda: ok.token_logprobs(S2, Y, logit_scale=True), TypeError, r"^logit_scale must be a number.*bool True$"),
    (lambda: ok.token_logprobs(S2, Y, softcap=torch.tensor(30.0)), TypeError, r"^softcap must be a number.*Tensor"),
    (lambda: ok.fused_linear_token_logprobs(H, W, Y, softcap=-1.0), ValueError, r"^softcap " + POS + r"-1\.0$"),
    (lambda: ok.fused_linear_token_logprobs(H, W, Y, logit_scale=INF), ValueError, r"^logit_scale" + SCALE + "inf$"),
    (lambda: ok.sparse_distill_loss(S2, IDS, TLP, softcap=0), ValueError, r"^softcap " + POS + "0$"),
    (lambda: ok.sparse_distill_loss(S2, IDS, TLP, logit_scale=-2), ValueError, r"^logit_scale" + SCALE + r"-2\.0$"),
    (lambda: ok.fused_linear_sparse_distill_loss(H, W, IDS, TLP, softcap=-3.0), ValueError, r"^softcap " + POS),
    (lambda: ok.fused_linear_sparse_distill_loss(H, W, IDS, TLP, logit_scale=0.0), ValueError, r"^logit_scale"),
    (lambda: ok.distill_loss(S2, T2, student_softcap=0.0), ValueError, r"^student_softcap " + POS + r"0\.0$"),
    (lambda: ok.distill_loss(S2, T2, teacher_softcap=-1.5), ValueError, r"^teacher_softcap " + POS + r"-1\.5$"),
    (lambda: ok.distill_loss(S2, T2, student_logit_scale=0), ValueError, r"^student_logit_scale" + SCALE + r"0\.0$"),
    (lambda: ok.distill_loss(S2, T2, teacher_logit_scale=math.nan), ValueError, r"^teacher_logit_scale" + SCALE),
    (lambda: ok.distill_loss(S2, T2, teacher_softcap=[30.0]), TypeError, r"^teacher_softcap must be a number.*list"),
    (lambda: ok.fused_linear_distill_loss(H, W, H, W, student_softcap=INF), ValueError, r"^student_softcap " + POS),
    (lambda: ok.fused_linear_distill_loss(H, W, H, W, teacher_logit_scale=-1.0), ValueError,
     r"^teacher_logit_scale" + SCALE + r"-1\.0$"),
    (lambda: ok.gopd_loss(S2, T2, T2, reward_scale=1.5, ref_softcap=-2.0), ValueError, r"^ref_softcap " + POS),
    (lambda: ok.gopd_loss(S2, T2, T2, ref_logit_scale=0.0), ValueError, r"^ref_logit_scale" + SCALE),  # lam = 1 too
    (lambda: ok.gopd_loss(S2, T2, T2, student_softcap=0), ValueError, r"^student_softcap " + POS),
    (lambda: ok.fused_linear_gopd_loss(H, W, H, W, H, W, ref_softcap=0.0), ValueError, r"^ref_softcap " + POS),
    (lambda: ok.fused_linear_gopd_loss(H, W, H, W, H, W, reward_scale=2.0, teacher_logit_scale="2"), TypeError,
     r"^teacher_logit_scale must be a number or None, got str '2'$"),
    (lambda: ok.DistillLoss(student_softcap=-30.0), ValueError, r"^student_softcap " + POS + r"-30\.0$"),
    (lambda: ok.FusedLinearDistillLoss(teacher_logit_scale=0.0), ValueError, r"^teacher_logit_scale" + SCALE),
])
def test_bad_transform(call, exc, pattern):
    with pytest.raises(exc, match=pattern):
        call()
