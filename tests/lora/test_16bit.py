"""16-bit bases against PEFT on the same settings: adapter dtypes, logits, a training step, merges."""

from __future__ import annotations

import peft
import pytest
import torch

from lorakit import LoraConfig, get_peft_model
from lorakit.bases import compute
from tinymodels import tiny_llama

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
DTYPES = [torch.bfloat16, torch.float16]


def _pair(dtype, autocast=True):
    """(lorakit model, PEFT model) on two copies of one tiny Llama in `dtype`, same adapter weights."""
    ours = get_peft_model(tiny_llama().to(dtype), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS,
                                                              init_lora_weights=False), autocast_adapter_dtype=autocast)
    theirs = peft.get_peft_model(tiny_llama().to(dtype), peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS,
                                                                         init_lora_weights=False),
                                 autocast_adapter_dtype=autocast)
    state = {k: v for k, v in ours.state_dict().items() if "lora_" in k}
    missing = theirs.load_state_dict(state, strict=False)
    assert not missing.unexpected_keys
    return ours, theirs


@pytest.fixture(params=["native", "fp32-products"])
def products(request, monkeypatch):
    """Both ways a CPU multiplies 16-bit weights: natively, or in fp32 where it only emulates them."""
    monkeypatch.setattr(compute, "_cpu_has", lambda flags: request.param == "native")
    return request.param


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("autocast", [True, False])
def test_adapters_live_where_peft_puts_them(dtype, autocast):
    ours, theirs = _pair(dtype, autocast)
    ours_dtypes = {n: p.dtype for n, p in ours.named_parameters() if "lora_" in n}
    theirs_dtypes = {n: p.dtype for n, p in theirs.named_parameters() if "lora_" in n}
    assert ours_dtypes == theirs_dtypes and set(ours_dtypes.values()) == {torch.float32 if autocast else dtype}


@pytest.mark.parametrize("dtype", DTYPES)
def test_logits_and_a_training_step_match_peft(dtype, products):
    ours, theirs = _pair(dtype)
    ids = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(0))
    ours.train(), theirs.train()
    loss_ours = ours(input_ids=ids, labels=ids).loss
    loss_theirs = theirs(input_ids=ids, labels=ids).loss
    assert loss_ours.dtype == loss_theirs.dtype
    assert abs(float(loss_ours) - float(loss_theirs)) <= 1e-2 * abs(float(loss_theirs))
    loss_ours.backward(), loss_theirs.backward()
    grads_ours = {n: p.grad for n, p in ours.named_parameters() if p.requires_grad}
    grads_theirs = {n: p.grad for n, p in theirs.named_parameters() if p.requires_grad}
    assert grads_ours.keys() == grads_theirs.keys() and len(grads_ours) == 28
    for name, grad in grads_ours.items():
        assert grad.dtype == torch.float32
        reference = grads_theirs[name].float()
        scale = float(reference.abs().max())
        torch.testing.assert_close(grad, reference, rtol=0.1, atol=0.1 * scale, msg=name)


@pytest.mark.parametrize("dtype", DTYPES)
def test_merge_adds_in_fp32_and_rounds_once(dtype):
    ours, _ = _pair(dtype)
    layer = ours.base_model.model.model.layers[0].self_attn.q_proj
    before = layer.base_layer.weight.detach().clone()
    expected = (before.float() + layer.get_delta_weight("default").float()).to(dtype)
    merged = ours.merge_and_unload()
    assert torch.equal(merged.model.layers[0].self_attn.q_proj.weight, expected)
    assert merged.model.layers[0].self_attn.q_proj.weight.dtype == dtype
