"""Adapters trained on one 4-bit base load onto the other with the same logits (fp32 compute,
2e-3): lorakit's own 4-bit base (quantize_model / load_model(quantization=...)) and real PEFT on
transformers + bitsandbytes' 4-bit base of the same weights, both ways."""

from __future__ import annotations

import peft
import pytest
import torch
from torch import nn

from bnbmodels import BNB_WARNINGS, TARGETS, bnb_llama
from lorakit import LoraConfig, PeftModel, QuantConfig, get_peft_model, load_model, quantize_model
from lorakit.bases.linear4bit import Linear4bit
from lorakit.lora.linear import Linear
from tinymodels import adamw_losses, save_tiny_model

bnb = pytest.importorskip("bitsandbytes")
pytestmark = BNB_WARNINGS

TOL = 2e-3
IDS = torch.randint(0, 250, (2, 12), generator=torch.Generator().manual_seed(3))
NF4 = QuantConfig(quant_type="nf4", double_quant=True, compute_dtype=torch.float32)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny"))


def lorakit_4bit(directory, how: str) -> nn.Module:
    if how == "load_model":
        return load_model(str(directory), quantization=NF4)[0]
    from transformers import AutoModelForCausalLM

    return quantize_model(AutoModelForCausalLM.from_pretrained(directory), NF4).eval()


def logits(model: nn.Module) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(IDS).logits


def train(model: nn.Module, steps: int = 3) -> nn.Module:
    """A few AdamW steps (lr 1e-2): B leaves zero and every adapter weight moves."""
    adamw_losses(model, [p for p in model.parameters() if p.requires_grad], steps=steps)
    return model.eval()


def four_bit_layers(model: nn.Module, kind: type) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, kind)}


@pytest.mark.parametrize("how", ["load_model", "quantize_model"])
def test_the_two_bases_hold_the_same_4bit_codes(model_dir, how):
    ours = four_bit_layers(lorakit_4bit(model_dir, how), Linear4bit)
    theirs = four_bit_layers(bnb_llama(model_dir), bnb.nn.Linear4bit)
    assert ours.keys() == theirs.keys() and len(ours) == 14
    for name, layer in ours.items():  # (the double-quantized absmax may differ by one 8-bit code)
        assert torch.equal(layer.weight, theirs[name].weight.data), name
        assert layer.weight_dtype == theirs[name].weight.quant_state.dtype == torch.float32


@pytest.mark.parametrize("how", ["load_model", "quantize_model"])
def test_a_lorakit_adapter_on_its_4bit_base_loads_into_peft_on_bitsandbytes(model_dir, tmp_path, how):
    base_ours, base_theirs = lorakit_4bit(model_dir, how), bnb_llama(model_dir)
    plain = logits(base_theirs)
    torch.testing.assert_close(logits(base_ours), plain, rtol=0, atol=TOL)
    ours = train(get_peft_model(base_ours, LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS)))
    expected = logits(ours)
    ours.save_pretrained(tmp_path / "adapter")
    theirs = peft.PeftModel.from_pretrained(base_theirs, tmp_path / "adapter")
    got = logits(theirs)
    assert (got - plain).abs().max() > 10 * TOL  # the trained adapter changes the logits
    torch.testing.assert_close(got, expected, rtol=0, atol=TOL)


@pytest.mark.parametrize("how", ["load_model", "quantize_model"])
def test_a_peft_adapter_on_bitsandbytes_loads_into_lorakit_on_its_4bit_base(model_dir, tmp_path, how):
    theirs = train(peft.get_peft_model(bnb_llama(model_dir), peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS)))
    expected = logits(theirs)
    theirs.save_pretrained(tmp_path / "adapter")
    base_ours = lorakit_4bit(model_dir, how)
    plain = logits(base_ours)
    ours = PeftModel.from_pretrained(base_ours, tmp_path / "adapter")
    assert all(isinstance(m.base_layer, Linear4bit) for m in ours.modules() if isinstance(m, Linear))
    got = logits(ours)
    assert (got - plain).abs().max() > 10 * TOL
    torch.testing.assert_close(got, expected, rtol=0, atol=TOL)


@pytest.mark.parametrize("how", ["load_model", "quantize_model"])
def test_parameter_counts_on_4bit_bases_equal_peft_on_bitsandbytes(model_dir, how):
    """PEFT counts a 4-bit weight at its logical size (in x out); so do lorakit's packed bases,
    on its own Linear4bit and on bitsandbytes' (whose parameter holds half as many bytes)."""
    config = dict(r=4, lora_alpha=8, target_modules=TARGETS)
    theirs = peft.get_peft_model(bnb_llama(model_dir), peft.LoraConfig(**config)).get_nb_trainable_parameters()
    assert get_peft_model(lorakit_4bit(model_dir, how), LoraConfig(**config)).get_nb_trainable_parameters() == theirs
    assert get_peft_model(bnb_llama(model_dir), LoraConfig(**config)).get_nb_trainable_parameters() == theirs
