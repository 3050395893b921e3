"""DoRA on a 4-bit base: the weight norm is that of the de-quantized weight, so the adapter equals
PEFT's DoRA on a dense model holding the de-quantized weights (forward, gradients, merge)."""

from __future__ import annotations

import copy

import peft
import pytest
import torch

from lorakit import LoraConfig, get_peft_model
from fourbit import dequantized_copy, four_bit_layers, quantized
from tinymodels import adamw_losses, logits, tiny_llama

IDS = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(0))
CONFIG = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], use_dora=True)


def pair(tmp_path, quant_type: str = "nf4"):
    """(lorakit DoRA on a 4-bit tiny Llama, PEFT loading the same adapter file onto the dense
    model with the de-quantized weights, another copy of that dense model for later)."""
    model = quantized(tiny_llama(), quant_type=quant_type, double_quant=True)
    reference = dequantized_copy(model)
    spare = copy.deepcopy(reference)
    torch.manual_seed(0)
    ours = get_peft_model(model, LoraConfig(init_lora_weights=False, **CONFIG)).eval()
    with torch.no_grad():  # a magnitude that is not the initial norm, so the DoRA term matters
        for name, p in ours.named_parameters():
            if "magnitude" in name:
                p.mul_(torch.linspace(0.5, 1.5, p.numel()))
    ours.save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(reference, tmp_path, is_trainable=True).eval()
    return ours, theirs, spare


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_forward_equals_peft_dora_on_the_dequantized_weights(tmp_path, quant_type):
    ours, theirs, _ = pair(tmp_path, quant_type)
    assert len(four_bit_layers(ours)) == 14
    with torch.no_grad():
        got, want = logits(ours, IDS), logits(theirs, IDS)
        with theirs.disable_adapter():
            plain = logits(theirs, IDS)
    assert (want - plain).abs().max() > 1e-3
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_the_initial_magnitude_is_the_norm_of_the_dequantized_weight():
    model = quantized(tiny_llama(), quant_type="nf4", double_quant=True)
    original = tiny_llama()
    torch.manual_seed(0)
    ours = get_peft_model(model, LoraConfig(init_lora_weights=False, **CONFIG))
    layer = ours.base_model.model.model.layers[0].self_attn.q_proj
    delta = layer.scaling["default"] * (layer.lora_B["default"].weight @ layer.lora_A["default"].weight).detach()
    norm = torch.linalg.vector_norm(layer.base_layer.dequantize() + delta, dim=1)
    torch.testing.assert_close(layer.lora_magnitude_vector["default"].detach(), norm, rtol=1e-6, atol=1e-7)
    dense_norm = torch.linalg.vector_norm(original.model.layers[0].self_attn.q_proj.weight.detach() + delta, dim=1)
    assert (norm - dense_norm).abs().max() > 1e-4  # not the weights before quantization


def test_gradients_equal_peft_dora_on_the_dequantized_weights(tmp_path):
    ours, theirs, _ = pair(tmp_path)
    for model in (ours, theirs):
        model.train()
        logits(model, IDS).pow(2).mean().backward()
    want = {n.replace(".weight", "") if "magnitude" in n else n: p.grad
            for n, p in theirs.named_parameters() if p.requires_grad}
    got = {n: p.grad for n, p in ours.named_parameters() if p.requires_grad}
    assert got.keys() == want.keys() and any("magnitude" in n for n in got)
    for name in got:
        assert got[name].abs().sum() > 0
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-6)


def test_dora_trains_on_a_4bit_base_and_merges_onto_the_dequantized_weights(tmp_path):
    ours, _, dense = pair(tmp_path)
    packed = {n: b.clone() for n, b in ours.named_buffers() if n.endswith(("weight", "absmax"))}
    trainable = [p for p in ours.parameters() if p.requires_grad]
    losses = adamw_losses(ours, trainable, steps=4)
    assert losses[-1] < losses[0]
    assert all(torch.equal(b, packed[n]) for n, b in ours.named_buffers() if n in packed)
    ours.eval()
    ours.save_pretrained(tmp_path / "trained")
    reference = peft.PeftModel.from_pretrained(dense, tmp_path / "trained")
    with torch.no_grad():
        unmerged = logits(ours, IDS)
        torch.testing.assert_close(logits(reference, IDS), unmerged, rtol=1e-5, atol=1e-5)
    merged = ours.merge_and_unload()
    assert not four_bit_layers(merged)
    want = reference.merge_and_unload().state_dict()
    got = merged.state_dict()
    for key in got:
        torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(logits(merged, IDS), unmerged, rtol=1e-5, atol=1e-5)
