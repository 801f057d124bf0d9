"""``--teacher-server URL``: a teacher behind an OpenAI-compatible completions server (vLLM's).

The teacher scores the student's completions by *prompt logprobs*: each sequence
``prompt + completion`` is sent as token ids (never text: a tokenizer re-loaded by the server
may split text differently, see `opd_train.tokenizer`) to ``/v1/completions`` with
``max_tokens=1`` and ``prompt_logprobs=K``; the answer gives, at every position, the top ``K``
tokens plus the actual one. Sampled-token OPD and G-OPD's sampled form (``--gopd-loss
sampled``; its reference model stays in this process) ask for ``K=0`` (only the sampled token's
logprob); GKD and full-vocabulary OPD use the top ``--teacher-topk`` through
``opd_kernels.fused_linear_sparse_distill_loss`` (top-k buckets + tail), an approximation of the
full-vocabulary divergence.

Before training (`ServerTeacher.connect`): the model name comes from ``/v1/models`` (or
``--teacher-model``, which must be served), the server's vocabulary must decode every student
token id as the student's tokenizer does (``/detokenize``, in chunks), and one probe sequence
is scored and validated. Every answer is validated (`opd_train.server_response`) before it
reaches a loss; connection failures are retried a bounded number of times, logged
(`opd_train.server_client`). Errors are one line (`ServerError`).
"""
from __future__ import annotations

import math

import torch

from .argtypes import nonneg_int, pos_float
from .server_client import Client, ServerError
from .server_response import BadResponse, choices_in_order, completion_scores

METHODS = ("opd", "gkd", "gopd")  # the methods whose teacher only scores completions it is given
DETOKENIZE_CHUNK = 2048   # ids per /detokenize request of the vocabulary check
# The smallest tail (1 - top-k mass) taken from served logprobs. They are float32 (vLLM's log-softmax),
# so a confident teacher's top-k mass can round to >= 1 (tail 0, which the sparse loss floors at
# ~1e-308: log tail = -708); tails below this are unresolved and set to it (python -m opd_train.topk_gap).
TAIL_FLOOR = 1e-6


def add_options(p) -> None:
    g = p.add_argument_group("teacher server (opd, gkd, gopd --gopd-loss sampled: an OpenAI-compatible completions "
                             "server, e.g. vLLM's)")
    g.add_argument("--teacher-server", metavar="URL",
                   help="score completions with the teacher behind this server (prompt logprobs by token ids) "
                        "instead of loading --teacher in this process")
    g.add_argument("--teacher-model", help="the served model name (default: the one model /v1/models lists)")
    g.add_argument("--teacher-topk", type=nonneg_int, default=20,
                   help="top-k teacher logprobs per position for gkd and --opd-loss fullvocab (sparse top-k + tail "
                        "loss; vLLM's default --max-logprobs is 20); sampled-token opd asks for none")
    g.add_argument("--teacher-timeout", type=pos_float, default=60.0, help="seconds per request")
    g.add_argument("--teacher-retries", type=nonneg_int, default=2,
                   help="retries of a failed or timed-out request (logged) before the run stops")


def check_args(args, error) -> None:
    """argparse-time checks; ``error(message)`` exits (`cli._Parser.error`)."""
    if not args.teacher_server:
        if args.teacher_model:
            error("--teacher-model needs --teacher-server")
        return
    if not args.teacher_server.startswith(("http://", "https://")):
        error(f"--teacher-server {args.teacher_server}: expected an http:// or https:// URL")
    if args.method not in METHODS:
        error(f"--teacher-server: supported by --method {', '.join(METHODS[:-1])} and {METHODS[-1]} (a teacher that "
              f"scores given completions), not {args.method}")
    if args.teacher:
        error("--teacher-server replaces --teacher; give one or the other")
    if args.method == "gopd":
        if args.gopd_loss != "sampled":
            error("--teacher-server with --method gopd needs --gopd-loss sampled (the served teacher gives the "
                  "sampled tokens' logprobs, not the full distribution fullvocab needs)")
        if args.domain_teacher:
            error("--teacher-server replaces --domain-teacher; give one or the other")
        if args.gopd_ref == "teacher-base" and not args.ref:
            error("--teacher-server with --gopd-ref teacher-base: the served teacher's base is not here; pass it as "
                  "--ref DIR")
    if needs_topk(args) and args.teacher_topk == 0:
        error(f"--teacher-topk 0: --method {args.method}"
              + (" --opd-loss fullvocab" if args.method == "opd" else "") + " needs the teacher's top-k (k >= 1)")


def needs_topk(args) -> bool:
    """Whether the loss needs the top-k (else only the sampled token's logprob)."""
    return args.method == "gkd" or getattr(args, "opd_loss", None) == "fullvocab"


class ServerTeacher:
    """A connected, checked teacher server; `score` returns validated tensors."""

    def __init__(self, client: Client, model: str, topk: int, vocab: int, log=print):
        self.client, self.model, self.topk, self.vocab, self.log = client, model, topk, vocab, log

    @classmethod
    def connect(cls, args, tok, vocab: int, log=print) -> "ServerTeacher":
        """Model name, vocabulary check and one validated probe score, before any training."""
        client = Client(args.teacher_server, timeout=args.teacher_timeout, retries=args.teacher_retries, log=log)
        model = served_model(client, args.teacher_model)
        topk = args.teacher_topk if needs_topk(args) else 0
        if topk > vocab:
            raise ServerError(f"--teacher-topk {topk}: more than the {vocab} tokens of the vocabulary")
        teacher = cls(client, model, topk, vocab, log)
        teacher.check_vocabulary(tok)
        probe = tok("12+34=46", add_special_tokens=False).input_ids or [0, 0]
        teacher.score_ids([probe], [max(1, len(probe) // 2)])
        log(f"teacher server {client.url}: model {model!r}, vocabulary of {len(tok)} tokens checked, "
            f"top-{topk} prompt logprobs")
        return teacher

    def check_vocabulary(self, tok) -> None:
        """Every student token id decodes on the server as it does here (``/detokenize``)."""
        n = len(tok)
        for lo in range(0, n, DETOKENIZE_CHUNK):
            ids = list(range(lo, min(n, lo + DETOKENIZE_CHUNK)))
            body = self.client.post("/detokenize", {"model": self.model, "tokens": ids})
            theirs = body.get("prompt") if isinstance(body, dict) else None
            ours = tok.decode(ids)
            if theirs != ours:
                at = next((i for i, (a, b) in enumerate(zip(ours, theirs or "")) if a != b),
                          min(len(ours), len(theirs or "")))
                raise ServerError(f"teacher server {self.client.url}: its tokenizer is not the student's: token ids "
                                  f"{ids[0]}..{ids[-1]} decode to {_around(theirs, at)} there and "
                                  f"{_around(ours, at)} here (character {at}); serve a model with the student's "
                                  "tokenizer")

    def score_ids(self, seqs: list[list[int]], starts: list[int]):
        """Validated scores of ``seqs[i][starts[i]:]``: per sequence, (sampled logprobs, top-k ids,
        top-k logprobs) as lists."""
        body = self.client.post("/v1/completions", {"model": self.model, "prompt": seqs, "max_tokens": 1,
                                                    "temperature": 0.0, "prompt_logprobs": self.topk})
        where = f"teacher server {self.client.url}/v1/completions"
        choices = choices_in_order(body, len(seqs), where)
        return [completion_scores(c, ids, start, self.topk, self.vocab, f"{where}: sequence {i}")
                for i, (c, ids, start) in enumerate(zip(choices, seqs, starts))]

    @torch.no_grad()
    def score(self, s) -> dict:
        """Teacher scores of packed sequences ``s`` (`opd_train.rollout.Seqs`), on its device:
        ``logprobs [B, C]`` of the completion tokens (0 at padding) and, with top-k,
        ``topk_ids`` / ``topk_logprobs`` ``[B, C, K]`` (float64, tails floored: `floor_tail`; at padding:
        ids 0..K-1, mass 1/2)."""
        seqs, starts = [], []
        for ids, am, m in zip(s.input_ids.tolist(), s.attention_mask.tolist(), s.mask.sum(1).tolist()):
            real = [t for t, a in zip(ids, am) if a]
            seqs.append(real)
            starts.append(len(real) - int(m))
        scored = self.score_ids(seqs, starts)
        B, C, K, dev = s.mask.shape[0], s.mask.shape[1], self.topk, s.mask.device
        lp = torch.zeros(B, C, dtype=torch.float32)
        out = {"logprobs": lp}
        if K:
            out["topk_ids"] = torch.arange(K).repeat(B, C, 1)
            out["topk_logprobs"] = torch.full((B, C, K), math.log(0.5 / K))
        for i, (sampled, top_ids, top_lps) in enumerate(scored):
            n = len(sampled)
            lp[i, :n] = torch.tensor(sampled)
            if K and n:
                out["topk_ids"][i, :n] = torch.tensor(top_ids)
                out["topk_logprobs"][i, :n] = torch.tensor(top_lps)
        if K:
            out["topk_logprobs"] = floor_tail(out["topk_logprobs"])
        return {k: v.to(dev) for k, v in out.items()}


def floor_tail(topk_logprobs: torch.Tensor, floor: float = TAIL_FLOOR) -> torch.Tensor:
    """Top-k logprobs ``[..., k]`` scaled down where their tail ``1 - sum exp`` is below ``floor``,
    so that the tail is ``floor`` (ratios within the top k kept); other rows unchanged. Float64
    (in float32 the shifted tail would round again)."""
    lp = topk_logprobs.double()
    mass = lp.exp().sum(-1, keepdim=True)
    return lp + torch.log((1.0 - floor) / mass).clamp(max=0.0)


def served_model(client: Client, wanted: str | None) -> str:
    """``wanted`` if the server lists it, else the one model it serves."""
    body = client.get("/v1/models")
    data = body.get("data") if isinstance(body, dict) else None
    if not isinstance(data, list) or not all(isinstance(m, dict) and isinstance(m.get("id"), str) for m in data):
        raise BadResponse(f"teacher server {client.url}/v1/models: no model list "
                          "(expected {'data': [{'id': ...}]})")
    names = [m["id"] for m in data]
    if wanted is not None:
        if wanted not in names:
            raise ServerError(f"--teacher-model {wanted}: not served by {client.url} (it serves: "
                              f"{', '.join(names) or 'nothing'})")
        return wanted
    if len(names) != 1:
        raise ServerError(f"teacher server {client.url} serves {len(names)} models ({', '.join(names) or 'none'}); "
                          "pick one with --teacher-model")
    return names[0]


def _around(text, at: int) -> str:
    if text is None:
        return "nothing"
    return repr(text[max(0, at - 10): at + 10])
