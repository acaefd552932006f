"""One actor update through verl's own actor loss (`verl.workers.utils.losses.ppo_loss`, the function verl's
engine worker binds as its loss) with loss_mode=asympo, on a tiny Qwen2 model on CPU.

verl 0.9's FSDP/Megatron engine itself is not run here (it needs torch.distributed and a device); this is
the loss path it calls with its data layout: unpadded flat log-probs of prompt+response, global batch info.
"""

from __future__ import annotations

import torch
from verl.utils import tensordict_utils as tu
from verl.workers.config.actor import FSDPActorConfig, PolicyLossConfig
from verl.workers.utils.losses import ppo_loss

from asympo.config import ObjectiveConfig, TinyModelConfig
from asympo.models.tiny import build_model, build_tokenizer
from asympo.objectives import LossInputs, compute_loss

SMALL = TinyModelConfig(hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=64)


def token_logprobs(model, ids: torch.Tensor, attention: torch.Tensor) -> torch.Tensor:
    """[B, L] log-prob of token t+1 at position t (last position 0), as verl's engine returns them."""
    logits = model(input_ids=ids, attention_mask=attention).logits.float()
    lp = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    return torch.nn.functional.pad(lp, (0, 1))


def test_one_update_step_with_loss_mode_asympo():
    torch.manual_seed(0)
    tok = build_tokenizer()
    model = build_model(SMALL, tok, seed=0)
    vocab = model.config.vocab_size
    b, p, r = 8, 4, 6
    prompts = torch.randint(3, vocab, (b, p))
    responses = torch.randint(3, vocab, (b, r))
    lengths = torch.tensor([6, 2, 4, 5, 1, 6, 3, 4])
    response_mask = (torch.arange(r)[None, :] < lengths[:, None]).long()
    attention = torch.cat([torch.ones(b, p, dtype=torch.long), response_mask], 1)
    ids = torch.cat([prompts, responses], 1)
    rewards = torch.tensor([1.0, 0, 0, 1, 1, 0, 0, 0])
    groups = torch.arange(b) // 4
    adv = torch.zeros(b)
    for g in groups.unique():  # GRPO group normalisation (verl's adv_estimator=grpo does this on the driver)
        sel = groups == g
        adv[sel] = (rewards[sel] - rewards[sel].mean()) / (rewards[sel].std() + 1e-6)
    token_adv = adv[:, None] * response_mask

    config = FSDPActorConfig(
        strategy="fsdp",
        rollout_n=4,
        ppo_mini_batch_size=8,
        ppo_micro_batch_size_per_gpu=8,
        loss_agg_mode="seq-mean-token-mean",
        policy_loss=PolicyLossConfig(loss_mode="asympo"),
    )
    with torch.no_grad():
        old = token_logprobs(model, ids, attention)[:, p - 1 : p - 1 + r]
    data = tu.get_tensordict(
        {
            "prompts": prompts,
            "responses": responses,
            "attention_mask": attention,
            "response_mask": response_mask,
            "old_log_probs": old,
            "advantages": token_adv,
        },
        {"dp_size": 1, "batch_num_tokens": int(response_mask.sum()), "global_batch_size": b},
    )

    before = [q.detach().clone() for q in model.parameters()]
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    lp = token_logprobs(model, ids, attention)
    flat = torch.cat([lp[i, : p + int(lengths[i])] for i in range(b)])  # verl's unpadded layout
    loss, metrics = ppo_loss(config, {"log_probs": flat}, data)
    loss.backward()
    grads = [q.grad.detach().clone() for q in model.parameters()]
    opt.step()

    assert "actor/asympo/nll_pos" in metrics and "actor/pg_loss" in metrics
    assert any(not torch.equal(a, q) for a, q in zip(before, model.parameters(), strict=True))

    # the same step computed by asympo directly: same loss and gradient
    ref_model = build_model(SMALL, tok, seed=0)
    ref_lp = token_logprobs(ref_model, ids, attention)[:, p - 1 : p - 1 + r]
    ref, _ = compute_loss(
        LossInputs(ref_lp, response_mask.bool(), adv, groups),
        ObjectiveConfig(name="asympo", aggregation="response"),
    )
    ref.backward()
    torch.testing.assert_close(loss, ref)
    for g1, q in zip(grads, ref_model.parameters(), strict=True):
        torch.testing.assert_close(g1, q.grad, rtol=1e-4, atol=1e-6)
