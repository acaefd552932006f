"""Does `torch.compile` speed up the engine's decode step on a CPU? One decode step of the engine's model,
eager as the engine runs it against the same step compiled with static shapes, side by side in one run.

The engine's eager step attends to the columns written so far (`SlotCache`: a view that grows by one column
per step). A compiled step needs shapes that do not change from step to step, or it recompiles: here the KV
buffers of one slot-count and capacity bucket are passed whole, the new column is written at a tensor index
(`index_copy_`, in place) and a boolean mask hides the columns not written yet. Both run the same model in
the same dtype on the same cache contents; the compiled step is timed after its compile, which is reported
on its own line.

Run: .venv/bin/python benchmarks/compile_decode.py [--model smollm2] [--slots 32] [--filled 120]
It prints the CPU first: the ratio depends on it.
"""

from __future__ import annotations

import argparse
import time

import torch
from transformers import Cache
from transformers.cache_utils import DynamicLayer

from asympo.bench.precision import cpu_description
from asympo.models.load import load_policy
from asympo.rollout.batching import BufferLayer
from asympo.rollout.packed import PackedLinears


class ColumnLayer(DynamicLayer):
    """A layer cache of fixed shape: writes the step's keys and values at column `column` (a tensor, so that
    a compiled graph does not specialise on it) and returns the whole buffers."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, column: torch.Tensor):
        super().__init__()
        self.keys, self.values, self.column = keys, values, column
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        self.keys.index_copy_(2, self.column, key_states)
        self.values.index_copy_(2, self.column, value_states)
        return self.keys, self.values


def seconds_per_call(step, calls: int) -> float:
    for _ in range(3):
        step()
    start = time.perf_counter()
    for _ in range(calls):
        step()
    return (time.perf_counter() - start) / calls


def measure(model, dtype: torch.dtype, slots: int, filled: int, capacity: int, calls: int) -> dict:
    model = model.to(dtype)
    config = model.config
    heads, head_dim = config.num_key_value_heads, config.hidden_size // config.num_attention_heads
    generator = torch.Generator().manual_seed(0)
    shape = (slots, heads, capacity, head_dim)
    buffers = [
        (torch.randn(shape, generator=generator).to(dtype), torch.randn(shape, generator=generator).to(dtype))
        for _ in range(config.num_hidden_layers)
    ]
    tokens = torch.randint(0, config.vocab_size, (slots, 1), generator=generator)
    positions = torch.full((slots, 1), filled)

    def forward(tokens, positions, mask, layers):
        kwargs = {"attention_mask": mask, "position_ids": positions, "use_cache": True}
        return model(input_ids=tokens, past_key_values=Cache(layers=layers), **kwargs).logits

    def eager():  # as the engine runs it: the cache is a view of the columns written so far
        mask = torch.ones(slots, filled + 1, dtype=torch.bool)
        return forward(tokens, positions, mask, [BufferLayer(k, v, filled) for k, v in buffers])

    column = torch.tensor([filled])
    static_mask = torch.zeros(slots, 1, 1, capacity, dtype=torch.bool)
    static_mask[..., : filled + 1] = True

    def static(tokens, positions, mask, column):  # whole buffers, a 4-d mask: the same shapes every step
        return forward(tokens, positions, mask, [ColumnLayer(k, v, column) for k, v in buffers])

    packed = PackedLinears(model, rows_hint=slots)
    with torch.inference_mode():
        result = {"eager": seconds_per_call(eager, calls)}
        if packed.layers:
            with packed.active():
                result["eager, packed bf16 weights"] = seconds_per_call(eager, calls)
        reference = eager()[:, -1].float()
        compiled = torch.compile(static, dynamic=False)
        start = time.perf_counter()
        out = compiled(tokens, positions, static_mask, column)[:, -1].float()
        result["compile seconds"] = time.perf_counter() - start
        result["compiled"] = seconds_per_call(lambda: compiled(tokens, positions, static_mask, column), calls)
        result["max logit difference"] = float((out - reference).abs().max())
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--slots", type=int, default=32, help="sequences decoded at once")
    parser.add_argument("--filled", type=int, default=120, help="cache columns written before the step")
    parser.add_argument(
        "--capacity", type=int, default=0, help="the compiled bucket's columns (0: filled+64)"
    )
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--dtypes", default="float32,bfloat16")
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"cpu: {cpu_description()}; torch {torch.__version__}, {torch.get_num_threads()} threads")
    model, _ = load_policy(args.model)
    model.eval()
    capacity = args.capacity or args.filled + 64
    print(f"{args.model}: {args.slots} slots, {args.filled} columns filled, compiled bucket of {capacity}")
    for name in args.dtypes.split(","):
        result = measure(model, getattr(torch, name), args.slots, args.filled, capacity, args.calls)
        eager = min(v for k, v in result.items() if k.startswith("eager"))
        print(f"  {name}:")
        for key, value in result.items():
            if key.startswith(("eager", "compiled")):
                print(f"    {key:28s} {value * 1000:7.1f} ms per step  ({eager / value:.2f}x the best eager)")
            else:
                print(f"    {key:28s} {value:7.3f}")


if __name__ == "__main__":
    main()
