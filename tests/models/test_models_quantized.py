"""models.quantized: 4-bit directories in transformers + bitsandbytes' layout, with bitsandbytes
(CPU) as the oracle in both directions: its files load into lorakit, lorakit's files into it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from lorakit import QuantConfig, quantize_model
from lorakit.bases.linear4bit import Linear4bit
from lorakit.models.quantized import bnb_key, load_quantized, save_quantized
from tinymodels import logits, tiny_llama

BF = pytest.importorskip("bitsandbytes.functional")
pytestmark = [pytest.mark.filterwarnings("ignore:_check_is_size:FutureWarning"),
              pytest.mark.filterwarnings("ignore:The 8-bit optimizer:UserWarning")]


def bnb_dir(out: Path, quant_type: str = "nf4", double_quant: bool = True, dtype: torch.dtype = torch.float32,
            tied: bool = False):
    """A tiny Llama written as transformers + bitsandbytes write a 4-bit model: every projection
    through bitsandbytes' quantize_4bit and QuantState.as_dict(packed=True); returns the states."""
    from transformers import BitsAndBytesConfig

    model = tiny_llama().to(dtype)
    if tied:
        model.config.tie_word_embeddings = True
        model.tie_weights()
    tensors, states = {}, {}
    for key, value in model.state_dict().items():
        name, _, leaf = key.rpartition(".")
        module = model.get_submodule(name)
        if isinstance(module, nn.Linear) and module is not model.lm_head and leaf == "weight":
            packed, state = BF.quantize_4bit(value, blocksize=64, quant_type=quant_type,
                                             compress_statistics=double_quant)
            tensors[key] = packed
            tensors.update({f"{key}.{k}": v for k, v in state.as_dict(packed=True).items()})
            states[name] = (packed, state)
        elif not (tied and key == "lm_head.weight"):
            tensors[key] = value.contiguous()
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    config = model.config.to_dict()
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type,
                             bnb_4bit_use_double_quant=double_quant, bnb_4bit_compute_dtype=dtype)
    config["quantization_config"] = json.loads(json.dumps(bnb.to_dict(), default=str))
    (out / "config.json").write_text(json.dumps(config))
    return model, states


def four_bit(model: nn.Module) -> dict[str, Linear4bit]:
    return {n: m for n, m in model.named_modules() if isinstance(m, Linear4bit)}


@pytest.mark.parametrize("double_quant", [True, False])
def test_bitsandbytes_nf4_files_load_to_the_same_weights(tmp_path, double_quant):
    dense, states = bnb_dir(tmp_path, "nf4", double_quant)
    model = load_quantized(tmp_path)
    layers = four_bit(model)
    assert layers.keys() == states.keys() and len(layers) == 14
    for name, (packed, state) in states.items():
        assert layers[name].double_quant == double_quant
        assert torch.equal(layers[name].dequantize(), BF.dequantize_4bit(packed, state))
    assert type(model.lm_head) is nn.Linear and torch.equal(model.lm_head.weight, dense.lm_head.weight)
    ids = torch.randint(0, 100, (1, 6))
    with torch.no_grad():
        out = logits(model, ids)
    torch.testing.assert_close(out, logits(dense, ids).detach(), rtol=0, atol=0.25 * float(out.abs().max()))


def test_bitsandbytes_fp4_bf16_tied_files_load(tmp_path):
    dense, states = bnb_dir(tmp_path, "fp4", True, torch.bfloat16, tied=True)
    model = load_quantized(tmp_path)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    for name, (packed, state) in states.items():
        mine = four_bit(model)[name].dequantize()
        assert mine.dtype == torch.bfloat16
        # bitsandbytes' CPU kernel rounds the FP4 code to 4 decimals and the code to bf16 first
        torch.testing.assert_close(mine.float(), BF.dequantize_4bit(packed, state).float(), rtol=2**-7, atol=2e-3)


@pytest.mark.parametrize("quant_type, double_quant", [("nf4", True), ("nf4", False), ("fp4", True)])
def test_lorakit_files_rebuild_in_bitsandbytes(tmp_path, quant_type, double_quant):
    model = quantize_model(tiny_llama(), QuantConfig(quant_type=quant_type, double_quant=double_quant))
    save_quantized(model, tmp_path / "q")
    tensors = load_file(tmp_path / "q" / "model.safetensors")
    config = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "bitsandbytes" and config["load_in_4bit"] and config["_load_in_4bit"]
    assert (config["bnb_4bit_quant_type"], config["bnb_4bit_use_double_quant"]) == (quant_type, double_quant)
    assert config["bnb_4bit_compute_dtype"] == "float32" and config["bnb_4bit_quant_storage"] == "uint8"
    assert config["llm_int8_skip_modules"] == ["lm_head"]
    for name, layer in four_bit(model).items():
        prefix = f"{name}.weight."
        qs = {k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)}
        expected = {"absmax", "quant_map", f"quant_state.bitsandbytes__{quant_type}"}
        expected |= {"nested_absmax", "nested_quant_map"} if double_quant else set()
        assert set(qs) == expected
        state = BF.QuantState.from_dict(qs, device=torch.device("cpu"))
        packed = tensors[bnb_key(name, "weight", quant_type)]
        assert packed.dtype == torch.uint8 and packed.shape == layer.weight.shape
        if quant_type == "nf4":
            assert torch.equal(BF.dequantize_4bit(packed, state), layer.dequantize())
        else:
            torch.testing.assert_close(BF.dequantize_4bit(packed, state), layer.dequantize(), rtol=0, atol=1e-4)
    # the quant state JSON is bitsandbytes' own
    name = "model.layers.0.self_attn.q_proj"
    layer = four_bit(model)[name]
    bnb_packed, bnb_state = BF.quantize_4bit(tiny_llama().model.layers[0].self_attn.q_proj.weight.detach(), blocksize=64,
                                             quant_type=quant_type, compress_statistics=double_quant)
    key = bnb_key(name, "quant_state", quant_type)
    ours, theirs = json.loads(bytes(tensors[key].tolist())), json.loads(bytes(bnb_state.as_dict(packed=True)[key.split(".weight.")[1]].tolist()))
    assert ours.keys() == theirs.keys()
    assert {k: v for k, v in ours.items() if k != "nested_offset"} == {k: v for k, v in theirs.items() if k != "nested_offset"}


def test_save_then_load_round_trips_exactly(tmp_path):
    model = quantize_model(tiny_llama(), QuantConfig(skip_modules=["down_proj"]))
    save_quantized(model, tmp_path / "q")
    again = load_quantized(tmp_path / "q")
    assert four_bit(again).keys() == four_bit(model).keys() and len(four_bit(model)) == 12
    mine, theirs = model.state_dict(), again.state_dict()
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    ids = torch.randint(0, 100, (2, 5))
    with torch.no_grad():
        assert torch.equal(logits(again, ids), logits(model, ids))
    save_quantized(again, tmp_path / "q")  # over an existing directory
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q"]


def test_missing_quant_state_is_named_and_nothing_built(tmp_path):
    bnb_dir(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    key = "model.layers.1.mlp.up_proj.weight.quant_state.bitsandbytes__nf4"
    del tensors[key]
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=rf"^model.safetensors: key '{key}' is missing$"):
        load_quantized(tmp_path)


def test_a_shape_that_disagrees_is_named(tmp_path):
    bnb_dir(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    key = "model.layers.0.self_attn.k_proj.weight.absmax"
    tensors[key] = tensors[key][:-1].clone()
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=rf"^model.safetensors: key '{key}' has shape \(7,\), expected 8 values for a \(16, 32\) weight$"):
        load_quantized(tmp_path)
    bnb_dir(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["intermediate_size"] = 48
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"^model.safetensors: key 'model.layers.0.mlp.down_proj.weight.quant_state.bitsandbytes__nf4' "
                                         r"is a \(32, 64\) weight; the model has \(32, 48\) there$"):
        load_quantized(tmp_path)


def test_transformers_from_pretrained_reads_lorakit_files(tmp_path):
    transformers = pytest.importorskip("transformers")
    model = quantize_model(tiny_llama(), "nf4")
    save_quantized(model, tmp_path / "q")
    try:
        theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "q", device_map="cpu")
    except Exception as e:  # noqa: BLE001 - the reason is reported in the skip
        pytest.skip(f"transformers cannot load a bitsandbytes 4-bit model on this machine: {str(e).splitlines()[0]}")
    ids = torch.randint(0, 100, (1, 6))
    with torch.no_grad():
        torch.testing.assert_close(logits(theirs, ids), logits(model, ids), rtol=1e-4, atol=1e-4)
