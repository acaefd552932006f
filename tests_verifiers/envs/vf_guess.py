"""Multi-turn: guess a number; the environment answers each guess with "higher" or "lower"."""

import verifiers.v1 as vf


class GuessData(vf.TaskData):
    secret: int


class GuessTask(vf.Task[GuessData]):
    @vf.reward
    async def solved(self, trace: vf.Trace) -> float:
        return float(trace.info.get("solved", False))


class GuessTaskset(vf.Taskset[GuessTask, vf.TasksetConfig]):
    def load(self):
        return [GuessTask(GuessData(prompt=f"{s}?", secret=s), self.config.task) for s in range(100, 140)]


class GuessEnvConfig(vf.EnvConfig):
    agent: vf.AgentConfig = vf.AgentConfig()
    rounds: int = 3


class GuessEnv(vf.Env[GuessEnvConfig]):
    async def run(self, task, agents):
        async with agents.agent.interaction(task) as chat:
            turn = await chat.turn()
            for _ in range(self.config.rounds - 1):
                if turn.terminated:
                    break
                reply = turn.last_reply.strip()
                if reply == str(task.data.secret):
                    chat.trace.info["solved"] = True
                    break
                guess = int(reply) if reply.isdigit() else 0
                turn = await chat.turn("+" if guess < task.data.secret else "-")


__all__ = ["GuessTaskset", "GuessEnv"]
