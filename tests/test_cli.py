from __future__ import annotations

import json
import subprocess
import sys

import pytest

FAST = ["task.test_size=20", "rollout.prompts_per_step=4", "rollout.group_size=4", "progress=false"]


def asympo(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "asympo", *args], capture_output=True, text=True, cwd=cwd, timeout=600
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["train", "nope=1"], "unknown config key 'nope'"),
        (["train", "optim.lr=abc"], "optim.lr"),
        (["train", "--config", "missing.yaml"], "config file not found"),
        (["train", "model=/no/such/folder"], "not 'tiny', 'tiny-random' or a local model folder"),
        (["train", "out=/proc/asympo-forbidden"], "not writable"),
        (["train", "objective=grpo_typo"], "grpo_typo"),
        (["eval", "k=0"], "config k"),
    ],
)
def test_bad_input_is_one_line_exit_2_no_traceback(args, message, tmp_path):
    result = asympo(*args, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("asympo: error:") and message in lines[-1]
    assert len(lines) == 1, result.stderr


def test_train_end_to_end_writes_metrics_result_and_model(tmp_path):
    out = tmp_path / "run"
    result = asympo("train", "runtime.mode=lag", "steps=3", "eval_every=2", f"out={out}", *FAST)
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [0, 1, 2, 3]
    for key in (
        "reward",
        "accuracy",
        "loss",
        "loss_pos",
        "loss_neg",
        "grad_norm",
        "staleness_hist",
        "response_len",
        "rollout_tokens_per_s",
        "version",
    ):
        assert key in lines[0], key
    assert lines[0]["staleness_hist"] == {"0": 16} and lines[2]["staleness_hist"] == {"2": 16}
    assert "test_accuracy" in lines[1] and "test_accuracy" in lines[3]
    summary = json.loads((out / "result.json").read_text())
    assert summary["steps"] == 3 and 0 <= summary["accuracy_after"] <= 1
    assert (out / "final" / "model.safetensors").exists()
    assert "held-out accuracy before" in result.stderr and "sampled pass@1" in result.stderr
    assert "held-out greedy accuracy" in result.stderr and "points)" in result.stderr  # the summary table


def test_sft_then_eval_on_its_output(tmp_path):
    out = tmp_path / "sft"
    small = [
        "model.hidden_size=32",
        "model.num_layers=1",
        "model.num_heads=2",
        "model.num_kv_heads=1",
        "model.intermediate_size=32",
    ]
    result = asympo("sft", "steps=5", "warmup=1", "eval_size=10", f"out={out}", "progress=false", *small)
    assert result.returncode == 0, result.stderr
    assert json.loads((out / "sft.json").read_text())["config"]["steps"] == 5
    result = asympo("eval", f"model={out}", "k=3", "task.test_size=10", f"json_out={tmp_path / 'e.json'}")
    assert result.returncode == 0, result.stderr
    printed = json.loads(result.stdout)
    assert set(printed) >= {"greedy_accuracy", "pass@1", "pass@3"}
    assert printed == json.loads((tmp_path / "e.json").read_text())
    assert printed["pass@1"] <= printed["pass@3"]
