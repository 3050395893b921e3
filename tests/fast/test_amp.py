"""The fast path under torch.autocast (Trainer/TRL with bf16=True): the fused kernels and the fused
loss run, with the general path's dtypes and, within bf16 rounding, its loss and gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import lorakit.bases.compute as compute
from lorakit import LoraConfig, get_peft_model
from lorakit.bases import frozen_base
from lorakit.fast.kernels import Adapted, lora_linear
from lorakit.lora.linear import Linear
from tinymodels import tiny_llama

FAST_NODES = {"_LoraLinearBackward", "_LoraSharedBackward", "_LoraSwiGLUBackward", "_LinearCrossEntropyBackward"}


def _nodes(loss: torch.Tensor) -> set[str]:
    seen, todo, names = set(), [loss.grad_fn], set()
    while todo:
        fn = todo.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        names.add(type(fn).__name__)
        todo.extend(next_fn for next_fn, _ in fn.next_functions)
    return names


def _step(fast: bool, backward_inside: bool):
    """(loss, adapter gradients, the autograd node names) of one bf16-autocast step on a tiny Llama."""
    torch.manual_seed(1)
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False)).train()
    model.fused_loss = fast
    ids = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids).loss
        if backward_inside:
            loss.backward()
    if not backward_inside:
        loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads, _nodes(loss)


@pytest.mark.parametrize("native", [False, True], ids=["emulated-bf16", "native-bf16"])
@pytest.mark.parametrize("backward_inside", [False, True], ids=["backward-after", "backward-inside"])
def test_autocast_step_takes_the_fast_path_with_the_general_paths_numbers(native, backward_inside, monkeypatch):
    # native: as on a GPU or a CPU with AMX, the frozen products run in bf16 (here simulated)
    monkeypatch.setattr(compute, "_cpu_has", lambda flags: native)
    loss, grads, nodes = _step(fast=True, backward_inside=backward_inside)
    assert FAST_NODES <= nodes  # every kernel ran, none fell back
    with monkeypatch.context() as m:
        m.setattr(Linear, "_fast_path_ok", lambda self, name: False)
        plain_loss, plain_grads, plain_nodes = _step(fast=False, backward_inside=backward_inside)
    assert not FAST_NODES & plain_nodes
    assert loss.dtype == plain_loss.dtype == torch.float32
    torch.testing.assert_close(loss, plain_loss, rtol=1e-2, atol=0)
    assert grads.keys() == plain_grads.keys() and grads
    for name, grad in grads.items():
        assert grad.dtype == torch.float32
        scale = float(plain_grads[name].abs().max())
        torch.testing.assert_close(grad, plain_grads[name], rtol=5e-2, atol=5e-2 * scale)


@pytest.mark.parametrize("native", [False, True], ids=["emulated-bf16", "native-bf16"])
def test_lora_linear_under_autocast_gives_autocasts_dtypes_and_values(native, monkeypatch):
    monkeypatch.setattr(compute, "_cpu_has", lambda flags: native)
    torch.manual_seed(0)
    layer = torch.nn.Linear(16, 24).requires_grad_(False)
    A = torch.randn(4, 16, requires_grad=True)
    B = torch.randn(24, 4, requires_grad=True)
    x = torch.randn(3, 5, 16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = lora_linear(x, Adapted(frozen_base(layer), A, B, 0.5))
        plain = layer(x) + 0.5 * F.linear(F.linear(x, A), B)
    assert out.dtype == plain.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), plain.float(), rtol=2e-2, atol=2e-2)
    grads = torch.autograd.grad(out.float().sum(), (x, A, B))
    plain_grads = torch.autograd.grad(plain.float().sum(), (x, A, B))
    for grad, expected in zip(grads, plain_grads):
        assert grad.dtype == expected.dtype == torch.float32
        torch.testing.assert_close(grad, expected, rtol=2e-2, atol=2e-2 * float(expected.abs().max()))


def test_autocast_base_view_multiplies_in_the_autocast_dtype_where_native(monkeypatch):
    from lorakit.fast.amp import base_under_autocast

    base = frozen_base(torch.nn.Linear(8, 8))
    monkeypatch.setattr(compute, "_cpu_has", lambda flags: False)
    assert base_under_autocast(base, torch.bfloat16) is base  # emulated: fp32 products, the base as it is
    monkeypatch.setattr(compute, "_cpu_has", lambda flags: True)
    view = base_under_autocast(base, torch.bfloat16)
    assert view.compute_dtype() == torch.bfloat16 and view.module is base.module
    x = torch.randn(2, 8).to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = base.module(x)
    torch.testing.assert_close(view.linear(x), expected, rtol=0, atol=0)  # autocast's own product
