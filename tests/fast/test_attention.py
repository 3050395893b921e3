"""Attention in the compute dtype: a 16-bit model on an emulating CPU attends in fp32, others untouched."""

from __future__ import annotations

import pytest
import torch

from lorakit import LoraConfig, get_peft_model
from lorakit.bases import compute
from lorakit.fast import attention
from tinymodels import tiny_llama


def _model(dtype, fuse=True):
    return get_peft_model(tiny_llama().to(dtype), LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                             init_lora_weights=False), fuse=fuse).train()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_emulated_16bit_attention_runs_in_fp32_with_the_same_results(dtype, monkeypatch):
    monkeypatch.setattr(compute, "_cpu_has", lambda flags: False)
    calls = []
    real = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda q, *a, **k: calls.append(q.dtype) or real(q, *a, **k))
    ids = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(0))
    ours, plain = _model(dtype), _model(dtype, fuse=False)
    assert ours.base_model.model.config._attn_implementation == attention.NAME
    assert plain.base_model.model.config._attn_implementation == "sdpa"
    out = ours(input_ids=ids).logits
    assert set(calls) == {torch.float32} and out.dtype == dtype
    calls.clear()
    expected = plain(input_ids=ids).logits
    assert set(calls) == {dtype}
    torch.testing.assert_close(out.float(), expected.float(), rtol=3e-2, atol=3e-2)
    g_ours = torch.autograd.grad(out.float().square().mean(), [p for p in ours.parameters() if p.requires_grad])
    g_plain = torch.autograd.grad(expected.float().square().mean(), [p for p in plain.parameters() if p.requires_grad])
    for a, b in zip(g_ours, g_plain):
        torch.testing.assert_close(a, b, rtol=0.1, atol=0.1 * float(b.abs().max()))
    base = ours.unload()
    assert base.config._attn_implementation == "sdpa"


def test_native_or_fp32_models_keep_their_attention(monkeypatch):
    monkeypatch.setattr(compute, "_cpu_has", lambda flags: True)
    assert _model(torch.bfloat16).base_model.model.config._attn_implementation == "sdpa"
    monkeypatch.setattr(compute, "_cpu_has", lambda flags: False)
    assert _model(torch.float32).base_model.model.config._attn_implementation == "sdpa"


def _saved_bytes(model, ids) -> int:
    seen: dict[int, int] = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids).logits.float().sum()
    return sum(n for ptr, n in seen.items() if ptr not in params)


def test_fp32_attention_keeps_only_16bit_inputs_for_backward(monkeypatch):
    """Upcast attention keeps q, k, v in bf16 and recomputes: no more than native bf16 attention keeps."""
    ids = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(0))
    monkeypatch.setattr(compute, "_cpu_has", lambda flags: True)
    native = _saved_bytes(_model(torch.bfloat16), ids)
    monkeypatch.setattr(compute, "_cpu_has", lambda flags: False)
    upcast_model = _model(torch.bfloat16)
    assert upcast_model.base_model.model.config._attn_implementation == attention.NAME
    assert _saved_bytes(upcast_model, ids) <= native
