"""lorakit models in transformers.Trainer through lorakit.integrations.Trainer, PEFT as the oracle."""

from __future__ import annotations

import os

import pytest
import torch
from datasets import Dataset
from trainer_helpers import QUICK, adapter_names, lora, losses, moved, snapshot
from safetensors.torch import load_file
from tinymodels import tiny_llama
from transformers import TrainingArguments

import transformers
from lorakit.integrations import Trainer
from lorakit.lora.io import file_key

_IDS = torch.randint(0, 100, (4, 12), generator=torch.Generator().manual_seed(0))


def rows(n: int = 8) -> Dataset:
    """The same four rows over and over (a loss that can fall), with a column the model does not take."""
    ids = [_IDS[i % 4].tolist() for i in range(n)]
    return Dataset.from_dict({"input_ids": ids, "labels": ids, "note": ["unused"] * n})


def args(out, **kw) -> TrainingArguments:
    return TrainingArguments(str(out), per_device_train_batch_size=4, learning_rate=2e-2, **{**QUICK, **kw})


def test_plain_trainer_names_the_fix(tmp_path):
    with pytest.raises(TypeError, match="from lorakit.integrations import Trainer"):
        transformers.Trainer(model=lora(tiny_llama()), args=args(tmp_path, max_steps=1), train_dataset=rows())


def test_other_readers_of_accepts_loss_kwargs_get_its_value():
    import inspect

    model = lora(tiny_llama())
    assert hasattr(model, "accepts_loss_kwargs")  # only transformers' and TRL's own code gets the fix
    assert model.accepts_loss_kwargs is True  # LlamaForCausalLM.forward takes **kwargs (num_items_in_batch)
    assert dict(inspect.getmembers(model))["accepts_loss_kwargs"] is model.accepts_loss_kwargs


def test_trains_the_adapter_only_and_peft_loads_what_it_saves(tmp_path):
    model = lora(tiny_llama())
    before = snapshot(model)
    trainer = Trainer(model=model, args=args(tmp_path, max_steps=6), train_dataset=rows(24))
    trainer.train()  # the unused "note" column is pruned: the batch reaches the model
    curve = losses(trainer)
    assert curve[-1] < curve[0] - 0.05
    assert moved(before, model) == adapter_names(model)

    trainer.save_model(str(tmp_path / "final"))
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(os.listdir(tmp_path / "final"))
    assert not {"model.safetensors", "pytorch_model.bin"} & set(os.listdir(tmp_path / "final"))

    peft = pytest.importorskip("peft")
    reference = peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "final")).eval()
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(_IDS).logits, reference(_IDS).logits, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(model(_IDS).logits, tiny_llama()(_IDS).logits, atol=1e-3)


def test_checkpoints_hold_the_adapter_and_resume_continues_the_run(tmp_path):
    straight = lora(tiny_llama())
    Trainer(model=straight, args=args(tmp_path / "a", max_steps=4, save_strategy="steps", save_steps=2),
            train_dataset=rows(16)).train()
    checkpoint = tmp_path / "a" / "checkpoint-2"
    files = set(os.listdir(checkpoint))
    assert {"adapter_model.safetensors", "adapter_config.json", "optimizer.pt", "trainer_state.json"} <= files
    assert "model.safetensors" not in files

    base = tiny_llama()
    torch.manual_seed(123)
    resumed = lora(base)  # another initial adapter: only what the checkpoint restores can match
    trainer = Trainer(model=resumed, args=args(tmp_path / "b", max_steps=4), train_dataset=rows(16))
    with pytest.raises(AssertionError):
        _assert_same_adapter(straight, resumed)
    trainer.train(resume_from_checkpoint=str(checkpoint))
    assert trainer.state.global_step == 4
    _assert_same_adapter(straight, resumed)


def _assert_same_adapter(a, b) -> None:
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    for name in adapter_names(a):
        torch.testing.assert_close(pa[name], pb[name], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("reentrant", [True, False])
def test_gradient_checkpointing_with_frozen_embeddings(tmp_path, reentrant):
    plain, checkpointed = lora(tiny_llama()), lora(tiny_llama())
    assert not plain.get_input_embeddings().weight.requires_grad
    Trainer(model=plain, args=args(tmp_path / "p", max_steps=2), train_dataset=rows()).train()
    gc = dict(gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    trainer = Trainer(model=checkpointed, args=args(tmp_path / "c", max_steps=2, **gc), train_dataset=rows())
    calls = []
    checkpointed.get_base_model().model.layers[0].mlp.register_forward_pre_hook(lambda *_: calls.append(1))
    trainer.train()
    assert len(calls) == 4  # two steps, each block run again in backward
    _assert_same_adapter(plain, checkpointed)  # the same steps, recomputing activations in backward


def test_mixed_precision_trains(tmp_path):
    """bf16=True runs the step under autocast: the layers and the loss keep their fast paths (tests/fast/test_amp.py)."""
    model = lora(tiny_llama())
    before = snapshot(model)
    trainer = Trainer(model=model, args=args(tmp_path, max_steps=4, bf16=True), train_dataset=rows(16))
    trainer.train()
    curve = losses(trainer)
    assert curve[-1] < curve[0] - 0.02
    assert moved(before, model) == adapter_names(model)


def test_evaluation_gets_the_loss_and_the_logits(tmp_path):
    """Label names come from the base model's class (eval loss), and eval calls return logits (no fused loss)."""
    model = lora(tiny_llama())
    trainer = Trainer(model=model, args=args(tmp_path, max_steps=1), eval_dataset=rows(4))
    assert trainer.label_names == ["labels"]
    metrics = trainer.evaluate()
    model.eval()
    with torch.no_grad():
        expected = model(input_ids=_IDS, labels=_IDS).loss.item()
    assert metrics["eval_loss"] == pytest.approx(expected, rel=1e-5)
    prediction = trainer.predict(rows(4))
    assert prediction.predictions.shape == (4, 12, 100)


def test_load_best_model_at_end_restores_the_best_adapter(tmp_path):
    model = lora(tiny_llama())
    best = dict(eval_strategy="steps", eval_steps=1, save_strategy="steps", save_steps=1, load_best_model_at_end=True,
                metric_for_best_model="loss", greater_is_better=True)  # "best" = the worst eval loss: checkpoint-1
    trainer = Trainer(model=model, args=args(tmp_path, max_steps=3, **best), train_dataset=rows(12),
                      eval_dataset=rows(4))
    trainer.train()
    assert trainer.state.best_model_checkpoint.endswith("checkpoint-1")
    saved = load_file(os.path.join(trainer.state.best_model_checkpoint, "adapter_model.safetensors"))
    state = model.base_model.adapter_state("default")
    assert saved.keys() == {file_key(k, "default") for k in state}
    for key, value in state.items():
        torch.testing.assert_close(value.detach(), saved[file_key(key, "default")], rtol=0, atol=0)
