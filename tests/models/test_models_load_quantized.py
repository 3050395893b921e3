"""load_model(..., quantization=...): a tiny model directory quantized on load, and 4-bit
directories (bitsandbytes' layout) loaded as they are."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lorakit import QuantConfig, load_model, save_quantized
from lorakit.bases.linear4bit import Linear4bit


def four_bit(model: nn.Module) -> dict[str, Linear4bit]:
    return {n: m for n, m in model.named_modules() if isinstance(m, Linear4bit)}


@pytest.mark.parametrize("quantization", ["nf4", QuantConfig(quant_type="fp4", double_quant=False)])
def test_quantization_on_load(tiny_model_dir, quantization):
    model, tokenizer = load_model(str(tiny_model_dir), device="cpu", quantization=quantization)
    layers = four_bit(model)
    assert len(layers) == 14 and type(model.lm_head) is nn.Linear and not model.training
    assert {m.quant_type for m in layers.values()} == {QuantConfig.coerce(quantization).quant_type}
    assert tokenizer.pad_token is not None
    dense, _ = load_model(str(tiny_model_dir), device="cpu")
    assert not four_bit(dense)
    w = dense.model.layers[0].mlp.up_proj.weight.detach()
    q = layers["model.layers.0.mlp.up_proj"].dequantize()
    assert not torch.equal(q, w)
    torch.testing.assert_close(q, w, rtol=0, atol=0.2 * float(w.abs().max()))


def test_skip_modules_on_load(tiny_model_dir):
    model, _ = load_model(str(tiny_model_dir), device="cpu", quantization=QuantConfig(skip_modules=["mlp"]))
    assert len(four_bit(model)) == 8 and type(model.model.layers[1].mlp.down_proj) is nn.Linear


def test_a_4bit_directory_loads_as_stored(tiny_model_dir, tmp_path):
    model, tokenizer = load_model(str(tiny_model_dir), device="cpu", quantization="nf4")
    out = save_quantized(model, tmp_path / "q4")
    tokenizer.save_pretrained(out)
    again, tok = load_model(str(out), device="cpu", quantization=None)
    assert four_bit(again).keys() == four_bit(model).keys() and not again.training
    mine, theirs = model.state_dict(), again.state_dict()
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    ids = tok("hello world", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(again(ids).logits, model(ids).logits)


def test_bad_quantization_is_refused_before_loading(tiny_model_dir):
    with pytest.raises(ValueError, match=r"^QuantConfig.quant_type must be 'nf4' or 'fp4', not 'int4'$"):
        load_model(str(tiny_model_dir), device="cpu", quantization="int4")
