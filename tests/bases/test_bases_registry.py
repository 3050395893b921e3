"""The registry: which modules LoRA adapts, the base each linear kind gets, and the one error."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lorakit import LoraConfig, get_peft_model, bases
from lorakit.bases import bnb4bit
from lorakit.bases.conv1d import Conv1DBase, conv1d_type
from lorakit.bases.dense import DenseLinear
from lorakit.bases.registry import _LINEAR
from tinymodels import tiny_llama


def test_each_kind_gets_its_base():
    assert isinstance(bases.frozen_base(nn.Linear(3, 2)), DenseLinear)
    assert isinstance(bases.frozen_base(conv1d_type()(2, 3)), Conv1DBase)
    assert bases.frozen_base(nn.Embedding(4, 2)) is None and bases.is_embedding(nn.Embedding(4, 2))
    assert bases.frozen_base(nn.Conv2d(1, 1, 1)) is None and not bases.is_adaptable(nn.Conv2d(1, 1, 1))
    assert isinstance(bases.frozen_base(nn.Linear(3, 2)), bases.FrozenBase)


def test_a_linear_subclass_is_wrapped_but_called_through_its_own_forward():
    class Scaled(nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    base = bases.frozen_base(Scaled(3, 2))
    assert isinstance(base, DenseLinear) and not base.fast


def test_the_one_error_names_module_type_and_what_is_adaptable():
    with pytest.raises(TypeError) as err:
        bases.check_adaptable("model.conv", nn.Conv2d(1, 1, 1))
    bnb = "bitsandbytes' Linear4bit, " if bnb4bit.linear4bit_type() else ""  # listed once bitsandbytes is imported
    assert str(err.value) == (
        f"cannot adapt module 'model.conv' of type Conv2d; adaptable types are {bnb}torch.nn.Linear, "
        "transformers' Conv1D, lorakit's 4-bit Linear4bit, lorakit's GGUFLinear, torch.nn.Embedding"
    )
    model = tiny_llama()
    with pytest.raises(TypeError, match="^cannot adapt module 'model.norm' of type LlamaRMSNorm; adaptable types are"):
        get_peft_model(model, LoraConfig(target_modules=["norm"]))


def test_a_registered_kind_is_tried_first_and_reaches_the_layers(monkeypatch):
    """A new base is one registration: the LoRA layer and the kernels then use it."""
    calls = []

    class Counting(DenseLinear):
        def __init__(self, module):
            super().__init__(module)
            self.fast = True  # computes what a plain nn.Linear computes

        def linear(self, x):
            calls.append("linear")
            return super().linear(x)

    class Marked(nn.Linear):
        pass

    monkeypatch.setattr("lorakit.bases.registry._LINEAR", list(_LINEAR))
    bases.register("Marked", Marked, lambda m: Counting(m), first=True)
    net = nn.Sequential(Marked(4, 4))
    model = get_peft_model(net, LoraConfig(r=2, target_modules=["0"], init_lora_weights=False))
    out = model(torch.randn(2, 4))
    assert calls == ["linear"] and out.shape == (2, 4)
    assert "Marked" in bases.adaptable_types()
