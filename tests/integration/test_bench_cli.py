"""`asympo bench` through the CLI: the quick mode runs every part end to end (its numbers are not checked),
an unknown section is a clear error, the backends section compares local, Ray and a served model, and the
publish section times each stage of a publish. The learner's FLOP count and synthetic batch:
tests/unit/test_bench.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys


def quick_bench(tmp_path, section: str, **env: str) -> dict:
    """`asympo bench quick=true sections=[section]`, which must succeed; its bench.json."""
    done = subprocess.run(
        [sys.executable, "-m", "asympo", "bench", "quick=true", f"sections=[{section}]", f"out={tmp_path}"],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, **env},
    )
    assert done.returncode == 0, done.stderr
    return json.loads((tmp_path / "bench.json").read_text())


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


def test_quick_backends_bench_compares_local_ray_and_a_served_model(tmp_path):
    result = quick_bench(tmp_path, "backends", RAY_AUTH_MODE="disabled")
    assert set(result["backends"]) == {"local", "ray", "openai"}
    assert all(r["samples_per_s"] > 0 for r in result["backends"].values())
    assert [row["measure"] for row in result["table"]] == [
        "train samples/s: async ray vs local",
        "train samples/s: async openai vs local",
    ]


def test_quick_inflight_bench_compares_the_weight_update_settings(tmp_path):
    result = quick_bench(tmp_path, "inflight")
    assert set(result["inflight"]) == {"tiny", "tiny, decode batch 4"}
    for workload in result["inflight"].values():
        assert set(workload) == {"between_jobs", "keep", "recompute"}
        assert all(r["samples_per_s"] > 0 and "publish_latency_p50" in r for r in workload.values())
    assert len(result["table"]) == 12  # 3 measures x (keep, recompute) x 2 workloads


def test_quick_packing_bench_steps_the_same_batch_four_ways(tmp_path):
    packing = quick_bench(tmp_path, "packing")["packing"]
    assert packing["none_pad_share"] < packing["padded_pad_share"]  # cut micro-batches hold less padding
    assert packing["packed_pad_share"] < packing["sorted_pad_share"] <= packing["none_pad_share"]
    assert all(packing[f"{n}_tokens_per_s"] > 0 for n in ("padded", "none", "sorted", "packed"))


def test_quick_publish_bench_times_every_stage_of_both_paths(tmp_path):
    publish = quick_bench(tmp_path, "publish")["publish"]
    assert publish["copy_gb_per_s"] > 0
    assert [(r["model"], r["dtype"]) for r in publish["rows"]] == [("tiny", "bfloat16"), ("tiny", "float32")]
    bf16, fp32 = publish["rows"]
    assert fp32["bytes"] > bf16["bytes"] > 0  # a float32 version is about twice a bf16 one
    stages = ("learner_copy", "shared_memory", "engine_load", "ray_put", "ray_fetch", "ray_load")
    stages += ("delta_encode", "delta_decode")
    assert all(r[s] > 0 and r["gb_per_s"][s] > 0 for r in publish["rows"] for s in stages)
    assert all(0 < r["delta_bytes"] < r["bytes"] for r in publish["rows"])  # an Adam-sized update
