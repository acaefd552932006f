from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

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
        (["train", "model=/no/such/folder"], "a model folder, a .gguf file or a hub id"),
        (["train", "out=/proc/asympo-forbidden"], "not writable"),
        (["train", "objective=grpo_typo"], "grpo_typo"),
        (["train", "rollout.temperature=0"], "rollout.temperature must be > 0"),
        (["eval", "k=0"], "config k"),
        (["serve", "device=gpu"], "device must be auto, cpu, cuda or cuda:N"),
        pytest.param(
            ["eval", "device=cuda:0"],
            "device=cuda:0 asked for",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA"),
        ),
    ],
)
def test_bad_input_is_one_line_exit_2_no_traceback(args, message, tmp_path):
    result = asympo(*args, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("asympo: error:") and message in lines[-1]
    assert len(lines) == 1, result.stderr


def test_a_damaged_gguf_file_is_one_line_exit_2(tmp_path):
    (tmp_path / "junk.gguf").write_bytes(b"GGUF\x03\x00\x00\x00" + b"garbage" * 3)
    result = asympo("train", "model=junk.gguf", cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("asympo: error: cannot load the GGUF file"), result.stderr


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
    bf16 = ["device=cpu", "precision=bf16"]  # the plumbing: bf16 autocast in sft, a bf16 engine in eval
    result = asympo(
        "sft", "steps=5", "warmup=1", "eval_size=10", f"out={out}", "progress=false", *small, *bf16
    )
    assert result.returncode == 0, result.stderr
    assert json.loads((out / "sft.json").read_text())["config"]["precision"] == "bf16"
    assert json.loads((out / "config.json").read_text())["dtype"] == "float32"  # master weights are saved
    result = asympo(
        "eval", f"model={out}", "k=3", "task.test_size=10", f"json_out={tmp_path / 'e.json'}", *bf16
    )
    assert result.returncode == 0, result.stderr
    printed = json.loads(result.stdout)
    assert set(printed) >= {"greedy_accuracy", "pass@1", "pass@3"}
    assert printed == json.loads((tmp_path / "e.json").read_text())
    assert printed["pass@1"] <= printed["pass@3"]


def arith_jsonl(path, n=300):
    import random

    rng = random.Random(0)
    rows = [(rng.randint(10, 99), rng.randint(10, 99)) for _ in range(n)]
    path.write_text("".join(json.dumps({"question": f"{a}+{b}=", "answer": a + b}) + "\n" for a, b in rows))
    return path


def test_eval_on_a_dataset_file_reports_every_metric(tmp_path):
    data = arith_jsonl(tmp_path / "arith.jsonl")
    out = tmp_path / "eval" / "result.json"
    result = asympo(
        "eval", f"task.name={data}", "task.test_size=12", "k=4", f"json_out={out}", "progress=false"
    )
    assert result.returncode == 0, result.stderr
    printed = json.loads(result.stdout)
    assert printed == json.loads(out.read_text())
    assert printed["problems"] == 12 and printed["task"] == str(data)
    assert 0 <= printed["pass@1"] <= printed["pass@4"] <= 1
    assert printed["avg@4"] == pytest.approx(printed["pass@1"])  # a 0/1 reward: the mean reward is pass@1
    assert printed["boxed_rate"] == 0 and 1 <= printed["mean_length"] <= 8
    assert printed["pass@1"] > 0.05  # the tiny model does this task: the rows really reach it


def test_eval_takes_a_training_config_file(tmp_path):
    """`asympo eval -c <training config>` evaluates that run's model, task and sampling."""
    path = tmp_path / "train.yaml"
    path.write_text(
        "model: tiny\ntask:\n  test_size: 6\nrollout:\n  max_new_tokens: 3\n  group_size: 4\n"
        "optim:\n  lr: 1.0e-4\nruntime:\n  mode: lag\nsteps: 5\n"
    )
    result = asympo("eval", "-c", str(path), "k=2", "greedy=false", "progress=false")
    assert result.returncode == 0, result.stderr
    printed = json.loads(result.stdout)
    assert printed["problems"] == 6 and printed["k"] == 2
    assert 1 <= printed["mean_length"] <= 3  # the rollout's cap, not eval's default of 8


def test_train_on_a_dataset_file_and_a_bad_row_is_named(tmp_path):
    data = arith_jsonl(tmp_path / "arith.jsonl")
    out = tmp_path / "run"
    result = asympo(
        "train", f"task.name={data}", "steps=2", "eval_samples=1", "runtime.mode=lag", f"out={out}", *FAST
    )
    assert result.returncode == 0, result.stderr
    assert json.loads((out / "result.json").read_text())["steps"] == 2
    with open(data, "a") as f:
        f.write('{"question": "", "answer": 3}\n')
    result = asympo("train", f"task.name={data}", f"out={out}", *FAST)
    assert result.returncode == 2 and f"{data}:301: question is empty" in result.stderr
    assert "Traceback" not in result.stderr
    result = asympo("train", "-c", "no-such-preset", f"out={out}")
    assert result.returncode == 2 and "smollm2-arith" in result.stderr  # the presets are listed
