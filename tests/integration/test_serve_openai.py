"""`asympo serve` through the official `openai` Python client, as agent frameworks and chat UIs call it:
streaming, stop strings, log-probs and echo, token-id prompts, n > 1, model aliases, tool calls; and each new
field's bad values. A real server on loopback with the real tiny model (taught a tool-call format here)."""

from __future__ import annotations

import http.client
import json
import shutil
import socket
import time
from pathlib import Path

import openai
import pytest
import torch
from serving import Server, call

from asympo.models.load import load_policy, tiny_checkpoint

KEY = "sk-test-91be0c44"  # made up; never to be printed
TEMPLATE = Path(__file__).resolve().parents[2] / "examples" / "tool_calls.jinja"
TOOLS = [{"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}]
CALL = '<tool_call>{"name": "add", "arguments": {"a": 2, "b": 3}}</tool_call>'


@pytest.fixture(scope="module")
def tool_model(tmp_path_factory):
    """The tiny model taught to answer "2+3?" with a call of the `add` tool in the template's format (300
    Adam steps on that one reply, a few seconds): a real model that really emits a tool call."""
    model, tokenizer = load_policy("tiny")
    tokenizer.chat_template = TEMPLATE.read_text()
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "2+3?"}], tools=TOOLS, tokenize=False, add_generation_prompt=True
    )
    p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    a = tokenizer(CALL, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    ids = torch.tensor([p + a])
    labels = ids.clone()
    labels[0, : len(p)] = -100
    torch.manual_seed(0)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(300):
        loss = model(input_ids=ids, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.05
    where = tmp_path_factory.mktemp("tool-model") / "tiny-tools"
    shutil.copytree(tiny_checkpoint(), where)
    model.save_pretrained(where)
    return where


@pytest.fixture(scope="module")
def server(tool_model):
    s = Server(
        f"model={tool_model}",
        "served_name=[tiny,HuggingFaceTB/SmolLM2-135M-Instruct]",
        f"chat_template={TEMPLATE}",
        env={"ASYMPO_API_KEY": KEY},
    )
    yield s
    assert s.stop() == 0
    assert KEY not in s.output()


@pytest.fixture(scope="module")
def plain():
    """The tiny model as shipped: no chat template, so no tool-call format."""
    s = Server()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url, api_key=KEY, max_retries=0, timeout=60)


def post(server: Server, path: str, body: dict) -> tuple[int, dict]:
    return call(server.url + path, body, {"Authorization": f"Bearer {KEY}"})


def test_models_lists_every_alias_and_each_is_served(client):
    assert [m.id for m in client.models.list()] == ["tiny", "HuggingFaceTB/SmolLM2-135M-Instruct"]
    for name in ("tiny", "HuggingFaceTB/SmolLM2-135M-Instruct"):
        reply = client.completions.create(model=name, prompt="12+7=", max_tokens=3, temperature=0)
        assert reply.model == name and reply.choices[0].text
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4", prompt="12+7=", max_tokens=3)


def test_streamed_text_equals_the_whole_reply(client):
    whole = client.completions.create(model="tiny", prompt=["12+7=", "40+9="], max_tokens=8, temperature=0)
    pieces: dict[int, str] = {0: "", 1: ""}
    reasons, usage = {}, None
    stream = client.completions.create(
        model="tiny",
        prompt=["12+7=", "40+9="],
        max_tokens=8,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    for chunk in stream:
        for choice in chunk.choices:
            pieces[choice.index] += choice.text
            if choice.finish_reason:
                reasons[choice.index] = choice.finish_reason
        usage = chunk.usage or usage
    assert [pieces[0], pieces[1]] == [c.text for c in whole.choices]
    assert reasons == {c.index: c.finish_reason for c in whole.choices}
    assert usage.completion_tokens == whole.usage.completion_tokens
    assert usage.prompt_tokens == whole.usage.prompt_tokens == 10


def test_chat_streams_deltas_that_add_up_to_the_message(client):
    messages = [{"role": "user", "content": "31+45="}]
    whole = client.chat.completions.create(model="tiny", messages=messages, max_tokens=12, temperature=0)
    stream = client.chat.completions.create(
        model="tiny", messages=messages, max_tokens=12, temperature=0, stream=True
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason


def test_stop_cuts_the_text_at_the_first_match(client):
    full = client.completions.create(model="tiny", prompt="12+7=", max_tokens=12, temperature=0).choices[0]
    stop = full.text[1]  # the reply's second character: the cut keeps only the first
    cut = client.completions.create(
        model="tiny", prompt="12+7=", max_tokens=12, temperature=0, stop=[stop, "@@"], logprobs=0
    ).choices[0]
    assert cut.text == full.text[: full.text.index(stop)]
    assert cut.finish_reason == "stop"
    assert cut.logprobs.tokens == list(cut.text)  # no token after the cut comes back (one char each)
    streamed = client.completions.create(
        model="tiny", prompt="12+7=", max_tokens=12, temperature=0, stop=stop, stream=True
    )
    assert "".join(c.choices[0].text for c in streamed if c.choices) == cut.text


def test_logprobs_and_echo_are_the_models_own(client, tool_model):
    """Each reported log-prob equals a float32 log-softmax of one forward pass of the same weights: the raw
    distribution for the prompt's tokens, and for generated ones the distribution they were drawn from, in
    which the special tokens the engine never samples (pad, bos, unk) have no mass."""
    model, tokenizer = load_policy(str(tool_model))
    reply = client.completions.create(
        model="tiny", prompt="12+7=", max_tokens=4, temperature=0, logprobs=3, echo=True
    ).choices[0]
    ids = tokenizer(reply.text, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float()
    banned = [tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.unk_token_id]
    drawn = logits.clone()
    drawn[:, banned] = float("-inf")
    expected = torch.cat([torch.log_softmax(logits[:4], -1), torch.log_softmax(drawn[4:], -1)])
    lp = reply.logprobs
    assert lp.tokens == list(reply.text) and lp.text_offset == list(range(len(reply.text)))
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    for k in range(1, len(ids)):
        assert lp.token_logprobs[k] == pytest.approx(expected[k - 1, ids[k]].item(), abs=1e-4)
        top = expected[k - 1].topk(3)
        best = {
            tokenizer.decode([i]): v for i, v in zip(top.indices.tolist(), top.values.tolist(), strict=True)
        }
        assert set(best) <= set(lp.top_logprobs[k])
        assert lp.tokens[k] in lp.top_logprobs[k]
    # max_tokens=0 with echo scores the prompt only, as vLLM-style clients ask
    status, body = post(
        client_server(client),
        "/completions",
        {"prompt": [ids[:5]], "max_tokens": 0, "echo": True, "logprobs": 0},
    )
    assert status == 200 and body["choices"][0]["text"] == "12+7=" and body["usage"]["completion_tokens"] == 0
    assert body["choices"][0]["logprobs"]["token_logprobs"][1:] == pytest.approx(
        lp.token_logprobs[1:5], abs=1e-5
    )


def client_server(client) -> Server:
    class Url:  # `post` needs only the url
        url = str(client.base_url).rstrip("/")

    return Url()


def test_chat_logprobs_have_the_requested_alternatives(client):
    reply = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "1+1="}],
        max_tokens=5,
        temperature=0,
        logprobs=True,
        top_logprobs=4,
    ).choices[0]
    content = reply.logprobs.content
    assert "".join(c.token for c in content if c.token != "<eos>") == reply.message.content
    for item in content:
        assert len(item.top_logprobs) == 4 and item.logprob <= 0
        assert item.top_logprobs[0].logprob >= item.logprob - 1e-6  # greedy: the chosen one is the best


def test_token_id_prompts_equal_text_prompts_and_n_gives_n_choices(client, tool_model):
    _, tokenizer = load_policy(str(tool_model))
    ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in ("12+7=", "40+9=")]
    by_text = client.completions.create(model="tiny", prompt=["12+7=", "40+9="], max_tokens=6, temperature=0)
    by_ids = client.completions.create(model="tiny", prompt=ids, max_tokens=6, temperature=0)
    assert [c.text for c in by_ids.choices] == [c.text for c in by_text.choices]
    single = client.completions.create(model="tiny", prompt=ids[0], max_tokens=6, temperature=0)
    assert single.choices[0].text == by_text.choices[0].text
    sampled = client.completions.create(model="tiny", prompt="12+7=", max_tokens=6, n=3, seed=5)
    assert [c.index for c in sampled.choices] == [0, 1, 2]


def test_the_sdk_calls_tools(client):
    messages = [{"role": "user", "content": "2+3?"}]
    reply = client.chat.completions.create(model="tiny", messages=messages, tools=TOOLS, temperature=0)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (called,) = choice.message.tool_calls
    assert called.function.name == "add" and json.loads(called.function.arguments) == {"a": 2, "b": 3}

    # the call goes back in the conversation with its result: the template renders both
    messages += [
        choice.message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": called.id, "content": "5"},
    ]
    follow = client.chat.completions.create(
        model="tiny", messages=messages, tools=TOOLS, max_tokens=4, temperature=0
    )
    assert follow.choices[0].finish_reason in ("stop", "length", "tool_calls")

    # streamed: the call arrives whole in one delta, never as half-sent text
    chunks = list(
        client.chat.completions.create(
            model="tiny", messages=messages[:1], tools=TOOLS, temperature=0, stream=True
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert "<tool_call>" not in text
    calls = [t for c in chunks if c.choices for t in (c.choices[0].delta.tool_calls or [])]
    assert len(calls) == 1 and calls[0].function.name == "add"
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_tools_without_a_tool_call_format_are_refused(plain):
    status, body = call(
        plain.url + "/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "tools": TOOLS}
    )
    assert status == 400 and body["error"]["code"] == "tools_unsupported"


@pytest.mark.parametrize(
    ("path", "body", "code"),
    [
        ("/completions", {"prompt": "1", "stop": ["a", "b", "c", "d", "e"]}, "invalid_value"),
        ("/completions", {"prompt": "1", "stop": 7}, "invalid_type"),
        ("/completions", {"prompt": "1", "logprobs": 21}, "invalid_value"),
        ("/completions", {"prompt": "1", "logprobs": True, "echo": "yes"}, "invalid_type"),
        ("/completions", {"prompt": "1", "max_tokens": 0}, "invalid_value"),
        ("/completions", {"prompt": "1" * 200, "echo": True, "max_tokens": 0}, "context_length_exceeded"),
        ("/completions", {"prompt": [[1, 2, 10_000]]}, "invalid_prompt"),
        ("/completions", {"prompt": [[1, 2], "x"]}, "invalid_prompt"),
        ("/completions", {"prompt": "1", "stream_options": {"include_usage": True}}, "invalid_value"),
        (
            "/chat/completions",
            {"messages": [{"role": "user", "content": "1"}], "logprobs": True, "top_logprobs": 21},
            "invalid_value",
        ),
        (
            "/chat/completions",
            {"messages": [{"role": "user", "content": "1"}], "top_logprobs": 2},
            "invalid_value",
        ),
        (
            "/chat/completions",
            {"messages": [{"role": "user", "content": "1"}], "tools": [{"type": "x"}]},
            "invalid_value",
        ),
        (
            "/chat/completions",
            {"messages": [{"role": "user", "content": "1"}], "tools": TOOLS, "tool_choice": "required"},
            "unsupported",
        ),
        (
            "/chat/completions",
            {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
            "invalid_messages",
        ),
    ],
)
def test_bad_values_of_the_new_fields_are_openai_errors(server, path, body, code):
    status, reply = post(server, path, body)
    assert status == 400, reply
    assert reply["error"]["code"] == code and reply["error"]["message"]
    assert post(server, "/completions", {"prompt": "1+1=", "max_tokens": 2})[0] == 200  # still serving


def test_a_client_that_drops_a_stream_frees_its_slot(server):
    """Dropped after its first event, a stream stops generating: fewer tokens than the same seeded request
    run to its end, and the server holds no request afterwards."""
    request = {"prompt": "1", "max_tokens": 120, "temperature": 2.0, "n": 8, "seed": 3}
    status, full = post(server, "/completions", request)
    assert status == 200 and full["usage"]["completion_tokens"] >= 300  # long enough to be cut short
    host, port = server.url.split("//")[1].split("/")[0].rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    conn.request("POST", "/v1/completions", json.dumps(request | {"stream": True}), headers)
    response = conn.getresponse()
    assert response.status == 200 and response.getheader("content-type") == "text/event-stream"
    assert response.read(6) == b"data: "  # the stream has started
    conn.sock.shutdown(socket.SHUT_RDWR)  # gone mid-stream (close() alone leaves the response file open)
    conn.close()
    deadline = time.monotonic() + 20
    while call(server.url.removesuffix("/v1") + "/health")[1]["requests"]:
        assert time.monotonic() < deadline, "the dropped stream still holds the engine"
        time.sleep(0.05)
    assert post(server, "/completions", {"prompt": "1+1=", "max_tokens": 2})[0] == 200
    time.sleep(0.2)
    streamed = [line for line in server.output().splitlines() if line.endswith(" stream dropped")]
    generated = int(streamed[-1].split("tokens=")[1].split()[0].split("+")[1])
    assert generated < full["usage"]["completion_tokens"]


def test_the_access_log_has_a_line_per_request_and_the_refusal_reasons(server):
    post(server, "/completions", {"prompt": "1", "stop": ["a", "b", "c", "d", "e"]})
    call(server.url + "/models")  # no key: a 401
    time.sleep(0.2)
    log = server.output()
    assert "POST /v1/completions 400" in log and "'stop' takes at most 4 strings" in log
    assert "GET /v1/models 401" in log
    assert "tokens=" in log and KEY not in log
