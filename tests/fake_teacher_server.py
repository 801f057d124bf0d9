"""A stand-in for vLLM's OpenAI-compatible server, for tests without vLLM (stdlib ``http.server``,
listening on 127.0.0.1 only).

It serves one HF causal LM: ``GET /v1/models``, ``POST /detokenize`` (``tok.decode``) and
``POST /v1/completions`` with token-id prompts and ``prompt_logprobs=k``, answered as vLLM does:
``prompt_logprobs[0]`` is null, then per position ``{"<id>": {"logprob", "rank", "decoded_token"}}``
for the top k plus the actual token (full-vocabulary log-softmax of the model's logits, float32).
Test hooks: ``mutate(body) -> body`` edits each completions answer, ``fail_next`` answers the
next requests with HTTP 503, ``requests`` records every (path, body).
"""
from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch


def prompt_logprobs(model, tok, ids: list[int], k: int) -> list:
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0].float()
    lp = torch.log_softmax(logits, -1)
    rows = [None]
    for p in range(1, len(ids)):
        row_lp = lp[p - 1]
        order = row_lp.argsort(descending=True).tolist()
        rank = {t: r + 1 for r, t in enumerate(order)}
        keep = order[:k] + ([ids[p]] if ids[p] not in order[:k] else [])
        rows.append({str(t): {"logprob": row_lp[t].item(), "rank": rank[t], "decoded_token": tok.decode([t])}
                     for t in keep})
    return rows


class FakeTeacherServer:
    def __init__(self, model, tok, name="teacher", models=None):
        self.model, self.tok, self.name = model.eval(), tok, name
        self.models = models if models is not None else [name]
        self.mutate = None
        self.fail_next = 0
        self.requests = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):  # quiet
                pass

            def _send(self, code, body):
                raw = body if isinstance(body, bytes) else json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

            def do_GET(self):
                server.requests.append((self.path, None))
                if server.fail_next:
                    server.fail_next -= 1
                    return self._send(503, {"error": "busy"})
                if self.path == "/v1/models":
                    return self._send(200, {"object": "list", "data": [{"id": m} for m in server.models]})
                self._send(404, {"error": "not found"})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.requests.append((self.path, body))
                if server.fail_next:
                    server.fail_next -= 1
                    return self._send(503, {"error": "busy"})
                if self.path == "/detokenize":
                    return self._send(200, {"prompt": server.tok.decode(body["tokens"])})
                if self.path != "/v1/completions":
                    return self._send(404, {"error": "not found"})
                if body.get("model") != server.name:
                    return self._send(404, {"error": {"message": f"The model `{body.get('model')}` does not exist."}})
                prompts = body["prompt"]
                k = body["prompt_logprobs"]
                out = {"choices": [{"index": i, "text": "", "prompt_logprobs": prompt_logprobs(server.model,
                                                                                               server.tok, ids, k)}
                                   for i, ids in enumerate(prompts)]}
                if server.mutate is not None:
                    out = server.mutate(out)
                self._send(200, out)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()
