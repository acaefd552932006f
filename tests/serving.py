"""Test helper: a real `asympo serve` process on loopback, its port read from its first stdout line; or an
`App` served in this process (`in_process`), as a training run serves its own engine; and SSE streams read
back as a list of JSON events (`stream`)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback never goes via a proxy
LISTENING = re.compile(r"^asympo serve: listening on (http://\S+/v1) ")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`python -m asympo serve`; `stop()` sends SIGTERM and returns the exit code. Output goes to files, so a
    chatty server never blocks on a full pipe and the tests can read everything it printed."""

    def __init__(self, *overrides: str, port: int = 0, env: dict[str, str] | None = None, wait: bool = True):
        self.dir = Path(tempfile.mkdtemp(prefix="asympo-serve-"))
        self.stdout_path, self.stderr_path = self.dir / "stdout", self.dir / "stderr"
        args = [sys.executable, "-m", "asympo", "serve", f"port={port}", "threads=1", *overrides]
        with open(self.stdout_path, "w") as out, open(self.stderr_path, "w") as err:
            self.process = subprocess.Popen(args, stdout=out, stderr=err, env={**os.environ, **(env or {})})
        self.url = ""
        self.final_output: str | None = None
        if wait:
            self.wait_ready()

    def wait_ready(self, timeout: float = 60) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            first = self.stdout_path.read_text().split("\n", 1)
            if len(first) == 2 and (match := LISTENING.match(first[0])):
                self.url = match.group(1)
                return self.url
            if self.process.poll() is not None:
                raise RuntimeError(f"asympo serve exited with {self.process.returncode}: {self.output()}")
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"asympo serve did not start in {timeout} s: {self.output()}")

    def output(self) -> str:
        if self.final_output is not None:
            return self.final_output
        return self.stdout_path.read_text() + self.stderr_path.read_text()

    def stop(self) -> int:
        """SIGTERM (a kill if it hangs); keeps what it printed and removes its folder."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.final_output is None:
            self.final_output = self.output()
            shutil.rmtree(self.dir, ignore_errors=True)
        return self.process.returncode


def call(url: str, body: dict | bytes | str | None = None, headers: dict | None = None) -> tuple[int, dict]:
    """GET when there is no body; POST JSON (dict), raw text (str) or bytes. Returns status and JSON body."""
    data = body if isinstance(body, bytes) else body.encode() if isinstance(body, str) else None
    if isinstance(body, dict):
        data = json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers=headers or {}, method="POST" if data else "GET")
    try:
        with NO_PROXY.open(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def stream(url: str, body: dict, headers: dict | None = None) -> list[dict]:
    """POST a streaming request; every `data:` event before `[DONE]`, parsed (the stream must end in it)."""
    headers = {"Content-Type": "application/json", **(headers or {})}
    request = urllib.request.Request(url, json.dumps(body).encode(), headers, method="POST")
    events = []
    with NO_PROXY.open(request, timeout=60) as response:
        for line in response:
            line = line.decode().strip()
            if line == "data: [DONE]":
                return events
            if line.startswith("data: "):
                events.append(json.loads(line.removeprefix("data: ")))
    raise AssertionError(f"the stream ended without [DONE] after {len(events)} events")


@contextmanager
def in_process(app: Any) -> Iterator[str]:
    """Serve an `asympo.serve.app.App` on loopback from a thread of this process (what a training run that
    serves its live engine does); yields the base URL (`.../v1`). The app's engine thread stops after."""
    from asympo.serve.server import InProcess  # the `serve` extra

    served = InProcess(app)
    try:
        yield served.url
    finally:
        served.close()
