"""models.kbit: prepare_model_for_kbit_training against PEFT's, on lorakit's and bitsandbytes' 4-bit
tiny Llamas, then LoRA training with gradient checkpointing (reentrant and not)."""

from __future__ import annotations

import peft
import pytest
import torch
from torch import nn

import lorakit
from bnbmodels import BNB_WARNINGS, TARGETS, bnb_llama, lora_state, randomize_adapters, save_llama
from lorakit import LoraConfig, QuantConfig, get_peft_model, prepare_model_for_kbit_training, quantize_model
from lorakit.bases.linear4bit import Linear4bit
from lorakit.models.kbit import inputs_require_grad
from tinymodels import tiny_llama

bnb = pytest.importorskip("bitsandbytes")
pytestmark = [*BNB_WARNINGS, pytest.mark.filterwarnings("ignore:`gradient_checkpointing_enable` is deprecated:FutureWarning")]

IDS = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def bf16_dir(tmp_path_factory):
    return save_llama(tmp_path_factory.mktemp("llama-bf16"), torch.bfloat16)


def lorakit_4bit(dtype=torch.bfloat16, compute_dtype=torch.float32) -> nn.Module:
    return quantize_model(tiny_llama().to(dtype), QuantConfig(compute_dtype=compute_dtype))


def checkpointing(model: nn.Module) -> bool:
    return model.is_activation_checkpointing if hasattr(model, "is_activation_checkpointing") else model.is_gradient_checkpointing


def dtypes(model: nn.Module) -> dict[str, torch.dtype]:
    return {n: p.dtype for n, p in model.named_parameters()}


def test_it_is_exported_under_peft_name_and_arguments():
    import inspect

    assert lorakit.prepare_model_for_kbit_training is prepare_model_for_kbit_training
    ours = list(inspect.signature(prepare_model_for_kbit_training).parameters)
    theirs = list(inspect.signature(peft.prepare_model_for_kbit_training).parameters)
    assert ours[: len(theirs)] == theirs and ours[len(theirs):] == ["upcast"]


def test_on_bitsandbytes_it_does_what_peft_does_but_keeps_dtypes(bf16_dir):
    ours = prepare_model_for_kbit_training(bnb_llama(bf16_dir, dtype=torch.bfloat16))
    theirs = peft.prepare_model_for_kbit_training(bnb_llama(bf16_dir, dtype=torch.bfloat16))
    assert not any(p.requires_grad for p in ours.parameters()) and not any(p.requires_grad for p in theirs.parameters())
    assert checkpointing(ours) and checkpointing(theirs)
    # PEFT: the embeddings, norms and head in fp32; ours kept in bf16; the 4-bit codes untouched by both
    assert theirs.model.embed_tokens.weight.dtype == theirs.lm_head.weight.dtype == torch.float32
    assert {dtypes(ours)[n] for n in ("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight")} == {torch.bfloat16}
    assert all(type(p) is bnb.nn.Params4bit for n, p in ours.named_parameters() if p.dtype == torch.uint8)
    upcast = prepare_model_for_kbit_training(bnb_llama(bf16_dir, dtype=torch.bfloat16), upcast=True)
    assert dtypes(upcast) == dtypes(theirs)


def test_on_lorakit_4bit_it_freezes_checkpoints_and_keeps_dtypes():
    model = lorakit_4bit()
    before = dtypes(model)
    out = prepare_model_for_kbit_training(model)
    assert out is model and checkpointing(model) and not any(p.requires_grad for p in model.parameters())
    assert dtypes(model) == before and set(before.values()) == {torch.bfloat16}
    upcast = prepare_model_for_kbit_training(lorakit_4bit(), upcast=True)
    assert set(dtypes(upcast).values()) == {torch.float32}
    assert all(m.weight.dtype == torch.uint8 and m.weight_dtype == torch.bfloat16
               for m in upcast.modules() if isinstance(m, Linear4bit))


def test_the_callers_kwargs_are_not_changed_and_bad_models_fail_first():
    kwargs = {"use_reentrant": False}
    prepare_model_for_kbit_training(lorakit_4bit(), gradient_checkpointing_kwargs=kwargs)
    assert kwargs == {"use_reentrant": False}
    plain = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(ValueError, match=r"^prepare_model_for_kbit_training: Sequential has no gradient checkpointing "
                                         r"\(gradient_checkpointing_enable\); pass use_gradient_checkpointing=False$"):
        prepare_model_for_kbit_training(plain)
    assert all(p.requires_grad for p in plain.parameters())  # untouched
    prepare_model_for_kbit_training(plain, use_gradient_checkpointing=False)
    assert not any(p.requires_grad for p in plain.parameters())


# -- LoRA training with gradient checkpointing after it --------------------------------------------
def bases(kind: str, bf16_dir):
    """Two identical 4-bit tiny Llamas of one kind (bf16 storage, fp32 compute)."""
    if kind == "bnb":
        return [bnb_llama(bf16_dir, dtype=torch.bfloat16) for _ in range(2)]
    return [lorakit_4bit() for _ in range(2)]


def step_grads(model: nn.Module) -> tuple[float, dict[str, torch.Tensor]]:
    model.train()
    loss = model(input_ids=IDS, labels=IDS).loss
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("kind", ["lorakit", "bnb"])
@pytest.mark.parametrize("reentrant", [True, False])
def test_lora_trains_with_gradient_checkpointing_as_without(kind, reentrant, bf16_dir):
    plain, checked = bases(kind, bf16_dir)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS)
    reference = get_peft_model(prepare_model_for_kbit_training(plain, use_gradient_checkpointing=False), config)
    model = get_peft_model(prepare_model_for_kbit_training(
        checked, gradient_checkpointing_kwargs={"use_reentrant": reentrant}), config)
    assert checkpointing(model.base_model.model)
    randomize_adapters(reference)
    model.load_state_dict(lora_state(reference), strict=False)
    loss_ref, grads_ref = step_grads(reference)
    loss, grads = step_grads(model)  # no "element 0 of tensors does not require grad"
    assert loss == pytest.approx(loss_ref, rel=1e-5)
    assert grads.keys() == grads_ref.keys() and len(grads) == 28 and all("lora_" in n for n in grads)
    for name, g in grads.items():
        torch.testing.assert_close(g, grads_ref[name], rtol=1e-4, atol=1e-6, msg=name)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    opt.step()
    assert step_grads(model)[0] < loss  # the step lowered the loss on the same batch


@pytest.mark.filterwarnings("ignore:None of the inputs have requires_grad=True:UserWarning")
def test_reentrant_checkpointing_needs_the_embeddings_output_to_require_grad():
    model = prepare_model_for_kbit_training(lorakit_4bit())  # reentrant, PEFT's default
    model.disable_input_require_grads()  # as if nothing had hooked the frozen embeddings
    lora = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    with pytest.raises(RuntimeError, match="does not require grad"):
        step_grads(lora)
    inputs_require_grad(model)
    assert len(step_grads(lora)[1]) == 28
