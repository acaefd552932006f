"""`asympo train rollout.engine=vllm` in the main environment, which has no vLLM: one line and exit code 2
from the CLI. The engine adapter's other tests here: tests/unit/test_vllm_engine.py; the real-vLLM tests:
tests_vllm/, by `./run test-vllm`."""

from __future__ import annotations

import subprocess
import sys


def test_the_cli_without_vllm_is_one_line_and_exit_2(tmp_path):
    args = [
        sys.executable,
        "-m",
        "asympo",
        "train",
        "rollout.engine=vllm",
        "runtime.mode=lag",
        f"out={tmp_path}",
    ]
    done = subprocess.run(args, capture_output=True, text=True, timeout=300)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1 and "needs vLLM: pip install vllm" in lines[0]
