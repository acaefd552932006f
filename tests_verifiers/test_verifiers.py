"""verifiers environments (single-turn with a rubric, multi-turn, tools over MCP) run unchanged through
asympo's OpenAI server on loopback, and train on the token ids the engine drew.

The environments are written here (`envs/`, local data, no hub). The models are real transformers models:
the built-in tiny one, and for tools a small one trained here in seconds to call `add` and then answer
(the tiny model cannot call a tool).
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from asympo.config import SamplingConfig, TaskConfig, TrainConfig
from asympo.data.source import Task
from asympo.data.tasks import Problem
from asympo.envs.episodes import make_episodes
from asympo.models.load import load_policy
from asympo.rollout.hf import HFEngine

ENVS = Path(__file__).parent / "envs"
GREEDY = SamplingConfig(temperature=0.0, max_new_tokens=96)
SAMPLED = SamplingConfig(temperature=1.0, max_new_tokens=8)


def name(module: str) -> str:
    return f"verifiers:{ENVS / module}.py"


def episodes(module: str, tokenizer, options: dict | None = None, **env):
    """The driver a run builds for `task.name=verifiers:<module>` (through the config, as a run does)."""
    cfg = TrainConfig.model_validate({"task": {"name": name(module), "options": options or {}}, "env": env})
    return make_episodes(cfg.env, tokenizer)


def problems(module: str, count: int):
    return Task(TaskConfig(name=name(module))).held_out()[:count]


@pytest.fixture(scope="module")
def tiny():
    model, tokenizer = load_policy("tiny")
    return HFEngine(model, tokenizer, return_logprobs=False)


def test_single_turn_trains_on_the_engines_ids_not_a_reencoding(tiny):
    """The tokenizer gains a merged token "12", so any text with "12" in it re-encodes differently from the
    character ids the model drew; the samples must hold the drawn ids."""
    tokenizer = copy.deepcopy(tiny.tokenizer)
    tokenizer.add_tokens(["12"])  # past the model's 100 logits: never drawn, the model writes "1", "2"
    merged = tokenizer.convert_tokens_to_ids("12")
    assert merged >= tiny.model.config.vocab_size
    engine = HFEngine(tiny.model, tokenizer, return_logprobs=False)
    driver = episodes("vf_arith", tokenizer)
    groups = driver.run(engine, problems("vf_arith", 16), 4, SAMPLED)
    samples = [s for g in groups for s in g]
    assert len(groups) == 16 and all(len(g) == 4 for g in groups)
    assert all(s.extra["env"].get("turns") == 1.0 for s in samples)
    differing = 0
    for s in samples:
        stopped = s.response_ids[-1] == tokenizer.eos_token_id  # else it ran out of tokens (sampled)
        assert s.model_mask == [True] * len(s.response_ids) and (stopped or s.finish_reason == "length")
        assert tokenizer.decode(s.response_ids, skip_special_tokens=True) == s.text
        assert s.prompt_ids == tokenizer(s.prompt, add_special_tokens=False)["input_ids"]
        assert merged not in s.response_ids
        eos = [tokenizer.eos_token_id] * stopped
        reencoded = tokenizer(s.text, add_special_tokens=False)["input_ids"] + eos
        differing += reencoded != s.response_ids
        answer = str(eval(s.prompt.removesuffix("=")))  # the rubric's verdict, recomputed
        assert s.reward == float(s.text.strip() == answer) == s.extra["env"]["reward_correct"]
    assert differing > 0, "no response held '12': the test did not test the re-encoding"
    driver.close()


def test_multi_turn_keeps_every_turn_and_masks_the_environments_tokens(tiny):
    driver = episodes("vf_guess", tiny.tokenizer, args={"rounds": 3}, max_turns=3)
    groups = driver.run(tiny, problems("vf_guess", 8), 2, SamplingConfig(temperature=1.0, max_new_tokens=4))
    samples = [s for g in groups for s in g]
    multi = [s for s in samples if s.extra["env"]["turns"] > 1]
    assert multi, "no episode took a second turn"
    for s in samples:
        env = s.extra["env"]
        assert env["forks"] == 0  # each turn's prompt extends the last, token for token: one sequence
        assert env.get("errors", 0) == 0
        assert (
            sum(1 for a, b in zip(s.model_mask, s.model_mask[1:], strict=False) if a and not b)
            == env["turns"] - 1
        )
        assert s.reward == env["reward_solved"]
        # the last turn ran out of its 4 tokens exactly when it does not end in EOS
        assert (s.finish_reason == "length") == (s.response_ids[-1] != tiny.tokenizer.eos_token_id)
    s = multi[0]
    replies = [i for i, m in enumerate(s.model_mask) if not m]
    # the environment's replies (and the EOS the template closes a turn with when the model ran out of tokens)
    said = tiny.tokenizer.decode([s.response_ids[i] for i in replies], skip_special_tokens=True)
    assert said in ("+", "-", "+-", "-+", "++", "--")
    driver.close()


# The tool model: the tiny model's characters, a chat template that renders tools and `<tool_call>`
# replies, and a 2-layer model trained here to call `add` and then give the tool's answer.
TOOLS_TEMPLATE = (
    "{%- for m in messages -%}"
    "{%- if m['role'] == 'assistant' -%}"
    "{%- for c in m['tool_calls'] or [] -%}{%- set args = c['function']['arguments'] -%}"
    "<tool_call>{\"name\": \"{{ c['function']['name'] }}\", "
    '"arguments": {{ args if args is string else args | tojson }}}</tool_call>{%- endfor -%}'
    "{{- m['content'] or '' }}{{ eos_token }}"
    "{%- elif m['role'] == 'tool' -%}={{ m['content'] }};"
    "{%- else -%}{{ m['content'] }}{% if tools %}:{% endif %}"
    "{%- endif -%}{%- endfor -%}"
)


def call(a: int, b: int) -> str:
    return f'<tool_call>{{"name": "add", "arguments": {{"a": {a}, "b": {b}}}}}</tool_call>'


@pytest.fixture(scope="module")
def tool_engine(tiny):
    tokenizer = copy.deepcopy(tiny.tokenizer)
    tokenizer.chat_template = TOOLS_TEMPLATE
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    pairs = []
    for a, b in ((2, 3), (7, 8)):
        first = f"{a}+{b}:"
        pairs += [(first, call(a, b)), (f"{first}{call(a, b)}{tokenizer.eos_token}={a + b};", str(a + b))]
    rows = []
    for prompt, reply in pairs:
        p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        r = tokenizer(reply, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        rows.append((p + r, len(p)))
    optim = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(300):
        loss = 0.0
        for ids, start in rows:
            x = torch.tensor([ids])
            labels = x.clone()
            labels[0, :start] = -100
            loss = loss + model(input_ids=x, labels=labels).loss
        optim.zero_grad()
        loss.backward()
        optim.step()
    model.eval()
    return HFEngine(model, tokenizer, return_logprobs=False)


def test_tool_env_calls_the_python_tool_over_mcp(tool_engine):
    driver = episodes("vf_tools", tool_engine.tokenizer)
    (group,) = driver.run(tool_engine, [Problem("2+3", json.dumps({"verifiers": 0}))], 2, GREEDY)
    for s in group:
        env = s.extra["env"]
        assert env["tool_calls"] == 1 and env["turns"] == 2 and env["forks"] == 0, env
        assert s.reward == 1.0 and s.text.endswith("5")
        text = tool_engine.tokenizer.decode(s.response_ids)
        assert text.startswith(call(2, 3)) and "=5;" in text  # the tool's result, in the model's context
        tool_tokens = [t for t, m in zip(s.response_ids, s.model_mask, strict=True) if not m]
        assert tool_engine.tokenizer.decode(tool_tokens) == "=5;"
    driver.close()


def test_a_hanging_tool_loses_its_episode_counted(tool_engine):
    driver = episodes("vf_tools", tool_engine.tokenizer, {"slow": True}, step_timeout=1.0)
    start = time.monotonic()
    (group,) = driver.run(tool_engine, [Problem("7+8", json.dumps({"verifiers": 0}))], 2, GREEDY)
    assert time.monotonic() - start < 30  # the tool sleeps 60 s: the episode did not wait for it
    for s in group:
        assert s.extra["env"] == {"timeouts": 1.0} and s.reward == 0.0
        assert not any(s.model_mask)
    driver.close()


KILLED_MID_TOOL = """
import json, sys
from asympo.config import TrainConfig, SamplingConfig
from asympo.data.tasks import Problem
from asympo.envs.episodes import make_episodes
from asympo.models.load import load_policy
from asympo.rollout.hf import HFEngine
model, tokenizer = load_policy(sys.argv[1])
cfg = TrainConfig.model_validate(
    {"task": {"name": sys.argv[2], "options": {"slow": True}}, "env": {"step_timeout": 300}}
)
driver = make_episodes(cfg.env, tokenizer)
print("calling", flush=True)
driver.run(HFEngine(model, tokenizer), [Problem("7+8", json.dumps({"verifiers": 0}))], 1,
           SamplingConfig(temperature=0.0, max_new_tokens=96))
"""


def tool_servers() -> list[int]:
    """Live `python -m vf_toolset` processes (not zombies)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if b"vf_toolset" in stat.read_bytes() and (stat.parent / "stat").read_text().split()[2] != "Z":
                found.append(int(stat.parent.name))
        except OSError:
            continue
    return found


def test_a_tool_server_ends_when_the_run_is_sigkilled(tool_engine, tmp_path):
    """verifiers starts each tool server in a session of its own, which no signal to the run reaches; the
    server still ends once the run is gone, SIGKILL included."""
    assert not tool_servers()
    folder = tmp_path / "tool-model"
    tool_engine.model.save_pretrained(folder)
    tool_engine.tokenizer.save_pretrained(folder)
    run = subprocess.Popen(
        [sys.executable, "-c", KILLED_MID_TOOL, str(folder), name("vf_tools")],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while not tool_servers() and time.monotonic() < deadline and run.poll() is None:
            time.sleep(0.2)
        servers = tool_servers()
        assert servers, "the tool server never started"
        time.sleep(2)  # the model is inside the hanging call now
    finally:
        run.kill()
        run.wait()
    # It watches the run twice a second (asympo.lifetime). Without that it lingered 12 s here, until some
    # timeout of its own: 5 s tells the two apart.
    deadline = time.monotonic() + 5
    while tool_servers() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not tool_servers(), "a tool server outlived the run"


def test_an_environment_that_raises_loses_those_episodes_only(tiny):
    driver = episodes("vf_broken", tiny.tokenizer)
    asked = problems("vf_broken", 6)
    groups = driver.run(tiny, asked, 2, SAMPLED)
    for p, group in zip(asked, groups, strict=True):
        odd = int(p.prompt.split("+")[0]) % 2
        for s in group:
            if odd:
                assert s.extra["env"] == {"errors": 1.0} and s.reward == 0.0 and not any(s.model_mask)
            else:
                assert s.reward == 1.0 and all(s.model_mask)
    assert {int(p.prompt.split("+")[0]) % 2 for p in asked} == {0, 1}
    driver.close()


def asympo(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "asympo", *args], capture_output=True, text=True, timeout=timeout
    )


@pytest.mark.parametrize(
    ("module", "says"),
    [("not_vf", "not a verifiers taskset"), ("missing", "no file")],
)
def test_a_module_that_is_not_a_taskset_is_one_line(tmp_path, module, says):
    run = asympo("train", f"task.name={name(module)}", f"out={tmp_path / 'run'}", "steps=1")
    assert run.returncode == 2, run.stderr
    assert says in run.stderr and "Traceback" not in run.stderr
    assert len(run.stderr.strip().splitlines()) == 1, run.stderr


def test_an_objective_that_needs_behaviour_logprobs_is_refused(tmp_path):
    run = asympo("train", f"task.name={name('vf_arith')}", "objective.name=grpo", f"out={tmp_path / 'run'}")
    assert run.returncode == 2 and "behaviour.source=learner" in run.stderr, run.stderr


def test_training_on_a_verifiers_environment_raises_its_reward(tmp_path):
    """The tiny model on the single-turn sums, its reward from the environment's rubric."""
    out = tmp_path / "run"
    run = asympo(
        "train",
        f"task.name={name('vf_arith')}",
        f"out={out}",
        "steps=60",
        "task.options.size=2000",  # about 200 held-out tasks
        "eval_samples=2",
        "eval_every=0",
        "progress=false",
        timeout=900,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "reward" in r]  # training steps (not the held-out evaluations)
    first, last = rows[:10], rows[-10:]
    mean = lambda xs: sum(r["reward"] for r in xs) / len(xs)  # noqa: E731
    assert mean(last) > mean(first) + 0.05, (mean(first), mean(last))
    result = json.loads((out / "result.json").read_text())
    after = result["accuracy_after"] + result["greedy_accuracy_after"]
    assert after > result["accuracy_before"] + result["greedy_accuracy_before"], result
    assert all(r["env_errors"] == 0 and r["env_forks"] == 0 for r in rows)
