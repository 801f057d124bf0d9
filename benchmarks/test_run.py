"""Plumbing of run.py / table.py without timing: the plan, the targets' pass/short logic, rendering."""
import argparse

import pytest

import report
import run
import table


def _args(**kw):
    a = dict(quick=True, shapes=None, ops=list(run.OPS), providers=list(run.PROVIDERS), dtype="float32",
             device="cpu", no_large=False)
    a.update(kw)
    return argparse.Namespace(**a)


def test_quick_plan_has_the_large_shape_for_ours_and_peers_only():
    todo = run.plan(_args())
    large = [c for c in todo if (c["N"], c["V"], c["d"]) == run.QUICK["large"][0]]
    assert large and {c["op"] for c in large} == {op for op in run.OPS if op.startswith("fused_linear_")}
    assert not {c["provider"] for c in large} & {"naive", "naive_compile"}
    assert {"torch", "liger_chunked", "cce", "trl"} <= {c["provider"] for c in large}
    # peers skip the second V (a recompile for the compiled ones)
    assert not [c for c in todo if c["provider"] in run.PEERS and c["V"] != run.QUICK["peer_V"]]
    assert not [c for c in run.plan(_args(no_large=True)) if c["N"] == run.QUICK["large"][0][0] and c["d"]]


def test_plan_shapes_replace_the_sweep():
    todo = run.plan(_args(shapes=["64,500,32"], ops=["fused_linear_distill_loss"], providers=["torch", "trl"]))
    assert {(c["N"], c["V"], c["d"]) for c in todo} == {(64, 500, 32)}
    assert {c["divergence"] for c in todo} == {"forward_kl", "reverse_kl", "jsd"}


def _row(op, div, prov, N, ms, mb, **kw):
    return dict(op=op, divergence=div, provider=prov, N=N, V=1000, d=16 if op.startswith("fused") else 0,
                dtype="float32", median_ms=ms, p20_ms=ms, p80_ms=ms, peak_mem_mb=mb, **{"pass": "fwd+bwd"}, **kw)


@pytest.mark.parametrize("ours_ms,ours_mb,expect", [(9.0, 10.0, True), (11.0, 10.0, False), (9.0, 30.0, False)])
def test_targets_vs_fastest_peer_and_floor(ours_ms, ours_mb, expect):
    op = "fused_linear_distill_loss"
    rows = [_row(op, "jsd", "torch", 512, ours_ms, ours_mb, floor_ms=7.0, floor_multiple=ours_ms / 7.0, gemm_passes=4),
            _row(op, "jsd", "liger_chunked", 512, 10.0, 20.0), _row(op, "jsd", "trl", 512, 40.0, 5.0),
            _row(op, "jsd", "torch", 128, 1.0, 1.0)]  # smaller shape: not the one checked
    ts = report.targets(rows, log=lambda m: None)
    peer = next(t for t in ts if t["kind"] == "vs_fastest_peer")
    assert (peer["N"], peer["peer"], peer["passed"]) == (512, "liger_chunked", expect)
    floor = next(t for t in ts if t["kind"] == "gemm_floor")
    assert floor["target"] == 1.4 and floor["passed"] == (ours_ms / 7.0 <= 1.4)


def test_targets_logits_level_vs_naive_and_no_peer():
    rows = [_row("distill_loss", "forward_kl", "torch", 256, 5.0, 1.0), _row("distill_loss", "forward_kl", "naive", 256, 4.0, 9.0),
            _row("fused_linear_gopd_loss", "gopd", "torch", 256, 5.0, 1.0, floor_ms=2.0, floor_multiple=2.5, gemm_passes=5)]
    ts = report.targets(rows, log=lambda m: None)
    naive = next(t for t in ts if t["kind"] == "vs_naive")
    assert naive["time_ratio"] == 1.25 and naive["passed"] is False
    gopd = next(t for t in ts if t["kind"] == "gemm_floor")
    assert gopd["target"] is None and gopd["passed"] is None  # G-OPD: shown, no target
    assert not [t for t in ts if t["kind"] == "vs_fastest_peer"]  # no peer measured


def test_table_shows_peers_floor_and_targets():
    op = "fused_linear_token_logprobs"
    rows = [_row(op, None, "torch", 512, 9.0, 10.0, floor_ms=7.0, floor_multiple=9.0 / 7.0, gemm_passes=3,
                 first_call_ms=50.0, first_step_ms=23456.0),
            _row(op, None, "cce", 512, 10.0, 20.0, first_call_ms=12345.0), _row(op, None, "naive", 512, 10.0, 20.0)]
    meta = dict(device="cpu", torch="x", date="2026-01-01", ratio_check=None,
                targets=report.targets(rows, log=lambda m: None), first_call=report.first_calls(rows))
    text = table.render(dict(meta=meta, results=rows, skipped=[]))
    head = next(line for line in text.splitlines() if line.startswith("| op"))
    assert "cce ms" in head and "torch x floor" in head
    assert "| 1.29 |" in text and "vs fastest peer `cce`" in text
    # first calls: ours beside the peers, with our compile in the first full-size step
    assert f"| {op} | - | cce | 12.3 | - (512) |" in text
    assert f"| {op} | - | torch | 0.1 | 23.5 (512) |" in text


def test_vs_naive_targets_name_their_baseline():
    rows = [_row("distill_loss", "jsd", "torch", 256, 5.0, 1.0), _row("distill_loss", "jsd", "naive", 256, 10.0, 1.0),
            _row("distill_loss", "jsd", "naive_compile", 256, 4.0, 1.0)]
    ts = {t["baseline"]: t for t in report.targets(rows, log=lambda m: None) if t["kind"] == "vs_naive"}
    assert ts["naive"]["time_ratio"] == 0.5 and ts["naive"]["passed"]
    assert ts["naive_compile"]["time_ratio"] == 1.25 and not ts["naive_compile"]["passed"]
    text = table.render(dict(meta=dict(device="cpu", torch="x", date="2026-01-01", targets=list(ts.values())),
                             results=rows, skipped=[]))
    assert "vs `naive` time 0.50x" in text and "vs `naive_compile` time 1.25x" in text
