"""Bad input raises ValueError/TypeError naming the argument and what was seen: tensors, options,
and the logit-transform options (``softcap`` / ``logit_scale``, per model ``student_`` / ``teacher_`` /
``ref_``) of every public op and module."""
import math

import pytest
import torch

import opd_kernels as ok
import opd_kernels.backends  # noqa: F401  (ok.backends.get)

S, T = torch.randn(4, 10), torch.randn(4, 10)
INF = math.inf
H, W, Y = torch.randn(4, 8), torch.randn(10, 8), torch.tensor([0, 1, 2, 3])
IDS, TLP = torch.zeros(4, 2, dtype=torch.long), torch.full((4, 2), -1.0)
POS = r"must be a finite number > 0 \(None: no softcap\), got "
SCALE = r": the logit scale must be finite and > 0, got "


@pytest.mark.parametrize("call,exc,pattern", [
    (lambda: ok.distill_loss(S, torch.randn(5, 10)), ValueError, r"leading dims.*\(4, 10\).*\(5, 10\)"),
    (lambda: ok.distill_loss(S, torch.randn(4, 12)), ValueError, r"student_logits has 10.*teacher_logits has 12"),
    (lambda: ok.distill_loss(S, T, temperature=0), ValueError, r"temperature.*0"),
    (lambda: ok.distill_loss(S, T, temperature=-1.5), ValueError, r"temperature.*-1.5"),
    (lambda: ok.distill_loss(S, T, divergence="jsd", beta=1.5), ValueError, r"beta.*\[0, 1\].*1.5"),
    (lambda: ok.distill_loss(S, T, divergence="kl"), ValueError, r"divergence.*'kl'"),
    (lambda: ok.distill_loss(S, T, reduction="avg"), ValueError, r"reduction.*'avg'"),
    (lambda: ok.distill_loss(S, T, impl="tpu"), ValueError, r"impl.*'tpu'"),
    (lambda: ok.distill_loss(S, T, impl="cuda"), ValueError, r"impl='cuda'.*(no CUDA device|not built)"),
    (lambda: ok.distill_loss(S.long(), T), TypeError, r"student_logits.*floating.*int64"),
    (lambda: ok.distill_loss(S, T.to(torch.complex64)), TypeError, r"teacher_logits.*floating.*complex64"),
    (lambda: ok.distill_loss(S, T, mask=torch.ones(4)), TypeError, r"mask.*bool.*float32"),
    (lambda: ok.distill_loss(S, T, mask=torch.ones(3, dtype=torch.bool)), ValueError, r"mask.*\(4,\).*\(3,\)"),
    (lambda: ok.distill_loss(S, T, vocab_size=11), ValueError, r"vocab_size.*11"),
    (lambda: ok.distill_loss(S, T.to("meta")), ValueError, r"one device.*student_logits on cpu.*meta"),
    (lambda: ok.token_logprobs(S, torch.tensor([0, 1, 10, 2])), ValueError, r"targets.*\[0, 10\).*\[10\]"),
    (lambda: ok.token_logprobs(S, torch.tensor([0, 1, -3, 2])), ValueError, r"targets.*-3"),
    (lambda: ok.token_logprobs(S, torch.zeros(4)), TypeError, r"targets.*integer.*float32"),
    (lambda: ok.token_logprobs(S, torch.zeros(5, dtype=torch.long)), ValueError, r"targets.*\(4,\).*\(5,\)"),
    (lambda: ok.gopd_loss(S, T, T, reward_scale=float("nan")), ValueError, r"reward_scale.*nan"),
    (lambda: ok.gopd_loss(S, T, torch.randn(4, 9)), ValueError, r"ref_logits has 9"),
    (lambda: ok.gopd_advantages(torch.zeros(3), torch.zeros(3), torch.zeros(4)), ValueError,
     r"old_logprobs.*\(3,\).*\(4,\)"),
    (lambda: ok.sparse_distill_loss(S, torch.zeros(4, 3, dtype=torch.long), torch.zeros(4, 2)), ValueError,
     r"teacher_topk_ids.*\(4, 3\).*\(4, 2\)"),
    (lambda: ok.sparse_distill_loss(S, torch.full((4, 2), 10), torch.zeros(4, 2)), ValueError, r"\[0, 10\)"),
    (lambda: ok.fused_linear_sparse_distill_loss(torch.randn(4, 8), torch.randn(10, 8),
                                                 torch.zeros(4, 3, dtype=torch.long), torch.zeros(4, 2)), ValueError,
     r"teacher_topk_ids.*\(4, 3\).*\(4, 2\)"),
    (lambda: ok.fused_linear_sparse_distill_loss(torch.randn(4, 8), torch.randn(10, 8), torch.full((4, 2), 10),
                                                 torch.zeros(4, 2)), ValueError, r"teacher_topk_ids.*\[0, 10\)"),
    (lambda: ok.fused_linear_sparse_distill_loss(torch.randn(4, 8), torch.randn(10, 7),
                                                 torch.zeros(4, 2, dtype=torch.long), torch.zeros(4, 2)), ValueError,
     r"weight.*\[V, d\].*8.*\(10, 7\)"),
    (lambda: ok.fused_linear_distill_loss(torch.randn(4, 8), torch.randn(10, 7), torch.randn(4, 8),
                                          torch.randn(10, 8)), ValueError, r"student_weight.*\[V, d\].*8.*\(10, 7\)"),
    (lambda: ok.fused_linear_distill_loss(torch.randn(4, 8), torch.randn(10, 8), torch.randn(3, 8),
                                          torch.randn(10, 8)), ValueError, r"teacher_hidden.*\(4,\).*\(3,\)"),
    (lambda: ok.fused_linear_distill_loss(torch.randn(4, 8), torch.randn(10, 8), torch.randn(4, 8),
                                          torch.randn(12, 8)), ValueError, r"10.*12.*vocab_size"),
    (lambda: ok.fused_linear_distill_loss(torch.randn(4, 8), torch.randn(10, 8), torch.randn(4, 8),
                                          torch.randn(10, 8), student_bias=torch.randn(9)), ValueError,
     r"student_bias.*\(10,\).*\(9,\)"),
    (lambda: ok.fused_linear_token_logprobs(torch.randn(4, 8), torch.randn(10, 8), torch.tensor([0, 1, 2, 10])),
     ValueError, r"targets.*\[0, 10\)"),
    # top-k "logprobs" above 0 (probabilities or logits passed by mistake) name the values seen
    (lambda: ok.sparse_distill_loss(S, torch.zeros(4, 2, dtype=torch.long), torch.tensor([[1.0, -2.0]] * 4)),
     ValueError, r"^teacher_topk_logprobs must be log-probabilities <= 0 .*got values \[1\.0\]$"),
    (lambda: ok.fused_linear_sparse_distill_loss(torch.randn(4, 8), torch.randn(10, 8),
                                                 torch.zeros(4, 2, dtype=torch.long), torch.full((4, 2), 0.5)),
     ValueError,
     r"teacher_topk_logprobs.*<= 0.*\[0\.5\]"),
    (lambda: ok.token_logprobs(S, torch.zeros(4, dtype=torch.long), process_group=ok.VocabShard(8, 12)), ValueError,
     r"VocabShard\(start=8, size_total=12\).*10 vocabulary entries"),
    (lambda: ok.sparse_distill_loss(S, torch.zeros(4, 2, dtype=torch.long), torch.zeros(4, 2),
                                    process_group=ok.VocabShard(-1, 10)), ValueError, r"VocabShard.start.*-1"),
    (lambda: ok.backends.get("tpu"), ValueError, r"impl.*'tpu'"),
    # logit transforms
    (lambda: ok.token_logprobs(S, Y, softcap=0.0), ValueError, r"^softcap " + POS + r"0\.0$"),
    (lambda: ok.token_logprobs(S, Y, softcap=-30), ValueError, r"^softcap " + POS + "-30$"),
    (lambda: ok.token_logprobs(S, Y, softcap=INF), ValueError, r"^softcap " + POS + "inf$"),
    (lambda: ok.token_logprobs(S, Y, softcap=math.nan), ValueError, r"^softcap " + POS + "nan$"),
    (lambda: ok.token_logprobs(S, Y, logit_scale=0), ValueError, r"^logit_scale" + SCALE + r"0\.0$"),
    (lambda: ok.token_logprobs(S, Y, logit_scale=-0.5), ValueError, r"^logit_scale" + SCALE + r"-0\.5$"),
    (lambda: ok.token_logprobs(S, Y, logit_scale=math.nan), ValueError, r"^logit_scale" + SCALE + "nan$"),
    (lambda: ok.token_logprobs(S, Y, softcap="30"), TypeError, r"^softcap must be a number or None, got str '30'$"),
    (lambda: ok.token_logprobs(S, Y, logit_scale=True), TypeError, r"^logit_scale must be a number.*bool True$"),
    (lambda: ok.token_logprobs(S, Y, softcap=torch.tensor(30.0)), TypeError, r"^softcap must be a number.*Tensor"),
    (lambda: ok.fused_linear_token_logprobs(H, W, Y, softcap=-1.0), ValueError, r"^softcap " + POS + r"-1\.0$"),
    (lambda: ok.fused_linear_token_logprobs(H, W, Y, logit_scale=INF), ValueError, r"^logit_scale" + SCALE + "inf$"),
    (lambda: ok.sparse_distill_loss(S, IDS, TLP, softcap=0), ValueError, r"^softcap " + POS + "0$"),
    (lambda: ok.sparse_distill_loss(S, IDS, TLP, logit_scale=-2), ValueError, r"^logit_scale" + SCALE + r"-2\.0$"),
    (lambda: ok.fused_linear_sparse_distill_loss(H, W, IDS, TLP, softcap=-3.0), ValueError, r"^softcap " + POS),
    (lambda: ok.fused_linear_sparse_distill_loss(H, W, IDS, TLP, logit_scale=0.0), ValueError, r"^logit_scale"),
    (lambda: ok.distill_loss(S, T, student_softcap=0.0), ValueError, r"^student_softcap " + POS + r"0\.0$"),
    (lambda: ok.distill_loss(S, T, teacher_softcap=-1.5), ValueError, r"^teacher_softcap " + POS + r"-1\.5$"),
    (lambda: ok.distill_loss(S, T, student_logit_scale=0), ValueError, r"^student_logit_scale" + SCALE + r"0\.0$"),
    (lambda: ok.distill_loss(S, T, teacher_logit_scale=math.nan), ValueError, r"^teacher_logit_scale" + SCALE),
    (lambda: ok.distill_loss(S, T, teacher_softcap=[30.0]), TypeError, r"^teacher_softcap must be a number.*list"),
    (lambda: ok.fused_linear_distill_loss(H, W, H, W, student_softcap=INF), ValueError, r"^student_softcap " + POS),
    (lambda: ok.fused_linear_distill_loss(H, W, H, W, teacher_logit_scale=-1.0), ValueError,
     r"^teacher_logit_scale" + SCALE + r"-1\.0$"),
    (lambda: ok.gopd_loss(S, T, T, reward_scale=1.5, ref_softcap=-2.0), ValueError, r"^ref_softcap " + POS),
    (lambda: ok.gopd_loss(S, T, T, ref_logit_scale=0.0), ValueError, r"^ref_logit_scale" + SCALE),  # lam = 1 too
    (lambda: ok.gopd_loss(S, T, T, student_softcap=0), ValueError, r"^student_softcap " + POS),
    (lambda: ok.fused_linear_gopd_loss(H, W, H, W, H, W, ref_softcap=0.0), ValueError, r"^ref_softcap " + POS),
    (lambda: ok.fused_linear_gopd_loss(H, W, H, W, H, W, reward_scale=2.0, teacher_logit_scale="2"), TypeError,
     r"^teacher_logit_scale must be a number or None, got str '2'$"),
    (lambda: ok.DistillLoss(student_softcap=-30.0), ValueError, r"^student_softcap " + POS + r"-30\.0$"),
    (lambda: ok.FusedLinearDistillLoss(teacher_logit_scale=0.0), ValueError, r"^teacher_logit_scale" + SCALE),
])
def test_bad_input(call, exc, pattern):
    with pytest.raises(exc, match=pattern):
        call()


def test_env_impl_is_validated(monkeypatch):
    monkeypatch.setenv("OPD_KERNELS_IMPL", "fast")
    with pytest.raises(ValueError, match="OPD_KERNELS_IMPL.*'fast'"):
        ok.distill_loss(S, T)


def test_topk_logprobs_rounding_slack():
    """A top-k logprob a hair above 0 (a producer's rounding, <= 1e-4) is accepted."""
    tlp = torch.tensor([[1e-5, -3.0]] * 4)
    assert torch.isfinite(ok.sparse_distill_loss(S, torch.tensor([[0, 1]] * 4), tlp))
    with pytest.raises(ValueError, match=r"teacher_topk_logprobs.*\[0\.0010"):
        ok.sparse_distill_loss(S, torch.tensor([[0, 1]] * 4), tlp + 1e-3)


def test_padded_vocab_with_vocab_size():
    loss = ok.fused_linear_distill_loss(torch.randn(4, 8), torch.randn(10, 8), torch.randn(4, 8),
                                        torch.randn(12, 8), vocab_size=10)
    assert torch.isfinite(loss)
