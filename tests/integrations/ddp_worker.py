"""Started by torchrun in test_integrations_ddp.py: lorakit.integrations.Trainer on 2 processes (gloo)."""

from __future__ import annotations

import sys

import torch
from datasets import Dataset
from trainer_helpers import QUICK, lora
from tinymodels import tiny_llama
from transformers import TrainingArguments

from lorakit.integrations import Trainer

IDS = torch.randint(0, 100, (1, 12), generator=torch.Generator().manual_seed(0))[0].tolist()


def train(out: str, batch: int) -> None:
    rows = Dataset.from_dict({"input_ids": [IDS] * 8, "labels": [IDS] * 8})  # any split gives the same batches
    args = TrainingArguments(out, per_device_train_batch_size=batch, learning_rate=2e-2, max_steps=2,
                             **{**QUICK, "save_strategy": "steps", "save_steps": 2})
    trainer = Trainer(model=lora(tiny_llama()), args=args, train_dataset=rows)
    trainer.train()
    trainer.save_model(out + "/final")


if __name__ == "__main__":
    train(sys.argv[1], int(sys.argv[2]))
