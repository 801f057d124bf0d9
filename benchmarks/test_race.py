"""race.py end to end on a tiny shape (one compiled provider: cce), and race_report's ratios and
verdicts on synthetic rounds. No timing is checked."""
import pytest

import race
import race_report


def _entry(op, ours, peers, naive=None, floor=None, mem=(100.0, 90.0), first=(5000.0, 6000.0)):
    """One race.json case: per-round fwd+bwd totals (as [fwd, 0]) for ours, peers, naive, floor."""
    def prov(ts, **kw):
        return dict(rounds_ms=[[t, 0.0] for t in ts], median_ms=sorted(ts)[len(ts) // 2], **kw)

    provs = {"torch": prov(ours, peak_mem_mb=mem[0], first_call_ms=first[0])}
    for i, (name, ts) in enumerate(peers.items()):
        provs[name] = prov(ts, peak_mem_mb=mem[1] * (i + 1), first_call_ms=first[1] * (i + 1))
    if naive:
        provs["naive"] = prov(naive, peak_mem_mb=1000.0, first_call_ms=100.0)
    if floor:
        provs["floor"] = prov(floor)
    return race_report.analyze(dict(op=op, N=64, V=512, d=32, rounds=len(ours), providers=provs, skipped=[]))


def test_ratio_is_the_median_of_per_round_ratios():
    # ours faster than the fastest peer in 2 of 3 rounds: ratios 10/11, 12/11, 9/10 -> median 10/11
    e = _entry("jsd", [10, 12, 9], {"liger_chunked": [11, 11, 10], "trl": [30, 30, 30]},
               naive=[1, 1, 1], floor=[8, 8, 8])
    assert e["fastest_peer"] == "liger_chunked"  # naive is faster but is not a peer
    assert e["ours"]["ratio_vs_fastest_peer"] == pytest.approx(10 / 11)
    assert e["verdicts"]["time"] is True
    # per-round ratios 10/9, 10/11, 12/11.5 -> median 1.043 (short), where the ratio of the
    # medians (10/11) would pass
    e2 = _entry("jsd", [10, 10, 12], {"liger_chunked": [9, 11, 11.5]})
    assert e2["ours"]["ratio_vs_fastest_peer"] == pytest.approx(12 / 11.5)
    assert e2["verdicts"]["time"] is False


def test_memory_and_first_call_against_the_fastest_peer():
    e = _entry("reverse_kl", [10, 10, 10], {"liger_chunked": [11, 11, 11]}, mem=(100.0, 90.0), first=(5e3, 6e3))
    assert e["ours"]["mem_ratio"] == pytest.approx(100 / 90) and e["verdicts"]["memory"] is False
    assert e["ours"]["first_call_ratio"] == pytest.approx(5 / 6) and e["verdicts"]["first_call"] is True
    e = _entry("reverse_kl", [10, 10, 10], {"liger_chunked": [11, 11, 11]}, mem=(90.0, 90.0), first=(7e3, 6e3))
    assert e["verdicts"]["memory"] is True and e["verdicts"]["first_call"] is False


@pytest.mark.parametrize("op,expect", [("jsd", True), ("reverse_kl", False), ("forward_kl", False),
                                       ("logprobs", False)])
def test_floor_target_is_1_4_for_jsd_else_1_2(op, expect):
    e = _entry(op, [10, 12, 9], {"trl": [20, 20, 20]}, floor=[8, 8, 8])  # ratios 1.25, 1.5, 1.125
    assert e["ours"]["floor_multiple"] == pytest.approx(1.25)
    assert e["ours"]["floor_target"] == (1.4 if op == "jsd" else 1.2)
    assert e["verdicts"]["floor"] is expect


def test_vs_naive_is_a_target_for_logprobs_only():
    lp = _entry("logprobs", [10, 10, 10], {"cce": [5, 5, 5]}, naive=[9, 11, 11])
    assert lp["ours"]["vs_naive"] == pytest.approx(10 / 11) and lp["verdicts"]["vs_naive"] is True
    kl = _entry("forward_kl", [10, 10, 10], {"trl": [5, 5, 5]}, naive=[9, 9, 9])
    assert kl["ours"]["vs_naive"] == pytest.approx(10 / 9) and kl["verdicts"]["vs_naive"] is None


def test_no_peer_or_no_floor_gives_no_verdict():
    e = _entry("jsd", [10, 10], {}, naive=[20, 20])
    assert e["fastest_peer"] is None and e["ours"]["ratio_vs_fastest_peer"] is None
    assert e["verdicts"] == {"time": None, "memory": None, "floor": None, "first_call": None, "vs_naive": None}


def test_rotation_starts_round_k_at_provider_k(monkeypatch):
    def build(op, div, p, dev):
        if p == "trl":
            raise RuntimeError("boom")
        return lambda x: x["student_hidden"].sum()

    monkeypatch.setattr(race.cases, "build", build)
    monkeypatch.setattr(race, "floor_fn", lambda op, N, V: lambda x: x["student_hidden"].sum())
    out = []
    race.race_worker(dict(op="fused_linear_token_logprobs", divergence=None, N=4, V=8, d=2, rounds=3,
                          providers=["torch", "naive", "trl", "floor"]), out.append)
    assert {"warm": "trl", "skipped": "warm-up failed: RuntimeError: boom"} in out
    assert [r["order"] for r in out if "round" in r] == [["torch", "naive", "floor"], ["naive", "floor", "torch"],
                                                           ["floor", "torch", "naive"]]
    assert all(len(r["ms"]) == 3 for r in out if "round" in r)


def test_race_end_to_end_tiny(tmp_path):
    out = tmp_path / "race.json"
    provs = ["torch", "torch_kept", "naive", "trl", "trl_chunked", "liger_chunked_eager", "cce"]
    data = race.main(["--out", str(out), "--shapes", "64,512,32", "--ops", "jsd", "logprobs", "--rounds", "1",
                      "--providers", *provs])
    m = data["meta"]
    assert {"device", "torch", "trl", "liger-kernel", "cut-cross-entropy", "git_sha", "loadavg_start", "loadavg_end",
            "memory", "cold_cache", "command"} <= set(m) and "partial" not in m
    by = {e["op"]: e for e in data["cases"]}
    assert set(by) == {"jsd", "logprobs"}
    for op, absent in (("jsd", {"torch_kept", "cce"}), ("logprobs", {"liger_chunked_eager"})):
        e = by[op]
        assert {s["provider"] for s in e["skipped"]} == absent, e["skipped"]
        assert {s["phase"] for s in e["skipped"]} == {"plan"}
        assert set(e["providers"]) == set(provs) - absent | {"floor"}
        for p, v in e["providers"].items():
            assert len(v["rounds_ms"]) == 1 and v["median_ms"] > 0, (op, p)
            if p != "floor":
                assert v["first_call_ms"] > 0 and v["peak_mem_mb"] is not None, (op, p)
        assert e["floor_ms"] > 0 and e["fastest_peer"] in set(provs) - {"torch", "torch_kept", "naive"}
        assert set(e["verdicts"]) == set(race_report.TARGETS)
    assert by["jsd"]["ours"]["floor_target"] == 1.4
    table = race_report.summary(data)
    assert table.count("| 64, 512, 32 |") == 2 and m["device"] in table
    assert "cce (cut-cross-entropy has no fused_linear_distill_loss" in table
    assert "Opt-in kept gradient" in table and "logprobs N=64 V=512: " in table


def test_torch_kept_opts_in_to_rule_4_for_the_call_only(monkeypatch):
    import cases
    import opd_kernels as ok
    from opd_kernels.ops import _decide
    seen = []
    monkeypatch.setattr(ok, "fused_linear_token_logprobs", lambda *a, **k: seen.append(_decide.KEEP_BYTES))
    before = _decide.KEEP_BYTES
    cases.build("fused_linear_token_logprobs", None, "torch_kept", "cpu")(
        dict(student_hidden=None, student_weight=None, targets=None))
    assert seen == [1 << 40] and _decide.KEEP_BYTES == before
    with pytest.raises(cases.Unavailable, match="per-token ops only"):
        cases.build("fused_linear_distill_loss", "jsd", "torch_kept", "cpu")
