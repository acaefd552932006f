"""The environment protocol and episodes on asympo's real engine: token-in/token-out, the model mask, the
context limit, environments that raise or hang, chat-message replies, and the built-in environments."""

from __future__ import annotations

import copy
import time

import pytest
import torch

from asympo.batch import make_batch
from asympo.config import EnvConfig, OpenAIEngineConfig, SamplingConfig
from asympo.data.tasks import Problem
from asympo.envs.base import Step, as_step
from asympo.envs.calculator import Calculator, calculate
from asympo.envs.episodes import Episodes, group_seed
from asympo.envs.guess import Guess
from asympo.envs.load import load_env
from asympo.errors import UserError
from asympo.metrics import episode_metrics
from asympo.models.load import load_policy
from asympo.recompute import BehaviourRecompute
from asympo.rollout.hf import HFEngine
from asympo.rollout.openai import OpenAIEngine
from asympo.rollout.stops import stop_end
from asympo.snapshots import SnapshotStore

PROBLEMS = [Problem("12+34-5=", "41"), Problem("61-20+7=", "48"), Problem("9+80+3=", "92")]
SAMPLING = SamplingConfig(max_new_tokens=24)


@pytest.fixture(scope="module")
def calc_model():
    """The warm start that calls the calculator in about a quarter of its answers (assets/tiny-calc-sft)."""
    return load_policy("tiny-calc")


def run(engine, tokenizer, n=4, seed=0, **env) -> list:
    episodes = Episodes(EnvConfig(**({"name": "calculator"} | env)), tokenizer)
    return episodes.run(engine, PROBLEMS, n, SAMPLING, torch.Generator().manual_seed(seed))


class Recorder:
    """asympo's engine, keeping every continuation it returns: what the model drew, turn by turn."""

    def __init__(self, engine):
        self.engine, self.version, self.drawn = engine, engine.version, []

    def continue_ids(self, *args, **kwargs):
        outs = self.engine.continue_ids(*args, **kwargs)
        self.drawn.append([o.ids for o in outs])
        return outs


def test_calculate_takes_integer_arithmetic_only():
    assert calculate("12+34-5") == "41"
    assert calculate(" (3+4)*5 ") == "35"
    assert calculate("-7//2") == "-4"
    for bad in ("2**99", "__import__('os')", "x+1", "1/0", "1//0", "1.5+1", "9" * 70, "", "12+"):
        assert calculate(bad) == "error", bad


def test_calculator_answers_calls_then_scores_the_final_answer():
    env = Calculator(max_calls=1)
    assert env.reset(PROBLEMS[0], 0) == "12+34-5="
    step = env.step("<calc>12+34-5</calc>")
    assert (step.observation, step.reward, step.done, step.info) == ("41\n", 0.0, False, {"tool_calls": 1})
    assert env.step("<calc>1+1</calc>") == Step(None, 0.0, True, {"used_tool": 1.0})  # past max_calls
    env.reset(PROBLEMS[0], 0)
    assert env.step(" 41 ") == Step(None, 1.0, True, {"used_tool": 0.0})


def test_guess_gives_each_group_one_secret_and_higher_or_lower():
    a, b = Guess(1, 10), Guess(1, 10)
    a.reset(PROBLEMS[0], 5), b.reset(PROBLEMS[1], 5)
    assert a.secret == b.secret  # the seed decides, as for every episode of a group
    low, high = a.step(str(a.secret - 1) if a.secret > 1 else "0"), a.step("11")
    assert (low.observation, high.observation) == ("higher\n", "lower\n")
    assert a.step(f"it is {a.secret}").reward == 1.0
    assert Guess(chat=True).reset(PROBLEMS[0], 1)[0]["role"] == "user"
    with pytest.raises(ValueError):
        Guess(5, 5)


def test_step_results_are_checked():
    assert as_step(("more", 0.5, False, {"k": 1})) == Step("more", 0.5, False, {"k": 1.0})
    for bad in ((None, float("nan"), True, {}), (1, 2), ("x", 0, False, {"k": "v"}), (42, 0, False, {}), 3):
        with pytest.raises(TypeError):
            as_step(bad)


def test_bad_environment_specs_are_one_line_errors():
    for spec, args, words in [
        ("nope", {}, "expected one of 'calculator', 'guess'"),
        ("no_such_module:Env", {}, "module no_such_module not found"),
        ("asympo.envs.guess:Nope", {}, "has no attribute Nope"),
        ("asympo.envs.calculator:calculate", {}, "with env.args={}: TypeError"),
        ("asympo.envs.base:Step", {}, "is not an environment"),
        ("guess", {"low": 9, "high": 1}, "ValueError: low (9) must be below high (1)"),
        ("guess", {"lo": 1}, "unexpected keyword"),
    ]:
        with pytest.raises(UserError, match=None) as e:
            load_env(spec, args)
        assert words in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_trained_ids_are_the_drawn_ids_even_where_the_text_encodes_differently(calc_model):
    model, tokenizer = calc_model
    tokenizer = type(tokenizer).from_pretrained(tokenizer.name_or_path)  # a copy we may change
    tokenizer.add_tokens(["<calc>", "</calc>"])  # re-encoding the text gives these; the model draws chars
    engine = Recorder(HFEngine(model, tokenizer))
    groups = run(engine, tokenizer, n=8)
    samples = [s for g in groups for s in g]
    # per episode, its model turns in order (episodes still live keep their order within each call)
    turns: list[list[list[int]]] = [[] for _ in samples]
    live = list(range(len(samples)))
    for call in engine.drawn:
        for i, ids in zip(live, call, strict=True):
            turns[i].append(ids)
        live = [i for i in live if len(turns[i]) < samples[i].extra["env"]["turns"]]
    tool_episodes = 0
    for s, drawn in zip(samples, turns, strict=True):
        model_ids = [t for t, m in zip(s.response_ids, s.model_mask, strict=True) if m]
        assert model_ids == [t for turn in drawn for t in turn]
        if s.extra["env"].get("tool_calls"):
            tool_episodes += 1
            assert tokenizer(s.text, add_special_tokens=False)["input_ids"] != s.response_ids
            first = len(drawn[0])  # the environment's reply follows the first turn, tokenized alone
            reply = s.response_ids[first : s.model_mask.index(True, first)]
            assert tokenizer.decode(reply) == calculate(s.text.split("<calc>")[1].split("</calc>")[0]) + "\n"
            assert not any(s.model_mask[first : first + len(reply)])
    assert tool_episodes >= 2  # the warm start calls the tool in about a quarter of its answers


def test_the_loss_mask_covers_the_model_tokens_only(calc_model):
    model, tokenizer = calc_model
    samples = [s for g in run(HFEngine(model, tokenizer), tokenizer, n=8) for s in g]
    batch = make_batch(samples, tokenizer.pad_token_id, "group_norm")
    for i, s in enumerate(samples):
        p = len(s.prompt_ids)
        row = batch.response_mask[i, p - 1 : p - 1 + len(s.response_ids)].tolist()
        assert row == s.model_mask and batch.response_mask[i].sum() == sum(s.model_mask)
        assert s.reward == float(s.text.rsplit("\n", 1)[-1].strip() == s.answer)  # the final turn's answer
        assert len(s.behaviour_logprobs) == len(s.response_ids)
    assert any(not all(s.model_mask) for s in samples)
    share = sum(map(sum, (s.model_mask for s in samples))) / sum(len(s.response_ids) for s in samples)
    assert episode_metrics(samples)["trained_token_share"] == pytest.approx(share) and 0 < share < 1


def test_an_episode_stops_cleanly_at_the_context_limit(calc_model):
    model, tokenizer = calc_model
    # room for the prompt and a tool call, not for the reply and an answer
    samples = [s for g in run(HFEngine(model, tokenizer), tokenizer, n=8, max_tokens=32) for s in g]
    for s in samples:
        assert len(s.prompt_ids) + len(s.response_ids) <= 32
        if s.extra["env"].get("tool_calls"):
            assert s.finish_reason == "length" and s.reward == 0.0
    tight = [s for g in run(HFEngine(model, tokenizer), tokenizer, n=8, max_tokens=14) for s in g]
    assert all(len(s.prompt_ids) + len(s.response_ids) <= 14 for s in tight)
    assert any(s.finish_reason == "length" for s in tight)


class Raises:
    stop = ()

    def reset(self, problem, seed):
        return problem.prompt

    def step(self, text):
        if len(text) % 2:
            raise RuntimeError("boom")
        return Step(None, 1.0, True, {})


class Hangs(Raises):
    def step(self, text):
        time.sleep(30)


def test_an_environment_that_raises_or_hangs_costs_its_episode_only(small_model, tokenizer):
    engine = HFEngine(small_model, tokenizer)
    samples = [s for g in run(engine, tokenizer, name=f"{__name__}:Raises", n=8) for s in g]
    lost = [s for s in samples if s.extra["env"].get("errors")]
    assert lost and len(lost) < len(samples)
    assert all(s.reward == (0.0 if s in lost else 1.0) for s in samples)
    assert episode_metrics(samples)["env_errors"] == len(lost)
    start = time.perf_counter()
    hung = [s for g in run(engine, tokenizer, name=f"{__name__}:Hangs", n=2, step_timeout=0.2) for s in g]
    assert time.perf_counter() - start < 5
    assert all(s.reward == 0.0 and s.extra["env"]["timeouts"] == 1 for s in hung)
    assert episode_metrics(hung)["env_timeouts"] == len(hung)


CHATML = (
    "{% for m in messages %}<bos>{{ m['role'] }}\n{{ m['content'] }}<eos>\n{% endfor %}"
    "{% if add_generation_prompt %}<bos>assistant\n{% endif %}"
)


def test_chat_replies_are_the_templates_increment_after_the_models_turn(small_model):
    _, tokenizer = load_policy("tiny")
    tokenizer.chat_template = CHATML
    engine = HFEngine(small_model, tokenizer)
    episodes = Episodes(EnvConfig(name="guess", args={"chat": True}, max_turns=3), tokenizer)
    samples = [s for g in episodes.run(engine, PROBLEMS[:1], 2, SamplingConfig(max_new_tokens=6)) for s in g]
    for s in samples:
        assert s.prompt == "<bos>user\nGuess my number from 1 to 100.<eos>\n<bos>assistant\n"
        starts = [i for i, m in enumerate(s.model_mask) if not m and (i == 0 or s.model_mask[i - 1])]
        assert starts  # an untrained model never guesses right in 3 turns of 6 tokens
        for start in starts:
            end = s.model_mask.index(True, start) if True in s.model_mask[start:] else len(s.model_mask)
            text = tokenizer.decode(s.response_ids[start:end])
            closed = s.response_ids[start - 1] == tokenizer.eos_token_id
            head = "" if closed else "<eos>"  # a turn ended by the stop string is closed by the environment
            assert text.startswith(head + "\n<bos>user\n"), text
            assert text.endswith("<eos>\n<bos>assistant\n"), text


# Like Qwen3's: the last assistant turn keeps an empty think block, which goes once messages follow it
THINKING = (
    "{% for m in messages %}<bos>{{ m['role'] }}\n"
    "{% if m['role'] == 'assistant' and loop.last %}<think>\n\n</think>\n\n{% endif %}"
    "{{ m['content'] }}<eos>\n{% endfor %}{% if add_generation_prompt %}<bos>assistant\n{% endif %}"
)


def test_a_template_that_rerenders_earlier_turns_still_gives_the_increment(small_model):
    _, tokenizer = load_policy("tiny")
    tokenizer.chat_template = THINKING
    episodes = Episodes(EnvConfig(name="guess", args={"chat": True}, max_turns=2), tokenizer)
    engine = HFEngine(small_model, tokenizer)
    samples = [s for g in episodes.run(engine, PROBLEMS[:1], 2, SamplingConfig(max_new_tokens=6)) for s in g]
    for s in samples:
        assert not s.extra["env"].get("errors")
        first = s.model_mask.index(False)
        reply = tokenizer.decode(s.response_ids[first : s.model_mask.index(True, first)])
        assert reply.endswith("<eos>\n<bos>assistant\n") and "think" not in reply


def test_a_chat_reply_the_template_rejects_costs_the_episode(small_model):
    _, tokenizer = load_policy("tiny")
    tokenizer.chat_template = "{{ raise_exception('no') if messages|length > 2 }}" + CHATML
    episodes = Episodes(EnvConfig(name="guess", args={"chat": True}, max_turns=2), tokenizer)
    samples = episodes.run(
        HFEngine(small_model, tokenizer), PROBLEMS[:1], 2, SamplingConfig(max_new_tokens=6)
    )
    for s in samples[0]:
        assert s.extra["env"]["errors"] == 1 and s.reward == 0 and not any(s.model_mask)


def test_episodes_of_a_group_share_the_problem_and_seed():
    assert group_seed(PROBLEMS[0]) == group_seed(Problem(PROBLEMS[0].prompt, "other"))
    assert group_seed(PROBLEMS[0]) != group_seed(PROBLEMS[1])


def test_a_continuation_is_cut_after_the_token_that_completes_a_stop(tokenizer):
    ids = tokenizer("<calc>1+2</calc>99</calc>", add_special_tokens=False)["input_ids"]
    assert stop_end(tokenizer, ids, ["</calc>"]) == len("<calc>1+2</calc>")
    assert stop_end(tokenizer, ids, ["\n"]) is None
    assert stop_end(tokenizer, ids, ["2<", "99"]) == len("<calc>1+2<")


def test_learner_recomputed_behaviour_logprobs_line_up_with_an_episodes_tokens(calc_model):
    model, tokenizer = calc_model
    samples = [s for g in run(HFEngine(model, tokenizer), tokenizer, n=8) for s in g]
    store = SnapshotStore(1)
    store.put(0, {k: v.detach().clone() for k, v in model.state_dict().items()})
    kept, stats = BehaviourRecompute(copy.deepcopy(model), store, tokenizer.pad_token_id).apply(samples)
    # the engine's, on the model's tokens (it masks pad/bos/unk; a token out of line would be off by nats)
    assert kept == samples and stats["behaviour_lp_diff_max"] < 1e-2
    assert all(len(s.behaviour_logprobs) == len(s.response_ids) for s in samples)
    make_batch(samples, tokenizer.pad_token_id, "group_norm")  # one row per episode, every token in place


def test_a_text_only_turn_is_cut_after_its_stop_string_and_tokenized_once(tokenizer):
    engine = OpenAIEngine(OpenAIEngineConfig(base_url="http://127.0.0.1:9/v1"), tokenizer, version=3)
    reply = lambda text, reason: {"choices": [{"text": text, "finish_reason": reason}]}  # noqa: E731
    cut = engine._continuation(reply("<calc>1+2</calc>7\n", "length"), ["</calc>"])
    assert tokenizer.decode(cut.ids) == "<calc>1+2</calc>" and cut.finish_reason == "stop"
    assert cut.versions == [3] * len(cut.ids) and cut.logprobs == [0.0] * len(cut.ids)
    eos = engine._continuation(reply("42", "stop"), ["</calc>"])  # stopped at EOS: the EOS is kept
    assert eos.ids == [*tokenizer("42", add_special_tokens=False)["input_ids"], tokenizer.eos_token_id]
    assert engine._continuation(reply("4242", "length"), ["</calc>"]).finish_reason == "length"
