"""vLLM's leg of `asympo bench sections=[engines]`, run as `python -m asympo.bench.vllm_leg` inside the vLLM
environment (./.venv-vllm: vLLM's pins clash with asympo's own environment).

Protocol, one JSON object a line: the parent sends the workload (model, dtype, prompt ids, n, sampling,
batch, threads); this process starts vLLM (through asympo's adapter, asympo.rollout.vllm), warms it up and
answers `{"ready": start seconds}`. Each later line `run` generates the whole workload once and answers
`{"seconds", "useful", "lengths"}`; `reload` publishes the model's own weights to vLLM once, as a training
run's new version, and answers `{"write", "reload", "bytes"}` (seconds to write the file, seconds for vLLM
to load it); `reload lora` does the same as under LoRA on every linear layer (peft's `all-linear`: all but
the output head), where only the adapted blocks are written; `quit` (or the end of input) stops it. Only
these answers go to stdout.
"""

from __future__ import annotations

import json
import os
import sys
import time

import torch

from asympo.config import SamplingConfig
from asympo.models.load import load_policy
from asympo.models.weights import publishable_weights
from asympo.rollout.vllm import VLLMEngine, changing_weights


def main() -> int:
    job = json.loads(sys.stdin.readline())
    # the engine's OpenMP threads on cores 0..threads-1, as asympo's engine gets `threads` torch threads
    # (vLLM's own default on a 2-core machine keeps one core for its scheduler and computes on the other)
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{job['threads'] - 1}")
    # vLLM's and asympo's prints, this process's and its children's, go to stderr: the protocol keeps fd 1
    sys.stdout.flush()
    out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)

    start = time.perf_counter()
    engine = VLLMEngine(
        job["model"],
        dtype=getattr(torch, job["dtype"]),
        seed=job["seed"],
        enforce_eager=job["eager"],
        max_num_seqs=job["batch"],
    )
    try:  # whatever happens (the parent gone: a broken pipe), vLLM's engine processes are stopped
        serve(engine, job, out, start)
    finally:
        engine.close()
    return 0


def serve(engine, job: dict, out, start: float) -> None:
    sampling = SamplingConfig(**job["sampling"])
    prompts, n = job["prompts"], job["n"]
    engine.generate_ids(prompts[:2], 2, sampling)  # warm-up
    say = lambda obj: print(json.dumps(obj), file=out, flush=True)  # noqa: E731
    say({"ready": time.perf_counter() - start})
    weights = linear = None
    for line in sys.stdin:
        if line.split()[:1] == ["reload"]:
            if weights is None:  # the version a learner would publish: the same model, in the engine's dtype
                model = load_policy(job["model"])[0]
                weights = publishable_weights(model, getattr(torch, job["dtype"]))
                linear = {f"{name}.weight" for name, m in model.named_modules() if type(m) is torch.nn.Linear}
                linear = changing_weights(linear - {"lm_head.weight"}, weights)
            engine.changing = linear if line.split()[1:] == ["lora"] else None
            start = time.perf_counter()
            engine.write(weights, engine.update_folder)
            written = time.perf_counter()
            engine.load_weights(weights, 1, written=True)
            nbytes = sum(weights[n].nbytes for n in engine.changing or weights)
            say({"write": written - start, "reload": time.perf_counter() - written, "bytes": nbytes})
            continue
        if line.strip() != "run":
            break
        start = time.perf_counter()
        completions = engine.generate_ids(prompts, n, sampling)  # unseeded: vLLM's fastest sampler path
        seconds = time.perf_counter() - start
        responses = [list(c.token_ids) for outs in completions for c in outs]  # each ends at EOS, inclusive
        lengths = [len(r) for r in responses]
        stopped = sum(bool(r) and r[-1] == engine.eos_id for r in responses) / len(responses)
        say({"seconds": seconds, "useful": sum(lengths), "lengths": lengths, "stopped": stopped})


if __name__ == "__main__":
    sys.exit(main())
