"""merge_and_unload on a 4-bit base (lora.quantized_merge): onto the de-quantized weights, dense
or quantized again, checked against a dense model holding the de-quantized weights."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from lorakit import LoraConfig, get_peft_model
from lorakit.bases.linear4bit import Linear4bit, quantize_linear
from lorakit.lora.quantized_merge import RequantizeReport
from fourbit import copy_adapters, dequantized_copy, four_bit_layers, quantized
from tinymodels import logits, tiny_llama

IDS = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(0))
TARGETS = ["q_proj", "v_proj", "down_proj"]


def adapted(dtype: torch.dtype = torch.float32, targets=TARGETS, **quant) -> tuple[nn.Module, nn.Module]:
    """(a PeftModel with a non-zero adapter on a 4-bit tiny Llama, the same 4-bit model unwrapped: a copy)."""
    import copy

    model = quantized(tiny_llama().to(dtype), **quant)
    plain = copy.deepcopy(model)
    torch.manual_seed(3)
    peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False))
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.mul_(5)  # a change the 4-bit rounding cannot hide
    return peft.eval(), plain


def exact_merged(peft, name: str) -> torch.Tensor:
    """The obvious reference: W de-quantized (in its weight dtype), in fp32, + s B A."""
    layer = peft.base_model.model.get_submodule(name)
    w = layer.base_layer.dequantize().float()
    A, B = layer.lora_A["default"].weight.detach().float(), layer.lora_B["default"].weight.detach().float()
    return w + layer.scaling["default"] * (B @ A)


def state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def same_state(model: nn.Module, before: dict[str, torch.Tensor]) -> bool:
    after = model.state_dict()
    return after.keys() == before.keys() and all(
        after[k].dtype == before[k].dtype and torch.equal(after[k].nan_to_num(), before[k].nan_to_num())
        and torch.equal(after[k].isnan(), before[k].isnan()) for k in before)


@pytest.mark.parametrize("quant", [dict(quant_type="nf4", double_quant=True), dict(quant_type="fp4", double_quant=False)],
                         ids=["nf4-dq", "fp4"])
def test_merge_and_unload_is_dense_and_equals_the_unmerged_4bit_forward(quant):
    peft, plain = adapted(**quant)
    names = [n for n, _ in peft.base_model.lora_layers()]
    want = {n: exact_merged(peft, n) for n in names}
    with torch.no_grad():
        unmerged = logits(peft, IDS)
        base = logits(plain, IDS)
    merged = peft.merge_and_unload()
    assert not four_bit_layers(merged)  # every 4-bit layer comes back dense, adapted or not
    assert all(type(merged.get_submodule(n)) is nn.Linear for n in names)
    for n in names:
        assert merged.get_submodule(n).weight.dtype == torch.float32
        torch.testing.assert_close(merged.get_submodule(n).weight, want[n], rtol=0, atol=0)
    k_proj = "model.layers.0.self_attn.k_proj"  # not adapted: its de-quantized weight
    assert torch.equal(merged.get_submodule(k_proj).weight, plain.get_submodule(k_proj).dequantize())
    with torch.no_grad():
        got = logits(merged, IDS)
    assert (unmerged - base).abs().max() > 1e-2  # the adapter matters...
    torch.testing.assert_close(got, unmerged, rtol=1e-5, atol=1e-5)  # ...and the merge keeps it


def test_a_dense_reference_model_gives_the_same_merge():
    """The merge of a 4-bit base equals the merge of a dense model holding its de-quantized weights."""
    peft, plain = adapted()
    dense = get_peft_model(dequantized_copy(plain), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    copy_adapters(peft, dense)
    want = dense.merge_and_unload().state_dict()
    got = peft.merge_and_unload().state_dict()
    assert got.keys() == want.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=0)


def test_bf16_base_and_dtype_round_once():
    peft, _ = adapted(torch.bfloat16)
    name = "model.layers.1.mlp.down_proj"
    exact = exact_merged(peft, name)
    k_proj = peft.base_model.model.get_submodule("model.layers.1.self_attn.k_proj")
    k_exact = k_proj.dequantize().float()
    merged = peft.merge_and_unload(dtype=torch.float16)
    layer = merged.get_submodule(name)
    assert layer.weight.dtype == torch.float16 and layer.bias is None
    assert torch.equal(layer.weight, exact.to(torch.float16))  # fp32 sum, one rounding
    assert torch.equal(merged.get_submodule("model.layers.1.self_attn.k_proj").weight, k_exact.to(torch.float16))
    assert merged.model.embed_tokens.weight.dtype == torch.bfloat16  # dtype is the de-quantized layers' only
    peft, _ = adapted(torch.bfloat16)
    exact = exact_merged(peft, name)
    assert torch.equal(peft.merge_and_unload().get_submodule(name).weight, exact.to(torch.bfloat16))


def test_requantize_stays_4bit_equals_quantizing_the_merged_model_and_reports_the_rounding(caplog):
    quant = dict(quant_type="nf4", double_quant=True, compute_dtype=torch.float32)
    peft, plain = adapted(**quant)
    names = [n for n, _ in peft.base_model.lora_layers()]
    exact = {n: exact_merged(peft, n) for n in names}
    untouched = {n: {k: v.clone() for k, v in m.state_dict().items()} for n, m in four_bit_layers(plain).items()
                 if n not in names}
    with torch.no_grad():
        unmerged = logits(peft, IDS)
    # the oracle: merge a dense model with the same de-quantized weights, quantize the adapted layers
    dense = get_peft_model(dequantized_copy(plain), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    copy_adapters(peft, dense)
    oracle = dense.merge_and_unload()
    for n in names:
        oracle.set_submodule(n, quantize_linear(oracle.get_submodule(n), "nf4", 64, True, torch.float32))

    with caplog.at_level(logging.INFO, logger="lorakit"):
        merged = peft.merge_and_unload(requantize=True)
    layers = four_bit_layers(merged)
    assert set(layers) == set(four_bit_layers(plain))  # still a 4-bit model, layer for layer
    for n in names:
        got, want = layers[n], oracle.get_submodule(n)
        assert (got.quant_type, got.blocksize, got.double_quant, got.compute_dtype) == ("nf4", 64, True, torch.float32)
        assert all(torch.equal(got.state_dict()[k], want.state_dict()[k]) for k in want.state_dict())
    for n, buffers in untouched.items():  # not adapted: not re-quantized
        assert all(torch.equal(layers[n].state_dict()[k], v) for k, v in buffers.items())

    report = merged.lorakit_requantize_report
    assert isinstance(report, RequantizeReport)
    changes = {n: (layers[n].dequantize().double() - exact[n].double()).abs() for n in names}
    assert report.layers == len(names) and report.weights == sum(c.numel() for c in changes.values())
    assert report.max_abs_change == pytest.approx(max(float(c.max()) for c in changes.values()), rel=1e-12)
    assert report.mean_abs_change == pytest.approx(float(sum(c.sum() for c in changes.values())) / report.weights, rel=1e-9)
    assert report.worst_layer == max(changes, key=lambda n: float(changes[n].max()))
    assert 0 < report.mean_abs_change < report.max_abs_change
    # NF4's widest gap between codes is 1 - 0.7230, so no weight moves by more than half of it
    # times its block's absmax (double quant perturbs absmax a little more)
    assert report.max_abs_change <= 0.5 * (1 - 0.72299) * 1.01 * report.max_abs_weight
    assert report.line() in caplog.text and "\n" not in report.line()

    with torch.no_grad():
        got = logits(merged, IDS)
        torch.testing.assert_close(got, logits(oracle, IDS), rtol=0, atol=0)
    assert (got - unmerged).abs().max() < 0.5 * (unmerged.max() - unmerged.min())  # a rounding, not a new model


def test_safe_merge_refuses_nan_before_anything_changes():
    peft, _ = adapted()
    with torch.no_grad():
        peft.base_model.model.model.layers[1].mlp.down_proj.lora_B["default"].weight[0, 0] = float("nan")
    before = state(peft)
    for kwargs in ({}, {"requantize": True}, {"dtype": torch.bfloat16}):
        with pytest.raises(ValueError, match=r"^merging \['default'\] would produce NaN or inf weights; the model was left unchanged$"):
            peft.merge_and_unload(safe_merge=True, **kwargs)
        assert same_state(peft, before)
        assert len(four_bit_layers(peft)) == 14 and sum(1 for _ in peft.base_model.lora_layers()) == 6


def test_safe_merge_of_finite_weights_is_the_plain_merge():
    peft, _ = adapted()
    want = {n: exact_merged(peft, n) for n, _ in peft.base_model.lora_layers()}
    merged = peft.merge_and_unload(safe_merge=True)
    assert all(torch.equal(merged.get_submodule(n).weight, w) for n, w in want.items())


def test_unload_and_unmerge_return_the_4bit_base_untouched():
    peft, plain = adapted()
    before = state(plain)
    peft.unmerge_adapter()
    unloaded = peft.unload()
    assert set(four_bit_layers(unloaded)) == set(four_bit_layers(plain))
    assert same_state(unloaded, before)
    with torch.no_grad():
        assert torch.equal(logits(unloaded, IDS), logits(plain, IDS))


def test_a_mixed_model_merges_dense_layers_in_place_and_4bit_ones_onto_their_dequantized_weights():
    model = tiny_llama()
    mlp = model.model.layers[1].mlp
    mlp.down_proj = quantize_linear(mlp.down_proj)
    torch.manual_seed(1)
    peft = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj", "down_proj"], init_lora_weights=False)).eval()
    with torch.no_grad():
        want = logits(peft, IDS)
    merged = peft.merge_and_unload()
    assert not four_bit_layers(merged)
    with torch.no_grad():
        torch.testing.assert_close(logits(merged, IDS), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kwargs, message", [
    (dict(requantize=True, dtype=torch.bfloat16), r"^merge_and_unload: dtype applies to layers that come back de-quantized"),
    (dict(dtype="int8"), r"^merge_and_unload: dtype must be float32, bfloat16, float16 or float64, not 'int8'$"),
    (dict(adapter_names=["nope"]), r"^unknown adapter 'nope'"),
])
def test_bad_arguments_are_refused_and_leave_the_model_untouched(kwargs, message):
    peft, _ = adapted()
    before = state(peft)
    with pytest.raises(ValueError, match=message):
        peft.merge_and_unload(**kwargs)
    assert same_state(peft, before) and len(four_bit_layers(peft)) == 14


@pytest.mark.parametrize("kwargs", [dict(requantize=True), dict(dtype=torch.bfloat16)])
def test_quantized_options_on_a_dense_model_are_refused(kwargs):
    peft = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    before = state(peft)
    with pytest.raises(ValueError, match=r"^merge_and_unload: .* applies to quantized layers \(4-bit or GGUF blocks\), "
                                         r"and the model has none$"):
        peft.merge_and_unload(**kwargs)
    assert same_state(peft, before)


def test_4bit_and_gguf_layers_merge_together_each_onto_its_dequantized_weight():
    """A model mixing 4-bit layers and GGUF blocks: merge_and_unload de-quantizes both (the same
    outputs as before), and requantize=True gives each layer its own kind back."""
    gguf = pytest.importorskip("gguf")
    import numpy as np

    from lorakit.bases.gguf_linear import GGUFLinear

    rng = np.random.default_rng(0)
    blocks = gguf.quants.quantize(rng.standard_normal((32, 64)).astype(np.float32) / 8, gguf.GGMLQuantizationType.Q8_0)

    def build():
        torch.manual_seed(0)
        net = nn.Sequential(quantize_linear(nn.Linear(64, 64)), nn.ReLU(),
                            GGUFLinear(torch.from_numpy(blocks.view(np.uint8).reshape(-1).copy()),
                                       gguf.GGMLQuantizationType.Q8_0, 32, 64))
        return get_peft_model(net, LoraConfig(r=4, target_modules=["0", "2"], init_lora_weights=False))

    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(1))
    peft = build()
    with torch.no_grad():
        want = peft(x)
        merged = peft.merge_and_unload()
        assert [type(m) for m in merged] == [nn.Linear, nn.ReLU, nn.Linear]
        torch.testing.assert_close(merged(x), want, rtol=1e-5, atol=1e-5)
        again = build().merge_and_unload(requantize=True)
    assert [type(m) for m in again] == [Linear4bit, nn.ReLU, GGUFLinear]
    assert again.lorakit_requantize_report.layers == 2
