"""benchmarks/gpu_check.py: `--device cpu --small` runs every part in seconds and records it; on a CUDA
machine the real check runs and the tiny model's held-out accuracy must rise."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"
PARTS = ("learner", "memory", "learner_fp32", "decode", "tiny", "logprobs", "fsdp")

# bf16 keeps 8 significant bits, so each rounding moves a value by up to ~0.4%: logits of a few units move by
# hundredths, and a response token's log-prob with them. Measured on this CPU (bf16 autocast and a bf16
# engine against float32), over 236 tokens of the small run: mean 0.006, max 0.09-0.12; over ~900 tokens of
# other prompts: mean 0.008-0.012, max 0.13-0.39 (the max grows with the number of tokens, the mean does not).
# The bounds leave ~3x room; a real fault (misaligned positions, wrong weights, a float16 overflow) is off by
# whole nats on average.
MEAN_TOLERANCE = 0.03
MAX_TOLERANCE = 1.0


def run_check(out: Path, *args: str, timeout: int) -> tuple[subprocess.CompletedProcess, dict]:
    command = [sys.executable, str(SCRIPT), "--out", str(out), *args]
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    report_file = out / "gpu_check.json"
    assert report_file.exists(), done.stdout[-3000:] + done.stderr[-3000:]
    return done, json.loads(report_file.read_text())


def failures(report: dict) -> dict[str, str]:
    return {name: part.get("error", "") for name, part in report["parts"].items() if not part["ok"]}


def positive(value: object) -> bool:
    return (
        isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) and value > 0
    )


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> tuple[subprocess.CompletedProcess, dict]:
    return run_check(tmp_path_factory.mktemp("gpu_check"), "--device", "cpu", "--small", timeout=300)


def test_small_check_runs_every_part(small):
    done, report = small
    assert done.returncode == 0, (failures(report), done.stderr[-3000:])
    assert tuple(report["parts"]) == PARTS
    assert report["ok"] and not failures(report)
    assert report["device"] == "cpu" and report["description"]  # the processor is named with the figures
    assert "asympo GPU check" in done.stdout  # the table


def test_learner_figures_are_finite_and_positive(small):
    parts = small[1]["parts"]
    for name in ("learner", "learner_fp32"):
        part = parts[name]
        assert part["tokens"] == 2 * 64
        for key in ("step_s", "tokens_per_s", "step_tflop", "peak_tflops", "mfu"):
            assert positive(part[key]), (name, key, part[key])
        assert part["mfu"] < 1  # model FLOPs cannot beat the measured matmul peak of the dtype
    assert positive(parts["learner_fp32"]["bf16_speedup"])
    memory = parts["memory"]
    assert positive(memory["estimate_gib"])
    assert memory["measured_gib"] is None  # CUDA's allocator statistics only


def test_decode_figures_are_finite_and_positive(small):
    decode = small[1]["parts"]["decode"]
    for key in ("engine_tokens_per_s", "generate_tokens_per_s", "engine_over_generate"):
        assert positive(decode[key]), (key, decode[key])


def test_tiny_run_is_recorded(small):
    tiny = small[1]["parts"]["tiny"]
    assert tiny["steps"] == 6
    for key in ("accuracy_before", "accuracy_after", "greedy_before", "greedy_after"):
        assert 0 <= tiny[key] <= 1, key
    assert tiny["rose"] == (tiny["accuracy_after"] > tiny["accuracy_before"])
    assert positive(tiny["train_s"])


def test_bf16_logprobs_stay_close_to_float32(small):
    lp = small[1]["parts"]["logprobs"]
    assert lp["tokens"] > 100
    for who in ("learner", "engine"):
        mean, peak = lp[f"{who}_mean_abs"], lp[f"{who}_max_abs"]
        assert 0 < mean < MEAN_TOLERANCE, (who, mean)  # 0 would mean both sides ran in float32
        assert mean <= peak < MAX_TOLERANCE, (who, peak)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the real check needs a CUDA GPU")
def test_real_check_on_cuda(tmp_path):
    done, report = run_check(tmp_path, "--device", "cuda", timeout=600)
    tiny = report["parts"]["tiny"]
    assert tiny.get("rose"), tiny
    assert tiny["steps"] == 50
    assert done.returncode == 0 and report["ok"], failures(report)
    assert report["parts"]["memory"]["measured_gib"] > 0
    for who in ("learner", "engine"):
        assert report["parts"]["logprobs"][f"{who}_mean_abs"] < MEAN_TOLERANCE
