"""`lorakit merge` over a 4-bit base: a dense dir merged onto the de-quantized weights (loaded
back in transformers), or with --requantize a 4-bit dir (loaded back by lorakit.load_model),
each against the unmerged 4-bit base + adapter."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from lorakit import PeftModel, cli, load_model, save_quantized
from lorakit.bases.linear4bit import quantize_linear
from fourbit import dequantized_copy, four_bit_layers

IDS = torch.tensor([[2, 3, 9, 10, 11, 12, 13, 4, 6], [2, 3, 14, 15, 16, 7, 8, 4, 6]])
TARGETS = ["q_proj", "v_proj", "down_proj"]


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def four_bit_dir(tiny_dir, tmp_path_factory):
    """tiny_dir quantized to NF4 with double quant, saved in bitsandbytes' layout, with its tokenizer."""
    model, tokenizer = load_model(str(tiny_dir), quantization="nf4", device="cpu")
    out = save_quantized(model, tmp_path_factory.mktemp("q") / "tiny-nf4")
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def four_bit_adapter(four_bit_dir, tmp_path_factory, adapter_factory):
    """An adapter made on the 4-bit base (as a QLoRA run on that directory leaves one)."""
    return adapter_factory(load_model(str(four_bit_dir), device="cpu")[0], tmp_path_factory.mktemp("a") / "qlora", seed=1)


def unmerged(model_dir, adapter, **load) -> tuple[torch.Tensor, PeftModel]:
    peft = PeftModel.from_pretrained(load_model(str(model_dir), device="cpu", **load)[0], adapter).eval()
    with torch.no_grad():
        return peft(IDS).logits, peft


def test_dense_merge_of_a_4bit_dir_loads_in_transformers_and_equals_the_unmerged_4bit_model(
        capsys, four_bit_dir, four_bit_adapter, tiny_dir, tmp_path):
    out = tmp_path / "merged"
    code, stdout, _ = run_cli(capsys, "merge", "--model", str(four_bit_dir), "--adapter", str(four_bit_adapter),
                              "--output", str(out))
    assert code == 0 and "onto its de-quantized 4-bit weights" in stdout and str(out) in stdout
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config  # a plain model: no bitsandbytes needed to load it
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    assert merged.dtype == torch.float32 and not four_bit_layers(merged)
    want, peft = unmerged(four_bit_dir, four_bit_adapter)
    with torch.no_grad():
        got = merged(IDS).logits
        dense_base = AutoModelForCausalLM.from_pretrained(tiny_dir).eval()(IDS).logits
    assert (want - dense_base).abs().max() > 1e-2
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # the weights are the de-quantized ones + s B A, not the original dense ones + s B A
    layer = peft.base_model.model.model.layers[0].self_attn.q_proj
    exact = layer.base_layer.dequantize() + layer.scaling["default"] * (
        layer.lora_B["default"].weight @ layer.lora_A["default"].weight).detach()
    assert torch.equal(merged.model.layers[0].self_attn.q_proj.weight, exact)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]


def test_dense_merge_in_bf16_rounds_once(four_bit_dir, four_bit_adapter, tmp_path):
    from lorakit.export.merged import write_merged

    result = write_merged(str(four_bit_dir), four_bit_adapter, tmp_path / "bf16", dtype="bfloat16")
    assert result.quantized and result.report is None
    merged = AutoModelForCausalLM.from_pretrained(result.path, dtype="auto")
    assert merged.dtype == torch.bfloat16
    _, peft = unmerged(four_bit_dir, four_bit_adapter)
    layer = peft.base_model.model.model.layers[1].mlp.down_proj
    exact = layer.base_layer.dequantize().float() + layer.scaling["default"] * (
        layer.lora_B["default"].weight @ layer.lora_A["default"].weight).detach()
    assert torch.equal(merged.model.layers[1].mlp.down_proj.weight, exact.to(torch.bfloat16))


def test_requantize_writes_a_4bit_dir_that_loads_back_and_prints_the_rounding(
        capsys, four_bit_dir, four_bit_adapter, tmp_path):
    dense_out, out = tmp_path / "dense", tmp_path / "nf4"
    assert run_cli(capsys, "merge", "--model", str(four_bit_dir), "--adapter", str(four_bit_adapter),
                   "--output", str(dense_out))[0] == 0
    code, stdout, _ = run_cli(capsys, "merge", "--model", str(four_bit_dir), "--adapter", str(four_bit_adapter),
                              "--output", str(out), "--requantize")
    assert code == 0
    line = next(li for li in stdout.splitlines() if li.startswith("requantized "))
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["bnb_4bit_quant_type"] == "nf4"
    assert config["quantization_config"]["bnb_4bit_use_double_quant"] is True
    model, _ = load_model(str(out), device="cpu")
    original, _ = load_model(str(four_bit_dir), device="cpu")
    exact = AutoModelForCausalLM.from_pretrained(dense_out).eval()  # the exact merge, checked above
    layers, before = four_bit_layers(model), four_bit_layers(original)
    assert set(layers) == set(before) and len(layers) == 14
    changes = []
    for name, layer in layers.items():
        if name.endswith(tuple(TARGETS)):
            changes.append((layer.dequantize() - exact.get_submodule(name).weight.detach()).abs())
            # the same bytes as quantizing the exact merged weight with the layer's settings
            want = quantize_linear(exact.get_submodule(name), "nf4", 64, True)
            assert torch.equal(layer.weight, want.weight) and torch.equal(layer.absmax, want.absmax)
        else:  # not adapted: the stored bytes as they were
            assert all(torch.equal(v, before[name].state_dict()[k]) for k, v in layer.state_dict().items())
    worst = max(float(c.max()) for c in changes)
    mean = float(sum(c.double().sum() for c in changes)) / sum(c.numel() for c in changes)
    assert f"max {worst:.3g}" in line and f"mean {mean:.3g}" in line and len(changes) == 6
    # the logits are those of the dense merge with the adapted layers quantized again, whose
    # distance to the unmerged model is the reported rounding's doing
    oracle = dequantized_copy(exact)
    for name in [n for n in layers if n.endswith(tuple(TARGETS))]:
        oracle.set_submodule(name, quantize_linear(exact.get_submodule(name), "nf4", 64, True))
    want, _ = unmerged(four_bit_dir, four_bit_adapter)
    with torch.no_grad():
        got = model(IDS).logits
        torch.testing.assert_close(got, oracle(IDS).logits, rtol=0, atol=1e-6)
    assert 0 < (got - want).abs().max() < 0.5 * float(want.abs().max())


def test_quantize_flag_merges_onto_the_weights_a_qlora_run_trained_against(capsys, tiny_dir, tmp_path,
                                                                            adapter_factory):
    """An adapter trained with `quantize: nf4` over a dense model dir records the dense dir; --quantize
    quantizes it the same way before merging."""
    base = load_model(str(tiny_dir), quantization="nf4", device="cpu")[0]
    adapter = adapter_factory(base, tmp_path / "adapter", seed=2)
    out = tmp_path / "merged"
    code, stdout, _ = run_cli(capsys, "merge", "--model", str(tiny_dir), "--adapter", str(adapter),
                              "--quantize", "nf4", "--output", str(out))
    assert code == 0 and "de-quantized" in stdout
    want, _ = unmerged(tiny_dir, adapter, quantization="nf4")
    with torch.no_grad():
        got = AutoModelForCausalLM.from_pretrained(out).eval()(IDS).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    code, _, _ = run_cli(capsys, "merge", "--model", str(tiny_dir), "--adapter", str(adapter),
                         "--output", str(tmp_path / "no-dq"), "--quantize", "nf4", "--no-double-quant")
    assert code == 0  # a different quantization: a different (still dense) model
    with torch.no_grad():
        other = AutoModelForCausalLM.from_pretrained(tmp_path / "no-dq").eval()(IDS).logits
    assert not torch.equal(other, got)


@pytest.mark.parametrize("extra, message", [
    (["--requantize"], "--requantize needs a 4-bit base"),
    (["--requantize", "--dtype", "bfloat16"], "--dtype does not apply with --requantize"),
    (["--no-double-quant"], "--no-double-quant applies with --quantize only"),
])
def test_bad_flag_combinations_are_one_line_errors_and_write_nothing(capsys, tiny_dir, adapter_dir, tmp_path,
                                                                     extra, message):
    code, _, err = run_cli(capsys, "merge", "--model", str(tiny_dir), "--adapter", str(adapter_dir),
                           "--output", str(tmp_path / "out"), *extra)
    assert code == 2 and err.count("\n") == 1 and message in err
    assert list(tmp_path.iterdir()) == []


def test_merging_onto_the_original_dense_weights_is_another_model(four_bit_dir, tiny_dir, four_bit_adapter, tmp_path):
    """The same adapter merged onto the original dense weights (no --quantize) is a different model:
    what QLoRA merges are known to lose when done that way."""
    from lorakit.export import merge_adapter_to_dir

    onto_dense = AutoModelForCausalLM.from_pretrained(merge_adapter_to_dir(str(tiny_dir), four_bit_adapter,
                                                                           tmp_path / "d")).eval()
    onto_4bit = AutoModelForCausalLM.from_pretrained(merge_adapter_to_dir(str(four_bit_dir), four_bit_adapter,
                                                                          tmp_path / "q")).eval()
    want, _ = unmerged(four_bit_dir, four_bit_adapter)
    with torch.no_grad():
        torch.testing.assert_close(onto_4bit(IDS).logits, want, rtol=1e-5, atol=1e-5)
        assert (onto_dense(IDS).logits - want).abs().max() > 1e-3
