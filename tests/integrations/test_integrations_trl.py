"""lorakit models in TRL's SFTTrainer and DPOTrainer through lorakit.integrations, PEFT as the oracle."""

from __future__ import annotations

import math
import os

import pytest
import torch
from datasets import Dataset
from trainer_helpers import QUICK, adapter_names, lora, losses, moved, snapshot
from tinymodels import save_tiny_model
from transformers import AutoModelForCausalLM, AutoTokenizer

trl = pytest.importorskip("trl")

from lorakit import PeftModel  # noqa: E402
from lorakit.integrations import AdapterDisabled, DPOTrainer, SFTTrainer  # noqa: E402


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny"))


def load(model_dir):
    return AutoModelForCausalLM.from_pretrained(model_dir).eval()


def completions(n: int = 16) -> Dataset:
    words = ["abc", "hgf", "cab", "dee"]
    return Dataset.from_dict({"prompt": [f"reverse {words[i % 4]}:" for i in range(n)],
                              "completion": [f" {words[i % 4][::-1]}" for i in range(n)]})


def preferences(n: int = 4) -> Dataset:
    return Dataset.from_dict({"prompt": ["say a:"] * n, "chosen": [" aaa"] * n, "rejected": [" bbb"] * n})


@pytest.mark.parametrize("kind", ["SFT", "DPO"])
def test_plain_trl_trainers_name_the_fix(model_dir, tmp_path, kind):
    config = getattr(trl, f"{kind}Config")(str(tmp_path), max_steps=1, **QUICK)
    with pytest.raises(TypeError, match="lorakit.integrations"):  # before DPO would load a reference copy
        getattr(trl, f"{kind}Trainer")(model=lora(load(model_dir)), args=config,
                                       train_dataset=completions() if kind == "SFT" else preferences(),
                                       processing_class=AutoTokenizer.from_pretrained(model_dir))


def test_sft_trains_the_adapter_only_and_peft_loads_what_it_saves(model_dir, tmp_path):
    model = lora(load(model_dir))
    before = snapshot(model)
    config = trl.SFTConfig(str(tmp_path), max_steps=8, per_device_train_batch_size=4, learning_rate=3e-2, **QUICK)
    trainer = SFTTrainer(model=model, args=config, train_dataset=completions(),
                         processing_class=AutoTokenizer.from_pretrained(model_dir))
    assert trainer.model is model
    trainer.train()
    curve = losses(trainer)
    assert curve[-1] < curve[0] - 0.1
    assert moved(before, model) == adapter_names(model)
    logged = [h for h in trainer.state.log_history if "mean_token_accuracy" in h]
    assert logged and all(math.isfinite(h["entropy"]) for h in logged)  # TRL's fused head on the base model

    trainer.save_model(str(tmp_path / "final"))
    files = set(os.listdir(tmp_path / "final"))
    assert {"adapter_config.json", "adapter_model.safetensors"} <= files and "model.safetensors" not in files
    saved = PeftModel.from_pretrained(load(model_dir), str(tmp_path / "final"))
    trained = dict(model.named_parameters())
    for name, value in saved.named_parameters():
        if "lora_" in name:
            torch.testing.assert_close(value, trained[name], rtol=0, atol=0)
    # the trained model's forward now runs under accelerate's bf16 autocast (TRL's default): compare in fp32
    peft = pytest.importorskip("peft")
    reference = peft.PeftModel.from_pretrained(load(model_dir), str(tmp_path / "final")).eval()
    ids = torch.tensor([[5, 9, 17, 33, 65, 120]])
    with torch.no_grad():
        torch.testing.assert_close(saved.eval()(ids).logits, reference(ids).logits, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(reference(ids).logits, load(model_dir)(ids).logits, atol=1e-3)


def _storages(*modules) -> set[int]:
    seen = set()
    for module in modules:
        for tensor in [*module.parameters(), *module.buffers()]:
            seen.add(tensor.untyped_storage().data_ptr())
    return seen


def test_dpo_uses_the_model_with_its_adapter_disabled_as_reference(model_dir, tmp_path):
    model = lora(load(model_dir))
    config = trl.DPOConfig(str(tmp_path), max_steps=3, per_device_train_batch_size=2, learning_rate=5e-2, bf16=False,
                           **QUICK)  # fp32: the reference is compared with the base model exactly
    trainer = DPOTrainer(model=model, args=config, train_dataset=preferences(),
                         processing_class=AutoTokenizer.from_pretrained(model_dir))
    ref = trainer.ref_model
    assert isinstance(ref, AdapterDisabled) and not list(ref.parameters())
    assert _storages(model, ref) == _storages(model)  # no second copy of the base in memory
    trainer.train()
    curve = losses(trainer)
    assert curve[0] == pytest.approx(math.log(2), abs=1e-5)  # policy == reference before the first update
    assert curve[-1] < curve[0]

    ids = torch.tensor([[5, 9, 17, 33, 65, 120]])
    model.eval()
    with torch.no_grad():
        base = load(model_dir)(ids).logits
        torch.testing.assert_close(ref(input_ids=ids).logits, base)
        assert not torch.allclose(model(ids).logits, base, atol=1e-4)  # the adapter trained and is back on


def test_a_lorakit_config_wraps_a_plain_model(model_dir, tmp_path):
    from lorakit import LoraConfig

    config = trl.SFTConfig(str(tmp_path), max_steps=1, **QUICK)
    trainer = SFTTrainer(model=load(model_dir), args=config, train_dataset=completions(4),
                         peft_config=LoraConfig(r=2, target_modules=["q_proj", "v_proj"]),
                         processing_class=AutoTokenizer.from_pretrained(model_dir))
    assert isinstance(trainer.model, PeftModel)
    trainable = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
