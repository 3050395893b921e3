"""frozen_matmul_precision: the frozen weights' products run at the level asked for, nothing else does."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from lorakit import LoraConfig, frozen_matmul_precision, get_peft_model
from lorakit.fast.loss import causal_lm_loss
from lorakit.fast.precision import frozen_level, products
from tinymodels import tiny_llama

PRODUCTS = {"mm", "addmm", "addmm_", "bmm", "baddbmm", "baddbmm_"}


class MatmulPrecisions(TorchDispatchMode):
    """Records (reads a frozen weight?, torch's matmul precision) for every matrix product."""

    def __init__(self, frozen_ptrs: set[int]) -> None:
        super().__init__()
        self.frozen, self.seen = frozen_ptrs, []
        self.attention: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in PRODUCTS:
            frozen = any(isinstance(a, torch.Tensor) and a.data_ptr() in self.frozen for a in args)
            self.seen.append((frozen, torch.get_float32_matmul_precision()))
        elif "scaled_dot_product" in name:
            self.attention.append(torch.get_float32_matmul_precision())
        return func(*args, **(kwargs or {}))


def _batch():
    ids = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def _model():
    return get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False)).train()


def test_frozen_products_run_at_the_level_and_everything_else_exact():
    model = _model()
    frozen = {p.data_ptr() for p in model.parameters() if not p.requires_grad and p.dim() == 2}
    mode = MatmulPrecisions(frozen)
    with mode:
        with frozen_matmul_precision("medium"):
            loss, _ = causal_lm_loss(model, _batch())
        loss.backward()  # outside the block: each node keeps the level its forward ran at
    kinds = {frozen for frozen, _ in mode.seen}
    assert kinds == {True, False}  # the base's and the head's products, and the adapters' own
    assert all(level == ("medium" if frozen else "highest") for frozen, level in mode.seen)
    assert mode.attention and set(mode.attention) == {"highest"}
    assert torch.get_float32_matmul_precision() == "highest"  # restored after each product
    n_frozen = sum(frozen for frozen, _ in mode.seen)
    # 2 layers x 7 projections forward and backward, the head forward and backward (one chunk),
    # but no input gradient for the first q/k/v: their input comes from the frozen embedding
    assert n_frozen == 2 * 7 * 2 + 2 - 3


def test_default_leaves_every_product_exact():
    model = _model()
    mode = MatmulPrecisions({p.data_ptr() for p in model.parameters() if not p.requires_grad})
    with mode:
        causal_lm_loss(model, _batch())[0].backward()
    assert mode.seen and {level for _, level in mode.seen} == {"highest"}


def test_medium_numbers_stay_close_to_exact():
    def run(level):
        model = _model()
        with frozen_matmul_precision(level):
            loss, _ = causal_lm_loss(model, _batch())
        loss.backward()
        return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    exact_loss, exact = run("highest")
    loss, grads = run("medium")  # bf16 operands where the CPU has AMX, otherwise exact
    torch.testing.assert_close(loss, exact_loss, rtol=5e-3, atol=0)
    for name, grad in grads.items():
        scale = float(exact[name].abs().max())
        torch.testing.assert_close(grad, exact[name], rtol=5e-2, atol=2e-2 * scale)


def test_only_fp32_products_of_frozen_weights_are_reduced():
    with frozen_matmul_precision("medium"):
        assert frozen_level(torch.float32) == "medium"
        assert frozen_level(torch.bfloat16) == "highest"
        assert frozen_level(None) == "highest"  # bases of different compute dtypes
    assert frozen_level(torch.float32) == "highest"
    # a base weight that trains is not frozen: its layer leaves the fast path altogether
    from lorakit import LoraConfig, get_peft_model
    from tinymodels import tiny_llama

    layer = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"])).base_model.model.model.layers[0].self_attn.q_proj
    assert layer.call_plan() is not None
    layer.base_layer.weight.requires_grad_(True)
    assert layer.call_plan() is None


def test_levels_nest_are_checked_and_restore_on_errors():
    with pytest.raises(ValueError, match="^frozen_matmul_precision: 'low' is not one of highest, high, medium$"):
        with frozen_matmul_precision("low"):
            pass
    frozen = torch.float32
    with frozen_matmul_precision("medium"):
        with frozen_matmul_precision("high"):
            assert frozen_level(frozen) == "high"
        assert frozen_level(frozen) == "medium"
        with pytest.raises(RuntimeError), products("medium"):
            assert torch.get_float32_matmul_precision() == "medium"
            raise RuntimeError("inside a product")
        assert torch.get_float32_matmul_precision() == "highest"
    assert frozen_level(frozen) == "highest"
