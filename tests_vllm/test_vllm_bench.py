"""`asympo bench sections=[engines]` with this environment's vLLM: the throughput row beside asympo's engine,
and the short learning run with each engine, read back from bench.json; the publish bench's vLLM leg."""

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


def test_the_publish_bench_times_a_vllm_file_write_and_reload(tmp_path):
    """vLLM's publish path through the bench's leg: a version written and reloaded, in bf16 and float32."""
    import torch

    from asympo.bench.publish import vllm_reload_costs

    rows = vllm_reload_costs("tiny", [torch.bfloat16, torch.float32], sys.executable, 2, tmp_path / "log",
                             say=lambda *_: None)  # fmt: skip
    assert [r["dtype"] for r in rows] == ["bfloat16", "float32"]
    assert rows[1]["bytes"] > rows[0]["bytes"] > 0
    assert all(r["write"] > 0 and r["reload"] > 0 for r in rows)
    # under LoRA on every linear layer the embedding and the norms stay behind (2% of the tiny model)
    assert all(
        0 < r["lora_bytes"] < r["bytes"] and r["lora_write"] > 0 and r["lora_reload"] > 0 for r in rows
    )
