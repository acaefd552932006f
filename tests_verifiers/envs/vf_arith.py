"""Single-turn: two-digit sums, rewarded by a rubric (the tiny model's own task, so its reward can rise)."""

import random

import verifiers.v1 as vf


class SumData(vf.TaskData):
    answer: str


class SumTask(vf.Task[SumData]):
    @vf.reward
    async def correct(self, trace: vf.Trace) -> float:
        return float(trace.last_reply.strip() == self.data.answer)


class SumConfig(vf.TasksetConfig):
    size: int = 400
    seed: int = 0


class SumTaskset(vf.Taskset[SumTask, SumConfig]):
    def load(self):
        rng = random.Random(self.config.seed)
        pairs = [(rng.randint(10, 99), rng.randint(10, 99)) for _ in range(self.config.size)]
        return [SumTask(SumData(prompt=f"{a}+{b}=", answer=str(a + b)), self.config.task) for a, b in pairs]


__all__ = ["SumTaskset"]
