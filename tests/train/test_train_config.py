"""TrainConfig: YAML, key=value overrides, flags, and the errors a typo or a bad value gets."""

from __future__ import annotations

import dataclasses
import typing

import pytest

from lorakit.data import FORMATS
from lorakit.lora.config import LoraConfig
from lorakit.train import ConfigError, TrainConfig, load_train_config
from lorakit.train.config import LORA_KEYS, NOT_IN_RECIPE, SEVEN_PROJECTIONS, field_names
from lorakit.train.setup import TRAJECTORY


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


# -- LoRA options: LoraConfig's fields, under PEFT's names ---------------------------------------
def test_every_lora_config_field_is_a_recipe_key_or_excluded_with_a_reason():
    names = set(field_names())
    for f in dataclasses.fields(LoraConfig):
        assert (f.name in names) != (f.name in NOT_IN_RECIPE), f.name
    assert all(NOT_IN_RECIPE.values())
    assert set(LORA_KEYS) <= set(TRAJECTORY)  # each shapes the run: a resumed run must keep it


def test_a_recipe_sets_any_lora_field(tmp_path):
    path = tmp_path / "lora.yaml"
    path.write_text(
        "data: x.jsonl\nexclude_modules: [k_proj]\nrank_pattern: {v_proj: 4}\nalpha_pattern: {v_proj: 8}\n"
        "modules_to_save: [lm_head]\nlayers_to_transform: [0]\nlayers_pattern: layers\n"
        "init_lora_weights: gaussian\nuse_rslora: true\nlora_bias: true\nbias: lora_only\nfan_in_fan_out: true\n"
    )
    lora = load_train_config(path, ["layers_to_transform=0,1"]).lora_config(task_type="CAUSAL_LM")
    assert (lora.exclude_modules, lora.rank_pattern, lora.alpha_pattern) == ({"k_proj"}, {"v_proj": 4}, {"v_proj": 8})
    assert (lora.modules_to_save, lora.layers_to_transform, lora.layers_pattern) == (["lm_head"], [0, 1], "layers")
    assert (lora.init_lora_weights, lora.use_rslora, lora.lora_bias, lora.bias) == ("gaussian", True, True, "lora_only")
    assert lora.fan_in_fan_out and lora.task_type == "CAUSAL_LM"
    assert (lora.r, lora.lora_alpha, lora.target_modules) == (16, 32, set(SEVEN_PROJECTIONS))  # the recipe's defaults


@pytest.mark.parametrize("items,field", [
    (["use_dora=true", "lora_bias=true"], "lora_bias"), (["layers_pattern=layers"], "layers_pattern"),
    (["rank_pattern={q_proj: 0}"], r"rank_pattern\['q_proj'\]"),
    (["alpha_pattern={q_proj: -1}"], r"alpha_pattern\['q_proj'\]"),
    (["rank_pattern=[1]"], "rank_pattern"), (["lora_alpha=0"], "lora_alpha"),
    (["init_lora_weights=pissa"], "init_lora_weights"), (["exclude_modules=5"], "exclude_modules"),
    (["layers_to_transform=[0]", "target_modules=.*proj"], "layers_to_transform"),
])
def test_lora_errors_are_lora_configs_naming_the_field(recipe, items, field):
    with pytest.raises(ConfigError, match=rf"^{field}: ") as err:
        load_train_config(recipe, items)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("key", sorted(NOT_IN_RECIPE))
def test_fields_a_recipe_does_not_set_are_unknown_options(recipe, key):
    with pytest.raises(ConfigError, match=rf"unknown option '{key}'"):
        load_train_config(recipe, [f"{key}=x"])


def test_null_target_modules_is_the_model_types_default(recipe):
    assert load_train_config(recipe, ["target_modules=null"]).lora_config().target_modules is None


def test_the_trained_adapter_has_the_recipes_lora_config():
    from tinymodels import tiny_llama

    from lorakit.train.setup import prepare_model

    config = TrainConfig(data="x", target_modules=["q_proj", "v_proj", "k_proj"], exclude_modules=["k_proj"],
                         rank_pattern={"v_proj": 2}, use_rslora=True)
    model = prepare_model(tiny_llama(), config)
    assert model.peft_config["default"] == config.lora_config(task_type="CAUSAL_LM",
                                                               base_model_name_or_path="smollm2-135m")
    ranks = {n.rsplit(".", 1)[-1]: m.r["default"] for n, m in model.named_modules() if hasattr(m, "lora_A")}
    assert ranks == {"q_proj": 16, "v_proj": 2}
