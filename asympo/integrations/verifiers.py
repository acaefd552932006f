"""Train on `verifiers` environments (the `verifiers` extra): `task.name=verifiers:<module or file.py>`.

The environment's code runs unchanged. Its episodes call an OpenAI-compatible server: the one `asympo serve`
runs, started here in-process on loopback over the rollout engine itself, so it always has the current
weights. verifiers' own interception server sits between the episode and ours (it records the turns and
applies the environment's limits); its client to us is ours (`AsympoClient`), which asks for the token ids
the engine drew (`return_token_ids`). verifiers builds each episode's token graph from those ids: a model
turn's tokens are exactly the engine's, never a re-encoding of the text the environment saw.

Each episode becomes one sample: the last branch of its trace (the whole episode when every turn's prompt
extends the previous turn token for token, as with a consistent chat template), with `model_mask` on the
tokens the model sampled. A turn whose prompt does not extend the previous one starts a new branch
(`env_forks` counts them); the earlier branches' turns are then not trained on, rather than trained on
re-encoded ids. The reward is the rubric's. An episode that raises, or whose tool call outlasts
`env.step_timeout`, is lost: reward 0, no token trained, counted (`env_errors`, `env_timeouts`).

The model's turns run in `ChatHarness`, a tool-calling chat loop in this process (verifiers' own chat
harness launches a program per episode through `uv`, which needs the network and a second per episode).
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import importlib.machinery
import json
import os
import secrets
import sys
import threading
import types
from pathlib import Path
from typing import Any

import verifiers.v1 as vf
import verifiers.v1.interception.server as interception
from openai import APIStatusError, AsyncOpenAI
from verifiers.v1.clients.eval import EvalClient
from verifiers.v1.harnesses.utils.mcp import call_mcp, connect_mcp
from verifiers.v1.runtimes import ProgramResult
from verifiers.v1.types import TurnTokens

from asympo.config import EnvConfig, SamplingConfig
from asympo.config.loading import deep_merge
from asympo.data.tasks import Problem
from asympo.data.verifiers import module_id, prepend_pythonpath, task_index
from asympo.errors import UserError
from asympo.lifetime import PARENT_ENV
from asympo.rollout.base import Sample
from asympo.serve.app import App
from asympo.serve.server import InProcess

SERVED = "asympo"
KEY_VAR = "ASYMPO_VERIFIERS_KEY"
HARNESS_ID = "asympo_chat"  # found by verifiers as verifiers.v1.harnesses.asympo_chat (registered below)
# For a model without a chat template (the tiny built-in one): the messages' text as it is, each assistant
# turn closed by EOS as the model closes it, so the next turn's prompt extends the last one token for token.
PLAIN_TEMPLATE = (
    "{% for m in messages %}{{ m['content'] or '' }}"
    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{% endfor %}"
)


class ToolTimeout(Exception):
    pass


class AsympoClientConfig(vf.TrainClientConfig):
    """Our server on loopback. A train-client config, so that verifiers asks for whole responses (it frames
    a stream for the program itself) and keeps their token ids."""


class AsympoClient(EvalClient):
    """verifiers' relay client, asking our server for the ids it drew and handing them to the trace."""

    finish: dict[str, str] = {}  # by trace id: how its last model turn ended (`length` marks a cut episode)

    async def get_response(self, dialect, body: dict, sampling, session_id=None, turn=None, headers=None):
        body = {k: v for k, v in body.items() if k not in ("stream", "stream_options")}
        body["return_token_ids"] = True
        response = await super().get_response(dialect, body, sampling, session_id, turn, headers)
        raw = response.raw or {}
        drawn = raw["choices"][0]["token_ids"]
        if session_id:
            AsympoClient.finish[session_id] = raw["choices"][0].get("finish_reason") or "stop"
        response.tokens = TurnTokens(
            prompt_ids=raw["prompt_token_ids"], completion_ids=drawn, completion_logprobs=[0.0] * len(drawn)
        )
        return response


_resolve_client = interception.resolve_client


def _resolve(config):
    return AsympoClient(config) if isinstance(config, AsympoClientConfig) else _resolve_client(config)


interception.resolve_client = _resolve  # verifiers resolves a client by its config's type; ours is new


class ChatHarnessConfig(vf.HarnessConfig):
    pass


class ChatHarness(vf.Harness[ChatHarnessConfig]):
    """The model's side of an episode, in-process: chat turns through the interception endpoint, each tool
    call answered by the task's tool servers (MCP), until a reply without tool calls or the episode's end."""

    APPENDS_SYSTEM_PROMPT = True
    SUPPORTS_MCP = True
    SUPPORTS_RESUME = True
    EXECUTES_CODE = False
    NEEDS_CONTAINER = False
    tool_seconds = 5.0  # set from env.step_timeout

    async def setup(self, runtime) -> None:
        pass

    async def launch(self, ctx, trace, runtime, endpoint, secret, mcp_urls, data, tool_interception_url=None):
        system, prompt = self.resolve_prompt(data)
        messages: list[dict[str, Any]] = [{"role": "system", "content": system}] if system else []
        if isinstance(prompt, str):
            messages.append({"role": "user", "content": prompt})
        else:
            from verifiers.v1.dialects.chat import message_to_wire  # only for a prompt of messages

            messages += [message_to_wire(m) for m in prompt or []]
        client = self._client(endpoint)
        auth = {"Authorization": f"Bearer {secret}"}  # the episode's own key on a shared client
        async with contextlib.AsyncExitStack() as stack:
            servers = {
                "mcpServers": {n: {"url": u, "timeout": self.tool_seconds} for n, u in mcp_urls.items()}
            }
            tools, dispatch, connections = await connect_mcp(servers, stack) if mcp_urls else ([], {}, {})
            while True:
                try:
                    completion = await client.chat.completions.create(
                        model=ctx.model,
                        messages=messages,
                        extra_headers=auth,
                        **({"tools": tools} if tools else {}),
                    )
                except APIStatusError as error:
                    if "rollout stopped" in str(error) or "rollout concluded" in str(error):
                        break  # the environment's limit (turns, tokens): the episode ends as it stands
                    raise
                message = completion.choices[0].message
                messages.append(message.model_dump(exclude_none=True))
                if not message.tool_calls:
                    break
                for call in message.tool_calls:
                    content = await self._tool(call, dispatch, connections)
                    messages.append(
                        {
                            "role": "tool",
                            "tool_call_id": call.id,
                            "name": call.function.name,
                            "content": content,
                        }
                    )
        return ProgramResult(exit_code=0, stdout="", stderr="")

    clients: dict[str, AsyncOpenAI] = {}

    @classmethod
    def _client(cls, endpoint: str) -> AsyncOpenAI:
        """One client per interception endpoint: building one (its TLS context) costs more CPU than a turn."""
        if endpoint not in cls.clients:
            cls.clients[endpoint] = AsyncOpenAI(base_url=endpoint, api_key="per-request", max_retries=0)
        return cls.clients[endpoint]

    async def _tool(self, call, dispatch, connections) -> Any:
        name = call.function.name
        try:
            args = json.loads(call.function.arguments or "{}")
        except json.JSONDecodeError as e:
            return f"error: the arguments are not JSON ({e})"
        if not isinstance(args, dict):
            return "error: the arguments must be a JSON object"
        if name not in dispatch:
            return f"error: no tool {name!r}"
        try:
            return await asyncio.wait_for(call_mcp(connections, dispatch, name, args), self.tool_seconds)
        except TimeoutError:
            raise ToolTimeout(f"tool {name} timed out after {self.tool_seconds:g} s") from None


_module = types.ModuleType(f"verifiers.v1.harnesses.{HARNESS_ID}")
_module.__spec__ = importlib.machinery.ModuleSpec(_module.__name__, None)
_module.ChatHarness, _module.__all__ = ChatHarness, ["ChatHarness"]
sys.modules.setdefault(_module.__name__, _module)


SITE = Path(__file__).resolve().parent.parent / "assets" / "site"


def outlive_nothing() -> None:
    """The processes verifiers starts (tool servers) run in sessions of their own: no signal to this one
    reaches them. A sitecustomize on their PYTHONPATH makes each watch this process and end with it."""
    prepend_pythonpath(str(SITE))
    os.environ[PARENT_ENV] = str(os.getpid())


def serve_engine(engine) -> tuple[InProcess, str]:
    """`asympo serve`'s app over the live engine, on loopback, and its fresh key; a model without a chat
    template gets the plain one."""
    tokenizer, key = engine.tokenizer, secrets.token_urlsafe(16)
    template = getattr(tokenizer, "chat_template", None) or PLAIN_TEMPLATE
    app = App(engine.model, tokenizer, SERVED, api_key=key, engine=engine, chat_template=template)
    return InProcess(app), key


class VerifiersEpisodes:
    """Runs a verifiers environment's episodes for a runtime's job (the `Episodes` interface)."""

    def __init__(self, cfg: EnvConfig, tokenizer):
        self.cfg, self.tokenizer = cfg, tokenizer
        mid = module_id(cfg.name or "")
        base = {
            "taskset": {"id": mid},
            "agent": {
                "harness": {"id": HARNESS_ID},
                "runtime": {"type": "subprocess"},
                "max_turns": cfg.max_turns,
            },
        }
        raw = deep_merge(base, cfg.args)
        raw["taskset"]["id"] = mid
        try:
            self.env = vf.load_environment(vf.resolve_env_config(raw))
            self.tasks = list(self.env.taskset)
        except Exception as e:  # the user's module or its config
            why = f"{type(e).__name__}: {e}".splitlines()[0]
            raise UserError(f"task.name={cfg.name}: not a verifiers environment ({why})") from None
        ChatHarness.tool_seconds = cfg.step_timeout
        outlive_nothing()
        self.servers: dict[int, tuple[InProcess, str]] = {}  # by engine
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, name="asympo-verifiers", daemon=True).start()
        self.serving: contextlib.AbstractAsyncContextManager | None = None
        self.said: set[str] = set()  # the lost episodes' errors already reported
        atexit.register(self.close)

    def run(
        self, engine, problems: list[Problem], n: int, sampling: SamplingConfig, generator=None, refresh=None
    ) -> list[list[Sample]]:
        """`n` episodes per problem, one group each, rewarded by the environment's rubric."""
        if id(engine) not in self.servers:
            self.servers[id(engine)] = serve_engine(engine)
        server, os.environ[KEY_VAR] = self.servers[id(engine)]
        ctx = vf.ModelContext(
            model=SERVED,
            client=AsympoClientConfig(base_url=server.url, api_key_var=KEY_VAR),
            sampling=vf.SamplingConfig(
                temperature=sampling.temperature, top_p=sampling.top_p, max_tokens=sampling.max_new_tokens
            ),
        )
        version = engine.version
        episodes = asyncio.run_coroutine_threadsafe(self._episodes(problems, n, ctx), self.loop).result()
        return [
            [self._sample(episodes[g * n + i], p, g, version, engine.version) for i in range(n)]
            for g, p in enumerate(problems)
        ]

    async def _episodes(self, problems: list[Problem], n: int, ctx) -> list[Any]:
        if self.serving is None:
            self.serving = self.env.serving()
            await self.serving.__aenter__()
        slots = [s for p in problems for s in self.env.slots(self.tasks[task_index(p.answer)], n)]
        return await asyncio.gather(*(self.env.run_slot(s, ctx) for s in slots), return_exceptions=True)

    def _sample(self, episode: Any, problem: Problem, group: int, version: int, version_end: int) -> Sample:
        info: dict[str, float] = {}
        prompt_ids: list[int] = self.tokenizer(problem.prompt, add_special_tokens=False)["input_ids"]
        response: list[int] = []
        mask: list[bool] = []
        reward, finish = 0.0, "stop"
        traces = getattr(episode, "traces", None) or []
        ended = AsympoClient.finish.pop(traces[0].id, "stop") if traces else "stop"
        failure = self._failure(episode)
        if failure is None:
            trace = episode.traces[0]
            branch = trace.branches[-1]
            ids, sampled = list(branch.token_ids), list(branch.sampled_mask)
            start = sampled.index(True)
            prompt_ids, response, mask = ids[:start], ids[start:], sampled[start:]
            room = self.cfg.max_tokens - len(prompt_ids)
            if len(response) > room:  # the learner's longest sequence: cut, and say so
                response, mask, finish = response[: max(room, 0)], mask[: max(room, 0)], "length"
            reward = float(trace.reward or 0.0)
            if ended == "length":  # its last turn ran out of tokens
                finish = "length"
            info["turns"] = float(sum(1 for m in trace.messages if m.role == "assistant"))
            info["tool_calls"] = float(sum(1 for m in trace.messages if m.role == "tool"))
            info["forks"] = float(len(trace.branches) - 1)
            for name, value in (trace.rewards or {}).items():
                info[f"reward_{name}"] = float(value.score)
        else:
            info[f"{failure}s"] = 1.0
        return Sample(
            prompt=problem.prompt,
            prompt_ids=prompt_ids,
            response_ids=response,
            text=self.tokenizer.decode(response, skip_special_tokens=True),
            finish_reason=finish,  # type: ignore[arg-type]
            version=version,
            behaviour_logprobs=None,
            answer=problem.answer,
            reward=reward,
            group=group,
            extra={"env": info},
            version_end=version_end,
            model_mask=mask,
        )

    def _failure(self, episode: Any) -> str | None:
        """`timeout` or `error` for a lost episode (raised, failed, or no model token), else None. Each new
        kind of error is said once on stderr: a lost episode is counted, and why should not be a guess."""
        if isinstance(episode, BaseException):
            errors = [f"{type(episode).__name__}: {episode}"]
        else:
            trace = episode.traces[0] if episode.traces else None
            lost = [*episode.errors, *(trace.errors if trace else [])]
            errors = [
                f"{e.type} ({e.status_code}): {e.message}" if e.status_code else f"{e.type}: {e.message}"
                for e in lost
            ]
            if not errors and (
                trace is None or not trace.branches or True not in trace.branches[-1].sampled_mask
            ):
                errors = ["no model turn"]
        if not errors:
            return None
        said = errors[0].splitlines()[0][:300] if errors[0] else "an error without a message"
        if said not in self.said:
            self.said.add(said)
            print(f"asympo: a verifiers episode was lost: {said}", file=sys.stderr, flush=True)
        return "timeout" if any("timed out" in e for e in errors) else "error"

    def close(self) -> None:
        """Stop the tool servers verifiers started and our server threads."""
        serving, self.serving = self.serving, None
        if serving is not None and self.loop.is_running():
            with contextlib.suppress(Exception):
                asyncio.run_coroutine_threadsafe(serving.__aexit__(None, None, None), self.loop).result(30)
        for server, _ in self.servers.values():
            server.close()
        self.servers.clear()
