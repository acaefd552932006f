"""Tools: the model calls `add` (a small Python function served by verifiers over MCP), then answers."""

import verifiers.v1 as vf
from vf_toolset import AddToolset


class AddData(vf.TaskData):
    answer: str


class AddTaskConfig(vf.TaskConfig):
    tools: vf.ToolsetConfig = vf.ToolsetConfig()


class AddTask(vf.Task[AddData, vf.State, AddTaskConfig]):
    @classmethod
    def toolsets(cls, config: AddTaskConfig) -> list[vf.Toolset]:
        return [AddToolset(config.tools)]

    @vf.reward
    async def correct(self, trace: vf.Trace) -> float:
        return float(trace.last_reply.strip() == self.data.answer)


class AddTasksetConfig(vf.TasksetConfig):
    task: AddTaskConfig = AddTaskConfig()
    slow: bool = False


class AddTaskset(vf.Taskset[AddTask, AddTasksetConfig]):
    def load(self):
        a, b = (7, 8) if self.config.slow else (2, 3)  # the toolset hangs on 7 + 8
        return [AddTask(AddData(prompt=f"{a}+{b}", answer=str(a + b)), self.config.task)]


__all__ = ["AddTaskset"]
