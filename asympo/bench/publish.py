"""What publishing one version costs, stage by stage, against this machine's memory copy bandwidth.

The local `async` runtime publishes in three copies: the learner's weights into fresh tensors in the engines'
dtype (`publishable_weights`), those into shared memory (`SharedWeights.publish`), and shared memory into the
worker's model (`load_state_dict`, timed here on a same-shaped set of tensors). The Ray backend puts the
version into the object store once (`ray.put`) and each actor fetches and loads it (timed inside an actor on
this node): as a dict of tensors (`ray_dict_*`, as it was) and packed into one buffer (`ray_*`,
`asympo.models.weights.pack_weights`, as it is); and packed, by an actor on another node (`ray_far_*`).
Each stage is timed on its own, best of `repeats`, and given as GB/s of the version's bytes, beside a plain
copy of 1 GiB (the machine's copy bandwidth, same run).

`delta_*`: runtime.publish=delta after one simulated update (`delta_stages`).

Models larger than the ones a test can load are random tensors of their shapes (Qwen3-0.6B and -1.7B, tied
embeddings, as their configs have it): a copy does not depend on the values.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import torch

from asympo.bench.engines import VLLMLeg
from asympo.models.weights import (
    decode_delta,
    encode_delta,
    pack_weights,
    publishable_weights,
    unpack_weights,
)
from asympo.runtime.local_async import SharedWeights

# (hidden, intermediate, layers, query heads, key/value heads, head dim, vocab), from the models' configs
SHAPES = {
    "qwen3-0.6b": (1024, 3072, 28, 16, 8, 128, 151936),
    "qwen3-1.7b": (2048, 6144, 28, 16, 8, 128, 151936),
}


def shaped_weights(name: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Random tensors named and shaped as a Qwen3 model's state dict (the tied output head left out)."""
    hidden, inter, layers, heads, kv, head_dim, vocab = SHAPES[name]
    shapes = {"model.embed_tokens.weight": (vocab, hidden), "model.norm.weight": (hidden,)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes |= {
            p + "self_attn.q_proj.weight": (heads * head_dim, hidden),
            p + "self_attn.k_proj.weight": (kv * head_dim, hidden),
            p + "self_attn.v_proj.weight": (kv * head_dim, hidden),
            p + "self_attn.o_proj.weight": (hidden, heads * head_dim),
            p + "self_attn.q_norm.weight": (head_dim,),
            p + "self_attn.k_norm.weight": (head_dim,),
            p + "mlp.gate_proj.weight": (inter, hidden),
            p + "mlp.up_proj.weight": (inter, hidden),
            p + "mlp.down_proj.weight": (hidden, inter),
            p + "input_layernorm.weight": (hidden,),
            p + "post_attention_layernorm.weight": (hidden,),
        }
    return {k: torch.empty(shape, dtype=dtype).uniform_(-0.05, 0.05) for k, shape in shapes.items()}


def best_of(repeats: int, work: Callable[[], object]) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        work()
        times.append(time.perf_counter() - start)
    return min(times)


def copy_into(targets: dict[str, torch.Tensor], sources: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for name, tensor in targets.items():
            tensor.copy_(sources[name])


def local_stages(masters: dict[str, torch.Tensor], dtype: torch.dtype, repeats: int) -> dict[str, float]:
    """Seconds of each copy the local runtime makes per version, and of one plain copy of as many bytes."""
    model = torch.nn.Module()  # publishable_weights reads a state dict: give it the masters as parameters
    for i, t in enumerate(masters.values()):
        model.register_parameter(f"p{i}", torch.nn.Parameter(t, requires_grad=False))
    version = publishable_weights(model, dtype)
    shared = SharedWeights(version, 0)
    engine = {k: torch.empty_like(t) for k, t in version.items()}
    return {
        "bytes": sum(t.nbytes for t in version.values()),
        "learner_copy": best_of(repeats, lambda: publishable_weights(model, dtype)),
        "shared_memory": best_of(repeats, lambda: shared.publish(version, 1)),
        "engine_load": best_of(repeats, lambda: copy_into(engine, shared.tensors)),
    }


def ray_stages(version: dict[str, torch.Tensor], repeats: int) -> dict[str, float]:
    """`ray.put` of a version in this process, then an actor fetching it and copying it into its own
    tensors (its load), each timed where it runs: an actor on the driver's node, and one on a second node
    of the same machine (its own raylet and object store: the version crosses between the two stores as
    it would between machines, over loopback here). The cluster is started here and stopped after."""
    import ray  # the `ray` extra
    from ray.cluster_utils import Cluster  # the `ray` extra

    store = max(2 * sum(t.nbytes for t in version.values()), 1 << 28)
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 1, "resources": {"near": 1}, "object_store_memory": store,
                        "include_dashboard": False},
    )  # fmt: skip
    try:
        cluster.add_node(num_cpus=1, resources={"far": 1}, object_store_memory=store)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, log_to_driver=False)

        @ray.remote(num_cpus=1)
        class Engine:
            def __init__(self, shapes: dict):
                self.tensors = {k: torch.empty(s, dtype=d) for k, (s, d) in shapes.items()}

            def load(self, boxed: list) -> tuple[float, float]:
                start = time.perf_counter()
                version = ray.get(boxed[0])
                if isinstance(version, tuple):  # packed: views into the object store's mapping
                    version = unpack_weights(*version)
                fetched = time.perf_counter()
                copy_into(self.tensors, version)
                return fetched - start, time.perf_counter() - fetched

        shapes = {k: (tuple(t.shape), t.dtype) for k, t in version.items()}
        near = Engine.options(resources={"near": 1}).remote(shapes)
        far = Engine.options(resources={"far": 1}).remote(shapes)
        packed = lambda: (lambda index, buffer: (index, buffer.numpy()))(*pack_weights(version))  # noqa: E731
        out = {}
        for label, prepare, engine in (
            ("ray_dict", lambda: version, near),
            ("ray", packed, near),
            ("ray_far", packed, far),
        ):
            put, fetch, load = [], [], []
            for _ in range(repeats):
                start = time.perf_counter()
                ref = ray.put(prepare())
                put.append(time.perf_counter() - start)
                got, loaded = ray.get(engine.load.remote([ref]))
                fetch.append(got)
                load.append(loaded)
                del ref
            out |= {f"{label}_put": min(put), f"{label}_fetch": min(fetch), f"{label}_load": min(load)}
        return out
    finally:
        ray.shutdown()
        cluster.shutdown()


def copy_bandwidth(nbytes: int = 1 << 30, repeats: int = 5) -> float:
    """GB/s of one plain copy between two buffers of `nbytes` (both touched first), best of `repeats`."""
    source = torch.ones(nbytes, dtype=torch.uint8)
    target = torch.zeros_like(source)
    return nbytes / 1e9 / best_of(repeats, lambda: target.copy_(source))


def delta_stages(
    masters: dict[str, torch.Tensor], dtype: torch.dtype, repeats: int, lr: float = 1e-6
) -> dict:
    """runtime.publish=delta after one update of about `lr` per weight (an Adam step's size; the values do
    not matter to a copy, but they do to a delta): the driver's XOR and compression, the actor's
    decompression and XOR (packing the version it holds first, as an actor does), and the delta's size."""
    g = torch.Generator().manual_seed(0)
    old = {k: t.to(dtype) for k, t in masters.items()}
    new = {
        k: (t.float() - lr * torch.randn(t.shape, generator=g).sign()).to(dtype) for k, t in masters.items()
    }
    _, old_buffer = pack_weights(old)
    _, new_buffer = pack_weights(new)
    delta = encode_delta(new_buffer, old_buffer)
    return {
        "delta_bytes": len(delta),
        "delta_encode": best_of(repeats, lambda: encode_delta(new_buffer, old_buffer)),
        "delta_decode": best_of(repeats, lambda: decode_delta(delta, pack_weights(old)[1])),
    }


def publish_costs(
    models: dict[str, tuple[Callable[[torch.dtype], dict[str, torch.Tensor]], bool]],
    dtypes: list[torch.dtype],
    repeats: int = 3,
    ray_up_to: int = 2 << 30,
    say=print,
) -> dict:
    """Each model in each dtype: the stages' seconds and GB/s, and the copy bandwidth. A model's maker
    gives its weights in a dtype; `True` beside it: float32 masters as a learner holds them (else masters in
    the publish dtype, for models whose float32 copies would not fit here: then `learner_copy` is a copy, not
    a cast). Ray runs for versions up to `ray_up_to` bytes (its store and the actor hold two more copies)."""
    bandwidth = copy_bandwidth()
    say(f"publish: plain copy of 1 GiB, {bandwidth:.1f} GB/s")
    rows = []
    for name, (make, float32_masters) in models.items():
        for dtype in dtypes:
            masters = make(torch.float32 if float32_masters else dtype)
            r = {"model": name, "dtype": str(dtype).removeprefix("torch."), "masters": masters_dtype(masters)}
            r |= local_stages(masters, dtype, repeats)
            if r["bytes"] <= ray_up_to:
                r |= ray_stages({k: t.to(dtype=dtype, copy=True) for k, t in masters.items()}, repeats)
            if r["bytes"] <= ray_up_to:
                r |= delta_stages(masters, dtype, repeats)
            del masters
            gb = r["bytes"] / 1e9
            r["gb_per_s"] = {k: gb / v for k, v in r.items() if isinstance(v, float)}  # of the whole version
            say(
                f"publish: {name} {r['dtype']} ({r['masters']} masters), {gb:.2f} GB: "
                + ", ".join(f"{k} {r[k]:.3f} s ({rate:.1f} GB/s)" for k, rate in r["gb_per_s"].items())
            )
            rows.append(r)
    return {"copy_gb_per_s": bandwidth, "threads": torch.get_num_threads(), "rows": rows}


def masters_dtype(masters: dict[str, torch.Tensor]) -> str:
    return str(next(iter(masters.values())).dtype).removeprefix("torch.")


def vllm_reload_costs(
    name: str, dtypes: list[torch.dtype], python: Path, repeats: int, log: Path, say=print
) -> list[dict]:
    """vLLM's path (`rollout.engine=vllm`), in its own environment (asympo.bench.vllm_leg): each version
    written as a safetensors file (to /dev/shm where it has room) and reloaded by vLLM, best of `repeats`."""
    rows = []
    for dtype in dtypes:
        job = {
            "model": name, "dtype": str(dtype).removeprefix("torch."), "prompts": [[1, 2, 3], [4, 5, 6]],
            "n": 1, "sampling": {"max_new_tokens": 4}, "batch": 4, "threads": torch.get_num_threads(),
            "seed": 0, "eager": True,
        }  # fmt: skip
        leg = VLLMLeg(python, job, log)
        try:  # alternating: the whole version, then only what LoRA on every linear layer changes
            answers = [[leg.ask(line) for line in ("reload", "reload lora")] for _ in range(repeats)]
        finally:
            leg.close()
        r = {"model": name, "dtype": job["dtype"]}
        for i, prefix in enumerate(("", "lora_")):
            r[f"{prefix}bytes"] = answers[0][i]["bytes"]
            r |= {f"{prefix}{stage}": min(a[i][stage] for a in answers) for stage in ("write", "reload")}
        for prefix, what in (("", "whole version"), ("lora_", "LoRA's blocks")):
            gb = r[f"{prefix}bytes"] / 1e9
            write, reload = r[f"{prefix}write"], r[f"{prefix}reload"]
            say(
                f"publish: vLLM {name} {r['dtype']}, {what}, {gb:.2f} GB: write {write:.3f} s "
                f"({gb / write:.1f} GB/s), reload {reload:.3f} s ({gb / reload:.1f} GB/s)"
            )
        rows.append(r)
    return rows
