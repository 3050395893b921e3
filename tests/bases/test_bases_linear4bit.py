"""bases.linear4bit: the 4-bit layer's products, and LoRA training on a 4-bit tiny Llama (QLoRA)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lorakit import LoraConfig, bases, get_peft_model
from lorakit.bases import quant4
from lorakit.bases.linear4bit import MERGE_REFUSED, Linear4bit, Linear4bitBase, quantize_linear
from lorakit.lora.linear import Linear
from tinymodels import adamw_losses, logits, tiny_llama


def linear(in_features: int = 96, out_features: int = 40, bias: bool = True, dtype=torch.float32) -> nn.Linear:
    torch.manual_seed(0)
    return nn.Linear(in_features, out_features, bias=bias).to(dtype)


def reference_weight(layer: nn.Linear, quant_type: str = "nf4", blocksize: int = 64) -> torch.Tensor:
    """W de-quantized by quant4's functions directly, fp32."""
    packed, absmax = quant4.quantize_4bit(layer.weight, quant_type, blocksize)
    return quant4.dequantize_4bit(packed, absmax, layer.weight.shape, quant_type, blocksize)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_and_input_grad_are_the_dequantized_products(quant_type, bias):
    dense = linear(bias=bias)
    layer = quantize_linear(dense, quant_type, blocksize=64)
    base = bases.frozen_base(layer)
    assert isinstance(base, Linear4bitBase) and base.fast and base.frozen and not base.transposed
    assert (base.in_features, base.out_features, base.dtype) == (96, 40, torch.float32)
    w = reference_weight(dense, quant_type)
    assert torch.equal(base.dense(), w) and base.dense(torch.float64).dtype == torch.float64
    x = torch.randn(2, 5, 96)
    expected = x @ w.t() + (dense.bias.detach() if bias else 0)
    torch.testing.assert_close(base.linear(x), expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(layer(x), expected, rtol=1e-6, atol=1e-6)
    g = torch.randn(10, 40)
    torch.testing.assert_close(base.input_grad(g), g @ w, rtol=1e-6, atol=1e-6)
    into = torch.randn(10, 96)
    expected_into = into + g @ w
    assert base.input_grad(g, into=into) is into
    torch.testing.assert_close(into, expected_into, rtol=1e-6, atol=1e-6)


def test_the_weight_is_stored_in_bitsandbytes_layout():
    dense = linear()
    layer = quantize_linear(dense, "nf4", blocksize=64)
    packed, absmax = quant4.quantize_4bit(dense.weight, "nf4", 64)
    assert layer.weight.dtype == torch.uint8 and layer.weight.shape == (96 * 40 // 2, 1)
    assert torch.equal(layer.weight, packed) and torch.equal(layer.absmax, absmax)
    double = quantize_linear(dense, "nf4", blocksize=64, double_quant=True)
    codes, nested, offset = quant4.quantize_absmax(absmax)
    assert double.absmax.dtype == torch.uint8 and torch.equal(double.absmax, codes)
    assert torch.equal(double.nested_absmax, nested) and torch.equal(double.offset, offset)
    assert set(dict(double.named_buffers())) == {"weight", "absmax", "nested_absmax", "offset", "nested_quant_map"}
    # de-quantized absmax are close, so the weights are close
    torch.testing.assert_close(double.dequantize(), layer.dequantize(), rtol=0, atol=0.02 * float(absmax.max()))


def test_bf16_weight_dequantizes_to_bf16_and_multiplies_in_the_compute_dtype():
    dense = linear(dtype=torch.bfloat16)
    layer = quantize_linear(dense)
    base = bases.frozen_base(layer)
    assert base.dtype == torch.bfloat16 and layer.dequantize().dtype == torch.bfloat16
    assert base.compute_dtype() in (torch.bfloat16, torch.float32)  # fp32 where the CPU emulates bf16
    x = torch.randn(3, 96, dtype=torch.bfloat16)
    w = layer.dequantize().to(base.compute_dtype())
    expected = (x.to(w.dtype) @ w.t() + dense.bias.detach().to(w.dtype)).to(torch.bfloat16)
    assert base.linear(x).dtype == torch.bfloat16
    torch.testing.assert_close(base.linear(x), expected)
    assert bases.frozen_base(quantize_linear(dense, compute_dtype=torch.float32)).compute_dtype() == torch.float32


def test_merging_is_refused_in_one_line():
    base = bases.frozen_base(quantize_linear(linear()))
    with pytest.raises(bases.MergeRefused, match=r"^cannot merge into a 4-bit base \(Linear4bit\) in place: its weight is "
                       r"stored quantized; keep the adapter unmerged, or merge_and_unload\(\) for a model merged onto "
                       r"the de-quantized weights$"):
        base.assign(base.dense())
    assert "\n" not in MERGE_REFUSED


def test_bad_settings_name_the_value():
    with pytest.raises(ValueError, match="^blocksize 100 is not one bitsandbytes allows"):
        quantize_linear(linear(), blocksize=100)
    with pytest.raises(ValueError, match=r"^weight has shape \(3, 3\), expected \(40, 96\)$"):
        Linear4bit(96, 40).quantize_(torch.zeros(3, 3))


# -- QLoRA on a tiny Llama ----------------------------------------------------------------------
def quantized_llama(double_quant: bool = False, dtype: torch.dtype = torch.float32) -> nn.Module:
    model = tiny_llama().to(dtype)
    for block in model.model.layers:
        for parent in (block.self_attn, block.mlp):
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.Linear):
                    setattr(parent, name, quantize_linear(child, "nf4", blocksize=64, double_quant=double_quant))
    return model


def packed_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: b.clone() for n, b in model.named_buffers() if n.endswith(("weight", "absmax", "offset"))}


def test_a_4bit_llama_trains_and_only_adapters_move():
    model = quantized_llama(double_quant=True)
    assert sum(isinstance(m, Linear4bit) for m in model.modules()) == 14
    before = packed_state(model)
    peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    assert sum(isinstance(m, Linear) and isinstance(m.base_layer, Linear4bit) for m in peft.modules()) == 14
    params = {n: p.detach().clone() for n, p in peft.named_parameters()}
    trainable = [p for p in peft.parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n, p in peft.named_parameters() if p.requires_grad)
    losses = adamw_losses(peft, trainable, steps=6)
    assert losses[-1] < losses[0] - 0.05
    moved = {n for n, p in peft.named_parameters() if not torch.equal(p.detach(), params[n])}
    assert moved and all("lora_" in n for n in moved)
    assert any("lora_B" in n for n in moved)
    after = {n.replace(".base_layer", "").removeprefix("base_model.model."): b for n, b in packed_state(peft).items()}
    assert after.keys() == before.keys() and all(torch.equal(after[n], before[n]) for n in before)


def adapter_grads(make_peft) -> dict[str, torch.Tensor]:
    torch.manual_seed(1)
    peft = make_peft().train()
    ids = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(0))
    logits(peft, ids).float().pow(2).mean().backward()
    return {n: p.grad for n, p in peft.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_gradients_equal_fused_unfused_and_plain(dtype, monkeypatch):
    config = dict(r=4, target_modules="all-linear", init_lora_weights=False)
    fused = adapter_grads(lambda: get_peft_model(quantized_llama(dtype=dtype), LoraConfig(**config)))
    unfused = adapter_grads(lambda: get_peft_model(quantized_llama(dtype=dtype), LoraConfig(**config), fuse=False))
    monkeypatch.setattr(Linear, "_fast_path_ok", lambda self, name: False)
    plain = adapter_grads(lambda: get_peft_model(quantized_llama(dtype=dtype), LoraConfig(**config)))
    assert fused.keys() == unfused.keys() == plain.keys() and len(fused) == 28
    for name in fused:
        assert fused[name].abs().sum() > 0
        if dtype == torch.float32:
            tolerance = dict(rtol=1e-4, atol=1e-6)
        else:  # bf16 rounding differs in where the casts fall (as tests/fast/test_fusion.py)
            tolerance = dict(rtol=5e-2, atol=5e-2 * float(plain[name].abs().max()))
        torch.testing.assert_close(fused[name], plain[name], **tolerance)
        torch.testing.assert_close(unfused[name], plain[name], **tolerance)


def test_the_kernels_call_the_4bit_base(monkeypatch):
    calls = []
    original = Linear4bitBase.input_grad
    monkeypatch.setattr(Linear4bitBase, "input_grad", lambda self, g, into=None: calls.append(1) or original(self, g, into))
    adapter_grads(lambda: get_peft_model(quantized_llama(), LoraConfig(r=4, target_modules="all-linear")))
    # every adapted projection's input gradient went through the seam, but for the first block's
    # q/k/v: their input comes from the frozen embedding and needs none
    assert len(calls) == 14 - 3


def test_merging_a_4bit_model_in_place_is_refused_and_leaves_it_untouched():
    peft = get_peft_model(quantized_llama(), LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    state = {n: t.clone() for n, t in peft.state_dict().items()}
    ids = torch.randint(0, 100, (1, 6))
    with torch.no_grad():
        out = logits(peft, ids)
    with pytest.raises(bases.MergeRefused) as refused:
        peft.merge_adapter()
    assert str(refused.value) == MERGE_REFUSED
    after = peft.state_dict()
    assert after.keys() == state.keys() and all(torch.equal(after[n], state[n]) for n in state)
    assert not any(isinstance(m, Linear) and m.merged for m in peft.modules())
    with torch.no_grad():
        assert torch.equal(logits(peft, ids), out)


def test_a_model_with_one_4bit_layer_refuses_to_merge_before_merging_any():
    """Dense layers and one 4-bit layer: the refusal comes before the dense layers are touched."""
    import pytest as _pytest

    from lorakit import LoraConfig, get_peft_model
    from lorakit.bases import MergeRefused
    from lorakit.bases.linear4bit import quantize_linear
    from tinymodels import tiny_llama

    base = tiny_llama()
    mlp = base.model.layers[1].mlp
    mlp.down_proj = quantize_linear(mlp.down_proj)
    model = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj", "down_proj"], init_lora_weights=False))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with _pytest.raises(MergeRefused, match="^cannot merge into a 4-bit base"):
        model.merge_adapter()
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not any(layer.merged for _, layer in model.base_model.lora_layers())


# -- the fast path over 4-bit bases: fused kernels, one dense layer at a time -------------------
def dense_copies_kept_for_backward(model: nn.Module, run) -> list[tuple[int, ...]]:
    """Shapes of the tensors autograd keeps during `run()` that look like a de-quantized weight:
    a decoder projection's (out, in) or (in, out) shape, and not one of the model's own tensors."""
    shapes = set()
    for m in model.modules():
        if isinstance(m, Linear4bit):
            shapes |= {(m.out_features, m.in_features), (m.in_features, m.out_features)}
    own = {t.data_ptr() for t in [*model.parameters(), *model.buffers()]}
    kept = []

    def pack(t):
        if tuple(t.shape) in shapes and t.is_floating_point() and t.data_ptr() not in own:
            kept.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run()
    return kept


def test_the_layers_own_product_saves_no_dense_weight_and_backward_is_g_w():
    dense = linear(bias=True)
    layer = quantize_linear(dense, "nf4", blocksize=64, double_quant=True)
    w = layer.dequantize()
    x = torch.randn(2, 5, 96, requires_grad=True)
    kept = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t.shape) or t, lambda t: t):
        y = layer(x)
    assert kept == []  # not the weight, not even x
    torch.testing.assert_close(y, x @ w.t() + dense.bias.detach(), rtol=1e-6, atol=1e-6)
    g = torch.randn(2, 5, 40)
    y.backward(g)
    torch.testing.assert_close(x.grad, g @ w, rtol=1e-6, atol=1e-6)
    layer.bias.requires_grad_(True)  # a bias made trainable gets its gradient
    layer(x).backward(g)
    torch.testing.assert_close(layer.bias.grad, g.sum(dim=(0, 1)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("weight_dtype, compute_dtype",
                         [(torch.float32, None), (torch.bfloat16, None), (torch.float32, torch.bfloat16),
                          (torch.float16, torch.float16)], ids=["fp32", "bf16", "fp32-bf16-compute", "fp16"])
def test_the_fused_kernels_run_over_4bit_bases_and_keep_no_dense_weights(weight_dtype, compute_dtype, monkeypatch):
    from lorakit.fast import fusion

    calls = []
    for name in ("lora_shared_input", "lora_swiglu"):
        kernel = getattr(fusion, name)
        monkeypatch.setattr(fusion, name, lambda *a, _k=kernel, _n=name, **kw: calls.append(_n) or _k(*a, **kw))
    model = tiny_llama().to(weight_dtype)
    for block in model.model.layers:
        for parent in (block.self_attn, block.mlp):
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.Linear):
                    setattr(parent, name, quantize_linear(child, double_quant=True, compute_dtype=compute_dtype))
    peft = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False)).train()
    # 21 tokens (18 after the shift): no activation has a weight's shape
    ids = torch.randint(0, 100, (3, 7), generator=torch.Generator().manual_seed(0))
    losses = []
    kept = dense_copies_kept_for_backward(peft, lambda: losses.append(peft(input_ids=ids, labels=ids).loss))
    assert kept == []
    assert calls.count("lora_shared_input") == 2 and calls.count("lora_swiglu") == 2  # every block, fused
    losses[0].backward()
    grads = [p.grad for p in peft.parameters() if p.requires_grad]
    assert len(grads) == 28 and all(g is not None and g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("fuse", [True, False], ids=["fused", "unfused"])
def test_the_general_path_keeps_no_dense_weights_either(fuse, monkeypatch):
    # dropout in training sends every layer down the general path (base product, then LoRA)
    peft = get_peft_model(quantized_llama(double_quant=True),
                          LoraConfig(r=4, target_modules="all-linear", lora_dropout=0.1), fuse=fuse).train()
    monkeypatch.setattr(Linear, "_fast_path_ok", lambda self, name: False)
    # 21 tokens (18 after the shift): no activation has a weight's shape
    ids = torch.randint(0, 100, (3, 7), generator=torch.Generator().manual_seed(0))
    losses = []
    assert dense_copies_kept_for_backward(peft, lambda: losses.append(peft(input_ids=ids, labels=ids).loss)) == []
    losses[0].backward()
    assert all(p.grad is not None for p in peft.parameters() if p.requires_grad)
