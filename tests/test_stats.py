"""The row-statistics algebra the primitives feed (``opd_kernels/_stats.py``): vocabulary shards merged
with ``rebase`` keep one pass's accuracy and ``-inf`` semantics, and the saved row state of the tests'
oracle (``reference.saved_row_state``) is the one the ops save."""
import pytest
import torch

import reference
from helpers import DEV
from opd_kernels._stats import finish, rebase
from opd_kernels.backends import torch_backend


def test_shard_merge_keeps_offset_accuracy_and_inf_semantics():
    """Uneven vocab shards merged with ``_stats.rebase`` (what ``merge_shards`` does after its
    MAX all-reduce): the same accuracy as one pass, and shards where a model has only -inf
    contribute 0, or +inf where the math says so."""
    N, V, cuts = 12, 4001, [0, 1000, 2500, 4001]
    s = torch.randn(N, V) * 2 + 50
    t = s + 0.01 * torch.randn_like(s)
    s[0, :1000] = -float("inf")           # the teacher supports shard 0, the student not: forward = inf
    t[1, 1000:2500] = -float("inf")       # the reverse: reverse = inf
    s[2, 2500:], t[2, 2500:] = -float("inf"), -float("inf")   # both empty on shard 2
    parts = torch.stack([torch_backend.row_stats(s[:, i:j], t[:, i:j], None, None, inv_temp=1.0)
                         for i, j in zip(cuts, cuts[1:])])
    m_a, m_b = parts[..., 0].amax(0), parts[..., 3].amax(0)
    stats = rebase(parts, m_a, m_b).sum(0)
    stats[:, 0], stats[:, 3] = m_a, m_b
    merged = finish(stats)
    whole = finish(torch_backend.row_stats(s, t, None, None, inv_temp=1.0))
    exact = reference.rows_f64(s, t)
    assert merged.forward_kl[0] == float("inf") and merged.reverse_kl[1] == float("inf")
    for name in ("reverse_kl", "forward_kl", "entropy"):
        got, one, want = getattr(merged, name), getattr(whole, name), exact[name]
        fin = torch.isfinite(want)
        assert torch.equal(torch.isfinite(got), fin) and not got.isnan().any()
        err = ((got[fin].double() - want[fin]).abs() / want[fin].abs()).max().item()
        one_err = ((one[fin].double() - want[fin]).abs() / want[fin].abs()).max().item()
        assert err <= 2 * one_err + 1e-6, f"{name}: merged {err:.2e}, one pass {one_err:.2e}"


@pytest.mark.parametrize("kind,gopd", [("logprob", False), ("forward_kl", False), ("reverse_kl", False),
                                       ("jsd", False), ("reverse_kl", True)])
def test_oracle_saved_row_state_matches_the_ops(kind, gopd):
    """The backend-primitive tests feed ``reference.saved_row_state`` to ``grad_logits``: it must be the
    (A, B, C, H) the ops save (``_stats.finish`` of the torch backend's statistics, C from ``jsd_sums``)."""
    N, V, inv_temp, lam, beta = 9, 301, 1 / 0.8, 1.5, 0.35
    s = (torch.randn(N, V, device=DEV) * 2.0).double()
    t = None if kind == "logprob" else (torch.randn(N, V, device=DEV) * 2.0).double()
    r = (torch.randn(N, V, device=DEV) * 2.0).double() if gopd else None
    s[2, :20] = -float("inf")
    if t is not None:
        t[2, 5:30] = -float("inf")
        s[3, 40:50], t[3, 40:50] = -float("inf"), -float("inf")
    rows = finish(torch_backend.row_stats(s, t, r, None, inv_temp=inv_temp, lam=lam))
    C = torch.zeros_like(rows.A)
    if kind == "reverse_kl":
        C = rows.reverse_kl
    elif kind == "jsd":
        C = torch_backend.jsd_sums(s, t, torch.stack([rows.A, rows.B], -1), inv_temp=inv_temp, beta=beta)[:, 1]
    want = torch.stack([rows.A, rows.B, C, rows.entropy], -1)
    got = reference.saved_row_state(s, t, r, kind, inv_temp, lam=lam, beta=beta)
    assert torch.equal(torch.isinf(got), torch.isinf(want))
    fin = torch.isfinite(want)
    reference.close(got[fin], want[fin], torch.float64)
