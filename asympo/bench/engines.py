"""asympo's rollout engine against vLLM, on one workload: `asympo bench sections=[engines]`.

vLLM lives in an environment of its own (./.venv-vllm, built by `./run test-vllm`), so its leg runs as a
subprocess there (asympo.bench.vllm_leg) while asympo's engine runs in this process. Both get the same
prompt ids, group size, sampling settings (temperature 1, top_p 1, the same banned special tokens), length
cap, dtype, concurrent sequences (asympo's `max_batch`, vLLM's `max_num_seqs`) and CPU cores; the rounds
alternate (asympo, vLLM, asympo, ...) so that machine noise hits both alike, and each engine's best round
counts. Useful tokens are those an RL step can use: each response up to and including its EOS.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import time
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from asympo.bench.engine import make_prompts, useful_tokens
from asympo.config import SamplingConfig
from asympo.errors import UserError
from asympo.lifetime import child_env
from asympo.models.device import Placement, engine_copy
from asympo.rollout.hf import HFEngine


def vllm_python(configured: str = "") -> Path:
    """The interpreter of vLLM's environment: `configured`, else ./.venv-vllm beside the asympo checkout."""
    path = Path(configured) if configured else Path(__file__).resolve().parents[2] / ".venv-vllm/bin/python"
    if not path.exists():
        raise UserError(
            f"sections=[engines] runs vLLM from its own environment, and {path} does not exist: "
            "`./run test-vllm` builds .venv-vllm (or set vllm_python=...)"
        )
    return path


class VLLMLeg:
    """The vLLM subprocess: started with the workload, then one `run` per round."""

    def __init__(self, python: Path, job: dict, log: Path):
        self.log = log.open("w")
        env = child_env() | {"PYTHONUNBUFFERED": "1"}
        self.process = subprocess.Popen(
            [str(python), "-m", "asympo.bench.vllm_leg"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log,
            text=True,
            env=env,
        )
        try:
            self.started = self.ask(json.dumps(job))["ready"]  # once vLLM has started and warmed up
        except BaseException:
            self.close()
            raise

    def ask(self, line: str) -> dict:
        self.process.stdin.write(line + "\n")
        self.process.stdin.flush()
        answer = self.process.stdout.readline()
        while answer and not answer.startswith("{"):  # a stray print: the protocol's lines are JSON objects
            answer = self.process.stdout.readline()
        if not answer:
            self.process.wait(timeout=60)
            tail = "".join(Path(self.log.name).read_text().splitlines(keepends=True)[-5:])
            raise RuntimeError(f"vLLM's leg stopped (exit {self.process.returncode}); its log ends:\n{tail}")
        return json.loads(answer)

    def close(self) -> None:
        """`quit`, so that vLLM stops its own engine processes; SIGTERM (which vLLM also handles) if the leg
        does not answer, and SIGKILL last."""
        if self.process.poll() is None:
            with contextlib.suppress(OSError):
                self.process.stdin.write("quit\n")
                self.process.stdin.close()
            for stop in (lambda: None, self.process.terminate, self.process.kill):
                stop()
                try:
                    self.process.wait(timeout=60)
                    break
                except subprocess.TimeoutExpired:
                    continue
        self.log.close()


def asympo_vs_vllm(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    name: str,
    placement: Placement,
    prompts: int,
    n: int,
    batch: int,
    max_new_tokens: int,
    rounds: int,
    threads: int,
    seed: int,
    out: Path,
    python: str = "",
    eager: bool = False,
    say=print,
) -> dict:
    """Each engine's best useful tokens/s over `rounds` alternating rounds, and asympo's over vLLM's."""
    interpreter = vllm_python(python)
    sampling = SamplingConfig(temperature=1.0, top_p=1.0, max_new_tokens=max_new_tokens)
    distinct = make_prompts(tokenizer, prompts, seed)
    dtype = str(placement.dtype).removeprefix("torch.")
    say(
        f"asympo engine vs vLLM ({interpreter}): {len(distinct)} prompts x {n} samples, prompt length "
        f"{min(map(len, distinct))}-{max(map(len, distinct))}, max_new_tokens {max_new_tokens}, "
        f"{batch} sequences at once, {dtype}, {threads} cores each, {rounds} alternating rounds"
    )
    job = {
        "model": name,
        "dtype": dtype,
        "prompts": distinct,
        "n": n,
        "sampling": sampling.model_dump(),
        "batch": batch,
        "threads": threads,
        "seed": seed,
        "eager": eager,
    }
    start = time.perf_counter()
    leg = VLLMLeg(interpreter, job, out / "vllm_leg.log")  # alone on the machine while it starts
    try:
        say(f"  vLLM started in {time.perf_counter() - start:.0f} s ({'eager' if eager else 'compiled'})")
        engine = HFEngine(engine_copy(model, placement), tokenizer, max_batch=batch)
        flat = [p for p in distinct for _ in range(n)]
        engine.generate_ids(flat[:4], sampling, torch.Generator().manual_seed(0))  # warm-up
        results: dict[str, list[dict]] = {"asympo": [], "vllm": []}
        for r in range(rounds):
            begin = time.perf_counter()
            responses, _, _ = engine.generate_ids(flat, sampling, torch.Generator().manual_seed(seed + r))
            seconds = time.perf_counter() - begin
            stopped = sum(engine.eos_id in x for x in responses) / len(responses)
            results["asympo"].append(
                {"seconds": seconds, "useful": useful_tokens(responses, engine.eos_id), "stopped": stopped}
            )
            results["vllm"].append(leg.ask("run"))
            for who in ("asympo", "vllm"):
                last = results[who][-1]
                say(
                    f"  round {r + 1} {who:6s} {last['seconds']:6.1f} s  {last['useful']:6d} useful tokens  "
                    f"{last['useful'] / last['seconds']:7.1f} tok/s ({last['stopped']:.0%} ended by EOS)"
                )
    finally:
        leg.close()
    best = {who: max(x["useful"] / x["seconds"] for x in rounds_) for who, rounds_ in results.items()}
    return {
        "asympo": best["asympo"],
        "vllm": best["vllm"],
        "ratio": best["asympo"] / best["vllm"],
        "rounds": results,
        "dtype": dtype,
        "vllm_eager": eager,
    }


def learning_runs(interpreter: Path, steps: int, seed: int, out: Path, say=print) -> dict:
    """A short lag-mode run of the tiny model with each engine, both in vLLM's environment (same asympo,
    task, seed and objective; only the engine differs, so the samples do): held-out accuracy should move
    the same way. Returns each engine's accuracy before and after and its wall time."""
    results = {}
    for engine in ("hf", "vllm"):
        folder = out / f"learning-{engine}"
        command = [
            str(interpreter),
            "-m",
            "asympo",
            "train",
            "model=tiny",
            "runtime.mode=lag",
            "runtime.lag=1",
        ]
        command += [f"steps={steps}", f"rollout.engine={engine}", f"seed={seed}", f"out={folder}"]
        command += ["progress=false", "save_model=false", "checkpoint_every=0", "eval_every=0"]
        start = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True, env=child_env())
        if done.returncode:
            raise RuntimeError(f"the {engine} learning run failed: {done.stderr.strip()[-2000:]}")
        result = json.loads((folder / "result.json").read_text())
        results[engine] = {
            "before": result["accuracy_before"],
            "after": result["accuracy_after"],
            "wall_seconds": time.perf_counter() - start,
        }
        say(
            f"  learning run, {engine:4s} engine: held-out accuracy {result['accuracy_before']:.1%} -> "
            f"{result['accuracy_after']:.1%} in {steps} steps ({results[engine]['wall_seconds']:.0f} s wall)"
        )
    return results
