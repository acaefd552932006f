"""`asympo serve` as a real process on loopback: OpenAI response shapes, greedy output equal to the in-process
engine, OpenAI-style errors, the optional API key, weight reloads (file, raw bytes, refused shapes), vLLM's
`return_token_ids`; and an `App` serving a given engine in-process."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading

import pytest
import torch
from safetensors.torch import save, save_file
from serving import Server, call, in_process, stream

from asympo.config import SamplingConfig, TaskConfig, TinyModelConfig
from asympo.data.tasks import train_stream
from asympo.models.load import load_policy
from asympo.models.tiny import build_model, build_tokenizer
from asympo.rollout.hf import HFEngine
from asympo.serve.app import App
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
        ("/completions", {"prompt": "1+2=", "return_token_ids": "yes"}, 400, "invalid_type"),
        (
            "/chat/completions",
            {"messages": [{"role": "user", "content": "1+2="}], "return_token_ids": 1},
            400,
            "invalid_type",
        ),
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


@pytest.fixture(scope="module")
def tiny_tokenizer():
    return load_policy("tiny")[1]


def encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_return_token_ids_are_the_ids_the_engine_saw_and_drew(server, tiny_tokenizer):
    """Completions: both lists in each choice; chat: the prompt's at the top. `token_ids` decode to the text
    and end in EOS exactly when the choice stopped on it; their count is the usage's."""
    eos = tiny_tokenizer.eos_token_id
    request = {"prompt": PROMPTS[:3], "n": 3, "max_tokens": 3, "temperature": 1.0, "seed": 4}
    status, body = call(f"{server.url}/completions", request | {"return_token_ids": True})
    assert status == 200, body
    reasons = set()
    for c in body["choices"]:
        assert c["prompt_token_ids"] == encode(tiny_tokenizer, PROMPTS[c["index"] // 3])
        assert tiny_tokenizer.decode(c["token_ids"], skip_special_tokens=True) == c["text"]
        assert (c["token_ids"][-1] == eos) == (c["finish_reason"] == "stop")
        assert eos not in c["token_ids"][:-1]
        reasons.add(c["finish_reason"])
    assert reasons == {"stop", "length"}  # the seed gives both kinds of ending
    assert body["usage"]["completion_tokens"] == sum(len(c["token_ids"]) for c in body["choices"])
    plain = call(f"{server.url}/completions", request)[1]  # the same seeded request, without the field
    assert [c["text"] for c in plain["choices"]] == [c["text"] for c in body["choices"]]

    messages = [{"role": "user", "content": PROMPTS[2]}]
    status, chat = call(
        f"{server.url}/chat/completions",
        {"messages": messages, "max_tokens": 8, "temperature": 0, "return_token_ids": True},
    )
    assert status == 200, chat
    # no chat template: the rendered prompt is the message itself
    assert chat["prompt_token_ids"] == encode(tiny_tokenizer, PROMPTS[2])
    (choice,) = chat["choices"]
    assert choice["finish_reason"] == "stop" and choice["token_ids"][-1] == eos
    assert (
        tiny_tokenizer.decode(choice["token_ids"], skip_special_tokens=True) == choice["message"]["content"]
    )


def test_return_token_ids_keep_the_tokens_of_a_cut_stop_string(server, tiny_tokenizer):
    whole = call(
        f"{server.url}/completions",
        {"prompt": PROMPTS[0], "max_tokens": 8, "temperature": 0, "return_token_ids": True},
    )[1]["choices"][0]
    stop = whole["text"][1]  # the reply's second character: the text keeps only the first
    request = {
        "prompt": PROMPTS[0],
        "max_tokens": 8,
        "temperature": 0,
        "stop": stop,
        "return_token_ids": True,
    }
    cut = call(f"{server.url}/completions", request)[1]["choices"][0]
    assert cut["text"] == whole["text"][:1] and cut["finish_reason"] == "stop" and cut["stop_reason"] == stop
    assert cut["token_ids"] == whole["token_ids"][:2]  # the token that completed the stop string is there
    assert tiny_tokenizer.decode(cut["token_ids"]) == whole["text"][:1] + stop
    chat = call(
        f"{server.url}/chat/completions",
        {"messages": [{"role": "user", "content": PROMPTS[0]}]} | request,
    )[1]["choices"][0]
    assert chat["message"]["content"] == cut["text"] and chat["token_ids"] == cut["token_ids"]


def joined_ids(events: list[dict]) -> dict[int, list[int]]:
    ids: dict[int, list[int]] = {}
    for e in events:
        for c in e["choices"]:
            ids.setdefault(c["index"], []).extend(c["token_ids"])
    return ids


def test_streamed_token_ids_add_up_to_the_whole_reply(server, tiny_tokenizer):
    """A seeded request streamed and not: each chunk's `token_ids` are that delta's, and joined they are the
    whole reply's, a cut stop string's tokens included; the prompt's ids come once, first."""
    request = {
        "prompt": PROMPTS[:2],
        "n": 2,
        "max_tokens": 10,
        "temperature": 1.5,
        "seed": 9,
        "stop": ["1", "5", "@@"],  # "@@" never matches: the last character is held back at each step
        "return_token_ids": True,
    }
    whole = call(f"{server.url}/completions", request)[1]["choices"]
    events = stream(f"{server.url}/completions", request | {"stream": True})
    assert joined_ids(events) == {c["index"]: c["token_ids"] for c in whole}
    assert any(not p["text"] and p["token_ids"] for e in events for p in e["choices"])  # ids of held text
    texts = {c["index"]: "" for c in whole}
    for e in events:
        assert "prompt_token_ids" not in e
        for c in e["choices"]:
            texts[c["index"]] += c["text"]
    assert texts == {c["index"]: c["text"] for c in whole}
    for c in whole:  # each choice's first part, and only that one, has its prompt's ids
        parts = [p for e in events for p in e["choices"] if p["index"] == c["index"]]
        assert parts[0]["prompt_token_ids"] == c["prompt_token_ids"]
        assert all("prompt_token_ids" not in p for p in parts[1:])
    assert any(
        c["finish_reason"] == "stop" and c["token_ids"][-1] != tiny_tokenizer.eos_token_id for c in whole
    )

    chat = {"messages": [{"role": "user", "content": PROMPTS[1]}]} | request
    del chat["prompt"]
    reply = call(f"{server.url}/chat/completions", chat)[1]
    events = stream(f"{server.url}/chat/completions", chat | {"stream": True})
    assert events[0]["prompt_token_ids"] == reply["prompt_token_ids"] == encode(tiny_tokenizer, PROMPTS[1])
    assert all("prompt_token_ids" not in e for e in events[1:])
    assert joined_ids(events) == {c["index"]: c["token_ids"] for c in reply["choices"]}


def test_without_return_token_ids_the_replies_are_unchanged(server):
    top = {"id", "object", "created", "model", "choices", "usage", "policy_version"}
    for flag in ({}, {"return_token_ids": False}, {"return_token_ids": None}):
        body = {"prompt": PROMPTS[:2], "max_tokens": 4, "stop": "1"} | flag
        reply = call(f"{server.url}/completions", body)[1]
        assert set(reply) == top
        assert all(
            set(c) == {"index", "text", "finish_reason", "logprobs", "stop_reason"} for c in reply["choices"]
        )
        chat = {"messages": [{"role": "user", "content": PROMPTS[0]}], "max_tokens": 4} | flag
        reply = call(f"{server.url}/chat/completions", chat)[1]
        assert set(reply) == top
        assert set(reply["choices"][0]) == {"index", "message", "finish_reason", "logprobs"}
        for path, request in (("/completions", body), ("/chat/completions", chat)):
            text = json.dumps(stream(server.url + path, request | {"stream": True}))
            assert "token_ids" not in text


def test_an_app_serves_through_the_engine_it_is_given():
    """`App(engine=...)`: the engine's version in /health and the replies, the weights loaded into the engine
    serve the next request, and reloads through the app reach the engine. An engine built to return
    log-probs (a training run's rollout engine) serves log-prob requests too."""
    model, tokenizer = load_policy("tiny")
    engine = HFEngine(model, tokenizer, version=5, return_logprobs=True, max_batch=8)
    with pytest.raises(ValueError, match="engine.model"):
        App(load_policy("tiny")[0], tokenizer, "tiny", engine=engine)
    app = App(engine.model, engine.tokenizer, "tiny", engine=engine)
    sampling = SamplingConfig(temperature=0, max_new_tokens=8)
    ids = [encode(tokenizer, p) for p in PROMPTS]

    def direct() -> list[str]:
        with app.batcher.lock:  # the engine's other user waits for the app's batch to end, and vice versa
            responses = engine.generate_ids(ids, sampling)[0]
        return [tokenizer.decode(r, skip_special_tokens=True) for r in responses]

    with in_process(app) as url:
        health = url.removesuffix("/v1") + "/health"
        assert call(health) == (200, {"status": "ok", "version": 5, "requests": 0})
        before = direct()
        assert greedy(url, PROMPTS) == before
        status, body = call(f"{url}/completions", {"prompt": PROMPTS[0], "max_tokens": 4, "logprobs": 2})
        assert status == 200 and body["policy_version"] == 5 and len(body["choices"][0]["logprobs"]["tokens"])

        with app.batcher.lock:  # what a training run does between steps
            engine.load_weights(random_tiny_weights(), 6)
        assert call(health)[1]["version"] == 6
        changed = greedy(url, PROMPTS)
        assert changed == direct() and changed != before
        assert call(f"{url}/completions", {"prompt": PROMPTS[0]})[1]["policy_version"] == 6

        original = {k: v for k, v in load_policy("tiny")[0].state_dict().items() if k != "lm_head.weight"}
        headers = {"Content-Type": "application/octet-stream"}
        assert call(f"{url}/weights?version=7", save(original), headers) == (200, {"version": 7})
        assert engine.version == 7 and direct() == before == greedy(url, PROMPTS)
