"""The fast path's autograd functions give the plain implementation's values and gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lorakit.bases.dense import DenseLinear
from lorakit.fast.kernels import Adapted, lora_linear, lora_shared_input, lora_swiglu


def adapted(W, b, A, B, scaling, compute=None) -> Adapted:
    """A LoRA op over a frozen dense base holding W (out, in) and bias b."""
    layer = torch.nn.Linear(W.shape[1], W.shape[0], bias=b is not None, dtype=W.dtype)
    layer.weight = torch.nn.Parameter(W, requires_grad=False)
    if b is not None:
        layer.bias = torch.nn.Parameter(b, requires_grad=False)
    return Adapted(DenseLinear(layer, compute), A, B, scaling)


@pytest.mark.parametrize("bias", [False, True])
def test_lora_linear_matches_plain(bias):
    torch.manual_seed(0)
    x = torch.randn(2, 5, 8, dtype=torch.float64, requires_grad=True)
    W = torch.randn(6, 8, dtype=torch.float64)
    b = torch.randn(6, dtype=torch.float64) if bias else None
    A = torch.randn(3, 8, dtype=torch.float64, requires_grad=True)
    B = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    fast = lora_linear(x, adapted(W, b, A, B, 0.7))
    plain = F.linear(x, W, b) + 0.7 * (x @ A.T) @ B.T
    torch.testing.assert_close(fast, plain)
    g = torch.randn_like(plain)
    inputs = [x, A, B]
    torch.testing.assert_close(torch.autograd.grad(fast, inputs, g), torch.autograd.grad(plain, inputs, g))


def test_lora_linear_gradcheck():
    torch.manual_seed(0)
    W = torch.randn(5, 4, dtype=torch.float64)
    args = (torch.randn(3, 4, dtype=torch.float64, requires_grad=True), torch.randn(2, 4, dtype=torch.float64, requires_grad=True),
            torch.randn(5, 2, dtype=torch.float64, requires_grad=True))
    assert torch.autograd.gradcheck(lambda x, A, B: lora_linear(x, adapted(W, None, A, B, 1.5)), args)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("compute", [None, torch.float32])
def test_lora_linear_on_a_16bit_base(dtype, compute):
    """A 16-bit base multiplied natively or in fp32 (`compute`, what an emulating CPU gets), fp32
    adapters: the fp64 result of the same 16-bit operands within 16-bit rounding."""
    torch.manual_seed(0)
    x = torch.randn(2, 5, 16, dtype=dtype, requires_grad=True)
    W, b = (torch.randn(12, 16) / 4).to(dtype), torch.randn(12).to(dtype)
    A, B = torch.randn(4, 16, requires_grad=True), torch.randn(12, 4, requires_grad=True)
    fast = lora_linear(x, adapted(W, b, A, B, 0.5, compute))
    x64 = x.detach().double().requires_grad_(True)
    A64, B64 = A.detach().double().requires_grad_(True), B.detach().double().requires_grad_(True)
    plain = F.linear(x64, W.double(), b.double()) + 0.5 * (x64 @ A64.T) @ B64.T
    assert fast.dtype == dtype
    # a few roundings to `dtype` of terms as large as |x| |W|^T + |b| (a native 16-bit product rounds
    # the base's output, then the sum): the bound scales with those terms, not with the result
    atol = 4 * torch.finfo(dtype).eps * float((x64.abs() @ W.double().abs().T + b.double().abs()).max())
    torch.testing.assert_close(fast.double(), plain, rtol=0, atol=atol)
    g = torch.randn_like(plain)
    fast_grads = torch.autograd.grad(fast, (x, A, B), g.to(dtype))
    plain_grads = torch.autograd.grad(plain, (x64, A64, B64), g)
    assert [t.dtype for t in fast_grads] == [dtype, torch.float32, torch.float32]
    for a, b_ in zip(fast_grads, plain_grads):
        torch.testing.assert_close(a.double(), b_, rtol=2e-2, atol=2e-2 * float(b_.abs().max()))
    with torch.no_grad():  # inference: the same numbers within rounding
        torch.testing.assert_close(lora_linear(x, adapted(W, b, A, B, 0.5, compute)).double(), plain.detach(),
                                   rtol=0, atol=atol)


@pytest.mark.parametrize("ranks", [(3, 3, 3), (2, 4, 3)])
def test_lora_swiglu_matches_plain(ranks):
    torch.manual_seed(0)
    d, inter = 8, 12
    x = torch.randn(2, 5, d, dtype=torch.float64, requires_grad=True)

    def weights(out, inp, r, s):
        return adapted(torch.randn(out, inp, dtype=torch.float64), None, torch.randn(r, inp, dtype=torch.float64, requires_grad=True),
                       torch.randn(out, r, dtype=torch.float64, requires_grad=True), s)

    gate, up, down = weights(inter, d, ranks[0], 0.5), weights(inter, d, ranks[1], 2.0), weights(d, inter, ranks[2], 1.5)

    def plain_linear(t, op):
        return t @ op.base.dense().T + op.scaling * (t @ op.A.T) @ op.B.T

    fast = lora_swiglu(x, gate, up, down)
    plain = plain_linear(F.silu(plain_linear(x, gate)) * plain_linear(x, up), down)
    torch.testing.assert_close(fast, plain)
    g = torch.randn_like(plain)
    inputs = [x] + [t for op in (gate, up, down) for t in (op.A, op.B)]
    torch.testing.assert_close(torch.autograd.grad(fast, inputs, g), torch.autograd.grad(plain, inputs, g))


@pytest.mark.parametrize("compute", [None, torch.float32])
def test_lora_swiglu_beside_a_bf16_base_matches_three_lora_linears(compute):
    """bf16 base (multiplied natively or in fp32), fp32 adapters (lorakit's layout): activations
    rounded to bf16 where `lora_linear` rounds them, so the same numbers within bf16 noise."""
    torch.manual_seed(0)
    d, inter, r = 16, 24, 4
    x = torch.randn(2, 5, d, dtype=torch.bfloat16, requires_grad=True)

    def weights(out, inp, s):
        return adapted(torch.randn(out, inp, dtype=torch.bfloat16) / inp**0.5, None, torch.randn(r, inp, requires_grad=True),
                       torch.randn(out, r, requires_grad=True), s, compute)

    gate, up, down = weights(inter, d, 0.5), weights(inter, d, 2.0), weights(d, inter, 1.5)
    fast = lora_swiglu(x, gate, up, down)
    plain = lora_linear(F.silu(lora_linear(x, gate)) * lora_linear(x, up), down)
    assert fast.dtype == torch.bfloat16
    torch.testing.assert_close(fast, plain, rtol=2e-2, atol=2e-2)
    g = torch.randn_like(plain)
    inputs = [x] + [t for op in (gate, up, down) for t in (op.A, op.B)]
    for a, b in zip(torch.autograd.grad(fast, inputs, g), torch.autograd.grad(plain, inputs, g)):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b, rtol=3e-2, atol=3e-2 * float(b.abs().max()))


def test_lora_swiglu_gradcheck():
    torch.manual_seed(0)
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)

    Ws = [torch.randn(6, 4, dtype=torch.float64), torch.randn(6, 4, dtype=torch.float64), torch.randn(4, 6, dtype=torch.float64)]
    ts = [torch.randn(*shape, dtype=torch.float64, requires_grad=True) for shape in ((2, 4), (6, 2), (2, 4), (6, 2), (2, 6), (4, 2))]

    def fused(x, *t):
        return lora_swiglu(x, *(adapted(W, None, t[2 * i], t[2 * i + 1], 0.7) for i, W in enumerate(Ws)))

    assert torch.autograd.gradcheck(fused, (x, *ts))


@pytest.mark.parametrize("bias", [False, True])
def test_lora_shared_input_matches_separate_layers(bias):
    """q, k, v of different widths, ranks and scalings as one node: the values and gradients of the plain expressions."""
    torch.manual_seed(0)
    d = 8
    x = torch.randn(2, 5, d, dtype=torch.float64, requires_grad=True)

    def layer(out, r, s):
        return adapted(torch.randn(out, d, dtype=torch.float64), torch.randn(out, dtype=torch.float64) if bias else None,
                       torch.randn(r, d, dtype=torch.float64, requires_grad=True),
                       torch.randn(out, r, dtype=torch.float64, requires_grad=True), s)

    def plain_one(op):
        return F.linear(x, op.base.dense(), op.base.bias) + op.scaling * (x @ op.A.T) @ op.B.T

    layers = [layer(8, 3, 0.5), layer(4, 2, 2.0), layer(4, 5, 1.5)]
    fast = lora_shared_input(x, layers)
    plain = [plain_one(op) for op in layers]
    assert len(fast) == 3
    for a, b in zip(fast, plain):
        torch.testing.assert_close(a, b)
    gs = [torch.randn_like(p) for p in plain]
    inputs = [x] + [t for op in layers for t in (op.A, op.B)]
    torch.testing.assert_close(torch.autograd.grad(fast, inputs, gs), torch.autograd.grad(plain, inputs, gs))
    # one output unused (autograd hands backward zeros for it), adapters of one layer frozen
    layers[1].A.requires_grad_(False)
    fast_k = lora_shared_input(x, layers)[0].sum()
    plain_k = plain_one(layers[0]).sum()
    inputs = [x, layers[0].A, layers[0].B]
    fast_grads = torch.autograd.grad(fast_k, inputs + [layers[2].B])
    torch.testing.assert_close(fast_grads[:3], torch.autograd.grad(plain_k, inputs))
    assert not fast_grads[3].any()


def test_lora_shared_input_forward_is_lora_linear_to_the_bit():
    """Grouped or not, with gradients or without, a projection's output is the same float32 numbers."""
    torch.manual_seed(0)
    x = torch.randn(3, 7, 32, requires_grad=True)
    layers = [adapted(torch.randn(out, 32), torch.randn(out), torch.randn(r, 32, requires_grad=True),
                      torch.randn(out, r, requires_grad=True), s) for out, r, s in ((32, 8, 2.0), (16, 2, 0.5), (16, 5, 1.0))]
    grouped = lora_shared_input(x, layers)
    with torch.no_grad():
        apart = [lora_linear(x, op) for op in layers]
    for a, b in zip(grouped, apart):
        assert torch.equal(a, b)


def test_lora_shared_input_gradcheck():
    torch.manual_seed(0)
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    Ws = [torch.randn(out, 4, dtype=torch.float64) for out in (5, 2)]
    params = [torch.randn(2, 4, dtype=torch.float64, requires_grad=True), torch.randn(5, 2, dtype=torch.float64, requires_grad=True),
              torch.randn(3, 4, dtype=torch.float64, requires_grad=True), torch.randn(2, 3, dtype=torch.float64, requires_grad=True)]
    assert torch.autograd.gradcheck(
        lambda x, a1, b1, a2, b2: lora_shared_input(x, [adapted(Ws[0], None, a1, b1, 0.7), adapted(Ws[1], None, a2, b2, 1.3)]),
        (x, *params))
