"""QuantConfig and quantize_model: a tiny Llama's linear layers in 4 bits, the head kept dense."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lorakit
from lorakit import LoraConfig, QuantConfig, get_peft_model, quantize_model
from lorakit.bases.linear4bit import Linear4bit
from tinymodels import adamw_losses, logits, tiny_llama

PROJECTIONS = 14  # 2 blocks x (q, k, v, o, gate, up, down)


def count(model: nn.Module, kind: type) -> int:
    return sum(type(m) is kind for m in model.modules())


def test_config_defaults_and_coerce():
    config = QuantConfig()
    assert (config.quant_type, config.blocksize, config.double_quant, config.compute_dtype, config.skip_modules) == (
        "nf4", 64, True, None, None)
    assert QuantConfig.coerce("fp4") == QuantConfig(quant_type="fp4")
    assert QuantConfig.coerce(config) is config
    assert QuantConfig(compute_dtype="bfloat16").compute_dtype is torch.bfloat16
    assert QuantConfig(skip_modules=["mlp"]).skip_modules == ("mlp",)


@pytest.mark.parametrize("kwargs, message", [
    (dict(quant_type="int4"), r"^QuantConfig.quant_type must be 'nf4' or 'fp4', not 'int4'$"),
    (dict(blocksize=32), r"^QuantConfig.blocksize must be one of 64, .*4096, not 32$"),
    (dict(double_quant="yes"), r"^QuantConfig.double_quant must be True or False, not 'yes'$"),
    (dict(compute_dtype=torch.int8), r"^QuantConfig.compute_dtype must be None, float32, bfloat16 or float16, not torch.int8$"),
    (dict(skip_modules="lm_head"), r"^QuantConfig.skip_modules must be a list of module names, not 'lm_head'$"),
])
def test_bad_fields_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        QuantConfig(**kwargs)


def test_coerce_refuses_other_values():
    with pytest.raises(ValueError, match=r"^quantization must be a QuantConfig, 'nf4' or 'fp4', not 4$"):
        QuantConfig.coerce(4)
    with pytest.raises(ValueError, match=r"^QuantConfig.quant_type must be 'nf4' or 'fp4', not 'int8'$"):
        QuantConfig.coerce("int8")


def test_public_names():
    assert {"QuantConfig", "quantize_model"} <= set(dir(lorakit))


@pytest.mark.parametrize("tied", [False, True])
def test_every_projection_is_4bit_and_the_head_stays_dense(tied):
    model = tiny_llama()
    if tied:
        model.config.tie_word_embeddings = True
        model.tie_weights()
    ids = torch.randint(0, 100, (1, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        dense_out = logits(model, ids)
    assert quantize_model(model, QuantConfig(quant_type="nf4")) is model
    assert count(model, Linear4bit) == PROJECTIONS and count(model, nn.Linear) == 1
    assert type(model.lm_head) is nn.Linear and model.get_output_embeddings() is model.lm_head
    if tied:
        assert model.lm_head.weight is model.model.embed_tokens.weight
    layer = model.model.layers[0].self_attn.q_proj
    assert layer.double_quant and layer.quant_type == "nf4" and layer.blocksize == 64
    with torch.no_grad():
        out = logits(model, ids)
    assert not torch.equal(out, dense_out)
    torch.testing.assert_close(out, dense_out, rtol=0, atol=0.25 * float(dense_out.abs().max()))  # 4-bit error, not a different model


def test_skip_modules_keep_named_layers_dense():
    model = quantize_model(tiny_llama(), QuantConfig(skip_modules=["down_proj", "layers.0.self_attn"]))
    dense = {n for n, m in model.named_modules() if type(m) is nn.Linear}
    assert dense == {"lm_head", "model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj",
                     "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj",
                     "model.layers.0.self_attn.v_proj", "model.layers.0.self_attn.o_proj"}
    assert count(model, Linear4bit) == PROJECTIONS - 6


def test_nothing_left_to_quantize_is_refused_and_the_model_untouched():
    model = tiny_llama()
    before = {n: t.clone() for n, t in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"^no nn.Linear layer left to quantize \(the output head is kept; "
                                         r"skip_modules=\('layers',\)\)$"):
        quantize_model(model, QuantConfig(skip_modules=["layers"]))
    assert count(model, Linear4bit) == 0
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[n], before[n]) for n in before)
    with pytest.raises(ValueError, match="^quantization must be"):
        quantize_model(tiny_llama(), None)


def test_a_quantized_llama_trains_with_lora():
    model = quantize_model(tiny_llama(), "nf4")
    peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    trainable = [p for p in peft.parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n, p in peft.named_parameters() if p.requires_grad)
    losses = adamw_losses(peft, trainable, steps=6)
    assert losses[-1] < losses[0] - 0.05
