from __future__ import annotations

import random
import re
from pathlib import Path

import numpy as np
import pytest
import torch

import asympo.checkpoint
from asympo.checkpoint import TrainState, latest_checkpoint, load_checkpoint, save_checkpoint
from asympo.config import TinyModelConfig
from asympo.errors import UserError
from asympo.models.tiny import build_model
from asympo.models.weights import publishable_weights


def make_optim(model: torch.nn.Module):
    """AdamW + warm-up LambdaLR, as asympo/learner.py builds them."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.99), weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda n: min(1.0, (n + 1) / 5))
    return optimizer, scheduler


def train_step(model, optimizer, scheduler, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, 40, (2, 12), generator=gen)
    optimizer.zero_grad(set_to_none=True)
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    scheduler.step()


def weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture()
def trained(small_model):
    model = small_model
    optimizer, scheduler = make_optim(model)
    history = []
    for i in range(3):
        history.insert(0, (i, weights(model)))  # newest first, to check the order survives
        train_step(model, optimizer, scheduler, seed=i)
    return model, optimizer, scheduler, history[:2]


def fresh(like: torch.nn.Module):
    """A differently initialised model of the same shape, with its own optimiser and scheduler."""
    torch.manual_seed(1)
    model = type(like)(like.config)
    return (model, *make_optim(model))


def draws() -> tuple:
    return torch.rand(4).tolist(), random.random(), np.random.rand(3).tolist(), np.random.randn()


def test_round_trip_resumes_exactly(tmp_path, trained):
    model, optimizer, scheduler, history = trained
    state = TrainState(step=3, version=3, skipped_steps=1, cursor=24, counters={"dropped": 2.0, "nan": 0.0})
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    np.random.randn()  # leave a cached gaussian in numpy's state
    folder = save_checkpoint(tmp_path, state, model, optimizer, scheduler, history=history)
    assert folder == tmp_path / "step-000003" and latest_checkpoint(tmp_path) == folder
    after_save = draws()

    model2, optimizer2, scheduler2 = fresh(model)
    state2, history2 = load_checkpoint(tmp_path, model2, optimizer2, scheduler2)
    assert draws() == after_save
    assert state2 == state
    assert [v for v, _ in history2] == [v for v, _ in history] == [2, 1]
    for (_, a), (_, b) in zip(history, history2, strict=True):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for (k, a), b in zip(model.state_dict().items(), model2.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    assert model2.lm_head.weight is model2.model.embed_tokens.weight  # tying survives the load
    s1, s2 = optimizer.state_dict(), optimizer2.state_dict()
    assert s1["param_groups"] == s2["param_groups"]
    assert isinstance(s2["param_groups"][0]["betas"], tuple)
    assert s1["state"].keys() == s2["state"].keys() and len(s1["state"]) > 0
    for pid, st in s1["state"].items():
        assert st.keys() == s2["state"][pid].keys() == {"step", "exp_avg", "exp_avg_sq"}
        for name, t in st.items():
            assert torch.equal(t, s2["state"][pid][name]) and t.dtype == s2["state"][pid][name].dtype
    assert float(s2["state"][0]["step"]) == 3.0
    assert scheduler2.last_epoch == scheduler.last_epoch == 3
    assert scheduler2.get_last_lr() == scheduler.get_last_lr()

    train_step(model, optimizer, scheduler, seed=9)
    train_step(model2, optimizer2, scheduler2, seed=9)
    for (k, a), b in zip(model.state_dict().items(), model2.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    assert scheduler2.get_last_lr() == scheduler.get_last_lr()


def save_at(root: Path, step: int, model, optimizer, scheduler, keep: int = 2) -> Path:
    return save_checkpoint(root, TrainState(step, step, 0, 8 * step), model, optimizer, scheduler, keep=keep)


def test_keeps_newest_and_ignores_partial_writes(tmp_path, trained):
    model, optimizer, scheduler, _ = trained
    for step in (1, 2, 3):
        save_at(tmp_path, step, model, optimizer, scheduler)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step-000002", "step-000003"]
    assert (tmp_path / "latest").read_text().strip() == "step-000003"

    stale = tmp_path / "step-000004.tmp"  # a crash mid-write: half a checkpoint, never named in `latest`
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"\x00" * 10)
    state, _ = load_checkpoint(tmp_path, *fresh(model))
    assert state.step == 3

    save_at(tmp_path, 5, model, optimizer, scheduler)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step-000003", "step-000005"]
    save_at(tmp_path, 5, model, optimizer, scheduler)  # the same step twice replaces it in place
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step-000003", "step-000005"]
    assert load_checkpoint(tmp_path, *fresh(model))[0].step == 5


def truncate(p: Path) -> None:
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


@pytest.mark.parametrize(
    "corrupt",
    [
        lambda d: truncate(d / "model.safetensors"),
        lambda d: (d / "state.json").write_text("{not json"),
        lambda d: (d / "optimizer.safetensors").unlink(),
        lambda d: (d / "rng.safetensors").write_bytes(b"garbage"),
    ],
    ids=["truncated-model", "garbage-json", "missing-optimizer", "garbage-rng"],
)
def test_corrupt_checkpoint_is_a_user_error(tmp_path, trained, corrupt):
    model, optimizer, scheduler, _ = trained
    older = save_at(tmp_path, 1, model, optimizer, scheduler)
    before = {p.name: p.read_bytes() for p in older.iterdir()}
    newer = save_at(tmp_path, 2, model, optimizer, scheduler)
    corrupt(newer)
    with pytest.raises(UserError, match=re.escape(str(newer)) + r" is corrupt: \S+") as e:
        load_checkpoint(tmp_path, *fresh(model))
    assert "\n" not in str(e.value)
    assert {p.name: p.read_bytes() for p in older.iterdir()} == before


def test_shape_mismatch_is_a_user_error_and_leaves_model_alone(tmp_path, tokenizer, trained):
    save_at(tmp_path, 1, *trained[:3])
    cfg = TinyModelConfig(hidden_size=16, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=32)
    model = build_model(cfg, tokenizer)
    optimizer, scheduler = make_optim(model)
    before = weights(model)
    with pytest.raises(UserError, match=r"step-000001 is corrupt: model\.safetensors: .*shape"):
        load_checkpoint(tmp_path, model, optimizer, scheduler)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_empty_root_has_no_checkpoint(tmp_path, small_model):
    assert latest_checkpoint(tmp_path / "missing") is None
    assert load_checkpoint(tmp_path, *fresh(small_model)) is None


def test_loading_never_unpickles():
    source = Path(asympo.checkpoint.__file__).read_text()
    assert "pickle" not in source.lower()
    for call in re.findall(r"torch\.load\([^)]*\)", source):
        assert "weights_only=True" in call


def test_history_may_leave_out_the_tied_alias_but_nothing_else(tmp_path, trained):
    model, optimizer, scheduler, _ = trained
    published = publishable_weights(model)  # what the learner hands the lag runtime: no lm_head alias
    assert "lm_head.weight" not in published
    state = TrainState(step=1, version=1, skipped_steps=0, cursor=8, counters={})
    save_checkpoint(tmp_path / "ok", state, model, optimizer, scheduler, history=[(1, published)])
    _, history = load_checkpoint(tmp_path / "ok", *fresh(model))
    assert history[0][1].keys() == published.keys()

    incomplete = {k: v for k, v in published.items() if k != "model.norm.weight"}
    save_checkpoint(tmp_path / "bad", state, model, optimizer, scheduler, history=[(1, incomplete)])
    with pytest.raises(UserError, match=r"history-1\.safetensors: .*missing \['model\.norm\.weight'\]"):
        load_checkpoint(tmp_path / "bad", *fresh(model))
