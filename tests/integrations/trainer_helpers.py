"""Shared pieces of the Trainer / TRL tests: a tiny model, arguments that keep runs short, checks."""

from __future__ import annotations

import torch

from lorakit import LoraConfig, get_peft_model

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
QUICK = dict(report_to="none", use_cpu=True, logging_steps=1, disable_tqdm=True, dataloader_num_workers=0,
             save_strategy="no", lr_scheduler_type="constant", warmup_steps=0, seed=0)


def lora(model, **kw):
    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, lora_dropout=0.0, **kw))


def snapshot(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def moved(before: dict, model) -> set[str]:
    return {n for n, p in model.named_parameters() if not torch.equal(before[n], p.detach())}


def losses(trainer) -> list[float]:
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def adapter_names(model) -> set[str]:
    return {n for n in dict(model.named_parameters()) if "lora_" in n}
