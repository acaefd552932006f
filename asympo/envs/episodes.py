"""Run episodes on an engine, turn by turn, keeping the model's token ids exactly as drawn.

All live episodes of a batch take their next model turn in one engine call (continuous batching within the
turn); each turn is then stepped by its own environment. The model's tokens are kept as the engine drew them
and never re-tokenized; an environment's reply is tokenized alone (text) or rendered as the chat template's
increment after the model's turn (messages), and appended. The sample's `model_mask` marks the model's tokens:
the loss covers those only. Episodes of a group share the problem and the environment's seed.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from asympo.config import EnvConfig, SamplingConfig
from asympo.data.tasks import Problem
from asympo.envs.base import Observation, as_step, check_observation
from asympo.envs.calls import EnvCalls
from asympo.envs.load import load_env
from asympo.errors import UserError
from asympo.rollout.base import Continuation, Sample
from asympo.specs import import_named

# An assistant turn whose content cannot be mistaken: what a template renders after it is the increment that
# follows a model's turn (its end, the environment's messages, the next assistant header). Earlier turns may
# render differently once messages follow them (Qwen3 drops an empty think block): they are never re-read.
SENTINEL = "ASYMPO-TURN-7f3a"
BASE_TURNS = [{"role": "user", "content": "?"}, {"role": "assistant", "content": SENTINEL}]


def group_seed(problem: Problem) -> int:
    """The environment's seed for every episode of a problem's group: a property of the problem."""
    return int.from_bytes(hashlib.blake2b(problem.prompt.encode(), digest_size=4).digest(), "little")


@dataclass
class Episode:
    problem: Problem
    group: int
    env: Any
    prompt: str = ""
    prompt_ids: list[int] = field(default_factory=list)
    response: list[int] = field(default_factory=list)
    mask: list[bool] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    versions: list[int] = field(default_factory=list)
    version: int = 0
    version_end: int = 0
    reward: float = 0.0
    turns: int = 0
    done: bool = False
    finish_reason: str = "stop"
    info: dict[str, float] = field(default_factory=dict)

    @property
    def length(self) -> int:
        return len(self.prompt_ids) + len(self.response)

    def fail(self, kind: str) -> None:
        """An environment call raised or hung: the episode ends with reward 0, counted, and none of its
        tokens is trained on (the fault is not the model's); its reward still counts in the group's mean."""
        self.done, self.reward = True, 0.0
        self.mask = [False] * len(self.mask)
        self.info[f"{kind}s"] = 1.0


class Episodes:
    """Runs an environment's episodes on any engine with `continue_ids` (asympo's engine in every runtime)."""

    def __init__(self, cfg: EnvConfig, tokenizer):
        if cfg.name is None:
            raise UserError("env.name is not set")
        self.cfg, self.tokenizer = cfg, tokenizer
        self.make = load_env(cfg.name, cfg.args)
        self.stops = list(getattr(self.make(), "stop", ()))
        self.calls = EnvCalls(cfg.step_timeout)
        self.eos = tokenizer.eos_token_id

    def run(
        self,
        engine,
        problems: list[Problem],
        n: int,
        sampling: SamplingConfig,
        generator: torch.Generator | None = None,
        refresh=None,
    ) -> list[list[Sample]]:
        """`n` episodes per problem, one group each, with the environment's rewards."""
        self.engine_logprobs = getattr(engine, "return_logprobs", True)
        episodes = [self._start(p, g, engine.version) for g, p in enumerate(problems) for _ in range(n)]
        while live := [e for e in episodes if not e.done]:
            budgets = [min(sampling.max_new_tokens, self.cfg.max_tokens - e.length) for e in live]
            sequences = [e.prompt_ids + e.response for e in live]
            kwargs = {"refresh": refresh} if refresh is not None else {}
            outs = engine.continue_ids(sequences, sampling, generator, self.stops, budgets, **kwargs)
            for e, out in zip(live, outs, strict=True):
                self._model_turn(e, out)
        return [[self._sample(e) for e in episodes[g * n : (g + 1) * n]] for g in range(len(problems))]

    def _start(self, problem: Problem, group: int, version: int) -> Episode:
        e = Episode(problem, group, self.make(), version=version, version_end=version)
        failure, obs = self.calls(e.env.reset, problem, group_seed(problem))
        if failure is None:
            failure, obs = self._guarded(self._first_text, obs)
        if failure is not None:
            e.prompt, e.prompt_ids = problem.prompt, self._encode(problem.prompt)
            e.fail(failure)
            return e
        e.prompt, e.prompt_ids = obs, self._encode(obs)
        if e.length >= self.cfg.max_tokens:
            e.done, e.finish_reason = True, "length"
        return e

    def _model_turn(self, e: Episode, out: Continuation) -> None:
        if not e.response:
            e.version = min(out.versions, default=e.version)
        e.response += out.ids
        e.mask += [True] * len(out.ids)
        e.logprobs += out.logprobs
        e.versions += out.versions
        e.version_end, e.turns = out.version_end, e.turns + 1
        if out.finish_reason == "length" and e.length >= self.cfg.max_tokens:  # no room left to answer it
            e.done, e.finish_reason = True, "length"
            return
        failure, result = self.calls(e.env.step, self.tokenizer.decode(out.ids, skip_special_tokens=True))
        if failure is None:
            try:
                step = as_step(result)
            except TypeError as error:
                failure, result = "error", str(error)
        if failure is not None:
            e.fail(failure)
            return
        e.reward += step.reward
        for key, value in step.info.items():
            e.info[key] = e.info.get(key, 0.0) + value
        if step.done or step.observation is None:
            e.done = True
            return
        if e.turns >= self.cfg.max_turns:  # out of turns: the environment's verdict stands (not truncated)
            e.done, e.info["out_of_turns"] = True, 1.0
            return
        failure, ids = self._guarded(self._reply_ids, step.observation, out.ids)
        if failure is not None:
            e.fail(failure)
            return
        if e.length + len(ids) >= self.cfg.max_tokens:  # the reply would leave no room for a turn
            e.done, e.finish_reason = True, "length"
            return
        e.response += ids
        e.mask += [False] * len(ids)
        e.logprobs += [0.0] * len(ids)
        e.versions += [e.versions[-1] if e.versions else e.version] * len(ids)

    def _guarded(self, render, *args) -> tuple[str | None, Any]:
        """Check and render what an environment returned; a malformed observation, or one the chat template
        rejects, is the environment's error: its episode is lost, counted."""
        try:
            return None, render(*args)
        except Exception as error:  # TypeError from the checks, jinja's errors from templates
            return "error", f"{type(error).__name__}: {error}"

    def _first_text(self, obs: Any) -> str:
        check_observation(obs)
        if obs == "":
            raise TypeError("the first observation is empty")
        if isinstance(obs, str):
            return obs
        return self.tokenizer.apply_chat_template(obs, tokenize=False, add_generation_prompt=True)

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _reply_ids(self, obs: Observation, turn: list[int]) -> list[int]:
        """Text as it is; messages as the chat template renders them after an assistant turn: the turn's end,
        the messages and the next assistant header. The turn's end is left out when the model's last token
        already wrote it (EOS or the template's end-of-turn token), else the environment closes the turn."""
        check_observation(obs)
        if isinstance(obs, str):
            return self._encode(obs)
        after = self.tokenizer.apply_chat_template(
            BASE_TURNS + obs, tokenize=False, add_generation_prompt=True
        )
        if after.count(SENTINEL) != 1:
            raise TypeError("the chat template does not render an assistant turn's content as it is")
        text = after[after.index(SENTINEL) + len(SENTINEL) :]
        last = self.tokenizer.decode(turn[-1:]) if turn else ""
        if last.strip() and text.startswith(last):
            text = text[len(last) :]
        return self._encode(text)

    def _sample(self, e: Episode) -> Sample:
        oldest = min(e.versions, default=e.version)
        model_versions = [v for v, m in zip(e.versions, e.mask, strict=True) if m]
        spans = any(v != oldest for v in model_versions)
        e.info["turns"] = float(e.turns)
        return Sample(
            prompt=e.prompt,
            prompt_ids=e.prompt_ids,
            response_ids=e.response,
            text=self.tokenizer.decode(e.response, skip_special_tokens=True),
            finish_reason=e.finish_reason,  # type: ignore[arg-type]
            version=oldest,
            behaviour_logprobs=e.logprobs if self.engine_logprobs else None,
            answer=e.problem.answer,
            reward=e.reward,
            group=e.group,
            extra={"env": dict(e.info)},
            token_versions=e.versions if spans else None,
            version_end=e.version_end,
            model_mask=e.mask,
        )


class EpisodeRunner(Protocol):
    """What runs a job's episodes: `Episodes` here, or `asympo.integrations.verifiers.VerifiersEpisodes`."""

    def run(
        self,
        engine,
        problems: list[Problem],
        n: int,
        sampling: SamplingConfig,
        generator: torch.Generator | None = None,
        refresh=None,
    ) -> list[list[Sample]]: ...


# Drivers above this layer, named by import path as any plugin: verifiers' environments run through the
# OpenAI server, which sits above the environments.
VERIFIERS_DRIVER = "asympo.integrations.verifiers:VerifiersEpisodes"


def make_episodes(cfg: EnvConfig, tokenizer) -> EpisodeRunner | None:
    """What runs `env.name`'s episodes: nothing (single-turn), asympo's driver, or verifiers'."""
    if not cfg.name:
        return None
    if cfg.name.startswith("verifiers:"):
        try:
            import verifiers  # noqa: F401  (the `verifiers` extra)
        except ImportError:
            raise UserError(
                f"task.name={cfg.name}: verifiers is not installed (pip install 'asympo[verifiers]')"
            ) from None
        return import_named(f"env.name={cfg.name!r}", VERIFIERS_DRIVER, {}, "Class")(cfg, tokenizer)
    return Episodes(cfg, tokenizer)


def generate_groups(
    engine,
    problems: list[Problem],
    n: int,
    sampling: SamplingConfig,
    generator: torch.Generator | None = None,
    refresh=None,
    episodes: EpisodeRunner | None = None,
) -> list[list[Sample]]:
    """What a runtime calls for a job: single-turn responses (to be scored by the reward) or, with an
    environment, whole episodes already rewarded by it."""
    if episodes is not None:
        return episodes.run(engine, problems, n, sampling, generator, refresh)
    kwargs = {"refresh": refresh} if refresh is not None else {}
    return engine.generate([p.prompt for p in problems], n, sampling, generator, **kwargs)
