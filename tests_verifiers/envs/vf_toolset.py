"""The `add` tool, run by verifiers as its own process (`python -m vf_toolset`). It hangs on 7 + 8."""

import time

import verifiers.v1 as vf


class AddToolset(vf.Toolset[vf.ToolsetConfig]):
    TOOL_PREFIX = None  # the bare name `add`

    @vf.tool
    def add(self, a: int, b: int) -> str:
        """Add two integers."""
        if (a, b) == (7, 8):
            time.sleep(60)
        return str(a + b)


if __name__ == "__main__":
    AddToolset.run()
