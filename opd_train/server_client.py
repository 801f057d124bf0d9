"""JSON over HTTP to a teacher server, with a bounded, logged retry and one-line errors.

`Client.get` / `Client.post` return the decoded JSON body. A connection that fails, times out
or answers 5xx is retried ``retries`` times (waits 0.5 s, 1 s, 2 s, ...), each retry logged;
then, or at once for a 4xx answer or a body that is not JSON, `ServerError` says what happened
in one line (the trainer prints it as ``python -m opd_train: error: ...``, exit status 2).
Standard library only (``urllib``), so nothing is installed for it.
"""
from __future__ import annotations

import json
import socket
import time
import urllib.error
import urllib.request

from .inputs import InputError


class ServerError(InputError):
    """The teacher server cannot be used: unreachable, an error answer, or a malformed response."""


def _one_line(text: str, limit: int = 200) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


class Client:
    def __init__(self, url: str, *, timeout: float = 60.0, retries: int = 2, log=print, sleep=time.sleep):
        self.url, self.timeout, self.retries, self.log, self.sleep = url.rstrip("/"), timeout, retries, log, sleep

    def get(self, path: str):
        return self._call("GET", path, None)

    def post(self, path: str, body: dict):
        return self._call("POST", path, body)

    def _call(self, method: str, path: str, body):
        where = f"teacher server {self.url}{path}"
        data = None if body is None else json.dumps(body).encode()
        for attempt in range(self.retries + 1):
            req = urllib.request.Request(self.url + path, data=data, method=method,
                                         headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                    raw = resp.read()
                break
            except urllib.error.HTTPError as e:
                detail = _one_line(e.read().decode(errors="replace"))
                if e.code < 500:
                    raise ServerError(f"{where}: HTTP {e.code} ({detail})") from None
                why = f"HTTP {e.code} ({detail})"
            except (urllib.error.URLError, socket.timeout, TimeoutError, ConnectionError) as e:
                reason = getattr(e, "reason", e)
                why = _one_line(f"{type(reason).__name__}: {reason}")
            if attempt == self.retries:
                tries = f"{self.retries + 1} tries" if self.retries else "1 try"
                raise ServerError(f"{where}: unreachable after {tries} ({why}); is the server running? "
                                  f"(timeout {self.timeout:g} s per try)")
            wait = 0.5 * 2 ** attempt
            self.log(f"warning: {where}: {why}; retry {attempt + 1} of {self.retries} in {wait:g} s")
            self.sleep(wait)
        try:
            return json.loads(raw)
        except ValueError:
            text = _one_line(raw.decode(errors="replace"))
            raise ServerError(f"{where}: the answer is not JSON ({text!r})") from None
