"""One command that checks asympo on a GPU, in under 8 minutes on one GPU:

    python benchmarks/gpu_check.py --out DIR [--device cuda] [--small]

writes DIR/gpu_check.json and prints a table. Parts, each recorded on its own
(a failure keeps its error and the other parts still run; the exit code is 1 if any failed):
  learner, learner_fp32  a learner step of a randomly initialised model of Qwen3-1.7B's shape (its cost
      depends on the shape only: nothing is downloaded), in bf16 then float32: tokens/s, MFU against the same
      dtype's matmul peak measured in this run
  memory    the bf16 step's peak GPU memory, beside the upper estimate docs/gpu.md sizes GPUs with
  decode    asympo's engine against `model.generate` on the same bf16 model and prompts
  tiny      a 50-step async `asympo train` of the tiny model on the device: its accuracy must rise
  logprobs  how far bf16 log-probs (learner autocast, engine sampling) are from float32 on the CPU
  fsdp      the data-parallel learner (FSDP2) as 1 rank under torchrun against one process's step
`--small` shrinks every part to seconds (a small Qwen3 config), so `--device cpu --small` tests the script on
a CPU. It fetches nothing: torch, transformers, numpy, safetensors, rich, pyyaml, pydantic and asympo suffice.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM
from transformers.utils import logging as hf_logging

from asympo.batch import make_batch, synthetic_batch
from asympo.bench.engine import make_prompts, run_generate, useful_tokens
from asympo.bench.learner import matmul_peak, step_flops
from asympo.bench.precision import device_description
from asympo.config import ObjectiveConfig, OptimConfig, SamplingConfig
from asympo.errors import UserError
from asympo.learner import Learner
from asympo.logprobs import token_logprobs
from asympo.models.device import Placement, engine_copy, for_engine, resolve_device
from asympo.models.load import load_policy
from asympo.rollout.base import Sample
from asympo.rollout.hf import HFEngine
from asympo.runtime.devices import activation_bytes

console = Console()
GIB = 1 << 30


@dataclass(frozen=True)
class Sizes:
    """How big each part runs: FULL fits in 8 minutes on one GPU, SMALL in seconds on a CPU."""

    rows: int  # learner batch: rows x length tokens, one micro-batch
    length: int
    timed_steps: int  # after one warm-up step
    peak_sizes: tuple[int, ...]  # square matmuls for the peak
    prompts: int  # decode: distinct prompts of `prompt_len` random ids, `samples` each, `batch` at once
    prompt_len: tuple[int, int]
    samples: int
    batch: int
    new_tokens: int
    tiny: tuple[str, ...]  # `asympo train` settings of the tiny run
    tiny_timeout: int  # seconds
    scored_prompts: int  # log-prob comparison: tiny-model prompts, 4 samples each
    scored_tokens: int


# fmt: off
# Qwen3-1.7B's config.json (tied embeddings); the small shape keeps the family for a test on a CPU
QWEN3_1_7B = dict(hidden_size=2048, num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8,
                  head_dim=128, intermediate_size=6144, vocab_size=151936)
SMALL_QWEN3 = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                   head_dim=16, intermediate_size=192, vocab_size=2048)
FULL = Sizes(rows=8, length=1024, timed_steps=3, peak_sizes=(4096, 8192), prompts=32, prompt_len=(32, 256),
             samples=4, batch=64, new_tokens=128, tiny=("steps=50",), tiny_timeout=300, scored_prompts=64,
             scored_tokens=32)
# the small tiny run only shows that the command works: fewer steps and a smaller held-out evaluation
SMALL = Sizes(rows=2, length=64, timed_steps=2, peak_sizes=(256, 512), prompts=4, prompt_len=(4, 16),
              samples=2, batch=4, new_tokens=8, tiny=("steps=6", "eval_samples=2", "task.test_size=50"),
              tiny_timeout=180, scored_prompts=16, scored_tokens=16)
# fmt: on


def timed(device: torch.device, work: Callable[[], Any]) -> tuple[float, Any]:
    """Seconds of `work()` on the device (CUDA runs asynchronously: synchronise on both sides)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    result = work()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start, result


def qwen3_model(device: torch.device, small: bool) -> Qwen3ForCausalLM:
    """Qwen3-1.7B's shape, randomly initialised (seeded) straight on the device: no hub, no host copy."""
    shape = SMALL_QWEN3 if small else QWEN3_1_7B
    config = Qwen3Config(**shape, tie_word_embeddings=True, max_position_embeddings=40960, rope_theta=1e6)
    torch.manual_seed(0)
    with torch.device(device):
        return Qwen3ForCausalLM(config)


def learner_bytes(model: torch.nn.Module, tokens: int, checkpointing: bool, precision: str) -> float:
    """Upper estimate of a step's peak: float32 weights, gradients and AdamW (16 B/param) + activations."""
    params = sum(p.numel() for p in model.parameters())
    return 16 * params + activation_bytes(model, tokens, checkpointing, precision == "bf16")


def wants_checkpointing(model: torch.nn.Module, tokens: int, precision: str, device: torch.device) -> bool:
    """Recompute activations only where keeping them would not fit: recomputing costs ~30% more time."""
    if device.type != "cuda":
        return False
    total = torch.cuda.get_device_properties(device).total_memory
    return learner_bytes(model, tokens, False, precision) > 0.85 * total


def part_learner(device: torch.device, sizes: Sizes, small: bool, precision: str, state: dict) -> dict:
    """Median step time after a warm-up step (allocator, AdamW state, kernel choice), and the step's model
    FLOPs against the matmul peak of the dtype it computes in, measured in this run."""
    model = qwen3_model(device, small)
    batch = synthetic_batch(model.config.vocab_size, sizes.rows, sizes.length)
    tokens = int(batch.attention_mask.sum())
    checkpointing = wants_checkpointing(model, tokens, precision, device)
    optim = OptimConfig(micro_batch_size=sizes.rows, warmup_steps=0, gradient_checkpointing=checkpointing)
    learner = Learner(model, ObjectiveConfig(name="asympo"), optim, placement=Placement(device, precision))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = [timed(device, lambda: learner.step(batch))[0] for _ in range(sizes.timed_steps + 1)][1:]
    step_s = statistics.median(times)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    peak_flops, _ = matmul_peak(sizes.peak_sizes, dtype=dtype, device=device)
    flops = step_flops(model, batch)
    record = {"tokens": tokens, "gradient_checkpointing": checkpointing, "step_s": step_s}
    record |= {"tokens_per_s": tokens / step_s, "step_tflop": flops / 1e12, "peak_tflops": peak_flops / 1e12}
    record["mfu"] = flops / step_s / peak_flops
    if precision == "bf16":
        estimate = learner_bytes(model, tokens, checkpointing, precision)
        state["bf16"] = {"peak": peak, "estimate": estimate, "checkpointing": checkpointing, "step_s": step_s}
    elif "bf16" in state:
        record["bf16_speedup"] = step_s / state["bf16"]["step_s"]
    return record


def part_memory(state: dict) -> dict:
    """The bf16 step's measured peak (CUDA only) beside the upper estimate of docs/gpu.md."""
    if "bf16" not in state:
        raise RuntimeError("the bf16 learner step did not run (see the learner part)")
    peak, estimate = state["bf16"]["peak"], state["bf16"]["estimate"]
    record = {"estimate_gib": estimate / GIB, "gradient_checkpointing": state["bf16"]["checkpointing"]}
    record["measured_gib"] = None if peak is None else peak / GIB
    if peak is not None:
        record["measured_over_estimate"] = peak / estimate
    return record


def wordlevel_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    """A real tokenizer over the model's whole vocabulary (ids 0-2 special): the engine reads its special
    ids (EOS ends a response; pad and unk are banned) and never needs text."""
    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2} | {f"t{i}": i for i in range(3, vocab_size)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    specials = dict(pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
    return PreTrainedTokenizerFast(tokenizer_object=backend, **specials)


def part_decode(device: torch.device, sizes: Sizes, small: bool) -> dict:
    """Useful tokens/s (each response up to its EOS) of both decoders on one bf16 model and RL-shaped prompts
    (`samples` per prompt, random ids of varied length), each warmed up first."""
    model = for_engine(qwen3_model(device, small), Placement(device, "bf16"))
    vocab = model.config.vocab_size
    engine = HFEngine(model, wordlevel_tokenizer(vocab), max_batch=sizes.batch)
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(*sizes.prompt_len, (sizes.prompts,), generator=g).tolist()
    distinct = [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]
    prompts = [p for p in distinct for _ in range(sizes.samples)]
    sampling = SamplingConfig(temperature=1.0, max_new_tokens=sizes.new_tokens)
    warm = SamplingConfig(temperature=1.0, max_new_tokens=4)
    engine.generate_ids(prompts[:4], warm, torch.Generator().manual_seed(1))
    engine_s, ours = timed(
        device, partial(engine.generate_ids, prompts, sampling, torch.Generator().manual_seed(2))
    )
    torch.manual_seed(2)
    with torch.inference_mode():
        run_generate(model, engine, prompts[:4], warm, sizes.batch)
        generate_s, (theirs, _) = timed(
            device, partial(run_generate, model, engine, prompts, sampling, sizes.batch)
        )
    engine_rate = useful_tokens(ours[0], engine.eos_id) / engine_s
    generate_rate = useful_tokens(theirs, engine.eos_id) / generate_s
    record = {"sequences": len(prompts), "max_new_tokens": sizes.new_tokens, "batch": sizes.batch}
    record |= {"engine_tokens_per_s": engine_rate, "generate_tokens_per_s": generate_rate}
    record["engine_over_generate"] = engine_rate / generate_rate
    return record


def part_tiny(device: torch.device, sizes: Sizes, small: bool, out: Path) -> dict:
    """The real CLI in its own process: async, its rollout worker on the same device (on a GPU colocated
    after the runtime's memory check); reads back result.json."""
    run = out / "tiny-async"
    (run / "result.json").unlink(missing_ok=True)  # never read a previous run's result
    fixed = "model=tiny precision=auto runtime.mode=async eval_every=0 progress=false save_model=false"
    placed = [f"device={device}", f"runtime.worker_devices=[{device}]", "checkpoint_every=0", f"out={run}"]
    command = [sys.executable, "-m", "asympo", "train", *fixed.split(), *placed, *sizes.tiny]
    # On a CPU the learner's and the worker's threads share the cores: one each, or they spin against each
    # other (on 2 busy cores a 6-step run took 30-50 s of training instead of 6 s)
    env = os.environ | ({"OMP_NUM_THREADS": "1"} if device.type == "cpu" else {})
    done = subprocess.run(command, capture_output=True, text=True, timeout=sizes.tiny_timeout, env=env)
    (out / "tiny-async.log").write_text(done.stdout + done.stderr)
    if done.returncode:
        raise RuntimeError(f"asympo train exited {done.returncode}: {done.stderr.strip()[-600:]}")
    result = json.loads((run / "result.json").read_text())
    before, after = result["accuracy_before"], result["accuracy_after"]
    record = {"steps": result["steps"], "accuracy_before": before, "accuracy_after": after}
    record |= {"rose": after > before, "greedy_before": result["greedy_accuracy_before"]}
    record |= {"greedy_after": result["greedy_accuracy_after"], "train_s": result["seconds"]}
    if not small and not record["rose"]:
        record["error"] = "held-out accuracy did not rise"
    return record


def part_fsdp(device: torch.device, out: Path) -> dict:
    """The data-parallel learner on this one device: a 1-rank FSDP2 step of the tiny model under torchrun
    (NCCL on a GPU, gloo on a CPU) against one process's step on the same device and batch, both float32.
    The multi-GPU launch is documented in docs/distributed.md and not run here."""
    from asympo.config import ObjectiveConfig
    from asympo.distributed.selfcheck import reference_inputs
    from asympo.learner import Learner
    from asympo.models.device import Placement
    from asympo.models.load import load_policy

    saved = out / "fsdp-rank.pt"
    saved.unlink(missing_ok=True)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1"]
    command = [*launcher, "-m", "asympo.distributed.selfcheck", str(saved), "asympo", "8", str(device)]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    seconds = time.perf_counter() - start
    (out / "fsdp.log").write_text(done.stdout + done.stderr)
    if done.returncode:
        raise RuntimeError(f"torchrun exited {done.returncode}: {done.stderr.strip()[-600:]}")
    ranks = torch.load(saved)
    model, tokenizer = load_policy("tiny")
    batch, optim = reference_inputs(8, len(tokenizer))
    learner = Learner(model, ObjectiveConfig(name="asympo"), optim, placement=Placement(device, "fp32"))
    metrics = learner.step(batch)
    weights = learner.weights(torch.float32)
    diff = max(float((weights[k] - ranks["weights"][k]).abs().max()) for k in weights)
    record = {
        "loss": metrics["loss"],
        "fsdp_loss": ranks["metrics"]["loss"],
        "grad_norm": metrics["grad_norm"],
    }
    record |= {
        "fsdp_grad_norm": ranks["metrics"]["grad_norm"],
        "max_weight_diff": diff,
        "torchrun_s": seconds,
    }
    relative = abs(record["fsdp_grad_norm"] - record["grad_norm"]) / max(record["grad_norm"], 1e-12)
    if relative > 1e-4 or diff > 0.1 * optim.lr:
        record["error"] = f"the FSDP step differs: grad norm {relative:.1e} relative, weights {diff:.1e}"
    return record


def part_logprobs(device: torch.device, sizes: Sizes) -> dict:
    """Sequences sampled by a bf16 engine on the device, scored (1) by token_logprobs in float32 on the CPU,
    the reference; (2) by token_logprobs under bf16 autocast on the device, as the learner scores; (3) by the
    engine itself while sampling (its behaviour log-probs). The engine samples with pad and unk banned, so its
    reference is renormalised over the other tokens, as the engine's own distribution is."""
    model, tokenizer = load_policy("tiny")
    placement = Placement(device, "bf16")
    engine = HFEngine(engine_copy(model, placement), tokenizer, max_batch=64)
    prompts = [p for p in make_prompts(tokenizer, sizes.scored_prompts, 1) for _ in range(4)]
    sampling = SamplingConfig(temperature=1.0, max_new_tokens=sizes.scored_tokens)
    responses, behaviour, _ = engine.generate_ids(prompts, sampling, torch.Generator().manual_seed(0))
    samples = [Sample("", list(p), r, "", "length", 0) for p, r in zip(prompts, responses, strict=True)]
    batch = make_batch(samples, engine.pad_id, "mean")
    ids, mask, scored = batch.input_ids, batch.attention_mask, batch.response_mask
    on_device = copy.deepcopy(model).to(device)  # float32 weights, as the learner keeps them
    with torch.no_grad():
        reference = token_logprobs(model.eval(), ids, mask, 1.0, scored)[scored]
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
        logits[..., engine.banned] = float("-inf")
        engine_reference = logits.log_softmax(-1).gather(-1, ids[:, 1:, None])[..., 0][scored]
        with placement.autocast():
            moved = [t.to(device) for t in (ids, mask)]
            learner = token_logprobs(on_device.eval(), *moved, 1.0, scored.to(device))
    learner_diff = (learner.cpu()[scored] - reference).abs()
    engine_diff = (torch.tensor([lp for row in behaviour for lp in row]) - engine_reference).abs()
    record = {"tokens": int(scored.sum()), "learner_mean_abs": learner_diff.mean().item()}
    record |= {"learner_max_abs": learner_diff.max().item(), "engine_mean_abs": engine_diff.mean().item()}
    record["engine_max_abs"] = engine_diff.max().item()
    return record


def run_part(name: str, work: Callable[[], dict], device: torch.device, results: dict, path: Path) -> None:
    """One part: an exception is recorded with its error; the file is rewritten after every part, so a run
    cut short still leaves what it measured."""
    console.print(f"[bold]{name}[/]: running")
    start = time.perf_counter()
    try:
        record = work()
        record["ok"] = "error" not in record
    except Exception as e:  # recorded: the other parts still run
        record = {"ok": False, "error": f"{type(e).__name__}: {e}"}
        record["traceback"] = traceback.format_exc()[-2000:]
    gc.collect()  # give the part's memory back, for the next part and the tiny run's memory check
    if device.type == "cuda":
        torch.cuda.empty_cache()
    record["seconds"] = round(time.perf_counter() - start, 1)
    results["parts"][name] = record
    path.write_text(json.dumps(results, indent=2))


def print_table(results: dict) -> None:
    table = Table(title=f"asympo GPU check: {results['description']}")
    for column in ("part", "status", "s", "figures"):
        table.add_column(column)
    for name, record in results["parts"].items():
        shown = {k: v for k, v in record.items() if k not in ("ok", "seconds", "error", "traceback")}
        figures = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in shown.items())
        if "error" in record:
            figures = f"[red]{record['error'][:300]}[/] {figures}"
        status = "[green]ok[/]" if record["ok"] else "[red]FAILED[/]"
        table.add_row(name, status, str(record["seconds"]), figures)
    console.print(table)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder for gpu_check.json and the tiny run")
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N, or cpu (to test the script)")
    parser.add_argument("--small", action="store_true", help="every part in seconds (a small Qwen3 shape)")
    args = parser.parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    path = out / "gpu_check.json"
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    results: dict = {"device": args.device, "description": "", "small": args.small, "parts": {}}
    results |= {"torch": torch.__version__, "cuda": torch.version.cuda}
    try:
        device = resolve_device(args.device)
    except UserError as e:
        path.write_text(json.dumps(results | {"ok": False, "error": str(e)}, indent=2))
        console.print(f"[red]{e}[/]")
        return 1
    results |= {"device": str(device), "description": device_description(device)}
    console.print(f"device: {device}, {results['description']}")
    sizes, state = (SMALL if args.small else FULL), {}
    parts: dict[str, Callable[[], dict]] = {
        "learner": lambda: part_learner(device, sizes, args.small, "bf16", state),
        "memory": lambda: part_memory(state),
        "learner_fp32": lambda: part_learner(device, sizes, args.small, "fp32", state),
        "decode": lambda: part_decode(device, sizes, args.small),
        "tiny": lambda: part_tiny(device, sizes, args.small, out),
        "logprobs": lambda: part_logprobs(device, sizes),
        "fsdp": lambda: part_fsdp(device, out),
    }
    start = time.perf_counter()
    for name, work in parts.items():
        run_part(name, work, device, results, path)
    results |= {"ok": all(r["ok"] for r in results["parts"].values()), "seconds": time.perf_counter() - start}
    path.write_text(json.dumps(results, indent=2))
    print_table(results)
    console.print(f"wrote {path}")
    return 0 if results["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
