"""The packed GGUF base: its products are those of the de-quantized weight, LoRA trains over it,
merging in place is refused with the model left as it was, and merge_and_unload merges onto the
de-quantized blocks (dense, or quantized again by gguf-py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from lorakit import LoraConfig, bases, get_peft_model
from lorakit.bases import gguf_blocks
from lorakit.bases.gguf_linear import GGUFBase, GGUFLinear

gguf = pytest.importorskip("gguf")
T = gguf.GGMLQuantizationType


def _blocks(qtype, out_features: int, in_features: int, seed: int = 0) -> torch.Tensor:
    """Random weights quantized by gguf-py; for Q4_K (which it cannot quantize) random bytes with
    small fp16 scales (d, dmin: its first 4 bytes)."""
    rng = np.random.default_rng(seed)
    if qtype == T.Q4_K:
        data = rng.integers(0, 256, (out_features * in_features // 256, 144), dtype=np.uint8)
        data[:, :4] = rng.uniform(1e-3, 2e-2, (len(data), 2)).astype(np.float16).view(np.uint8)
    else:
        weight = rng.standard_normal((out_features, in_features)).astype(np.float32) / np.sqrt(in_features)
        data = gguf.quants.quantize(weight, qtype)
    return torch.from_numpy(np.ascontiguousarray(data).view(np.uint8).reshape(-1).copy())


def _layer(qtype=T.Q4_1, out_features=24, in_features=256, bias=True, **kw) -> GGUFLinear:
    b = torch.randn(out_features, generator=torch.Generator().manual_seed(1)) if bias else None
    return GGUFLinear(_blocks(qtype, out_features, in_features), qtype, out_features, in_features, b, **kw)


def _weight(layer: GGUFLinear) -> torch.Tensor:
    return gguf_blocks.dequantize(layer.blocks, layer.qtype, (layer.out_features, layer.in_features))


@pytest.mark.parametrize("qtype", [T.Q4_1, T.Q8_0, T.Q5_0, T.Q4_K, T.F16], ids=lambda t: t.name)
@pytest.mark.parametrize("bias", [False, True])
def test_products_are_those_of_the_dequantized_weight(qtype, bias):
    layer = _layer(qtype, bias=bias)
    base = bases.frozen_base(layer)
    assert isinstance(base, GGUFBase) and isinstance(base, bases.FrozenBase)
    w = _weight(layer)
    x = torch.randn(3, 5, 256)
    expected = x @ w.T + (layer.bias if bias else 0)
    assert torch.equal(base.linear(x), expected) and torch.equal(layer(x), expected)
    assert base.linear(x.to(torch.bfloat16)).dtype == torch.bfloat16
    g = torch.randn(15, 24)
    assert torch.equal(base.input_grad(g), g @ w)
    acc = torch.ones(15, 256)
    assert base.input_grad(g, into=acc) is acc
    torch.testing.assert_close(acc, 1 + g @ w)
    assert torch.equal(base.dense(), w) and base.dense(torch.float64).dtype == torch.float64
    assert (base.in_features, base.out_features, base.dtype) == (256, 24, torch.float32)
    assert base.device == torch.device("cpu")
    assert (base.fast, base.transposed, base.frozen, base.compute_dtype()) == (True, False, True, torch.float32)


def test_a_16_bit_compute_dtype_rounds_the_weight_and_multiplies_where_the_device_is_fast(monkeypatch):
    from lorakit.bases import compute

    layer = _layer(compute_dtype=torch.bfloat16)
    rounded = _weight(layer).to(torch.bfloat16)
    x = torch.randn(4, 256)
    for native, work in ((False, torch.float32), (True, torch.bfloat16)):
        monkeypatch.setattr(compute, "_cpu_has", lambda flags, native=native: native)
        base = bases.frozen_base(layer)
        assert layer.work_dtype() == base.compute_dtype() == work and base.dtype == torch.bfloat16
        assert torch.equal(layer.dense(), rounded.to(work))
        assert torch.equal(base.dense(), rounded)
        y = layer(x)
        assert y.dtype == torch.float32
        torch.testing.assert_close(y, (x.to(work) @ rounded.to(work).T + layer.bias.to(work)).float())


def test_a_block_of_rows_at_a_time(monkeypatch):
    """With a small budget each product expands at most `rows_per_chunk` rows per call, and the
    sum equals the whole weight's product."""
    whole, chunked = _layer(), _layer(chunk_values=5 * 256)
    assert chunked.rows_per_chunk == 5 and list(chunked.chunks())[-1] == (20, 24)
    spans = []
    real = gguf_blocks.dequantize_rows

    def counting(raw, qtype, shape, start, stop, name=None):
        spans.append(stop - start)
        return real(raw, qtype, shape, start, stop, name)

    monkeypatch.setattr(gguf_blocks, "dequantize_rows", counting)
    x, g = torch.randn(7, 256), torch.randn(7, 24)
    out = chunked.linear(x)
    assert spans == [5, 5, 5, 5, 4]
    torch.testing.assert_close(out, whole.linear(x), rtol=1e-6, atol=1e-6)
    spans.clear()
    grad = chunked.input_grad(g)
    assert spans == [5, 5, 5, 5, 4]
    torch.testing.assert_close(grad, whole.input_grad(g), rtol=1e-6, atol=1e-6)
    assert torch.equal(chunked.dense(), whole.dense())


@pytest.mark.parametrize("chunk_values", [1 << 22, 7 * 256])
def test_backward_reaches_the_input_and_the_bias_only(chunk_values):
    layer = _layer(compute_dtype=torch.float64, chunk_values=chunk_values)
    layer.bias.requires_grad_(True)
    x = torch.randn(4, 256, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(layer, (x,))
    layer(x).sum().backward()
    torch.testing.assert_close(x.grad, torch.ones(4, 24, dtype=torch.float64) @ _weight(layer).double())
    assert torch.equal(layer.bias.grad, torch.full((24,), 4.0, dtype=torch.float64))
    assert layer.blocks.dtype == torch.uint8 and not layer.blocks.requires_grad


def test_moving_the_model_keeps_the_blocks_bytes():
    layer = _layer().to(torch.bfloat16)
    assert layer.blocks.dtype == torch.uint8 and layer.bias.dtype == torch.bfloat16
    assert set(layer.state_dict()) == {"blocks", "bias"}
    assert layer(torch.randn(2, 256)).dtype == torch.float32


def test_unknown_types_and_wrong_sizes_are_refused_when_built():
    with pytest.raises(ValueError, match="'blk.0.attn_q.weight' is stored as IQ4_XS.*dense conversion"):
        GGUFLinear(torch.zeros(136, dtype=torch.uint8), T.IQ4_XS, 1, 256, name="blk.0.attn_q.weight")
    with pytest.raises(ValueError, match="expected 40 uint8 bytes of Q4_1 blocks, got 20"):
        GGUFLinear(torch.zeros(20, dtype=torch.uint8), T.Q4_1, 2, 32)


def test_assign_refuses_in_one_line():
    layer = _layer(name="blk.0.ffn_up.weight")
    with pytest.raises(bases.MergeRefused, match="blk.0.ffn_up.weight in place: the base holds Q4_1 GGUF") as err:
        bases.frozen_base(layer).assign(torch.zeros(24, 256))
    assert "merge_and_unload() returns a model merged" in str(err.value) and "\n" not in str(err.value)


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        GGUFLinear(_blocks(T.Q4_1, 64, 64, seed=1), T.Q4_1, 64, 64, torch.zeros(64)),
        nn.ReLU(),
        GGUFLinear(_blocks(T.Q8_0, 32, 64, seed=2), T.Q8_0, 32, 64, chunk_values=8 * 64),
    )


@pytest.mark.parametrize("dropout", [0.0, 0.1], ids=["fused-kernel", "general-path"])
def test_lora_trains_over_packed_bases_and_merging_is_refused(dropout):
    model = get_peft_model(_net(), LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=["0", "2"]))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(32, 64, generator=torch.Generator().manual_seed(3))
    y = torch.randn(32, 32, generator=torch.Generator().manual_seed(4))
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)
    layers = [layer for _, layer in model.base_model.lora_layers()]
    assert [layer.call_plan() is not None for layer in layers] == [dropout == 0] * 2  # which path runs
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    losses = []
    for _ in range(8):
        loss = nn.functional.mse_loss(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 1e-3
    after = model.state_dict()
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert moved and all("lora_" in k for k in moved)
    assert any("lora_B" in k for k in moved)  # B starts at zero: the adapters really changed
    packed = {k for k in after if k.endswith("blocks")}
    assert packed == {f"base_model.model.{i}.base_layer.blocks" for i in (0, 2)}

    model.eval()
    out = model(x)
    with pytest.raises(bases.MergeRefused, match="holds Q4_1 GGUF blocks"):
        model.merge_adapter()
    assert all(torch.equal(after[k], v) for k, v in model.state_dict().items())
    assert torch.equal(model(x), out)
    assert not any(layer.merged for _, layer in model.base_model.lora_layers())


def _trained_pair(qtype_first=T.Q4_1):
    """(a LoRA model over packed layers with non-zero B, the same adapters over dense layers holding
    the de-quantized weights)."""
    net = nn.Sequential(
        GGUFLinear(_blocks(qtype_first, 64, 256, seed=1), qtype_first, 64, 256, torch.randn(64), name="blk.0.a"),
        nn.ReLU(),
        GGUFLinear(_blocks(T.Q8_0, 32, 64, seed=2), T.Q8_0, 32, 64, name="blk.0.b"),
        nn.ReLU(),
        GGUFLinear(_blocks(T.Q5_0, 32, 32, seed=3), T.Q5_0, 32, 32, name="blk.0.c"),  # no adapter
    )
    dense = nn.Sequential(*[bases.frozen_base(m).dequantized() if isinstance(m, GGUFLinear) else m for m in net])
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["0", "2"], init_lora_weights=False)
    torch.manual_seed(5)
    packed_model = get_peft_model(net, config)
    torch.manual_seed(5)
    dense_model = get_peft_model(dense, config)
    return packed_model, dense_model


def test_merge_and_unload_merges_onto_the_dequantized_blocks():
    packed_model, dense_model = _trained_pair()
    x = torch.randn(8, 256, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        want = dense_model(x)
        torch.testing.assert_close(packed_model(x), want, rtol=1e-5, atol=1e-5)
    merged, reference = packed_model.merge_and_unload(), dense_model.merge_and_unload()
    assert all(type(m) is not GGUFLinear for m in merged.modules())  # a plain dense model
    for got, ref in zip(merged, reference):
        if isinstance(ref, nn.Linear):
            assert type(got) is nn.Linear and torch.equal(got.weight, ref.weight)
    with torch.no_grad():
        torch.testing.assert_close(merged(x), want, rtol=1e-5, atol=1e-5)


def test_merge_and_unload_requantizes_into_the_same_block_types():
    packed_model, dense_model = _trained_pair()
    exact = dense_model.merge_and_unload()
    merged = packed_model.merge_and_unload(requantize=True)
    report = merged.lorakit_requantize_report
    assert (report.layers, report.weights) == (2, 64 * 256 + 32 * 64)
    assert type(merged[4]) is GGUFLinear and merged[4].qtype == T.Q5_0  # no adapter: kept as it was
    for got, ref in ((merged[0], exact[0]), (merged[2], exact[2])):
        assert type(got) is GGUFLinear
        want_blocks = gguf.quants.quantize(ref.weight.detach().numpy(), got.qtype)
        assert torch.equal(got.blocks.reshape(-1), torch.from_numpy(want_blocks.view(np.uint8).reshape(-1)))
        change = (_weight(got) - ref.weight).abs()
        assert 0 < float(change.max()) <= report.max_abs_change
    assert 0 < report.mean_abs_change < report.max_abs_change < report.max_abs_weight


def test_requantize_refuses_k_quants_with_the_model_untouched():
    packed_model, _ = _trained_pair(T.Q4_K)
    before = {k: v.clone() for k, v in packed_model.state_dict().items()}
    with pytest.raises(ValueError, match="blk.0.a holds Q4_K GGUF blocks, which gguf-py cannot quantize") as err:
        packed_model.merge_and_unload(requantize=True)
    assert "\n" not in str(err.value)
    after = packed_model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert not any(layer.merged for _, layer in packed_model.base_model.lora_layers())
