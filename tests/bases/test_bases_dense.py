"""Dense and Conv1D bases: their products, dense copies and merges equal the modules' own."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lorakit.bases import compute
from lorakit.bases.conv1d import Conv1DBase, conv1d_type
from lorakit.bases.dense import DenseLinear


def _linear(dtype, bias=True):
    torch.manual_seed(0)
    return nn.Linear(12, 6, bias=bias).to(dtype).requires_grad_(False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("bias", [False, True])
def test_dense_products_are_the_modules(dtype, bias):
    layer = _linear(dtype, bias)
    base = DenseLinear(layer)
    x = torch.randn(3, 5, 12, dtype=dtype)
    g = torch.randn(15, 6, dtype=dtype)
    assert torch.equal(base.linear(x), layer(x))
    assert torch.equal(base.input_grad(g), g @ layer.weight)
    acc = torch.ones(15, 12, dtype=dtype)
    assert base.input_grad(g, into=acc) is acc
    torch.testing.assert_close(acc, 1 + g @ layer.weight)
    assert (base.in_features, base.out_features, base.dtype, base.frozen, base.fast, base.transposed) == (12, 6, dtype, True, True, False)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_16bit_base_multiplied_in_fp32_gives_the_same_operands_exact_sums(dtype):
    """fp32 products of the 16-bit values: the fp64 result of those values, rounded once to 16 bits."""
    layer = _linear(dtype)
    x = torch.randn(4, 12).to(dtype)
    exact = (x.double() @ layer.weight.double().T + layer.bias.double())
    wide = DenseLinear(layer, compute_dtype=torch.float32)
    assert wide.compute_dtype() == torch.float32
    out = wide.linear(x)
    assert out.dtype == dtype
    torch.testing.assert_close(out.double(), exact.to(dtype).double(), rtol=0, atol=0)
    native = DenseLinear(layer, compute_dtype=dtype)
    torch.testing.assert_close(native.linear(x).double(), exact, rtol=1e-2, atol=1e-2)
    g = torch.randn(4, 6)  # the kernels pass gradients in the compute dtype
    torch.testing.assert_close(wide.input_grad(g).double(), g.double() @ layer.weight.double(), rtol=1e-5, atol=1e-5)


def test_compute_dtype_follows_the_cpu(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.setattr(compute, "_cpu_has", lambda flags: False)
    assert compute.product_dtype(torch.bfloat16, cpu) == torch.float32
    assert compute.product_dtype(torch.float16, cpu) == torch.float32
    assert compute.product_dtype(torch.float32, cpu) == torch.float32
    assert compute.product_dtype(torch.bfloat16, cuda) == torch.bfloat16
    monkeypatch.setattr(compute, "_cpu_has", lambda flags: "avx512_bf16" in flags)
    assert compute.product_dtype(torch.bfloat16, cpu) == torch.bfloat16
    assert compute.product_dtype(torch.float16, cpu) == torch.float32


def test_cpu_flags_are_read_from_cpuinfo():
    flags = compute.cpu_flags()
    assert isinstance(flags, frozenset)
    try:
        text = open("/proc/cpuinfo").read()
    except OSError:
        pytest.skip("no /proc/cpuinfo here")
    assert ("sse2" in flags) == (" sse2" in text)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dense_copy_and_assign_round_once(dtype):
    layer = _linear(dtype)
    base = DenseLinear(layer)
    assert base.dense() is layer.weight
    assert base.dense(torch.float64).dtype == torch.float64
    new = torch.randn(6, 12, dtype=torch.float64)
    base.assign(new)
    assert layer.weight.dtype == dtype and isinstance(layer.weight, nn.Parameter)
    assert torch.equal(layer.weight, new.to(dtype))


def test_conv1d_base_presents_its_weight_out_in():
    Conv1D = conv1d_type()
    torch.manual_seed(0)
    conv = Conv1D(6, 12).requires_grad_(False)  # nf=6 outputs, nx=12 inputs: weight (12, 6)
    base = Conv1DBase(conv)
    x = torch.randn(2, 3, 12)
    assert (base.in_features, base.out_features, base.transposed) == (12, 6, True)
    torch.testing.assert_close(base.linear(x), conv(x))
    assert torch.equal(base.dense(), conv.weight.t())
    g = torch.randn(6, 6)
    torch.testing.assert_close(base.input_grad(g), g @ conv.weight.t())
    new = torch.randn(6, 12)
    base.assign(new)
    assert torch.equal(conv.weight, new.t()) and conv.weight.is_contiguous()
