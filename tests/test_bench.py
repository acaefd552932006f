"""`asympo bench`: the quick mode runs every part end to end through the CLI (its numbers are not checked);
the learner's FLOP count and the synthetic batch are checked against hand counts."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch

from asympo.bench.learner import matmul_peak, step_flops, synthetic_batch


def test_quick_bench_runs_every_part_and_writes_its_table(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "asympo", "bench", "quick=true", f"out={tmp_path}"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    result = json.loads((tmp_path / "bench.json").read_text())
    assert result["quick"] and result["model"] == "tiny"
    measures = [row["measure"] for row in result["table"]]
    assert len(measures) == 9 and any("engine vs generate" in m for m in measures)
    assert any("bf16 vs float32" in m for m in measures) and "flags:" in result["device"]
    for precision in ("fp32", "bf16"):
        part = result["precision"]["learner"][precision]
        assert part["step_s"] > 0 and part["utilisation"] > 0 and part["peak_gflops"] > 0
    assert result["precision"]["decode"]["bf16"] > 0 and result["precision"]["decode"]["speedup"] > 0
    assert result["engine"]["engine"] > 0 and result["engine"]["generate"] > 0
    assert result["learner"]["asympo_s"] > 0 and result["learner"]["peak_gflops"] > 0
    assert result["learner"]["no_entropy_s"] > 0 and result["learner"]["entropy_ratio"] > 0
    assert {"sync", "async"} <= set(result["runtime"]) and result["runtime"]["overlap_bound"] >= 1
    assert "asympo bench" in done.stderr and "target" in done.stderr


def test_bench_rejects_an_unknown_section(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "asympo", "bench", "sections=[nope]", f"out={tmp_path}"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2 and "sections" in done.stderr and "Traceback" not in done.stderr


def test_step_flops_counts_decoder_head_and_causal_attention(small_model):
    batch = synthetic_batch(vocab=small_model.config.vocab_size, rows=2, length=16)
    config = small_model.config
    d, inner, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    head_dim = d // config.num_attention_heads
    kv = config.num_key_value_heads * head_dim
    per_layer = d * d * 2 + d * kv * 2 + 3 * d * inner  # q, o; k, v; gate, up, down
    tokens, scored = 2 * 16, 2 * (16 - 1 - (16 // 4 - 1))
    attention = 2 * (2 * 16 * 17) * config.num_attention_heads * head_dim * layers
    expected = 3 * (2 * per_layer * layers * tokens + 2 * config.vocab_size * d * scored + attention)
    assert step_flops(small_model, batch) == expected


def test_synthetic_batch_has_groups_and_behaviour_logprobs_on_responses_only():
    batch = synthetic_batch(vocab=50, rows=8, length=32)
    assert batch.group_ids.tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    assert (batch.behaviour_logprobs[~batch.response_mask] == 0).all()
    assert (batch.behaviour_logprobs[batch.response_mask] < 0).all()
    assert batch.response_mask[:, :7].sum() == 0 and batch.response_mask[:, 7:].all()


def test_matmul_peak_is_a_plausible_rate():
    torch.set_num_threads(1)
    rate, n = matmul_peak((64, 128), repeats=2)
    assert n in (64, 128) and 1e7 < rate < 1e13


def test_quick_backends_bench_compares_local_ray_and_a_served_model(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "asympo", "bench", "quick=true", "sections=[backends]", f"out={tmp_path}"],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "RAY_AUTH_MODE": "disabled"},
    )
    assert done.returncode == 0, done.stderr
    result = json.loads((tmp_path / "bench.json").read_text())
    assert set(result["backends"]) == {"local", "ray", "openai"}
    assert all(r["samples_per_s"] > 0 for r in result["backends"].values())
    assert [row["measure"] for row in result["table"]] == [
        "train samples/s: async ray vs local",
        "train samples/s: async openai vs local",
    ]
