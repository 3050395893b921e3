"""TRL's SFTTrainer and DPOTrainer for lorakit models, as TRL runs PEFT models.

TRL puts its fused LM head (per-token log-probs without the full logits) on the model it is given
unless that is a `peft.PeftModel`, whose base model gets it instead. On a lorakit handle the head
has to live on the base model as well: the handle then routes its adapters and passes
`fused_lm_head=True` through. DPO's reference is the same model with its adapters disabled
(`AdapterDisabled`), as TRL does for a new PEFT adapter: no second copy of the base.
"""

from __future__ import annotations

import trl
from trl.trainer.utils import add_fused_lm_head

from ..lora.config import LoraConfig
from ..lora.layer import LoraLayer
from ..lora.peft_model import PeftModel, get_peft_model
from .reference import AdapterDisabled
from .trainer import AdapterTrainerMixin, lorakit_model

# every per-token field TRL's fused head can return: a superset of what any TRL trainer reads
_FUSED_FIELDS = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")


def _wrap(model, kwargs: dict):
    """`peft_config=lorakit.LoraConfig(...)` with a plain model: wrap it here (TRL only knows PEFT's configs)."""
    config = kwargs.get("peft_config")
    if isinstance(config, LoraConfig):
        if isinstance(model, str):
            raise ValueError("a lorakit LoraConfig needs a loaded model: pass the model object, not its name")
        kwargs["peft_config"] = None
        model = get_peft_model(model, config)
    return model


def _check_head(handle: PeftModel) -> None:
    if isinstance(handle.get_output_embeddings(), LoraLayer):
        raise ValueError("TRL computes log-probs from lm_head.weight directly, so an adapter on lm_head would never "
                         "train: remove 'lm_head' from target_modules")


def _head_on_base(handle: PeftModel) -> None:
    """Move TRL's fused head from the handle (where it cannot reach the backbone) to its base model."""
    handle.__dict__.pop("forward", None)
    add_fused_lm_head(handle.get_base_model(), outputs=_FUSED_FIELDS)


class SFTTrainer(AdapterTrainerMixin, trl.SFTTrainer):
    """trl.SFTTrainer that treats lorakit models as TRL treats PEFT ones."""

    def __init__(self, model, *args, **kwargs) -> None:
        model = _wrap(model, kwargs)
        handle = lorakit_model(model)
        if handle is not None:
            _check_head(handle)
        super().__init__(model, *args, **kwargs)
        if handle is not None:
            _head_on_base(handle)


class DPOTrainer(AdapterTrainerMixin, trl.DPOTrainer):
    """trl.DPOTrainer whose reference for a lorakit model is the model with its adapters disabled."""

    def __init__(self, model, ref_model=None, *args, **kwargs) -> None:
        model = _wrap(model, kwargs)
        handle = lorakit_model(model)
        if handle is not None:
            _check_head(handle)
            config = kwargs.get("args") if "args" in kwargs else (args[0] if args else None)
            if ref_model is None:
                if getattr(config, "sync_ref_model", False):
                    raise ValueError("sync_ref_model=True needs a separate ref_model; a lorakit model's reference is "
                                     "itself with the adapter disabled")
                ref_model = AdapterDisabled(handle)
        super().__init__(model, ref_model, *args, **kwargs)
        if handle is not None:
            _head_on_base(handle)
