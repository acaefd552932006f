"""Concurrent clients against a real `asympo serve` on loopback: resets, latency spread and server RSS.

It starts `python -m asympo serve` (tiny model unless told otherwise) on 127.0.0.1 with a free port, then runs
`--clients` threads that each send `--requests` small `/v1/completions` requests over one keep-alive
connection (reopened when the server closes it, as an HTTP/1.0 server does after every reply). Everything is
bounded: the clients stop at `--deadline` seconds whatever they have left, and each request has a timeout.

Printed (and written as JSON with `--json`): the CPU model, requests sent and answered, connection errors
(resets, refusals, early closes), non-200 answers, p50/p90/p99/max latency, and the server's RSS before the
load, at its peak (sampled every 50 ms) and a few seconds after the load.

Run: .venv/bin/python benchmarks/serve_load.py [--clients 32] [--requests 20] [--model tiny]
Loopback only: the server binds 127.0.0.1 and the clients connect nowhere else.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HOST = "127.0.0.1"
LISTENING = re.compile(r"^asympo serve: listening on http://127\.0\.0\.1:(\d+)/v1 ")
PROMPTS = ["12+34=", "5+6=", "7*8=", "90-12=", "3+4=", "100-1=", "8*9=", "41+1="]


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def start_server(model: str, extra: list[str]) -> tuple[subprocess.Popen, int, Path]:
    folder = Path(tempfile.mkdtemp(prefix="asympo-load-"))
    out = open(folder / "stdout", "w")  # noqa: SIM115 (kept open for the server's lifetime)
    args = [
        sys.executable,
        "-m",
        "asympo",
        "serve",
        f"model={model}",
        "host=127.0.0.1",
        "port=0",
        "threads=1",
    ]
    env = {k: v for k, v in os.environ.items() if k != "ASYMPO_API_KEY"}
    process = subprocess.Popen([*args, *extra], stdout=out, stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        first = (folder / "stdout").read_text().split("\n", 1)
        if len(first) == 2 and (match := LISTENING.match(first[0])):
            return process, int(match.group(1)), folder
        if process.poll() is not None:
            break
        time.sleep(0.05)
    process.kill()
    raise SystemExit(f"the server did not start: {(folder / 'stdout').read_text()}")


class Client(threading.Thread):
    def __init__(self, index: int, port: int, requests: int, stop_at: float, timeout: float):
        super().__init__(daemon=True)
        self.index, self.port, self.requests, self.stop_at, self.timeout = (
            index,
            port,
            requests,
            stop_at,
            timeout,
        )
        self.latencies: list[float] = []
        self.errors: dict[str, int] = {}
        self.statuses: dict[int, int] = {}
        self.sent = 0

    def run(self) -> None:
        conn = http.client.HTTPConnection(HOST, self.port, timeout=self.timeout)
        for i in range(self.requests):
            if time.monotonic() > self.stop_at:
                break
            prompt = PROMPTS[(self.index + i) % len(PROMPTS)]
            body = json.dumps({"prompt": prompt, "max_tokens": 8, "temperature": 1.0}).encode()
            self.sent += 1
            started = time.perf_counter()
            try:
                conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
                response = conn.getresponse()
                response.read()
                if response.will_close:
                    conn.close()
            except (OSError, http.client.HTTPException) as e:
                kind = type(e).__name__
                self.errors[kind] = self.errors.get(kind, 0) + 1
                conn.close()
                continue
            self.latencies.append(time.perf_counter() - started)
            self.statuses[response.status] = self.statuses.get(response.status, 0) + 1
        conn.close()


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--requests", type=int, default=20)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--deadline", type=float, default=240.0, help="seconds before the clients give up")
    parser.add_argument("--timeout", type=float, default=60.0, help="per-request timeout, seconds")
    parser.add_argument("--settle", type=float, default=5.0, help="seconds to wait before the after-RSS")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("serve_args", nargs="*", help="extra `asympo serve` key=value overrides")
    args = parser.parse_args()
    if args.clients < 1 or args.clients > 256 or args.requests < 1 or args.requests > 1000:
        raise SystemExit("keep it bounded: 1-256 clients, 1-1000 requests each")

    process, port, folder = start_server(args.model, args.serve_args)
    try:
        warm = Client(-1, port, 3, time.monotonic() + 60, args.timeout)  # first decode compiles kernels
        warm.run()
        time.sleep(1.0)
        before = rss_mb(process.pid)
        peak = [before]
        done = threading.Event()

        def sample() -> None:
            while not done.wait(0.05):
                peak[0] = max(peak[0], rss_mb(process.pid))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        stop_at = time.monotonic() + args.deadline
        clients = [Client(i, port, args.requests, stop_at, args.timeout) for i in range(args.clients)]
        started = time.perf_counter()
        for c in clients:
            c.start()
        for c in clients:
            c.join(timeout=max(1.0, stop_at - time.monotonic() + args.timeout))
        elapsed = time.perf_counter() - started
        done.set()
        sampler.join()
        time.sleep(args.settle)
        after = rss_mb(process.pid)
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    latencies = [x for c in clients for x in c.latencies]
    errors: dict[str, int] = {}
    statuses: dict[str, int] = {}
    for c in clients:
        for k, v in c.errors.items():
            errors[k] = errors.get(k, 0) + v
        for k, v in c.statuses.items():
            statuses[str(k)] = statuses.get(str(k), 0) + v
    p50, p99 = percentile(latencies, 0.5), percentile(latencies, 0.99)
    figures = {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "clients": args.clients,
        "requests_each": args.requests,
        "sent": sum(c.sent for c in clients),
        "answered": len(latencies),
        "connection_errors": sum(errors.values()),
        "errors_by_kind": errors,
        "statuses": statuses,
        "seconds": round(elapsed, 2),
        "p50_ms": round(p50 * 1000, 1),
        "p90_ms": round(percentile(latencies, 0.9) * 1000, 1),
        "p99_ms": round(p99 * 1000, 1),
        "max_ms": round(max(latencies, default=float("nan")) * 1000, 1),
        "p99_over_p50": round(p99 / p50, 2) if latencies else None,
        "rss_before_mb": round(before, 1),
        "rss_peak_mb": round(peak[0], 1),
        "rss_after_mb": round(after, 1),
    }
    for key, value in figures.items():
        print(f"{key:>18}: {value}")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    for f in folder.iterdir():
        f.unlink()
    folder.rmdir()


if __name__ == "__main__":
    main()
