"""TrainConfig: YAML, key=value overrides, flags, and the errors a typo or a bad value gets."""

from __future__ import annotations

import dataclasses
import typing

import pytest

from lorakit.data import FORMATS
from lorakit.train import ConfigError, TrainConfig, load_train_config


@pytest.fixture
def recipe(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text("data: train.jsonl\nlr: 2e-4\nr: 8\ntarget_modules: [q_proj, v_proj]\nmax_steps: 50\n")
    return path


def test_yaml_then_overrides_then_flags(recipe):
    config = load_train_config(recipe, ["r=4", "max_steps=10", "scheduler=linear"], max_steps=7, quiet=None)
    assert config.lr == pytest.approx(2e-4) and isinstance(config.lr, float)  # YAML 1.1 reads "2e-4" as text
    assert config.r == 4  # override beats the file
    assert config.max_steps == 7  # a flag beats an override
    assert config.quiet is False  # None means "flag not given"
    assert config.scheduler == "linear"
    assert config.target_modules == ["q_proj", "v_proj"]


def test_override_values_are_yaml(recipe):
    config = load_train_config(recipe, [
        "target_modules=[o_proj]", "max_grad_norm=null", "packing=true", "lora_alpha=16", "eval_every=1e1", "eval_fraction=0.1",
    ])
    assert config.target_modules == ["o_proj"]
    assert config.max_grad_norm is None and config.packing is True
    assert config.lora_alpha == 16 and config.eval_every == 10 and isinstance(config.eval_every, int)


def test_comma_list_and_all_linear(recipe):
    assert load_train_config(recipe, ["target_modules=q_proj, k_proj"]).target_modules == ["q_proj", "k_proj"]
    assert load_train_config(recipe, ["target_modules=all-linear"]).target_modules == "all-linear"


def test_defaults():
    config = TrainConfig(data="x.jsonl")
    assert (config.model, config.lr, config.r, config.lora_alpha, config.method) == ("smollm2-135m", 2e-4, 16, 32, "lora")
    assert config.target_modules == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    assert config.distributed == "auto" and config.resume is None and config.keep_checkpoints == 2


@pytest.mark.parametrize("item,hint", [
    ("learnig_rate=1", None), ("bacth_size=2", "did you mean 'batch_size'"),
    ("learning_rate=1", "did you mean 'lr'"), ("gradient_accumulation_steps=2", "did you mean 'grad_accum'"),
    ("tf32=true", "did you mean 'frozen_matmul_precision'"),
])
def test_unknown_key_lists_valid_ones(recipe, item, hint):
    with pytest.raises(ConfigError) as err:
        load_train_config(recipe, [item])
    message = str(err.value)
    assert repr(item.split("=")[0]) in message and "valid options:" in message and "max_seq_len" in message
    if hint:
        assert hint in message
    assert "\n" not in message


def test_unknown_key_in_the_file_names_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("data: x\nepochz: 2\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: unknown option 'epochz'; did you mean 'epochs'"):
        load_train_config(path)


@pytest.mark.parametrize("item,field", [
    ("lr=fast", "lr"), ("r=0", "r"), ("r=2.5", "r"), ("method=qlora", "method"), ("batch_size=-1", "batch_size"),
    ("lora_dropout=1.5", "lora_dropout"), ("packing=maybe", "packing"), ("device=gpu", "device"),
    ("max_steps=0", "max_steps"), ("target_modules=[]", "target_modules"), ("eval_fraction=1", "eval_fraction"),
    ("frozen_matmul_precision=low", "frozen_matmul_precision"),
    ("frozen_matmul_precision=medium method=full", "frozen_matmul_precision"),
])
def test_bad_value_names_the_field(recipe, item, field):
    with pytest.raises(ConfigError, match=rf"^{field}: "):
        load_train_config(recipe, item.split())


def test_conflicting_and_missing_options(recipe):
    with pytest.raises(ConfigError, match="warmup_steps and warmup_ratio"):
        load_train_config(recipe, ["warmup_steps=3", "warmup_ratio=0.1"])
    with pytest.raises(ConfigError, match="^eval_every: there is no eval data"):
        load_train_config(recipe, ["eval_every=5"])
    with pytest.raises(ConfigError, match="^data: required"):
        load_train_config(None, [])
    with pytest.raises(ConfigError, match="expected key=value"):
        load_train_config(recipe, ["lr"])
    with pytest.raises(ConfigError, match="unknown option 'lerning'"):
        load_train_config(recipe, lerning=1)
    with pytest.raises(FileNotFoundError, match="config file not found"):
        load_train_config(recipe.parent / "nope.yaml")


def test_non_mapping_yaml(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_train_config(path)


def test_written_config_reads_back_the_same(tmp_path):
    config = TrainConfig(data="d.jsonl", lr=3e-5, target_modules="all-linear", max_steps=9, resume="latest")
    path = tmp_path / "config.yaml"
    path.write_text(config.to_yaml())
    assert load_train_config(path) == config


def test_every_field_is_documented_and_typed():
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        assert f.metadata.get("help"), f"{f.name} has no help"
        assert f.name in hints
    assert typing.get_args(hints["format"]) == ("auto", *FORMATS)


def test_caller_list_is_copied():
    targets = ["q_proj"]
    config = TrainConfig(data="x", target_modules=targets)
    targets.append("v_proj")
    assert config.target_modules == ["q_proj"]
