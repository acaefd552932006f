"""An environment whose rubric raises on every other task: those episodes are lost, counted."""

import verifiers.v1 as vf


class BrokenData(vf.TaskData):
    index: int


class BrokenTask(vf.Task[BrokenData]):
    @vf.reward
    async def explode(self, trace: vf.Trace) -> float:
        if self.data.index % 2:
            raise RuntimeError("the rubric broke")
        return 1.0


class BrokenTaskset(vf.Taskset[BrokenTask, vf.TasksetConfig]):
    def load(self):
        return [BrokenTask(BrokenData(prompt=f"{i}+1=", index=i), self.config.task) for i in range(10, 40)]


__all__ = ["BrokenTaskset"]
