"""`asympo bench sections=[engines]` with this environment's vLLM: the throughput row beside asympo's engine,
and the short learning run with each engine, read back from bench.json."""

from __future__ import annotations

import json
import subprocess
import sys


def test_the_engines_bench_prints_the_vllm_rows(tmp_path):
    args = [
        "model=tiny",
        "quick=true",
        "sections=[engines]",
        "vllm_eager=true",
        f"vllm_python={sys.executable}",
    ]
    done = subprocess.run(
        [sys.executable, "-m", "asympo", "bench", *args, f"out={tmp_path}"],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "bench.json").read_text())
    engines = result["engines"]
    assert (
        engines["asympo"] > 0
        and engines["vllm"] > 0
        and engines["ratio"] == engines["asympo"] / engines["vllm"]
    )
    assert set(engines["learning"]) == {"hf", "vllm"}
    for run in engines["learning"].values():
        assert 0 <= run["before"] <= 1 and 0 <= run["after"] <= 1
    measures = [r["measure"] for r in result["table"]]
    assert any("asympo engine vs vLLM" in m and "tok/s" in m for m in measures)
    assert any("accuracy gain" in m for m in measures)
    assert "vLLM" in done.stdout + done.stderr
