"""QLoRA in the trainer: `quantize: nf4 | fp4` trains an fp32 adapter on a 4-bit base (lorakit's Linear4bit)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from train_helpers import assert_resumes_as_uninterrupted, losses, poison_loss

from lorakit import PeftModel
from lorakit.bases.linear4bit import Linear4bit
from lorakit.bases.quant_config import QuantConfig
from lorakit.models import load_model
from lorakit.train import ConfigError, TrainConfig, TrainingDiverged, load_train_config, train
from lorakit.train import loop as train_loop

PROMPT = torch.tensor([[5, 60, 70, 80, 90, 100, 33]])


# -- the recipe keys --------------------------------------------------------------------------
def test_recipe_keys_make_the_quant_config():
    assert TrainConfig(data="d").quant_config() is None  # default: quantize none
    config = load_train_config(None, ["data=d", "quantize=nf4"])
    assert (config.quantize, config.double_quant, config.compute_dtype) == ("nf4", True, "auto")
    assert config.quant_config() == QuantConfig("nf4", double_quant=True, compute_dtype=None)
    config = load_train_config(None, ["data=d", "quantize=fp4", "double_quant=false", "compute_dtype=bfloat16"])
    assert config.quant_config() == QuantConfig("fp4", double_quant=False, compute_dtype=torch.bfloat16)


@pytest.mark.parametrize("items, field", [
    ("quantize=int8", "quantize"), ("quantize=null", "quantize"), ("quantize=nf4 double_quant=maybe", "double_quant"),
    ("quantize=nf4 compute_dtype=fp8", "compute_dtype"),
    ("double_quant=false", "double_quant"), ("compute_dtype=float16", "compute_dtype"),  # no quantize
    ("quantize=nf4 method=full", "quantize"),
])
def test_bad_values_are_one_line_errors_naming_the_key(items, field):
    with pytest.raises(ConfigError, match=rf"^{field}: ") as err:
        load_train_config(None, ["data=d", *items.split()])
    assert "\n" not in str(err.value)


# -- training on a 4-bit base ----------------------------------------------------------------
def test_nf4_run_learns_only_the_adapter_and_saves_a_peft_adapter(base_config, tiny_model, capsys):
    result = train(TrainConfig(**base_config, max_steps=12, quantize="nf4"))
    out = Path(base_config["output_dir"])
    run = losses(out)
    assert run[12] < run[1] - 0.1  # it learns
    assert "QLoRA r=16 alpha=32.0 on a NF4 base (double quant)" in capsys.readouterr().out
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert (saved["quantize"], saved["double_quant"], saved["compute_dtype"]) == ("nf4", True, "auto")

    # the base is 4-bit and is the model on disk quantized, untouched by training
    trained = result.model.base_model.model
    layers = [m for m in trained.modules() if isinstance(m, Linear4bit)]
    assert len(layers) == 14 and all(m.double_quant and m.quant_type == "nf4" for m in layers)
    fresh, _ = load_model(str(tiny_model), quantization="nf4")
    reference = fresh.state_dict()
    state = trained.state_dict()
    moved = {k for k, v in state.items() if "lora_" not in k and not torch.equal(v, reference[k.replace(".base_layer", "")])}
    assert not moved
    assert {k.replace(".base_layer", "") for k in state if "lora_" not in k} == set(reference)
    assert all(not p.requires_grad for n, p in trained.named_parameters() if "lora_" not in n)
    assert result.stats["total_params"] == sum(p.numel() for p in fresh.parameters()) + sum(
        m.in_features * m.out_features for m in layers) + result.stats["trainable_params"]

    # a plain PEFT adapter (no quantization in it) that loads back on a 4-bit base with the same logits
    adapter = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert adapter["peft_type"] == "LORA" and adapter["base_model_name_or_path"] == str(tiny_model)
    assert sorted(p.name for p in result.adapter_dir.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    with torch.no_grad():
        ours = result.model(PROMPT).logits
        loaded = PeftModel.from_pretrained(fresh, out / "adapter").eval()(PROMPT).logits
        dense = PeftModel.from_pretrained(load_model(str(tiny_model))[0], out / "adapter").eval()(PROMPT).logits
    torch.testing.assert_close(loaded, ours, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(dense, ours, atol=1e-4)  # the 4-bit base is what it was trained on


def test_fp4_without_double_quant_and_16bit_compute(base_config):
    result = train(TrainConfig(**base_config, max_steps=8, quantize="fp4", double_quant=False, compute_dtype="bfloat16"))
    run = losses(Path(base_config["output_dir"]))
    assert run[8] < run[1] - 0.1
    layers = [m for m in result.model.modules() if isinstance(m, Linear4bit)]
    assert layers and all(m.quant_type == "fp4" and not m.double_quant for m in layers)
    assert {m.compute_dtype for m in layers} == {torch.bfloat16} and {m.weight_dtype for m in layers} == {torch.float32}
    assert {p.dtype for n, p in result.model.named_parameters() if "lora_" in n} == {torch.float32}


def test_gradient_checkpointing_on_a_4bit_base_gives_the_same_run(base_config, tmp_path):
    plain = dict(base_config, output_dir=str(tmp_path / "plain"), quantize="nf4")
    checkpointed = dict(plain, output_dir=str(tmp_path / "ckpt"), gradient_checkpointing=True)
    train(TrainConfig(**plain, max_steps=3))
    result = train(TrainConfig(**checkpointed, max_steps=3))
    assert result.model.base_model.model.is_activation_checkpointing
    for step, loss in losses(tmp_path / "plain").items():
        assert losses(tmp_path / "ckpt")[step] == pytest.approx(loss, abs=1e-6)


def test_resumed_4bit_run_continues_as_the_uninterrupted_one(base_config, monkeypatch, tmp_path):
    real = train_loop.causal_lm_loss
    poison_loss(monkeypatch, from_call=5)
    config = dict(base_config, max_steps=8, save_every=2, lora_dropout=0.1, quantize="nf4")
    with pytest.raises(TrainingDiverged, match=r"step 5.*checkpoints/step-4"):
        train(TrainConfig(**config))
    monkeypatch.setattr(train_loop, "causal_lm_loss", real)
    with pytest.raises(ConfigError, match="trained with quantize='nf4', but this config has quantize='fp4'"):
        train(TrainConfig(**{**config, "quantize": "fp4"}, resume="latest"))
    assert_resumes_as_uninterrupted(config, tmp_path / "reference")


def test_dora_trains_on_a_4bit_base(base_config, tiny_model):
    train(TrainConfig(**base_config, max_steps=3, quantize="nf4", use_dora=True))
    run = losses(Path(base_config["output_dir"]))
    assert len(run) == 3 and all(math.isfinite(v) for v in run.values())
