"""LoraConfig: validation naming the field, JSON round trip, forward-compatible loading."""

import dataclasses
import json
import warnings

import pytest

from lorakit import LoraConfig


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(r=0), "r"),
        (dict(r=-4), "r"),
        (dict(r=2.5), "r"),
        (dict(lora_alpha=0), "lora_alpha"),
        (dict(lora_alpha=-1), "lora_alpha"),
        (dict(bias="some"), "bias"),
        (dict(lora_dropout=1.0), "lora_dropout"),
        (dict(lora_dropout=-0.1), "lora_dropout"),
        (dict(init_lora_weights="pissa"), "init_lora_weights"),
        (dict(rank_pattern={"q_proj": 0}), "rank_pattern"),
        (dict(use_dora=True, lora_bias=True), "lora_bias"),
        (dict(target_modules=5), "target_modules"),
    ],
)
def test_invalid_values_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=rf"^{field}(\[.*\])?: ") as err:
        LoraConfig(**kwargs)
    assert "\n" not in str(err.value)


def test_every_field_is_documented():
    assert all(f.metadata.get("help") for f in dataclasses.fields(LoraConfig))


def test_peft_defaults():
    config = LoraConfig()
    assert (config.r, config.lora_alpha, config.lora_dropout, config.bias) == (8, 8, 0.0, "none")
    assert config.init_lora_weights is True and config.target_modules is None


def test_caller_list_is_not_shared():
    targets = ["q_proj"]
    config = LoraConfig(target_modules=targets)
    targets.append("v_proj")
    assert config.target_modules == {"q_proj"}


def test_json_round_trip(tmp_path):
    config = LoraConfig(r=4, lora_alpha=16, target_modules=["v_proj", "q_proj"], rank_pattern={"q_proj": 2})
    config.save_pretrained(tmp_path)
    data = json.loads((tmp_path / "adapter_config.json").read_text())
    assert data["target_modules"] == ["q_proj", "v_proj"] and data["peft_type"] == "LORA"
    assert LoraConfig.from_pretrained(tmp_path) == config


def test_unknown_keys_warn_and_are_ignored():
    with pytest.warns(UserWarning, match="future_option"):
        config = LoraConfig.from_dict({"r": 4, "future_option": 3})
    assert config.r == 4


def test_peft_metadata_keys_are_silent():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        LoraConfig.from_dict({"r": 4, "peft_version": "0.21.2", "megatron_core": "megatron.core", "eva_config": None})


def test_other_peft_types_are_refused():
    with pytest.raises(ValueError, match="peft_type"):
        LoraConfig.from_dict({"peft_type": "IA3"})


def test_pattern_lookup_matches_dotted_suffix():
    config = LoraConfig(r=8, rank_pattern={"v_proj": 2, r"layers\.1\.self_attn\.q_proj": 3})
    assert config.rank_for("model.layers.0.self_attn.v_proj") == 2
    assert config.rank_for("model.layers.1.self_attn.q_proj") == 3
    assert config.rank_for("model.layers.0.self_attn.q_proj") == 8
