"""``--fsdp`` under torchrun (FSDP2, gloo on CPU): equal to one process, DCP checkpoints, resume, export."""
from __future__ import annotations

import json
import math
import os
import sys

import pytest
import torch
from safetensors.torch import load_file

from opd_train.export import main as export_main
from test_train import ROOT, SMOKE, one_line_error, rows, run_subprocess, smoke_models  # noqa: F401  (fixture)

PORT = 29500 + os.getpid() % 400


def torchrun(args: list[str], port: int, timeout: int = 400):
    return run_subprocess([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_port", str(port), *args], timeout=timeout)


@pytest.mark.parametrize("family", ["qwen2", "gemma2"])  # gemma2: tied embeddings and a softcap
def test_two_sharded_ranks_equal_one_process(family, tmp_path):
    out = tmp_path / "result.json"
    r = torchrun([str(ROOT / "tests" / "fsdp_equivalence.py"), str(out), family], PORT + (family == "gemma2") * 7)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(out.read_text())
    sharded, single = res["sharded"], res["single"]
    assert sharded["shard_numel"] < sharded["numel"]  # each rank holds a shard, not the whole student
    assert sharded["loss"] == pytest.approx(single["loss"], rel=1e-5)
    moved = 0
    for name, want in single["params"].items():
        got, init = torch.tensor(sharded["params"][name]), torch.tensor(res["initial"][name])
        want = torch.tensor(want)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))
        moved += int(not torch.equal(want, init))
    assert moved == len(single["params"])  # the step changed every parameter


RUN = ["-m", "opd_train", "--method", "opd", *SMOKE, "--fsdp", "--eval-size", "8", "--save-every", "1"]


def test_fsdp_trains_checkpoints_resumes_and_exports(smoke_models, tmp_path):  # noqa: F811
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    r = torchrun([*RUN, "--steps", "3", "--out", str(straight)], PORT + 1)
    assert r.returncode == 0, r.stderr[-3000:]
    r = torchrun([*RUN, "--steps", "2", "--out", str(resumed)], PORT + 2)
    assert r.returncode == 0, r.stderr[-3000:]
    ckpt = resumed / "ckpt"
    assert (ckpt / "dcp" / ".metadata").is_file() and not (ckpt / "model" / "model.safetensors").exists()
    exported = tmp_path / "exported"
    assert export_main([str(ckpt), str(exported)]) == 0
    r = torchrun([*RUN, "--steps", "3", "--out", str(resumed), "--resume"], PORT + 3)
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = [x for x in rows(straight) if "loss" in x], [x for x in rows(resumed) if "loss" in x]
    assert [x["step"] for x in b] == [1, 2, 3]
    assert all(math.isfinite(x["loss"]) for x in a)
    assert b[2]["loss"] == a[2]["loss"] and b[2]["reward"] == a[2]["reward"]  # resumed exactly
    # the export after step 2 is a plain HF directory with trained (changed) weights
    weights = load_file(exported / "model.safetensors")
    initial = load_file(smoke_models["student"] / "model.safetensors")
    assert weights.keys() == initial.keys()
    assert any(not torch.equal(weights[k], initial[k]) for k in weights)
    from transformers import AutoModelForCausalLM
    assert AutoModelForCausalLM.from_pretrained(exported).num_parameters() > 0


def test_fsdp_needs_torchrun(capsys, monkeypatch):
    from opd_train.train import main
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(SystemExit):
        main(["--fsdp", "--preset", "smoke"])
    assert "--fsdp runs under torchrun" in one_line_error(capsys)


def test_export_of_something_that_is_not_a_checkpoint(tmp_path, capsys):
    assert export_main([str(tmp_path), str(tmp_path / "x")]) == 2
    assert "not a checkpoint" in capsys.readouterr().err


def test_fsdp_with_bf16_micro_batches_and_an_ema_self_teacher(smoke_models, tmp_path):  # noqa: F811
    """SDPO (its EMA teacher copies the sharded student whole and tracks it), bf16 mixed precision and
    micro-batches (gradients reduce-scattered after the last) under --fsdp."""
    out = tmp_path / "run"
    r = torchrun([*RUN, "--method", "sdpo", "--dtype", "bf16", "--micro-batch-size", "4", "--out", str(out)], PORT + 4)
    assert r.returncode == 0, r.stderr[-3000:]
    train = [x for x in rows(out) if "loss" in x]
    assert [x["step"] for x in train] == [1, 2] and all(math.isfinite(x["loss"]) for x in train)
    assert (out / "ckpt" / "dcp" / ".metadata").is_file()


def test_fsdp_gemma2_self_teacher_and_export_keeps_the_tied_head(tmp_path):
    """A Gemma2 student (tied embeddings, softcap) under --fsdp with SDFT's EMA teacher; the export keeps
    the tie and the config's softcap."""
    from test_train_heads import build
    from opd_train.tokenizer import build_char_tokenizer
    tok, student, out = build_char_tokenizer(), tmp_path / "gemma2", tmp_path / "run"
    build("gemma2", tok, 0).save_pretrained(student)
    tok.save_pretrained(student)
    r = torchrun([*RUN, "--method", "sdft", "--student", str(student), "--out", str(out)], PORT + 5)
    assert r.returncode == 0, r.stderr[-3000:]
    assert export_main([str(out), str(tmp_path / "hf")]) == 0
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    assert model.config.final_logit_softcapping == 2.0
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    initial = load_file(student / "model.safetensors")
    assert any(not torch.equal(v, initial[k]) for k, v in load_file(tmp_path / "hf" / "model.safetensors").items())


def test_ddp_micro_batches_stay_in_sync(smoke_models, tmp_path):  # noqa: F811
    """The DDP path (no --fsdp) with micro-batches: gradients all-reduced after the last micro-batch only
    (no_sync before it); the checkpoint's weights-in-sync check across processes passes."""
    out = tmp_path / "ddp"
    r = torchrun(["-m", "opd_train", "--method", "grpo", *SMOKE, "--eval-size", "8", "--save-every", "1",
                  "--micro-batch-size", "3", "--out", str(out)], PORT + 6)
    assert r.returncode == 0, r.stderr[-3000:]
    assert [x["step"] for x in rows(out) if "loss" in x] == [1, 2]
    assert (out / "ckpt" / "model" / "model.safetensors").is_file()  # DDP: a plain HF checkpoint
