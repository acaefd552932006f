"""`asympo serve` as a real process on loopback: OpenAI response shapes, greedy output equal to the in-process
engine, OpenAI-style errors, the optional API key, and weight reloads (file, raw bytes, refused shapes)."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading

import pytest
import torch
from safetensors.torch import save, save_file
from serving import Server, call

from asympo.config import SamplingConfig, TaskConfig, TinyModelConfig
from asympo.data.tasks import train_stream
from asympo.models.load import load_policy
from asympo.models.tiny import build_model, build_tokenizer
from asympo.rollout.hf import HFEngine
from asympo.serve.batcher import Batcher, Job

KEY = "sk-test-4f9a7c1e"  # a made-up key: it must never show up in anything the server prints
PROMPTS = [p.prompt for _, p in zip(range(6), train_stream(TaskConfig(), 0), strict=False)]


@pytest.fixture(scope="module")
def server():
    s = Server()
    yield s
    s.stop()


def greedy(url: str, prompts: list[str], max_tokens: int = 8) -> list[str]:
    status, body = call(f"{url}/completions", {"prompt": prompts, "temperature": 0, "max_tokens": max_tokens})
    assert status == 200, body
    return [c["text"] for c in body["choices"]]


def random_tiny_weights() -> dict[str, torch.Tensor]:
    """The tiny architecture with fresh random weights: a valid reload that changes every output."""
    model = build_model(TinyModelConfig(), build_tokenizer(), seed=1)
    return {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}  # tied


def test_models_and_health(server):
    status, body = call(f"{server.url}/models")
    assert status == 200 and body["object"] == "list"
    assert [m["id"] for m in body["data"]] == ["tiny"] and body["data"][0]["object"] == "model"
    assert call(f"{server.url}/models/tiny")[0] == 200
    assert call(f"{server.url}/models/other")[0] == 404
    health = call(server.url.removesuffix("/v1") + "/health")
    assert health == (200, {"status": "ok", "version": 0, "requests": 0})


def test_completions_shape_with_a_list_of_prompts_and_n(server):
    request = {"model": "tiny", "prompt": PROMPTS[:3], "n": 4, "max_tokens": 6, "seed": 7}
    status, body = call(f"{server.url}/completions", request)
    assert status == 200, body
    assert body["object"] == "text_completion" and body["model"] == "tiny" and body["id"].startswith("cmpl-")
    assert isinstance(body["created"], int) and body["policy_version"] == 0
    choices = body["choices"]
    assert [c["index"] for c in choices] == list(range(12))
    assert all(c["finish_reason"] in ("stop", "length") and c["logprobs"] is None for c in choices)
    assert all(isinstance(c["text"], str) for c in choices)
    usage = body["usage"]
    assert usage["prompt_tokens"] == sum(len(p) for p in PROMPTS[:3])  # one character, one token
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert 12 <= usage["completion_tokens"] <= 12 * 6
    assert call(f"{server.url}/completions", request)[1]["choices"] == choices  # a seed repeats
    status, single = call(f"{server.url}/completions", {"prompt": PROMPTS[0]})
    assert status == 200 and len(single["choices"]) == 1


def test_chat_completions_shape(server):
    request = {
        "model": "tiny",
        "messages": [{"role": "user", "content": PROMPTS[0]}],
        "n": 2,
        "max_tokens": 6,
    }
    status, body = call(f"{server.url}/chat/completions", request)
    assert status == 200, body
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    assert body["policy_version"] == 0 and body["usage"]["prompt_tokens"] == len(PROMPTS[0])
    for i, choice in enumerate(body["choices"]):
        assert choice["index"] == i and choice["message"]["role"] == "assistant"
        assert isinstance(choice["message"]["content"], str) and choice["finish_reason"] in ("stop", "length")
    # The tiny tokenizer has no chat template: messages are joined as plain text, so chat == completion.
    status, chat = call(f"{server.url}/chat/completions", request | {"temperature": 0, "n": 1})
    assert chat["choices"][0]["message"]["content"] == greedy(server.url, [PROMPTS[0]], 6)[0]


def test_greedy_output_equals_the_in_process_engine(server):
    model, tokenizer = load_policy("tiny")
    engine = HFEngine(model, tokenizer, max_batch=256)
    sampling = SamplingConfig(temperature=0, max_new_tokens=8)
    expected = [g[0].text for g in engine.generate(PROMPTS, 1, sampling)]
    assert greedy(server.url, PROMPTS) == expected
    results: dict[int, list[str]] = {}  # concurrent requests are batched together and still answer the same
    threads = [
        threading.Thread(target=lambda i=i, p=p: results.update({i: greedy(server.url, [p])}))
        for i, p in enumerate(PROMPTS)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [results[i][0] for i in range(len(PROMPTS))] == expected


@pytest.mark.parametrize(
    ("path", "body", "status", "code"),
    [
        ("/completions", "{not json", 400, "invalid_json"),
        ("/completions", {"prompt": "1+2=", "model": "gpt-4"}, 404, "model_not_found"),
        ("/completions", {"prompt": 5}, 400, "invalid_prompt"),
        ("/completions", {"prompt": "1+2=", "temperature": "hot"}, 400, "invalid_type"),
        ("/completions", {"prompt": "1+2=", "n": 0}, 400, "invalid_value"),
        ("/completions", {"prompt": "1+2=", "stream": True, "echo": True}, 400, "unsupported"),
        ("/completions", {"prompt": "1+2=", "max_tokens": 10_000}, 400, "context_length_exceeded"),
        ("/chat/completions", {"messages": "hi"}, 400, "invalid_messages"),
        ("/nowhere", {"prompt": "1+2="}, 404, "not_found"),
    ],
)
def test_bad_requests_get_openai_style_json_errors(server, path, body, status, code):
    got, reply = call(server.url + path, body)
    assert got == status, reply
    assert reply["error"]["code"] == code and reply["error"]["type"] and reply["error"]["message"]


def test_the_api_key_is_required_when_set_and_never_printed():
    s = Server(env={"ASYMPO_API_KEY": KEY})
    try:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
            status, body = call(f"{s.url}/completions", {"prompt": "1+2="}, headers)
            assert status == 401 and body["error"]["code"] == "invalid_api_key"
            assert KEY not in str(body)
        status, body = call(f"{s.url}/completions", {"prompt": "1+2="}, {"Authorization": f"Bearer {KEY}"})
        assert status == 200, body
        assert call(f"{s.url}/models", headers={"Authorization": f"Bearer {KEY}"})[0] == 200
    finally:
        assert s.stop() == 0  # SIGTERM stops it cleanly
    output = s.output()
    assert "listening on" in output and "asympo serve: stopped" in output
    assert KEY not in output


def test_reload_from_a_file_and_from_raw_bytes_and_refused_shapes(tmp_path):
    s = Server(f"weights_dir={tmp_path}")
    try:
        before = greedy(s.url, PROMPTS)
        original = {k: v for k, v in load_policy("tiny")[0].state_dict().items() if k != "lm_head.weight"}
        save_file(random_tiny_weights(), tmp_path / "random.safetensors")
        status, body = call(f"{s.url}/weights", {"path": str(tmp_path / "random.safetensors"), "version": 1})
        assert (status, body) == (200, {"version": 1})
        changed = greedy(s.url, PROMPTS)
        assert changed != before
        status, body = call(f"{s.url}/completions", {"prompt": PROMPTS[0]})
        assert body["policy_version"] == 1

        headers = {"Content-Type": "application/octet-stream"}
        status, body = call(f"{s.url}/weights?version=2", save(original), headers)
        assert (status, body) == (200, {"version": 2})
        assert greedy(s.url, PROMPTS) == before  # the original weights are back
        assert call(s.url.removesuffix("/v1") + "/health")[1]["version"] == 2

        small = build_model(
            TinyModelConfig(hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=64),
            build_tokenizer(),
            seed=0,
        )
        wrong = {k: v.contiguous() for k, v in small.state_dict().items() if k != "lm_head.weight"}
        status, body = call(f"{s.url}/weights?version=3", save(wrong), headers)
        assert (
            status == 400
            and body["error"]["code"] == "weights_mismatch"
            and "shape" in body["error"]["message"]
        )
        partial = dict(list(original.items())[:3])
        status, body = call(f"{s.url}/weights?version=3", save(partial), headers)
        assert status == 400 and "missing weights" in body["error"]["message"]
        assert call(f"{s.url}/weights?version=3", b"not safetensors", headers)[0] == 400
        status, body = call(f"{s.url}/weights", {"path": "relative.safetensors", "version": 3})
        assert status == 400
        assert greedy(s.url, PROMPTS) == before  # refused reloads left the old weights serving
        assert call(s.url.removesuffix("/v1") + "/health")[1]["version"] == 2
    finally:
        s.stop()


def test_a_busy_port_is_a_one_line_error():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        done = subprocess.run(
            [sys.executable, "-m", "asympo", "serve", f"port={port}"],
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip() == f"asympo: error: cannot listen on 127.0.0.1:{port}: Address already in use"


class CountingEngine(HFEngine):
    calls = 0

    def generate_ids(self, *args, **kwargs):
        self.calls += 1
        return super().generate_ids(*args, **kwargs)


def test_requests_waiting_together_decode_in_one_batch(small_model, tokenizer):
    engine = CountingEngine(small_model, tokenizer, return_logprobs=False, max_batch=64)
    sampling = SamplingConfig(temperature=0, max_new_tokens=5)
    ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]
    alone = [engine.generate_ids([x], sampling)[0][0] for x in ids]
    engine.calls = 0
    batcher = Batcher(engine, window=0.3)
    jobs = [Job([x], 1, sampling, None) for x in ids]
    try:
        gate = threading.Barrier(len(jobs))  # all six submit together, however late a thread starts

        def submit(job: Job) -> None:
            gate.wait()
            batcher.submit(job)

        threads = [threading.Thread(target=submit, args=(job,)) for job in jobs]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        batcher.stop()
    assert engine.calls <= 2  # six requests, one engine call (two if the window closed between submits)
    assert [job.responses[0] for job in jobs] == alone


def test_an_oversized_request_body_is_refused_before_it_is_read(server):
    host, port = server.url.split("//")[1].split("/")[0].split(":")
    with socket.create_connection((host, int(port)), timeout=30) as conn:
        conn.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 1000000000\r\n\r\n{"
        )
        chunks = []  # headers and body may arrive apart: read until the server closes
        try:
            while chunk := conn.recv(4096):
                chunks.append(chunk)
        except ConnectionResetError:
            pass  # the unread body makes the close a reset; what came before it is kept
        reply = b"".join(chunks).decode()
    assert reply.startswith("HTTP/1.0 413") or reply.startswith("HTTP/1.1 413"), reply
    assert '"too_large"' in reply
    assert greedy(server.url, PROMPTS[:1])  # still serving
