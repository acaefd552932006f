"""The OpenAI-compatible rollout engine against a real `asympo serve` process: sample shapes and ids, retries
while the server comes up, clear 4xx errors, the API key kept secret, weights pushed again after a server
restart, and `asympo train rollout.engine=openai` learning in the sync and async runtimes."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch
from serving import Server, call, free_port

from asympo.batch import make_batch
from asympo.config import OpenAIEngineConfig, SamplingConfig, TaskConfig, TinyModelConfig, TrainConfig
from asympo.data.tasks import train_stream
from asympo.errors import UserError
from asympo.faults import RunAborted
from asympo.models.load import load_policy
from asympo.models.tiny import build_model, build_tokenizer
from asympo.rollout.client import ApiClient, ServerRejected, ServerUnreachable
from asympo.rollout.hf import HFEngine
from asympo.rollout.openai import OpenAIEngine
from asympo.runtime import build_remote

KEY = "sk-test-0d5e2b9c"
PROMPTS = [p.prompt for _, p in zip(range(5), train_stream(TaskConfig(), 0), strict=False)]
GREEDY = SamplingConfig(temperature=0, max_new_tokens=6)


@pytest.fixture(scope="module")
def tiny():
    return load_policy("tiny")


@pytest.fixture(scope="module")
def server():
    s = Server()
    yield s
    s.stop()


def engine_for(url: str, tokenizer, **cfg) -> OpenAIEngine:
    return OpenAIEngine(OpenAIEngineConfig(base_url=url, **cfg), tokenizer)


def test_groups_of_n_samples_with_ids_that_decode_to_the_text(server, tiny):
    model, tokenizer = tiny
    engine = engine_for(server.url, tokenizer, concurrency=3)
    sampling = SamplingConfig(temperature=1.0, max_new_tokens=6)
    groups = engine.generate(PROMPTS, 4, sampling, torch.Generator().manual_seed(0))
    assert len(groups) == len(PROMPTS) and all(len(g) == 4 for g in groups)
    for gid, (prompt, group) in enumerate(zip(PROMPTS, groups, strict=True)):
        for s in group:
            assert s.prompt == prompt and s.group == gid and s.version == 0 and s.behaviour_logprobs is None
            assert s.prompt_ids == tokenizer(prompt, add_special_tokens=False)["input_ids"]
            assert tokenizer.decode(s.response_ids, skip_special_tokens=True) == s.text
            if s.finish_reason == "stop":
                assert s.response_ids[-1] == tokenizer.eos_token_id
            else:
                assert len(s.response_ids) == sampling.max_new_tokens
    batch = make_batch([s for g in groups for s in g], tokenizer.pad_token_id, "group_norm")
    assert batch.behaviour_logprobs is None and len(batch) == 20
    # Greedy: the same token ids, EOS included, as the in-process engine gives the learner.
    local = HFEngine(model, tokenizer, max_batch=256).generate(PROMPTS, 1, GREEDY)
    remote = engine.generate(PROMPTS, 1, GREEDY)
    assert [g[0].response_ids for g in remote] == [g[0].response_ids for g in local]
    assert [g[0].finish_reason for g in remote] == [g[0].finish_reason for g in local]
    # One request per call (concurrency=1): the seed drawn from the generator makes the call repeat.
    single = engine_for(server.url, tokenizer, concurrency=1)
    runs = [single.generate(PROMPTS, 3, sampling, torch.Generator().manual_seed(5)) for _ in range(2)]
    assert [[s.text for s in g] for g in runs[0]] == [[s.text for s in g] for g in runs[1]]


def test_a_4xx_is_a_clear_error_at_once(server, tiny):
    engine = engine_for(server.url, tiny[1], served_model="no-such-model", retries=3)
    with pytest.raises(ServerRejected, match="HTTP 404.*no-such-model"):
        engine.generate(PROMPTS, 2, GREEDY)
    assert engine.retries == 0


def test_an_unreachable_server_is_one_line_after_the_retries(tiny):
    url = f"http://127.0.0.1:{free_port()}/v1"
    engine = engine_for(url, tiny[1], served_model="tiny", retries=2, backoff=0.05, concurrency=1)
    with pytest.raises(ServerUnreachable, match="gave up after 3 tries") as info:
        engine.generate(PROMPTS, 2, GREEDY)
    assert isinstance(info.value, RunAborted)  # in a run: stop with a checkpoint, resume later
    assert url in str(info.value) and "\n" not in str(info.value) and engine.retries == 2


def test_a_run_whose_server_is_gone_stops_with_one_line_and_a_checkpoint(tmp_path):
    args = [
        "rollout.engine=openai",
        f"rollout.openai.base_url=http://127.0.0.1:{free_port()}/v1",
        "rollout.openai.retries=1",
        "rollout.openai.backoff=0.05",
        "runtime.mode=sync",
        "steps=2",
        "task.test_size=10",
        "eval_samples=1",
        "progress=false",
        f"out={tmp_path}",
    ]
    done = subprocess.run(
        [sys.executable, "-m", "asympo", "train", *args], capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("asympo: run stopped: rollout server http://127.0.0.1:") and "checkpoint" in last
    assert (tmp_path / "checkpoints").exists()


def test_retries_while_the_server_starts_and_the_api_key_stays_secret(tiny, monkeypatch):
    port = free_port()
    url = f"http://127.0.0.1:{port}/v1"
    monkeypatch.setenv("TEST_ROLLOUT_KEY", KEY)
    engine = engine_for(
        url, tiny[1], api_key_env="TEST_ROLLOUT_KEY", served_model="tiny", retries=10, backoff=0.1
    )
    s = Server(
        port=port, env={"ASYMPO_API_KEY": KEY}, wait=False
    )  # still importing torch: refuses connections
    try:
        groups = engine.generate(PROMPTS, 2, GREEDY)
        assert engine.retries > 0 and len(groups) == len(PROMPTS)
        monkeypatch.setenv("TEST_ROLLOUT_KEY", "sk-wrong-7731")
        wrong = engine_for(url, tiny[1], api_key_env="TEST_ROLLOUT_KEY")
        with pytest.raises(ServerRejected, match="HTTP 401") as info:
            wrong.generate(PROMPTS, 2, GREEDY)
        assert "sk-wrong-7731" not in str(info.value) and "sk-wrong-7731" not in repr(wrong)
        assert KEY not in repr(engine) and KEY not in repr(engine.client)
    finally:
        s.stop()
    assert KEY not in s.output()


def random_weights() -> dict[str, torch.Tensor]:
    return build_model(TinyModelConfig(), build_tokenizer(), seed=3).state_dict()


def test_a_restarted_server_gets_the_weights_again(tiny):
    port = free_port()
    first = Server(port=port)
    engine = engine_for(first.url, tiny[1], retries=10, backoff=0.1)
    try:
        engine.load_weights(random_weights(), 5)
        pushed = engine.generate(PROMPTS, 1, GREEDY)
        assert all(g[0].version == 5 for g in pushed)
    finally:
        first.stop()
    second = Server(port=port)  # back with the base model at version 0
    try:
        again = engine.generate(PROMPTS, 1, GREEDY)
        assert engine.repushes == 1
        assert [g[0].version for g in again] == [5] * len(PROMPTS)
        assert [g[0].text for g in again] == [g[0].text for g in pushed]  # the pushed weights, not the base's
        assert call(second.url.removesuffix("/v1") + "/health")[1]["version"] == 5
    finally:
        second.stop()


def test_behaviour_corrected_objectives_need_learner_logprobs(tiny):
    problems = train_stream(TaskConfig(), 0)
    data = {"rollout": {"engine": "openai"}, "objective": {"name": "grpo"}, "runtime": {"mode": "sync"}}
    cfg = TrainConfig.model_validate(data)
    with pytest.raises(UserError, match="behaviour.source=learner"):
        build_remote(cfg, tiny[1], problems, lambda items: [0.0] * len(items), False)
    compare = cfg.model_copy(update={"behaviour": cfg.behaviour.model_copy(update={"compare": True})})
    with pytest.raises(UserError, match="compare"):
        build_remote(compare, tiny[1], problems, lambda items: [0.0] * len(items), False)
    learner = cfg.model_copy(update={"behaviour": cfg.behaviour.model_copy(update={"source": "learner"})})
    build_remote(learner, tiny[1], problems, lambda items: [0.0] * len(items), False).close()


@pytest.fixture(scope="module")
def train_server():
    s = Server()
    yield s
    s.stop()


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_train_through_the_server_raises_held_out_accuracy(train_server, tmp_path, mode):
    out = tmp_path / "run"
    args = [
        "rollout.engine=openai",
        f"rollout.openai.base_url={train_server.url}",
        f"runtime.mode={mode}",
        "steps=30",
        "task.test_size=100",
        "eval_samples=4",
        "eval_every=0",
        "progress=false",
        "save_model=false",
        "checkpoint_every=0",
        f"out={out}",
    ]
    done = subprocess.run(
        [sys.executable, "-m", "asympo", "train", *args], capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr
    result = json.loads((out / "result.json").read_text())
    assert result["version"] == 30 and result["skipped_steps"] == 0
    assert result["accuracy_after"] >= result["accuracy_before"] + 0.04, result
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(m["staleness_hist"] == {"0": 256} for m in steps if "reward" in m) or mode == "async"
    if mode == "async":
        last = [m for m in steps if "reward" in m][-1]
        assert {"buffer_groups", "learner_busy", "worker_busy", "wait_time", "dropped_stale"} <= set(last)
        assert set(last["staleness_hist"]) <= {"0", "1", "2"}
    served = call(train_server.url.removesuffix("/v1") + "/health")[1]["version"]
    assert 27 <= served <= 30  # new weights kept reaching the server


def test_a_redirect_is_refused_and_the_key_never_follows_it(monkeypatch):
    """urllib would resend the Authorization header to wherever a redirect points: the client refuses."""
    seen: list[str | None] = []

    class Target(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            seen.append(self.headers.get("Authorization"))
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"{}")

        def log_message(self, *args):
            pass

    target = ThreadingHTTPServer(("127.0.0.1", 0), Target)

    class Redirect(Target):
        def do_GET(self):  # noqa: N802
            self.send_response(302)
            self.send_header("Location", f"http://127.0.0.1:{target.server_port}/v1/models")
            self.send_header("Content-Length", "0")
            self.end_headers()

    source = ThreadingHTTPServer(("127.0.0.1", 0), Redirect)
    for s in (target, source):
        threading.Thread(target=s.serve_forever, daemon=True).start()
    monkeypatch.setenv("ASYMPO_API_KEY", "sk-never-forward")
    client = ApiClient(f"http://127.0.0.1:{source.server_port}/v1", "ASYMPO_API_KEY", retries=0)
    try:
        with pytest.raises(ServerRejected, match="HTTP 302"):
            client.get("/models")
    finally:
        for s in (target, source):
            s.shutdown()
            s.server_close()
    assert seen == []
