"""asympo objectives inside TRL's GRPOTrainer: real TRL, the tiny built-in model, CPU, a few steps each."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("trl")

from datasets import Dataset  # noqa: E402  (after the importorskip on purpose)
from trl import GRPOConfig  # noqa: E402

from asympo.config import (
    ObjectiveConfig,  # noqa: E402
    TaskConfig,  # noqa: E402
)
from asympo.data.tasks import train_stream
from asympo.integrations.trl import GROUP_KEY, AsympoGRPOTrainer  # noqa: E402
from asympo.models.load import load_policy  # noqa: E402
from asympo.objectives import LossInputs, compute_loss
from asympo.rewards.exact import exact_match  # noqa: E402

PROMPTS, GENERATIONS = 2, 4  # per micro-batch: 2 groups of 4 completions


@pytest.fixture(autouse=True)
def one_thread():
    """TRL generates token by token on tensors of a few KB: a second thread only adds synchronisation, and on
    a busy 2-core machine it made these tests ~30x slower (0.4 s vs 12 s for three steps)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def reward(completions: list[str], answer: list[str], **kwargs: Any) -> list[float]:
    return [exact_match(c, a) for c, a in zip(completions, answer, strict=True)]


class Recording(AsympoGRPOTrainer):
    """Records, at every loss call, TRL's batch, the loss and its gradient, and the same quantities computed
    independently: plain forward (full logits, no TRL helper) -> log-probs -> asympo's compute_loss."""

    records: list[dict[str, Any]]

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        params = [p for p in model.parameters() if p.requires_grad]
        grads = torch.autograd.grad(loss, params, retain_graph=True)
        ref_loss, ref_metrics = independent_loss(self, model, inputs)
        ref_grads = torch.autograd.grad(ref_loss, params)
        self.records.append(
            {"inputs": inputs, "loss": loss.detach(), "grads": grads, "ref_loss": ref_loss.detach()}
            | {"ref_grads": ref_grads, "ref_metrics": ref_metrics}
        )
        return loss


def independent_loss(trainer: AsympoGRPOTrainer, model, inputs: dict[str, Any]):
    prompt_ids, completion_ids = inputs["prompt_ids"], inputs["completion_ids"]
    ids = torch.cat([prompt_ids, completion_ids], dim=1)
    attention = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
    logits = model(input_ids=ids, attention_mask=attention).logits[:, :-1] / trainer.temperature
    logprobs = torch.log_softmax(logits.float(), -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    logprobs = logprobs[:, -completion_ids.shape[1] :]
    groups = torch.unique(prompt_ids, dim=0, return_inverse=True)[1]  # same prompt, same group
    behaviour = inputs.get("old_per_token_logps", logprobs.detach())
    cfg = trainer.objective
    loss, metrics = compute_loss(
        LossInputs(
            logprobs=logprobs,
            mask=inputs["completion_mask"].bool(),
            advantages=inputs["advantages"],
            group_ids=groups,
            behaviour_logprobs=behaviour if cfg.name == "grpo" else None,
            max_len=trainer.max_completion_length,
        ),
        cfg,
    )
    return loss / trainer.args.gradient_accumulation_steps, metrics


def make_trainer(
    out: Path, objective: str | ObjectiveConfig = "asympo", cls=AsympoGRPOTrainer, **overrides: Any
):
    torch.manual_seed(0)
    model, tokenizer = load_policy("tiny")
    steps = overrides.pop("max_steps", 2)
    problems = itertools.islice(train_stream(TaskConfig(), seed=0), 64)
    dataset = Dataset.from_list([{"prompt": p.prompt, "answer": p.answer} for p in problems])
    config = GRPOConfig(
        output_dir=str(out),
        use_cpu=True,
        bf16=False,
        seed=0,
        max_steps=steps,
        learning_rate=1e-3,  # large, so a couple of steps visibly move the weights
        per_device_train_batch_size=PROMPTS * GENERATIONS,
        num_generations=GENERATIONS,
        max_completion_length=6,
        generation_kwargs={"suppress_tokens": [tokenizer.pad_token_id, tokenizer.bos_token_id]},
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        disable_tqdm=True,
        **overrides,
    )
    trainer = cls(
        model=model,
        reward_funcs=reward,
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
        objective=objective,
    )
    if cls is Recording:
        trainer.records = []
    return trainer


def test_steps_change_weights_and_log_asympo_metrics(tmp_path):
    trainer = make_trainer(tmp_path, "asympo", max_steps=3)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.train()
    after = trainer.model.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    logs = [log for log in trainer.state.log_history if "reward" in log]
    assert len(logs) == 3
    for key in ("asympo/loss", "asympo/loss_pos", "asympo/loss_neg", "asympo/asympo_scale_mean"):
        assert all(key in log for log in logs), key
    assert any("asympo/nll_ratio" in log for log in logs)  # defined whenever a step has both signs


@pytest.mark.parametrize(
    ("objective", "overrides"),
    [
        (ObjectiveConfig(name="asympo", asympo_scale="group"), {}),
        # accumulation: TRL shuffles the generation batch and splits groups across micro-batches
        ("asympo", {"gradient_accumulation_steps": 2}),
        ("spo", {}),
        ("pg", {}),
    ],
    ids=["asympo-group-scale", "asympo-accumulation", "spo", "pg"],
)
def test_trl_optimises_asympo_objective(tmp_path, objective, overrides):
    trainer = make_trainer(tmp_path, objective, cls=Recording, **overrides)
    trainer.train()
    assert len(trainer.records) == 2 * trainer.args.gradient_accumulation_steps
    for rec in trainer.records:
        prompts = rec["inputs"]["prompt_ids"]
        groups = rec["inputs"][GROUP_KEY]
        same_group = groups[:, None] == groups[None, :]
        same_prompt = (prompts[:, None] == prompts[None, :]).all(-1)
        assert torch.equal(same_group, same_prompt)  # the tagged groups are TRL's prompt groups
        torch.testing.assert_close(rec["loss"], rec["ref_loss"], rtol=1e-5, atol=1e-6)
        for g, ref in zip(rec["grads"], rec["ref_grads"], strict=True):
            torch.testing.assert_close(g, ref, rtol=1e-4, atol=1e-6)
    assert any(g.abs().sum() > 0 for rec in trainer.records for g in rec["grads"])


def test_grpo_without_old_logprobs_is_on_policy(tmp_path):
    """Default TRL config: one step per generation, TRL computes no old log-probs (they would equal the
    current ones), and grpo uses the detached current log-probs, exactly as TRL's own loss does."""
    trainer = make_trainer(tmp_path, "grpo", cls=Recording)
    trainer.train()
    for rec in trainer.records:
        assert "old_per_token_logps" not in rec["inputs"]
        torch.testing.assert_close(rec["loss"], rec["ref_loss"], rtol=1e-5, atol=1e-6)
        for g, ref in zip(rec["grads"], rec["ref_grads"], strict=True):
            torch.testing.assert_close(g, ref, rtol=1e-4, atol=1e-6)
        assert rec["ref_metrics"]["behaviour_kl"] == pytest.approx(0.0, abs=1e-6)


def test_grpo_uses_trl_old_logprobs(tmp_path):
    """num_iterations=2: the second pass trains on the same batch with updated weights, so TRL computes old
    log-probs and grpo's ratio moves away from 1."""
    trainer = make_trainer(tmp_path, "grpo", cls=Recording, num_iterations=2)
    trainer.train()
    assert all("old_per_token_logps" in rec["inputs"] for rec in trainer.records)
    for rec in trainer.records:
        torch.testing.assert_close(rec["loss"], rec["ref_loss"], rtol=1e-5, atol=1e-6)
    second = trainer.records[1]["ref_metrics"]
    assert abs(second["behaviour_kl"]) > 1e-6
    assert any("asympo/behaviour_kl" in log for log in trainer.state.log_history)


@pytest.mark.parametrize(
    ("objective", "overrides", "message"),
    [
        ("decoupled_ppo", {}, "proximal"),
        (ObjectiveConfig(name="spo", advantage="mean"), {}, "scale_rewards"),
        ("asympo", {"beta": 0.04}, "beta"),
        ("nope", {}, "unknown objective"),
    ],
)
def test_clear_errors(tmp_path, objective, overrides, message):
    with pytest.raises(ValueError, match=message):
        make_trainer(tmp_path, objective, **overrides)
