"""peft's LoRA Linear, adding the adapter's output into the frozen layer's output in place.

peft computes `result + lora_B(lora_A(x)) * scaling`: two more activation-sized tensors per adapted layer
in the forward, and their gradients in the backward. On a CPU that churn is what made a LoRA step peak
above a full fine-tuning one (SmolLM2, 4 x 256 tokens: 2928 against 2504 MiB of resident memory), though
the tensors it holds at its peak are fewer: glibc's heap cannot hand freed blocks back while the activations
kept for the backward sit between them. Scaling the rank-sized `lora_A(x)` instead, and one `addmm_` into
the base output, gives the same sum with neither tensor. Anything else (several or mixed adapters, a variant
such as DoRA, merged weights, extra arguments) takes peft's own path.

Imported only when LoRA is on (peft is the `lora` extra); registered through peft's custom-module hook.
"""

from __future__ import annotations

import torch
from peft.tuners.lora.layer import Linear


class InPlaceLinear(Linear):
    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        adapters = [a for a in self.active_adapters if a in self.lora_A]
        plain = not (self.disable_adapters or self.merged or self.lora_variant or args or kwargs)
        if not plain or len(adapters) != 1:
            return super().forward(x, *args, **kwargs)
        (name,) = adapters
        lora_a, lora_b = self.lora_A[name], self.lora_B[name]
        result = self.base_layer(x)
        # the frozen layer's output is no input to its own backward, so writing into it is safe
        low = lora_a(self.lora_dropout[name](x.to(lora_a.weight.dtype))) * self.scaling[name]
        flat = result.view(-1, result.shape[-1])
        flat.addmm_(low.reshape(-1, low.shape[-1]).to(flat.dtype), lora_b.weight.t().to(flat.dtype))
        return result
