"""What transformers' Trainer does for PEFT models, for lorakit's PeftModel.

Trainer's PEFT branches test `isinstance(model, peft.PeftModel)`; the mixin overrides the methods
that hold them: saving (the adapter only, PEFT's layout), resuming and loading the best checkpoint
(the adapter's weights replaced in place, so the optimizer keeps its parameters), and the label
names read from the base model. Anything that is not a lorakit model takes Trainer's own path.
"""

from __future__ import annotations

import inspect
import os

import torch
import transformers
from transformers.utils import can_return_loss, find_labels

from ..lora.io import WEIGHTS_NAME
from ..lora.peft_model import PeftModel, known_trainer

TRAINING_ARGS_NAME = "training_args.bin"  # transformers' name for the pickled TrainingArguments


def lorakit_model(model) -> PeftModel | None:
    """The lorakit PeftModel inside `model` (DDP, torch.compile or accelerate wrappers), if any."""
    while not isinstance(model, PeftModel):
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if inner is None:
            return None
        model = inner
    return model


class AdapterTrainerMixin:
    """Put first in the bases of a transformers.Trainer subclass (see Trainer, SFTTrainer, DPOTrainer)."""

    def __init__(self, *args, **kwargs) -> None:
        with known_trainer():
            super().__init__(*args, **kwargs)
        handle = lorakit_model(self.model)
        if handle is not None:
            # Trainer reads these from the model's class; a PEFT model's come from the base model's
            base_class = type(handle.get_base_model())
            if self.args.label_names is None:
                self.label_names = find_labels(base_class)
            self.can_return_loss = can_return_loss(base_class)

    def _lorakit(self) -> PeftModel | None:
        return lorakit_model(self.model)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        handle = self._lorakit()
        if handle is None:
            return super()._save(output_dir, state_dict)
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        handle.save_pretrained(output_dir)  # adapter_model.safetensors + adapter_config.json
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        handle = lorakit_model(model if model is not None else self.model)
        if handle is None:
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        _restore_adapters(handle, resume_from_checkpoint)

    def _load_best_model(self) -> None:
        handle = self._lorakit()
        if handle is None:
            return super()._load_best_model()
        _restore_adapters(handle, self.state.best_model_checkpoint)


def _restore_adapters(handle: PeftModel, directory: str) -> None:
    """Replace the weights of the handle's adapters with those saved in `directory` (its first
    adapter at the root, the others in sub-folders by name: save_pretrained's layout)."""
    if not os.path.isfile(os.path.join(directory, WEIGHTS_NAME)):
        raise FileNotFoundError(f"no {WEIGHTS_NAME} in checkpoint {directory}: not a lorakit/PEFT adapter checkpoint")
    root = handle._owned[0]
    trainable = set(handle.active_adapters)
    for name in handle._owned:
        path = directory if name == root else os.path.join(directory, name)
        if os.path.isfile(os.path.join(path, WEIGHTS_NAME)):
            handle.load_adapter(path, name, is_trainable=name in trainable)


class Trainer(AdapterTrainerMixin, transformers.Trainer):
    """transformers.Trainer that treats lorakit models as transformers treats PEFT ones."""

    def _set_signature_columns_if_needed(self) -> None:
        handle = self._lorakit()
        if self._signature_columns is None and handle is not None:
            # PEFT models' columns: the arguments of the base model's forward
            columns = list(inspect.signature(handle.get_base_model().forward).parameters)
            self._signature_columns = list(dict.fromkeys([*columns, "label", "label_ids", *self.label_names]))
        super()._set_signature_columns_if_needed()
