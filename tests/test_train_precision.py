"""``--micro-batch-size`` (gradient accumulation equal to one big batch) and ``--dtype bf16``.

Micro-batches: for every method, on a Gemma2 student in float64 (`test_train_heads`), the loss and
the student's gradients accumulated over uneven micro-batches (3 + 3 + 2 completions) equal those
of the whole batch at once. bf16: the fused ops get bf16 hidden states and heads, the loss and the
gradients are fp32 and near the fp32 loss, and a run keeps fp32 weights and optimizer state.
"""
from __future__ import annotations

import json
import math
import random

import pytest
import torch
from safetensors.torch import load_file

import opd_kernels as ok
from opd_train import cli
from opd_train.methods import METHODS
from opd_train.step import accumulate, micro_batches
from opd_train.train import main
from test_train import SMOKE, smoke_models  # noqa: F401  (fixture)
from test_train_heads import VARIANTS, dirs, float64, setup  # noqa: F401  (fixtures)


def grads_of(method, batch, size):
    params = [p for p in method.tr.student.model.parameters()]
    for p in params:
        p.grad = None
    loss, extra = accumulate(method.tr, method, micro_batches(method, batch, size))
    return loss, [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in params], extra


def close(got, want):
    """Equal up to float32 rounding relative to the tensor's scale: HF's norms compute in float32 even in
    a float64 model, and the micro-batches' forward passes round differently from the whole batch's."""
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: "-".join(x.lstrip("-") for x in v))
def test_micro_batches_equal_one_big_batch(variant, dirs, tmp_path, float64):
    method, task = setup("gemma2", variant, dirs, tmp_path)
    batch = method.prepare(task.sample(random.Random(0), 8 // method.samples_per_prompt))
    if batch.advantages is not None:  # untrained models earn no reward: give the policy-gradient terms some signal
        batch.advantages = torch.randn(batch.advantages.shape, generator=torch.Generator().manual_seed(1))
    assert batch.seqs.completion.shape[0] == 8
    loss, grads, extra = grads_of(method, batch, None)
    assert len(micro_batches(method, batch, 3)) == 3
    loss_m, grads_m, extra_m = grads_of(method, batch, 3)
    torch.testing.assert_close(loss_m, loss, rtol=1e-10, atol=1e-13)
    assert any(g.abs().max() > 0 for g in grads)
    for g_m, g in zip(grads_m, grads):
        close(g_m, g)
    assert extra_m.keys() == extra.keys()
    for k in extra:
        assert extra_m[k] == pytest.approx(extra[k], rel=1e-9, abs=1e-12)


def test_gopd_domain_teachers_split_into_micro_batches(dirs, tmp_path, float64):
    """Two domain teachers: each micro-batch keeps only its own rows of each domain, renumbered."""
    method, task = setup("gemma2", ["gopd"], dirs, tmp_path)
    rows = torch.tensor([0, 2, 3, 6])
    batch = method.prepare(task.sample(random.Random(0), 2))
    h_t = batch.groups[""][1]
    batch.groups = {"a": (rows, h_t[rows]), "b": (torch.tensor([1, 4, 5, 7]), h_t[[1, 4, 5, 7]])}
    method.teachers = {"a": method.tr.teacher, "b": method.tr.teacher}
    part = method.split(batch, slice(3, 6))
    idx, h = part.groups["a"]
    assert idx.tolist() == [0] and torch.equal(h, h_t[[3]])
    assert part.groups["b"][0].tolist() == [1, 2]
    loss, grads, _ = grads_of(method, batch, None)
    loss_m, grads_m, _ = grads_of(method, batch, 3)
    torch.testing.assert_close(loss_m, loss, rtol=1e-10, atol=1e-13)
    for g_m, g in zip(grads_m, grads):
        close(g_m, g)


@pytest.mark.parametrize("variant", [["gkd"], ["opd"], ["sdpo", "--sdpo-topk", "5"]], ids=lambda v: v[0])
def test_bf16_fused_ops_get_bf16_and_return_fp32(variant, dirs, tmp_path, monkeypatch):
    seen = []
    for fn in ("fused_linear_distill_loss", "fused_linear_token_logprobs", "fused_linear_sparse_distill_loss"):
        real = getattr(ok, fn)
        monkeypatch.setattr(ok, fn, lambda *x, _real=real, **kw: seen.append(x) or _real(*x, **kw))
    method, task = setup("gemma2", [*variant, "--dtype", "bf16"], dirs, tmp_path)
    tr = method.tr
    assert tr.student.compute_dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in tr.student.model.parameters())
    batch = method.prepare(task.sample(random.Random(0), 8 // method.samples_per_prompt))
    seen.clear()
    loss, _ = method.loss(batch)
    assert seen and all(x.dtype == torch.bfloat16 for args in seen for x in args[:2])  # hidden, head weight
    assert loss.dtype == torch.float32
    loss.backward()
    assert all(p.grad.dtype == torch.float32 for p in tr.student.model.parameters() if p.grad is not None)
    # the same batch in fp32: close, not equal
    for lm in (tr.student, tr.teacher, getattr(getattr(method, "ema", None), "lm", None)):
        if lm is not None:
            lm.compute_dtype = None
    batch.old_logprobs = None
    loss32, _ = method.loss(batch)
    assert loss32.dtype == torch.float32 and float(loss) != float(loss32)
    assert float(loss) == pytest.approx(float(loss32), rel=5e-2, abs=1e-2)


def test_bf16_run_with_micro_batches_keeps_fp32_weights_and_optimizer_state(smoke_models, tmp_path):  # noqa: F811
    out = tmp_path / "run"
    assert main(["--method", "opd", *SMOKE, "--dtype", "bf16", "--micro-batch-size", "4", "--out", str(out)]) == 0
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2]
    assert all(math.isfinite(r["loss"]) for r in rows if "loss" in r)
    state = torch.load(out / "ckpt" / "state.pt", weights_only=False)
    moments = [v for s in state["optimizer"]["state"].values() for k, v in s.items() if k in ("exp_avg", "exp_avg_sq")]
    assert moments and all(m.dtype == torch.float32 for m in moments)
    weights = load_file(out / "ckpt" / "model" / "model.safetensors")
    assert weights and all(w.dtype == torch.float32 for w in weights.values())


def test_micro_batch_size_in_help():
    text = cli.build_parser().format_help()
    assert "--micro-batch-size" in text and "--dtype {fp32,bf16}" in text
    assert METHODS  # the registry is intact


def test_served_teacher_scores_split_into_micro_batches(dirs, tmp_path, float64):
    """A --teacher-server batch carries the teacher's top-k per row in ``batch.served`` (a dict):
    micro-batches cut it by rows too, so GKD's sparse loss and gradients equal the whole batch's."""
    from opd_train import rollout as R

    method, task = setup("gemma2", ["gkd"], dirs, tmp_path)
    batch = method.prepare(task.sample(random.Random(0), 8 // method.samples_per_prompt))
    ids, lps = R.teacher_topk(method.tr.teacher.head, batch.teacher_hidden, 5)
    batch.teacher_hidden, batch.served = None, {"topk_ids": ids, "topk_logprobs": lps}
    assert method.split(batch, slice(0, 3)).served["topk_ids"].shape[0] == 3
    loss, grads, _ = grads_of(method, batch, None)
    loss_m, grads_m, _ = grads_of(method, batch, 3)
    torch.testing.assert_close(loss_m, loss, rtol=1e-10, atol=1e-13)
    for g_m, g in zip(grads_m, grads):
        close(g_m, g)
