"""``--teacher-server``: the client (bounded, logged retry; one-line errors), the validation of
every answer, the scores against the in-process teacher, and training end to end -- against a
stand-in for vLLM's server on 127.0.0.1 (``fake_teacher_server``), so no vLLM is needed."""
from __future__ import annotations

import json
import math
import random
import re
import socket
from types import SimpleNamespace

import pytest
import torch

from fake_teacher_server import FakeTeacherServer
from opd_train import cli, inputs
from opd_train import rollout as R
from opd_train.models import PRETRAIN_SEED, get_pretrained
from opd_train.server_client import Client, ServerError
from opd_train.server_response import BadResponse, choices_in_order, completion_scores, position_scores
from opd_train.server_teacher import ServerTeacher
from opd_train.task import ArithmeticTask
from opd_train.train import main

SMOKE = ["--preset", "smoke", "--steps", "2", "--eval-every", "2", "--save-every", "2", "--eval-size", "16"]


@pytest.fixture(scope="module")
def smoke():
    p = cli.PRESETS["smoke"]
    task = ArithmeticTask(p["digits"], p["ops"], eval_size=16)
    paths = {role: get_pretrained(role, p[role], task, PRETRAIN_SEED) for role in ("teacher", "student")}
    tok = inputs.load_tokenizer("--teacher", paths["teacher"], print)
    teacher = inputs.load_model("--teacher", paths["teacher"], torch.device("cpu")).eval()
    return SimpleNamespace(paths=paths, tok=tok, teacher=teacher, task=task)


@pytest.fixture
def server(smoke):
    with FakeTeacherServer(smoke.teacher, smoke.tok) as s:
        yield s


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("python -m opd_train: error: ") and "\n" not in err, err
    return err


# -- the client: retry, errors ---------------------------------------------------------------------
def test_unreachable_server_is_one_line_after_logged_retries():
    logs = []
    c = Client(f"http://127.0.0.1:{free_port()}", retries=2, log=logs.append, sleep=lambda s: None)
    with pytest.raises(ServerError, match=r"^teacher server http://127.0.0.1:\d+/v1/models: unreachable after 3 tries "
                                          r"\(ConnectionRefusedError: .*\); is the server running\? \(timeout 60 s "
                                          r"per try\)$"):
        c.get("/v1/models")
    assert len(logs) == 2 and all(line.startswith("warning: teacher server ") and "retry" in line for line in logs)
    assert "retry 1 of 2 in 0.5 s" in logs[0] and "retry 2 of 2 in 1 s" in logs[1]


def test_server_errors_are_retried_then_succeed_or_fail(server):
    logs = []
    c = Client(server.url, retries=2, log=logs.append, sleep=lambda s: None)
    server.fail_next = 2
    assert c.get("/v1/models")["data"][0]["id"] == "teacher"
    assert len(logs) == 2 and "HTTP 503" in logs[0]
    server.fail_next = 3
    with pytest.raises(ServerError,
                       match=r"/v1/models: unreachable after 3 tries \(HTTP 503 \(\{\"error\": \"busy\"\}\)\)"):
        c.get("/v1/models")


def test_client_error_is_not_retried(server):
    logs = []
    c = Client(server.url, retries=2, log=logs.append, sleep=lambda s: None)
    with pytest.raises(ServerError, match=r"/nope: HTTP 404 \(\{\"error\": \"not found\"\}\)$"):
        c.post("/nope", {})
    assert logs == []


def test_timeout_is_retried_then_one_line():
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(4)  # accepts connections, never answers
    try:
        c = Client(f"http://127.0.0.1:{sock.getsockname()[1]}", timeout=0.2, retries=1, log=lambda m: None,
                   sleep=lambda s: None)
        with pytest.raises(ServerError,
                           match=r"unreachable after 2 tries \(.*timed out.*\); .*\(timeout 0.2 s per try\)"):
            c.get("/v1/models")
    finally:
        sock.close()


def test_answer_that_is_not_json(server):
    server.mutate = lambda body: b"<html>oops</html>"
    c = Client(server.url, retries=0)
    with pytest.raises(ServerError, match=r"/v1/completions: the answer is not JSON \('<html>oops</html>'\)"):
        c.post("/v1/completions", {"model": "teacher", "prompt": [[1, 2, 3]], "prompt_logprobs": 1})


# -- validation of one answer -----------------------------------------------------------------------
def row(**lps):
    return {k[1:]: {"logprob": v, "rank": 1} for k, v in lps.items()}


def test_position_scores_top_k_and_sampled():
    lp, ids, lps = position_scores(row(_1=-0.5, _2=-1.5, _7=-6.0), 7, 2, 10, "w")
    assert (lp, ids, lps) == (-6.0, [1, 2], [-0.5, -1.5])
    assert position_scores(row(_1=-0.5, _2=-1.5), 2, 2, 10, "w") == (-1.5, [1, 2], [-0.5, -1.5])
    assert position_scores(row(_4=-0.1), 4, 0, 10, "w") == (-0.1, [], [])  # sampled token only
    assert position_scores({"3": -0.25}, 3, 0, 10, "w")[0] == -0.25  # a bare number is a logprob too


@pytest.mark.parametrize("bad,k,sampled,msg", [
    (None, 1, 1, r"w: no logprobs \(None\)"),
    ({}, 1, 1, r"w: no logprobs \(\{\}\)"),
    ({"x": {"logprob": -1.0}}, 1, 1, r"w: token id 'x' is not an integer"),
    ({"1.5": {"logprob": -1.0}}, 1, 1, r"w: token id '1.5' is not an integer"),
    ({"10": {"logprob": -1.0}}, 1, 10, r"w: token id 10 is outside the vocabulary \[0, 10\)"),
    ({"-1": {"logprob": -1.0}}, 1, 1, r"w: token id -1 is outside the vocabulary \[0, 10\)"),
    ({"1": {"logprob": 0.5}}, 1, 1, r"w, token 1: logprob 0.5 is not finite and <= 0"),
    ({"1": {"logprob": float("nan")}}, 1, 1, r"w, token 1: logprob nan is not finite and <= 0"),
    ({"1": {"logprob": -math.inf}}, 1, 1, r"w, token 1: logprob -inf is not finite and <= 0"),
    ({"1": {"logprob": "-1"}}, 1, 1, r"w, token 1: no numeric logprob \(\{'logprob': '-1'\}\)"),
    ({"1": {"rank": 1}}, 1, 1, r"w, token 1: no numeric logprob"),
    ({"1": -1.0, "01": -2.0}, 1, 1, r"w: token id 1 appears twice"),
    ({"1": -1.0}, 1, 3, r"w: the sampled token 3 is missing \(the server must return the actual token's logprob"),
    ({"1": -1.0, "2": -2.0, "3": -3.0, "4": -4.0}, 2, 1, r"w: 4 entries, expected the top 2 plus the sampled token "
                                                          r"\(2 or 3\)"),
    ({"1": -1.0}, 2, 1, r"w: 1 entries, expected the top 2 plus the sampled token"),
    ({"1": -1.0, "2": -2.0, "3": -0.5}, 2, 3, r"w: 3 entries, but the sampled token 3 \(logprob -0.5\) ranks inside "
                                              r"the top 2: not a top-2 answer"),
    ({"1": -0.1, "2": -0.2}, 2, 1, r"w: top-2 probability mass 1.723568 > 1"),
])
def test_position_scores_errors(bad, k, sampled, msg):
    with pytest.raises(BadResponse, match=msg):
        position_scores(bad, sampled, k, 10, "w")


def test_completion_and_choice_errors():
    ok_row = {"2": -0.1}
    with pytest.raises(BadResponse, match=r"s: no prompt_logprobs in the answer \(does the server support"):
        completion_scores({"text": ""}, [1, 2], 1, 0, 10, "s")
    with pytest.raises(BadResponse, match=r"s: 3 prompt_logprobs rows for 2 tokens \(one row per position expected\)"):
        completion_scores({"prompt_logprobs": [None, ok_row, ok_row]}, [1, 2], 1, 0, 10, "s")
    with pytest.raises(BadResponse, match=r"s, position 1: no logprobs \(None\)"):
        completion_scores({"prompt_logprobs": [None, None]}, [1, 2], 1, 0, 10, "s")
    assert completion_scores({"prompt_logprobs": [None, ok_row]}, [1, 2], 1, 0, 10, "s") == ([-0.1], [[]], [[]])
    with pytest.raises(BadResponse, match=r"w: 1 choices for 2 prompts"):
        choices_in_order({"choices": [{"index": 0}]}, 2, "w")
    with pytest.raises(BadResponse, match=r"w: no choices for 2 prompts"):
        choices_in_order({"error": "x"}, 2, "w")
    with pytest.raises(BadResponse, match=r"w: choice index 0 is not one of 0..1 \(once each\)"):
        choices_in_order({"choices": [{"index": 0}, {"index": 0}]}, 2, "w")
    assert [c["index"] for c in choices_in_order({"choices": [{"index": 1}, {"index": 0}]}, 2, "w")] == [0, 1]


# -- the connected teacher ----------------------------------------------------------------------------
def args(url, **kw):
    a = dict(teacher_server=url, teacher_model=None, teacher_topk=5, teacher_timeout=10.0, teacher_retries=0,
             method="gkd", opd_loss="sampled")
    a.update(kw)
    return SimpleNamespace(**a)


def test_scores_equal_the_in_process_teacher(smoke, server):
    tok, vocab = smoke.tok, smoke.teacher.get_output_embeddings().weight.shape[0]
    t = ServerTeacher.connect(args(server.url), tok, vocab, log=lambda m: None)
    exs = smoke.task.sample(random.Random(0), 6)
    prompts = R.encode_prompts(tok, [ex.prompt for ex in exs])
    comp, mask = R.pad_completions(R.encode_answers(tok, [ex.answer for ex in exs]), tok.pad_token_id)
    mask[0, 1:] = False  # ragged completions
    seqs = R.pack(prompts, comp, mask, tok.pad_token_id)
    got = t.score(seqs)
    lm = R.LM(smoke.teacher)
    h = R.completion_hidden(lm, seqs)
    want = R.token_logprobs(lm, h, seqs)
    torch.testing.assert_close(got["logprobs"], want * mask, rtol=1e-5, atol=1e-5)
    ids, lps = R.teacher_topk(lm.head, h, 5)
    m = mask.unsqueeze(-1).expand_as(ids)
    assert torch.equal(got["topk_ids"][m], ids[m])
    # float64 after the tail floor, which moves a logprob by at most -log(1 - 1e-6)
    torch.testing.assert_close(got["topk_logprobs"][m].float(), lps[m], rtol=1e-5, atol=1e-5)
    last = server.requests[-1][1]
    assert last["prompt_logprobs"] == 5 and last["max_tokens"] == 1 and isinstance(last["prompt"][0][0], int)


def test_sampled_token_opd_asks_for_no_top_k(smoke, server):
    t = ServerTeacher.connect(args(server.url, method="opd"), smoke.tok, 60, log=lambda m: None)
    assert t.topk == 0 and server.requests[-1][1]["prompt_logprobs"] == 0


def test_model_name_from_the_server_or_checked(smoke, server):
    logs = []
    assert ServerTeacher.connect(args(server.url), smoke.tok, 60, log=logs.append).model == "teacher"
    assert logs[-1].startswith(f"teacher server {server.url}: model 'teacher', vocabulary of {len(smoke.tok)} tokens")
    with pytest.raises(ServerError,
                       match=r"--teacher-model big: not served by http://127.0.0.1:\d+ \(it serves: teacher\)"):
        ServerTeacher.connect(args(server.url, teacher_model="big"), smoke.tok, 60)
    server.models = ["a", "b"]
    with pytest.raises(ServerError, match=r"serves 2 models \(a, b\); pick one with --teacher-model"):
        ServerTeacher.connect(args(server.url), smoke.tok, 60)


def test_vocabulary_mismatch_fails_before_training(smoke, server):
    class Shifted:
        def decode(self, ids):
            return smoke.tok.decode([(i + 1) % len(smoke.tok) for i in ids])
    server.tok = Shifted()
    with pytest.raises(ServerError, match=r"its tokenizer is not the student's: token ids 0..\d+ decode to .* there "
                                          r"and .* here \(character \d+\); serve a model with the student's tokenizer"):
        ServerTeacher.connect(args(server.url), smoke.tok, 60)


def test_top_k_larger_than_the_vocabulary(smoke, server):
    with pytest.raises(ServerError, match=r"--teacher-topk 100: more than the 60 tokens of the vocabulary"):
        ServerTeacher.connect(args(server.url, teacher_topk=100), smoke.tok, 60)


# -- training end to end ------------------------------------------------------------------------------
def rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_sampled_opd_through_the_server_equals_in_process(smoke, server, tmp_path):
    """Same seeds, same student samples: the served teacher's logprobs give the in-process losses."""
    base = ["--method", "opd", *SMOKE, "--student", str(smoke.paths["student"])]
    assert main([*base, "--teacher", str(smoke.paths["teacher"]), "--out", str(tmp_path / "local")]) == 0
    assert main([*base, "--teacher-server", server.url, "--out", str(tmp_path / "served")]) == 0
    local, served = rows(tmp_path / "local"), rows(tmp_path / "served")
    losses = [(a["loss"], b["loss"]) for a, b in zip(local, served) if "loss" in a]
    assert len(losses) == 2
    for a, b in losses:
        assert abs(a - b) <= 1e-4 * max(1.0, abs(a)), losses


def test_sampled_gopd_through_the_server_equals_in_process(smoke, server, tmp_path):
    """G-OPD's sampled form needs only the sampled tokens' teacher logprobs (the reference stays here)."""
    base = ["--method", "gopd", "--gopd-loss", "sampled", *SMOKE, "--student", str(smoke.paths["student"])]
    assert main([*base, "--teacher", str(smoke.paths["teacher"]), "--out", str(tmp_path / "local")]) == 0
    assert main([*base, "--teacher-server", server.url, "--out", str(tmp_path / "served")]) == 0
    losses = [(a["loss"], b["loss"]) for a, b in zip(rows(tmp_path / "local"), rows(tmp_path / "served"))
              if "loss" in a]
    assert len(losses) == 2 and all(abs(a - b) <= 1e-4 * max(1.0, abs(a)) for a, b in losses), losses
    assert server.requests[-1][1]["prompt_logprobs"] == 0


@pytest.mark.parametrize("method", [["--method", "gkd"], ["--method", "opd", "--opd-loss", "fullvocab"]])
def test_top_k_methods_train_through_the_server(smoke, server, tmp_path, method):
    assert main([*method, *SMOKE, "--teacher-server", server.url, "--teacher-topk", "8", "--out", str(tmp_path)]) == 0
    rs = [r for r in rows(tmp_path) if "loss" in r]
    assert len(rs) == 2 and all(math.isfinite(r["loss"]) and r["loss"] >= 0 for r in rs)
    assert any(b and b.get("prompt_logprobs") == 8 for _, b in server.requests)


def test_hostile_answer_stops_the_run_with_one_line(smoke, server, tmp_path, capsys):
    def poison(body):  # a positive "logprob" at the last position of sequence 1 (not in the 1-sequence probe)
        if len(body["choices"]) > 1:
            body["choices"][1]["prompt_logprobs"][-1] = {"0": {"logprob": 0.3}}
        return body
    server.mutate = poison
    assert main(["--method", "opd", *SMOKE, "--teacher-server", server.url, "--out", str(tmp_path)]) == 2
    # mid-training the progress bar shares stderr (as for a non-finite loss); the error is one line of it
    err = re.search(r"python -m opd_train: error: .*", capsys.readouterr().err).group(0)
    assert not (tmp_path / "ckpt").exists()
    assert re.search(r"/v1/completions: sequence 1, position \d+(, token 0: logprob 0.3 is not finite and <= 0|"
                     r": the sampled token \d+ is missing)", err), err


def test_unreachable_server_stops_before_training(tmp_path, capsys):
    url = f"http://127.0.0.1:{free_port()}"
    assert main(["--method", "opd", *SMOKE, "--teacher-server", url, "--teacher-retries", "0",
                 "--out", str(tmp_path)]) == 2
    err = one_line_error(capsys)
    assert f"teacher server {url}/v1/models: unreachable after 1 try (ConnectionRefusedError" in err
    assert not (tmp_path / "metrics.jsonl").exists()


@pytest.mark.parametrize("argv,msg", [
    (["--method", "sft"], "--teacher-server: supported by --method opd, gkd and gopd (a teacher that scores given "
                          "completions), not sft"),
    (["--method", "gopd"], "--teacher-server with --method gopd needs --gopd-loss sampled (the served teacher gives "
                           "the sampled tokens' logprobs, not the full distribution fullvocab needs)"),
    (["--method", "gopd", "--gopd-loss", "sampled", "--gopd-ref", "teacher-base"],
     "--teacher-server with --gopd-ref teacher-base: the served teacher's base is not here; pass it as --ref DIR"),
    (["--teacher", "x"], "--teacher-server replaces --teacher; give one or the other"),
    (["--method", "gkd", "--teacher-topk", "0"], "--teacher-topk 0: --method gkd needs the teacher's top-k (k >= 1)"),
    (["--opd-loss", "fullvocab", "--teacher-topk", "0"],
     "--teacher-topk 0: --method opd --opd-loss fullvocab needs the teacher's top-k (k >= 1)"),
])
def test_cli_refuses(argv, msg, capsys):
    with pytest.raises(SystemExit) as e:
        cli.parse_args(["--teacher-server", "http://127.0.0.1:1", *argv])
    assert e.value.code == 2 and one_line_error(capsys).endswith(msg)


def test_cli_refuses_domain_teachers_with_a_server(smoke, capsys):
    with pytest.raises(SystemExit):
        cli.parse_args(["--teacher-server", "http://127.0.0.1:1", "--method", "gopd", "--gopd-loss", "sampled",
                        "--domain-teacher", f"+={smoke.paths['teacher']}"])
    assert one_line_error(capsys).endswith("--teacher-server replaces --domain-teacher; give one or the other")


def test_cli_refuses_url_and_lone_model(capsys):
    for argv, msg in ((["--teacher-server", "127.0.0.1:8000"],
                       "--teacher-server 127.0.0.1:8000: expected an http:// or https:// URL"),
                      (["--teacher-model", "t"], "--teacher-model needs --teacher-server")):
        with pytest.raises(SystemExit):
            cli.parse_args(argv)
        assert one_line_error(capsys).endswith(msg)



# -- the served top-k's tail and the approximation gap --------------------------------------------
def test_floor_tail_sets_unresolved_tails_to_the_floor():
    from opd_train.server_teacher import TAIL_FLOOR, floor_tail
    lps = torch.tensor([[math.log(0.5), math.log(0.25)],            # tail 0.25: unchanged
                        [math.log(0.7), math.log(0.3)],             # tail 0 (float32 rounding): floored
                        [math.log(0.7), math.log(0.30001)]])        # mass > 1: floored
    out = floor_tail(lps).double()
    assert torch.equal(out[0], lps[0].double())
    tails = 1 - out.exp().sum(-1)
    assert abs(tails[1] - TAIL_FLOOR) < 1e-12 and abs(tails[2] - TAIL_FLOOR) < 1e-12
    torch.testing.assert_close(out[1, 0] - out[1, 1], lps[1, 0].double() - lps[1, 1].double())  # ratios kept


def test_scores_apply_the_tail_floor(smoke, server):
    t = ServerTeacher.connect(args(server.url, teacher_topk=40), smoke.tok, 60, log=lambda m: None)
    exs = smoke.task.sample(random.Random(1), 4)
    prompts = R.encode_prompts(smoke.tok, [ex.prompt for ex in exs])
    comp, mask = R.pad_completions(R.encode_answers(smoke.tok, [ex.answer for ex in exs]), smoke.tok.pad_token_id)
    got = t.score(R.pack(prompts, comp, mask, smoke.tok.pad_token_id))
    tails = 1 - got["topk_logprobs"].double().exp().sum(-1)
    assert tails[mask].min() >= 1e-6 * (1 - 1e-6)


def test_topk_gap_is_zero_when_k_covers_the_vocabulary():
    from opd_train.topk_gap import gap
    rows_ = gap(SimpleNamespace(preset="smoke", batches=1, prompts=4, k=[57, 5], seed=0, tail_floor=True))
    full = {(r["loss"].split()[0], r["k"]): r for r in rows_}
    for name in ("opd", "gkd"):
        assert full[(name, 57)]["vocab"] == 57
        assert full[(name, 57)]["loss_rel_err"] < 1e-4 and full[(name, 57)]["grad_cosine"] > 1 - 1e-6
        assert full[(name, 5)]["loss_rel_err"] > 1e-4  # a real top-k is an approximation
