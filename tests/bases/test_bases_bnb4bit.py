"""bases.bnb4bit: bitsandbytes' Linear4bit as a frozen base, against bitsandbytes (CPU) and PEFT
on a tiny Llama quantized by transformers + bitsandbytes."""

from __future__ import annotations

import subprocess
import sys

import peft
import pytest
import torch
from torch import nn

from bnbmodels import BNB_WARNINGS, TARGETS, bnb_llama, lora_state, randomize_adapters, save_llama
from lorakit import LoraConfig, PeftModel, bases, get_peft_model
from lorakit.bases import bnb4bit
from lorakit.bases.bnb4bit import MERGE_REFUSED, BnbLinear4bitBase
from lorakit.fast.fusion import FusedSwiGLU
from lorakit.lora.linear import Linear
from tinymodels import adamw_losses

bnb = pytest.importorskip("bitsandbytes")
BF = pytest.importorskip("bitsandbytes.functional")
pytestmark = BNB_WARNINGS

IDS = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(0))


def bnb_layer(quant_type: str = "nf4", double_quant: bool = True, bias: bool = True, dtype=torch.float32,
              compute_dtype=None) -> tuple[nn.Module, nn.Linear]:
    """(bitsandbytes' Linear4bit holding a random (40, 96) weight quantized on the CPU, that dense layer)."""
    torch.manual_seed(0)
    dense = nn.Linear(96, 40, bias=bias).to(dtype)
    layer = bnb.nn.Linear4bit(96, 40, bias=bias, compute_dtype=compute_dtype, compress_statistics=double_quant,
                              quant_type=quant_type)
    layer.weight = bnb.nn.Params4bit(dense.weight.detach().clone(), requires_grad=False, quant_type=quant_type,
                                     compress_statistics=double_quant, blocksize=64)
    if bias:
        layer.bias = nn.Parameter(dense.bias.detach().clone(), requires_grad=False)
    return layer.to("cpu"), dense


# -- the seam -------------------------------------------------------------------------------------
def test_the_type_is_found_only_where_bitsandbytes_was_imported():
    code = ("import sys, torch; from lorakit import LoraConfig, get_peft_model, bases; "
            "from lorakit.bases import bnb4bit; "
            "m = get_peft_model(torch.nn.Sequential(torch.nn.Linear(4, 4)), LoraConfig(target_modules=['0'])); "
            "assert bnb4bit.linear4bit_type() is None and 'bitsandbytes' not in ' '.join(bases.adaptable_types()); "
            "assert not [n for n in sys.modules if n.startswith('bitsandbytes')], 'imported'")
    subprocess.run([sys.executable, "-c", code], check=True)
    assert bnb4bit.linear4bit_type() is bnb.nn.Linear4bit and bnb4bit.params4bit_type() is bnb.nn.Params4bit
    assert bases.adaptable_types()[0] == "bitsandbytes' Linear4bit"  # before nn.Linear, which it subclasses


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("bias", [True, False])
def test_products_are_bitsandbytes_dequantized_weight(quant_type, double_quant, bias):
    layer, dense = bnb_layer(quant_type, double_quant, bias)
    base = bases.frozen_base(layer)
    assert isinstance(base, BnbLinear4bitBase) and base.fast and base.frozen and not base.transposed
    assert (base.in_features, base.out_features, base.dtype, base.device) == (96, 40, torch.float32, torch.device("cpu"))
    assert not base.mergeable and (base.bias is None) == (not bias)
    theirs = BF.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
    w = base.dense()
    assert base.dense(torch.float64).dtype == torch.float64
    if quant_type == "nf4":
        assert torch.equal(w, theirs)
    else:  # bitsandbytes' CPU kernel reads the FP4 code rounded to 4 decimals (tests/bases/test_bases_quant4.py)
        torch.testing.assert_close(w, theirs, rtol=0, atol=1e-4 * float(theirs.abs().max()))
    x = torch.randn(2, 5, 96)
    torch.testing.assert_close(base.linear(x), x @ w.t() + (dense.bias.detach() if bias else 0), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(base.linear(x), layer(x), rtol=1e-4, atol=1e-4)  # bitsandbytes' own forward
    g = torch.randn(10, 40)
    torch.testing.assert_close(base.input_grad(g), g @ w, rtol=1e-6, atol=1e-6)
    into = torch.randn(10, 96)
    expected = into + g @ w
    assert base.input_grad(g, into=into) is into
    torch.testing.assert_close(into, expected, rtol=1e-6, atol=1e-6)


def test_the_product_under_autograd_keeps_no_dense_weight_and_backward_is_g_w():
    layer, dense = bnb_layer()
    base = bases.frozen_base(layer)
    w = base.dense()
    x = torch.randn(2, 5, 96, requires_grad=True)
    kept = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t.shape) or t, lambda t: t):
        y = base.linear(x)
    assert kept == []  # not the de-quantized weight, not even x
    torch.testing.assert_close(y, x @ w.t() + dense.bias.detach(), rtol=1e-6, atol=1e-6)
    g = torch.randn(2, 5, 40)
    y.backward(g)
    torch.testing.assert_close(x.grad, g @ w, rtol=1e-6, atol=1e-6)
    layer.bias.requires_grad_(True)  # a bias made trainable gets its gradient
    base.linear(x).backward(g)
    torch.testing.assert_close(layer.bias.grad, g.sum(dim=(0, 1)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_16bit_weight_dequantizes_to_its_dtype_and_multiplies_in_the_compute_dtype(dtype):
    layer, _ = bnb_layer(dtype=dtype)
    base = bases.frozen_base(layer)
    assert base.dtype == dtype and base.dense().dtype == dtype
    # bitsandbytes' CPU path rounds the code to 16 bits before scaling: one rounding apart
    w = BF.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
    torch.testing.assert_close(base.dense(), w, rtol=2 ** -7, atol=0)
    assert base.compute_dtype() in (dtype, torch.float32)  # fp32 where the CPU emulates 16-bit products
    x = torch.randn(3, 96, dtype=dtype)
    assert base.linear(x).dtype == dtype
    torch.testing.assert_close(base.linear(x), layer(x), rtol=2e-2, atol=2e-2)
    fp32 = bases.frozen_base(bnb_layer(dtype=dtype, compute_dtype=torch.float32)[0])
    assert fp32.compute_dtype() == torch.float32
    w32 = base.dense(torch.float32)
    torch.testing.assert_close(fp32.linear(x), (x.float() @ w32.t() + fp32.bias.float()).to(dtype))


def test_merging_is_refused_in_one_line():
    base = bases.frozen_base(bnb_layer()[0])
    with pytest.raises(bases.MergeRefused, match=r"^cannot merge into a 4-bit base \(bitsandbytes Linear4bit\) in place: "
                                                 r"its weight is stored quantized; keep the adapter unmerged, or "
                                                 r"merge_and_unload\(\) for a model merged onto the de-quantized weights$"):
        base.assign(base.dense())
    assert "\n" not in MERGE_REFUSED


def test_a_layer_not_yet_quantized_is_named_in_one_line():
    layer = bnb.nn.Linear4bit(96, 40, quant_type="nf4")  # on the CPU, never moved: no quant_state
    base = bases.frozen_base(layer)
    assert (base.in_features, base.out_features) == (96, 40)
    with pytest.raises(ValueError, match=r"^bitsandbytes Linear4bit \(40x96\) has no quant_state: it is not "
                                         r"quantized yet \(move it to its device first\)$"):
        base.dense()


# -- get_peft_model on a transformers + bitsandbytes tiny Llama, against PEFT ------------------------
@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return save_llama(tmp_path_factory.mktemp("llama"))


def pair(directory, compute_dtype=torch.float32, fuse: bool = True):
    """(lorakit, PEFT) on two identical bitsandbytes 4-bit tiny Llamas, the same random adapter."""
    ours = get_peft_model(bnb_llama(directory, compute_dtype), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS),
                          fuse=fuse)
    theirs = peft.get_peft_model(bnb_llama(directory, compute_dtype),
                                 peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    randomize_adapters(ours)
    assert not theirs.load_state_dict(lora_state(ours), strict=False).unexpected_keys
    return ours, theirs


def grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("fuse", [True, False])
def test_lorakit_on_bitsandbytes_layers_equals_peft(llama_dir, fuse):
    ours, theirs = pair(llama_dir, fuse=fuse)
    wrapped = [m for m in ours.modules() if isinstance(m, Linear)]
    assert len(wrapped) == 14 and all(type(m.base_layer) is bnb.nn.Linear4bit for m in wrapped)
    assert all(isinstance(m.base, BnbLinear4bitBase) and m.call_plan() is not None for m in wrapped)  # fused kernel
    fused_mlp = [isinstance(b.mlp.__dict__.get("forward"), FusedSwiGLU) for b in ours.base_model.model.model.layers]
    assert fused_mlp == [fuse, fuse]
    with torch.no_grad():
        torch.testing.assert_close(ours(IDS).logits, theirs(IDS).logits, rtol=1e-5, atol=1e-5)
        with ours.disable_adapter():
            plain = ours(IDS).logits
        assert (plain - ours(IDS).logits).abs().max() > 1e-2  # the adapter changes the output
    ours.train(), theirs.train()
    loss_ours, loss_theirs = ours(input_ids=IDS, labels=IDS).loss, theirs(input_ids=IDS, labels=IDS).loss
    torch.testing.assert_close(loss_ours, loss_theirs, rtol=1e-5, atol=1e-5)
    loss_ours.backward(), loss_theirs.backward()
    ours_g, theirs_g = grads(ours), grads(theirs)
    assert ours_g.keys() == theirs_g.keys() and len(ours_g) == 28
    for name, g in ours_g.items():
        torch.testing.assert_close(g, theirs_g[name], rtol=1e-4, atol=1e-5, msg=name)


def test_adamw_steps_match_peft_and_move_only_adapters(llama_dir):
    ours, theirs = pair(llama_dir)
    before = {n: t.detach().clone() for n, t in ours.state_dict().items()}
    params_ours = [p for p in ours.parameters() if p.requires_grad]
    params_theirs = [p for p in theirs.parameters() if p.requires_grad]
    losses_ours = adamw_losses(ours, params_ours, steps=4)
    losses_theirs = adamw_losses(theirs, params_theirs, steps=4)
    assert losses_ours[-1] < losses_ours[0] - 0.05
    torch.testing.assert_close(torch.tensor(losses_ours), torch.tensor(losses_theirs), rtol=1e-4, atol=1e-5)
    moved = {n for n, t in ours.state_dict().items() if not torch.equal(t, before[n])}
    assert moved and all("lora_" in n for n in moved) and any("lora_B" in n for n in moved)


def test_bf16_compute_matches_peft_within_bf16_noise(llama_dir):
    ours, theirs = pair(llama_dir, compute_dtype=torch.bfloat16)
    assert {m.base.compute_dtype() for m in ours.modules() if isinstance(m, Linear)} <= {torch.bfloat16, torch.float32}
    with torch.no_grad():
        a, b = ours(IDS).logits.float(), theirs(IDS).logits.float()
    torch.testing.assert_close(a, b, rtol=0.05, atol=0.05 * float(b.abs().max()))


def test_adapters_move_between_lorakit_and_peft_on_bitsandbytes_bases(llama_dir, tmp_path):
    ours, theirs = pair(llama_dir)
    with torch.no_grad():
        expected = theirs(IDS).logits
    theirs.save_pretrained(tmp_path / "peft")
    ours.save_pretrained(tmp_path / "lorakit")
    loaded = PeftModel.from_pretrained(bnb_llama(llama_dir), tmp_path / "peft")
    assert all(isinstance(m.base, BnbLinear4bitBase) for m in loaded.modules() if isinstance(m, Linear))
    back = peft.PeftModel.from_pretrained(bnb_llama(llama_dir), tmp_path / "lorakit")
    with torch.no_grad():
        torch.testing.assert_close(loaded(IDS).logits, expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(back(IDS).logits, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [True, False])
def test_dequantized_and_requantized_layers_for_merge_and_unload(quant_type, double_quant):
    layer, dense = bnb_layer(quant_type, double_quant, dtype=torch.bfloat16, compute_dtype=torch.float32)
    base, codes = bases.frozen_base(layer), layer.weight.data.clone()
    plain = base.dequantized(torch.float32)
    assert type(plain) is nn.Linear and not plain.weight.requires_grad and plain.weight.dtype == torch.float32
    assert torch.equal(plain.weight, base.dense(torch.float32)) and torch.equal(plain.bias, dense.bias.float())
    assert base.dequantized().weight.dtype == torch.bfloat16
    merged = plain.weight + 0.01 * torch.randn(40, 96, generator=torch.Generator().manual_seed(1))
    again = base.requantized(merged, plain.bias)
    assert type(again) is bnb.nn.Linear4bit and again.compute_dtype == torch.float32
    state, expected = again.weight.quant_state, BF.quantize_4bit(merged.to(torch.bfloat16), blocksize=64,
                                                                 quant_type=quant_type, compress_statistics=double_quant)
    assert (state.quant_type, state.blocksize, state.nested, state.dtype) == (quant_type, 64, double_quant, torch.bfloat16)
    assert torch.equal(again.weight.data, expected[0])  # bitsandbytes' own quantization of the merged weight
    assert torch.equal(again.bias, plain.bias) and torch.equal(layer.weight.data, codes)  # the layer is untouched


@pytest.mark.filterwarnings("ignore:Merge lora module to 4-bit linear:UserWarning")
def test_merge_and_unload_on_bitsandbytes_layers_is_peft_s(llama_dir):
    if not hasattr(bases, "QuantizedBase"):
        pytest.skip("needs merge_and_unload over quantized bases (bases.QuantizedBase)")
    ours, theirs = pair(llama_dir)
    adapter = lora_state(ours)
    with torch.no_grad():
        expected = ours(IDS).logits
    dense = ours.merge_and_unload()
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in dense.modules())
    with torch.no_grad():
        torch.testing.assert_close(dense(IDS).logits, expected, rtol=1e-5, atol=1e-5)
    again = get_peft_model(bnb_llama(llama_dir), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    again.load_state_dict(adapter, strict=False)
    ours_4bit, theirs_4bit = again.merge_and_unload(requantize=True), theirs.merge_and_unload()
    layers = [(a, b) for a, b in zip(ours_4bit.modules(), theirs_4bit.modules()) if isinstance(a, bnb.nn.Linear4bit)]
    assert len(layers) == 14
    for a, b in layers:  # PEFT merges onto the de-quantized weight and has bitsandbytes quantize it again
        assert type(b) is bnb.nn.Linear4bit and torch.equal(a.weight.data, b.weight.data)
        assert torch.equal(a.weight.quant_state.absmax, b.weight.quant_state.absmax)


def test_an_8bit_bitsandbytes_model_is_refused_in_one_line_and_left_untouched(tmp_path):
    """Linear8bitLt subclasses nn.Linear; adapting it as dense would compute with its int8 codes."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    model = AutoModelForCausalLM.from_pretrained(save_llama(tmp_path / "m"), device_map="cpu",
                                                 quantization_config=BitsAndBytesConfig(load_in_8bit=True))
    before = [(name, type(module)) for name, module in model.named_modules()]
    with pytest.raises(TypeError, match=r"^bitsandbytes' 8-bit Linear8bitLt \(32x32\) is not a base lorakit adapts; "
                                        r"load the model in 4 bits"):
        get_peft_model(model, LoraConfig(r=4, target_modules=TARGETS))
    assert [(name, type(module)) for name, module in model.named_modules()] == before
    assert "Linear8bitLt" not in ", ".join(bases.adaptable_types())
