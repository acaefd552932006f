"""`asympo study`'s configuration: the lr table's lookup, base defaults and refused grids. The study end to
end through the CLI: tests/integration/test_study.py."""

from __future__ import annotations

import pytest

from asympo.config import StudyConfig, build_config
from asympo.errors import UserError
from asympo.study.grid import cell_config, cells_of


def test_lr_table_lookup():
    table = "lr_table={grpo: {0: 0.0001, 8: 0.00003}}"
    cfg = build_config(StudyConfig, None, ["objectives=[grpo,pg]", "lags=[0,4,16]", table])
    assert [cfg.lrs_for("grpo", k) for k in (0, 4, 16)] == [[1e-4], [1e-4], [3e-5]]
    assert cfg.lrs_for("grpo@mb4", 16) == [3e-5]  # the entry's table, whatever the mini-batches
    assert cfg.lrs_for("pg", 4) == cfg.lrs  # not in the table: every lr
    late = build_config(StudyConfig, None, ["objectives=[grpo]", "lr_table={grpo: {4: 0.0001}}"])
    assert late.lrs_for("grpo", 0) == [1e-4]  # below the table's smallest k: that k's lr
    for bad, message in [
        ("lr_table={spo: {0: 0.0001}}", "not in objectives"),
        ("lr_table={pg: {0: 0}}", "learning rates > 0"),
        ("lr_table={pg: {}}", "learning rates > 0"),
    ]:
        with pytest.raises(UserError, match=message):
            build_config(StudyConfig, None, ["objectives=[pg]", bad])


def test_study_config_keeps_base_defaults_and_rejects_bad_grids():
    cfg = build_config(StudyConfig, None, ["base.steps=10"])
    assert cfg.base.steps == 10 and cfg.base.eval_samples == 4 and not cfg.base.save_model
    with pytest.raises(UserError, match="unknown objective 'nope'"):
        build_config(StudyConfig, None, ["objectives=[pg,nope]"])
    with pytest.raises(UserError, match="lags"):
        build_config(StudyConfig, None, ["lags=[-1]"])
    assert build_config(StudyConfig, None, ["objectives=[grpo:learner]"]).objectives == ["grpo:learner"]
    assert build_config(StudyConfig, None, ["lrs=[3e-4,1e-5]"]).lrs == [1e-5, 3e-4]
    for bad, message in [
        ("objectives=[grpo:group]", "group variant is asympo's"),
        ("objectives=[asympo:big]", "unknown objective 'asympo:big'"),
        ("objectives=[pg,pg]", "twice"),
        ("lrs=[0]", "lrs"),
        ("lrs=[]", "lrs"),
        ("minibatches=[0]", "minibatches"),
        ("minibatches=[2,2]", "minibatches"),
    ]:
        with pytest.raises(UserError, match=message):
            build_config(StudyConfig, None, [bad])


def test_weight_updates_axis_runs_async_cells_named_by_arm(tmp_path):
    cfg = build_config(
        StudyConfig,
        None,
        ["objectives=[asympo,grpo:learner]", "lags=[4]", "lrs=[0.0001]", "seeds=[0]",
         "weight_updates=[between_jobs,inflight-keep,inflight-recompute]"],
    )  # fmt: skip
    assert cfg.arms == [
        "asympo~between_jobs", "asympo~inflight-keep", "asympo~inflight-recompute",
        "grpo:learner~between_jobs", "grpo:learner~inflight-keep", "grpo:learner~inflight-recompute",
    ]  # fmt: skip
    cells = {c.objective: c for c in cells_of(cfg)}
    keep = cell_config(cfg, cells["asympo~inflight-keep"], tmp_path / "a")
    assert (keep.runtime.mode, keep.runtime.max_staleness) == ("async", 4)
    assert (keep.rollout.weight_updates, keep.rollout.inflight_kv) == ("inflight", "keep")
    assert (
        cell_config(cfg, cells["asympo~inflight-recompute"], tmp_path / "b").rollout.inflight_kv
        == "recompute"
    )
    learner = cell_config(cfg, cells["grpo:learner~inflight-keep"], tmp_path / "c")
    assert learner.rollout.weight_updates == "inflight" and learner.behaviour.source == "learner"
    assert cells["asympo~inflight-keep"].name == "asympo-inflight-keep-k4-lr0.0001-s0"
    switch = build_config(
        StudyConfig, None, ["objectives=[asympo]", "lags=[4]", "seeds=[0]", "weight_updates=[lag,lag-switch]"]
    )
    by_arm = {c.objective: c for c in cells_of(switch)}
    lag, mid = (cell_config(switch, by_arm[f"asympo~{w}"], tmp_path / w) for w in ("lag", "lag-switch"))
    assert (lag.runtime.mode, lag.runtime.lag, lag.runtime.lag_switch_at) == ("lag", 4, 0)
    assert (mid.runtime.mode, mid.runtime.lag, mid.runtime.lag_switch_at) == ("lag", 4, 2)
    plain = build_config(StudyConfig, None, ["objectives=[asympo]", "lags=[2]"])
    assert cell_config(plain, cells_of(plain)[0], tmp_path / "d").runtime.mode == "lag"  # no axis: lag
