from __future__ import annotations

import pytest
from pydantic import BaseModel

from asympo.cli import parse_args
from asympo.config import EvalConfig, StudyConfig, TrainConfig, build_config, preset_names
from asympo.config.reference import COMMAND_CONFIGS, settings
from asympo.errors import UserError


def test_defaults_are_the_documented_default_run():
    cfg = build_config(TrainConfig)
    assert (cfg.model, cfg.objective.name, cfg.runtime.mode, cfg.runtime.lag) == (
        "tiny",
        "asympo",
        "async",
        2,
    )


def test_yaml_then_overrides_dotted_leaf_and_section_shorthand(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("steps: 7\noptim:\n  lr: 0.001\nobjective:\n  name: spo\n")
    cfg = build_config(
        TrainConfig, path, ["optim.lr=3e-4", "lag=4", "objective=pg", "spo_c=0.25", "tensorboard=true"]
    )
    assert cfg.steps == 7
    assert cfg.optim.lr == pytest.approx(3e-4)
    assert cfg.runtime.lag == 4
    assert cfg.objective.name == "pg" and cfg.objective.spo_c == 0.25
    assert cfg.tensorboard is True


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["nope=1"], "unknown config key 'nope'"),
        (["optim.nope=1"], "config optim.nope: unknown config key"),
        (["optim.lr=-1"], "config optim.lr: Input should be greater than 0"),
        (["steps=many"], "config steps: Input should be a valid integer"),
        (["runtime.mode=warp"], "config runtime.mode"),
        (["objective=nonsense"], "nonsense"),
        (["seedless"], "not of the form key=value"),
        (["optim.minibatches=9", "rollout.prompts_per_step=8"], "groups are never split"),
    ],
)
def test_bad_values_give_one_line_naming_the_key(overrides, message):
    with pytest.raises(UserError) as err:
        build_config(TrainConfig, None, overrides)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


class _Inner(BaseModel):
    size: int = 1


class _Outer(BaseModel):
    a: _Inner = _Inner()
    b: _Inner = _Inner()


def test_ambiguous_leaf_names_the_candidates():
    with pytest.raises(UserError, match=r"'size' is ambiguous: use one of a\.size, b\.size"):
        build_config(_Outer, None, ["size=2"])
    assert build_config(_Outer, None, ["b.size=2"]).b.size == 2


@pytest.mark.parametrize(
    ("text", "message"),
    [("steps: [1,\n", "malformed YAML"), ("- 1\n- 2\n", "must hold a mapping"), ("stepz: 3\n", "stepz")],
)
def test_bad_files(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(UserError, match=message):
        build_config(TrainConfig, path)
    with pytest.raises(UserError, match="not found"):
        build_config(TrainConfig, tmp_path / "missing.yaml")


@pytest.mark.parametrize("name", preset_names())
def test_every_preset_loads_as_its_command_config(name):
    """A shipped preset that no longer validates would fail only when a user runs it."""
    kind = StudyConfig if name.startswith("study-") else TrainConfig
    assert isinstance(build_config(kind, name, []), kind)


def test_eval_reads_a_training_preset_as_its_model_task_prompt_and_sampling():
    """The README's `eval -c smollm2-arith`: the preset's sampling carries over, training sections go."""
    cfg = build_config(EvalConfig, "smollm2-arith", ["k=4"])
    train = build_config(TrainConfig, "smollm2-arith", [])
    same = ("model", "reward", "task", "prompt")
    assert [getattr(cfg, key) for key in same] == [getattr(train, key) for key in same]
    assert (cfg.max_new_tokens, cfg.max_batch, cfg.k) == (48, 64, 4)
    assert cfg.max_new_tokens != EvalConfig().max_new_tokens  # the preset's value, not eval's default


def test_a_typo_in_a_training_preset_read_by_eval_is_named_not_dropped(tmp_path):
    path = tmp_path / "train.yaml"
    path.write_text("model: tiny\noptim:\n  lrr: 0.1\n")
    with pytest.raises(UserError, match="optim.lrr: unknown config key"):
        build_config(EvalConfig, path, [])


def command_help(capsys, command: str) -> str:
    with pytest.raises(SystemExit) as done:
        parse_args([command, "--help"])
    assert done.value.code == 0
    return capsys.readouterr().out


def test_train_help_lists_every_setting_with_its_default_and_description(capsys):
    out = command_help(capsys, "train")
    assert "  optim.lr = 0.0001\n" in out
    flat = " ".join(out.split())  # descriptions are wrapped
    assert " ".join(TrainConfig.model_fields["seed"].description.split()) in flat
    assert "optim.lr = 0.0001 AdamW learning rate" in flat
    for key, _, description in settings(TrainConfig):
        assert key in out and description in flat, key


def test_serve_help_lists_its_settings(capsys):
    out = command_help(capsys, "serve")
    assert "  port = 8000\n" in out
    assert "any free port" in out
    assert "rollout.temperature" not in out  # train's settings stay in train's help


def test_every_documented_default_typed_back_gives_the_default_config():
    """What the reference shows as a default, given as `key=value`, is that default (quotes and all)."""
    for model in COMMAND_CONFIGS.values():
        default = build_config(model).model_dump()
        for key, shown, _ in settings(model):
            if not key.endswith(".*"):
                assert build_config(model, None, [f"{key}={shown}"]).model_dump() == default, key
