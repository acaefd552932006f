"""A small JSON-over-HTTP client for OpenAI-compatible servers (standard library only), with retries.

Connection errors, timeouts, 429 and 5xx are retried with exponential backoff: a server restarting or briefly
overloaded should not end a long run. Any other 4xx is the caller's mistake and fails at once, naming the
status and the server's message. The API key is sent as a Bearer header and kept out of every message, repr
and exception this module produces.
"""

from __future__ import annotations

import http.client
import json
import os
import threading
import time
import urllib.error
import urllib.request
from typing import Any
from urllib.parse import urlencode, urlsplit

from asympo.errors import UserError
from asympo.faults import RunAborted

LOOPBACK = {"localhost", "127.0.0.1", "::1"}


class ServerRejected(UserError):
    """The server refused a request (4xx other than 429) or answered with something unreadable."""


class ServerUnreachable(RunAborted):
    """Retries ran out: in a training run this stops with a checkpoint, so `resume=true` continues."""


class NoRedirects(urllib.request.HTTPRedirectHandler):
    """A redirect is an error here: urllib would resend the Authorization header to wherever it points."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        return None


class ApiClient:
    def __init__(
        self,
        base_url: str,
        api_key_env: str = "",
        timeout: float = 300.0,
        retries: int = 5,
        backoff: float = 0.5,
    ):
        if urlsplit(base_url).scheme not in ("http", "https"):
            raise UserError(f"rollout.openai.base_url must start with http:// or https://, got '{base_url}'")
        self.base_url = base_url.rstrip("/")
        self._key = os.environ.get(api_key_env) if api_key_env else None
        self.timeout, self.retries, self.backoff = timeout, retries, backoff
        self.retried = 0  # retries taken so far, for the metrics
        self._count = threading.Lock()  # requests run on several threads at once
        # Loopback never goes through an http_proxy from the environment; other hosts follow the environment.
        proxies = {} if urlsplit(base_url).hostname in LOOPBACK else None
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler(proxies), NoRedirects())

    def __repr__(self) -> str:
        return f"ApiClient({self.base_url!r}, key={'set' if self._key else 'none'})"

    def get(self, path: str) -> dict[str, Any]:
        return self._request("GET", path)

    def post_json(self, path: str, payload: dict[str, Any]) -> dict[str, Any]:
        return self._request("POST", path, json.dumps(payload).encode(), "application/json")

    def post_bytes(self, path: str, data: bytes, query: dict[str, Any]) -> dict[str, Any]:
        return self._request("POST", f"{path}?{urlencode(query)}", data, "application/octet-stream")

    def _request(
        self, method: str, path: str, data: bytes | None = None, content_type: str | None = None
    ) -> dict[str, Any]:
        url = self.base_url + path
        headers = {"Accept": "application/json"}
        if content_type:
            headers["Content-Type"] = content_type
        if self._key:
            headers["Authorization"] = f"Bearer {self._key}"
        problem = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
                with self._count:
                    self.retried += 1
            request = urllib.request.Request(url, data=data, headers=headers, method=method)
            try:
                with self._opener.open(request, timeout=self.timeout) as response:
                    body = response.read()
            except urllib.error.HTTPError as e:
                message = self._server_message(e)
                if e.code != 429 and e.code < 500:
                    raise ServerRejected(self._redact(f"{method} {url}: HTTP {e.code}: {message}")) from None
                problem = f"HTTP {e.code}: {message}"
                continue
            except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
                problem = str(getattr(e, "reason", None) or e) or type(e).__name__
                continue
            try:
                return json.loads(body)
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise ServerRejected(f"{method} {url}: the server's answer is not JSON") from None
        tries = self.retries + 1
        raise ServerUnreachable(
            self._redact(f"rollout server {url}: {problem} (gave up after {tries} tries)")
        )

    @staticmethod
    def _server_message(error: urllib.error.HTTPError) -> str:
        """The OpenAI-style `error.message` when there is one, else the start of the body."""
        try:
            raw = error.read()
        except (OSError, http.client.HTTPException):
            return error.reason or ""
        try:
            payload = json.loads(raw)
            return str(
                payload["error"]["message"] if isinstance(payload.get("error"), dict) else payload["error"]
            )
        except (ValueError, KeyError, TypeError, AttributeError):
            return raw[:200].decode("utf-8", "replace").strip() or str(error.reason)

    def _redact(self, text: str) -> str:
        return text.replace(self._key, "***") if self._key else text
