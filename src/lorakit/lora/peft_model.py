"""PeftModel: a handle that behaves like the base model with its own adapter(s), PEFT's public API.

Several handles may share one base model (and one LoraModel): each handle passes its adapter
with every call (see routing.py), so handles never disturb each other, even across threads.
"""

from __future__ import annotations

import inspect
import os
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import torch
from torch import nn

from ..bases.registry import uncounted_weight_elements
from ..fast import allocator
from ..fast.loss import fused_output
from .config import LoraConfig
from .io import WEIGHTS_NAME, file_key, load_adapter_weights, save_tensors
from .model import OWNER_ATTR, LoraModel, owner_of
from .names import adapter_name_for
from .routing import BASE, current_route, per_row_adapters, use_adapters


class PeftModel(nn.Module):
    """The base model with LoRA adapters; `forward`, `generate` and attributes pass through."""

    def __init__(self, model: nn.Module, peft_config: LoraConfig, adapter_name: str = "default",
                 autocast_adapter_dtype: bool = True, fuse: bool = True) -> None:
        super().__init__()
        self.base_model = LoraModel(model, peft_config, adapter_name, autocast_adapter_dtype, fuse)
        self.training = model.training
        self._adapters = [adapter_name]  # what this handle runs
        self._owned = [adapter_name]  # what this handle saves; the first goes at the root

    @classmethod
    def _handle(cls, lora_model: LoraModel, adapter_name: str) -> "PeftModel":
        handle = cls.__new__(cls)
        nn.Module.__init__(handle)
        handle.base_model = lora_model
        handle.training = lora_model.model.training
        handle._adapters = [adapter_name]
        handle._owned = [adapter_name]
        return handle

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self.base_model, name)

    def get_base_model(self) -> nn.Module:
        """The model the adapters live in (its layers wrapped in place), as PEFT's `get_base_model`."""
        return self.base_model.model

    @property
    def accepts_loss_kwargs(self) -> bool:
        """Whether the base model's forward takes Trainer's loss arguments (`num_items_in_batch`).

        transformers' Trainer reads this when it starts; it is also the one place where a plain
        `transformers.Trainer` (or TRL trainer) meets a lorakit model, which it cannot save or resume
        (it looks for `peft.PeftModel`): read from transformers' or TRL's own code outside
        lorakit.integrations' trainers, it raises the one-line fix. Any other reader (hasattr,
        inspect.getmembers) gets the value."""
        if not _KNOWN_TRAINER.get() and _read_by_trainer(sys._getframe(1)):
            raise TypeError(
                "transformers' Trainer and TRL's trainers treat a lorakit model as a plain model (it would save "
                "the whole model, not the adapter): use `from lorakit.integrations import Trainer` "
                "(or SFTTrainer, DPOTrainer)"
            )
        base = self.get_base_model()
        if hasattr(base, "accepts_loss_kwargs"):
            return bool(base.accepts_loss_kwargs)
        params = inspect.signature(base.forward).parameters.values()
        return any(p.kind == inspect.Parameter.VAR_KEYWORD for p in params)

    # -- state --------------------------------------------------------------------------------
    @property
    def peft_config(self) -> dict[str, LoraConfig]:
        return self.base_model.peft_config

    @property
    def active_adapter(self) -> str:
        return self._adapters[0]

    @property
    def active_adapters(self) -> list[str]:
        return list(self._adapters)

    def set_adapter(self, adapter_name: str | Sequence[str]) -> None:
        self.base_model.set_adapter(adapter_name)
        self._adapters = list(self.base_model.active_adapters)

    def add_adapter(self, adapter_name: str, peft_config: LoraConfig) -> None:
        self.base_model.add_adapter(adapter_name, peft_config)
        self._owned.append(adapter_name)

    def delete_adapter(self, adapter_name: str) -> None:
        self.base_model.delete_adapter(adapter_name)
        self._owned = [a for a in self._owned if a != adapter_name]
        if adapter_name in self._adapters:
            self._adapters = [a for a in self._adapters if a != adapter_name] or list(self.base_model.active_adapters)

    # -- running ------------------------------------------------------------------------------
    @contextmanager
    def adapter_scope(self, adapter_names: Sequence[str] | None = None, expand: int = 1) -> Iterator[None]:
        """Calls to the base model inside the block use this handle's adapters (or one per row)."""
        outer = current_route()
        if outer is not None and outer.disabled:
            yield
            return
        if adapter_names is None:
            with use_adapters(self._adapters):
                yield
            return
        unknown = [n for n in adapter_names if n != BASE and n not in self.peft_config]
        if unknown:
            raise ValueError(f"unknown adapter {unknown[0]!r} in adapter_names; loaded: {', '.join(self.peft_config)}")
        if self.base_model.model.training:
            raise ValueError("adapter_names (mixed-adapter batches) is for inference; call model.eval() first")
        rows = [n for n in adapter_names for _ in range(expand)]
        with per_row_adapters(rows):
            yield

    # In training, `model(input_ids, labels=...)` takes the fused head + loss (`fast.loss`): the same
    # loss without the (tokens, vocab) logits, whose `logits` is then None. False: transformers' own.
    fused_loss = True
    # The first training forward on a CPU sets up the CPU caching allocator, as `lorakit train` does
    # (`fast.allocator`: process-wide, for the rest of the process). False, or LORAKIT_CPU_ALLOCATOR=0
    # in the environment: torch's own allocator.
    cpu_allocator = True

    def forward(self, *args, adapter_names: Sequence[str] | None = None, **kwargs):
        if adapter_names is not None:
            _check_rows(adapter_names, args, kwargs)
        model = self.base_model.model
        if self.cpu_allocator and model.training and not allocator.cpu_training_prepared() and torch.is_grad_enabled():
            _prepare_cpu_training(model, args, kwargs)
        with self.adapter_scope(adapter_names):
            if self.fused_loss and len(args) <= 1 and adapter_names is None and "labels" in kwargs:
                out = fused_output(model, {**dict(zip(("input_ids",), args)), **kwargs})
                if out is not None:
                    return out
            return model(*args, **kwargs)

    def generate(self, *args, adapter_names: Sequence[str] | None = None, **kwargs):
        model = self.base_model.model
        if adapter_names is None:
            with self.adapter_scope():
                return model.generate(*args, **kwargs)
        _check_rows(adapter_names, args, kwargs)
        expand = _generation_expansion(model, kwargs)
        order = _grouping_order(model, adapter_names, kwargs)
        if order is None:
            with self.adapter_scope(adapter_names, expand):
                return model.generate(*args, **kwargs)
        # each adapter's rows side by side, so that the layers skip their gathers; then back in order
        n = len(adapter_names)
        with self.adapter_scope([adapter_names[i] for i in order], expand):
            out = model.generate(*_take_rows(args, order, n), **_take_rows(kwargs, order, n))
        return out.index_select(0, _restore_order(order, out.shape[0] // n).to(out.device))

    @contextmanager
    def disable_adapter(self) -> Iterator[None]:
        with self.base_model.disable_adapter():
            yield

    # -- counting -----------------------------------------------------------------------------
    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        trainable = total = 0
        for _, p in self.named_parameters():
            total += p.numel()
            if p.requires_grad:
                trainable += p.numel()
        total += uncounted_weight_elements(self)  # packed weights (4-bit, GGUF) at their logical size
        return trainable, total

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(
            f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}"
        )

    # -- merging ------------------------------------------------------------------------------
    def merge_adapter(self, adapter_names: Sequence[str] | None = None, safe_merge: bool = False) -> None:
        self.base_model.merge_adapter(adapter_names or self._adapters, safe_merge=safe_merge)

    def unmerge_adapter(self) -> None:
        self.base_model.unmerge_adapter()

    def _shared(self) -> bool:
        return any(name not in self._owned for name in self.peft_config)

    def merge_and_unload(
        self, progressbar: bool = False, safe_merge: bool = False, adapter_names: Sequence[str] | None = None, *,
        dtype: torch.dtype | str | None = None, requantize: bool = False,
    ) -> nn.Module:
        """Merge this handle's adapter(s) and return a plain model.

        On a base that only this handle uses, the base is merged in place (PEFT's behaviour, no copy).
        On a base shared with other handles, the merge happens on a copy: the shared base and the
        other handles keep working unchanged. lorakit's own keywords, for 4-bit bases (merged onto
        their de-quantized weights): `dtype` of the layers that come back dense, `requantize=True`
        to quantize the merged ones again (LoraModel.merge_and_unload).
        """
        names = list(adapter_names) if adapter_names is not None else list(self._adapters)
        owner = self.base_model if not self._shared() else _detached_copy(self.base_model)
        return owner.merge_and_unload(progressbar, safe_merge, names, dtype=dtype, requantize=requantize)

    def unload(self) -> nn.Module:
        if self._shared():
            raise ValueError("unload() would strip the adapters of other handles sharing this base model")
        return self.base_model.unload()

    def add_weighted_adapter(self, adapters, weights, adapter_name, combination_type="svd", svd_rank=None, svd_clamp=None):
        self.base_model.add_weighted_adapter(adapters, weights, adapter_name, combination_type, svd_rank, svd_clamp)
        self._owned.append(adapter_name)

    # -- files --------------------------------------------------------------------------------
    def save_pretrained(
        self, save_directory: str | os.PathLike, selected_adapters: Sequence[str] | None = None, **_: Any
    ) -> None:
        """PEFT's layout: the handle's first adapter at the root, any others in sub-folders by name."""
        names = list(selected_adapters) if selected_adapters is not None else list(self._owned)
        if os.path.isfile(save_directory):
            raise ValueError(f"{save_directory} is a file, not a directory")
        for name in names:
            self.base_model._check_name(name)
            root = name == self._owned[0] or (name == "default" and self._owned[0] not in names)
            directory = save_directory if root else os.path.join(save_directory, name)
            tensors = {file_key(k, name): v for k, v in self.base_model.adapter_state(name).items()}
            config = self.peft_config[name]
            os.makedirs(directory, exist_ok=True)
            save_tensors(tensors, os.path.join(directory, WEIGHTS_NAME))
            saved = LoraConfig.from_dict({**config.to_dict(), "inference_mode": True})
            saved.save_pretrained(directory)

    def load_adapter(
        self, model_id: str | os.PathLike, adapter_name: str, is_trainable: bool = False, **_: Any
    ) -> None:
        """Add the adapter in `model_id` as `adapter_name`; for a name already loaded, its weights are
        replaced in place (PEFT's behaviour, what a Trainer resuming from a checkpoint relies on)."""
        if adapter_name in self.peft_config:
            self.base_model.load_adapter_state(adapter_name, load_adapter_weights(os.fspath(model_id)))
            self.peft_config[adapter_name].inference_mode = not is_trainable
            self.base_model._update_trainable()
            return
        _load_into(self.base_model, model_id, adapter_name, is_trainable)
        self._owned.append(adapter_name)

    @classmethod
    def from_pretrained(
        cls,
        model: nn.Module,
        model_id: str | os.PathLike,
        adapter_name: str = "default",
        is_trainable: bool = False,
        config: LoraConfig | None = None,
        autocast_adapter_dtype: bool = True,
        **_: Any,
    ) -> "PeftModel":
        """Load an adapter directory (or a llama.cpp LoRA adapter ``.gguf`` file) onto `model`.

        If `model` already carries lorakit adapters (an earlier `from_pretrained` or `get_peft_model`
        on it), the adapter is added to the same layers instead of wrapping them again, and the
        returned handle runs only its own adapter. An adapter name already in use is replaced by one
        made from the directory name (`names.adapter_name_for`).
        """
        if isinstance(model, PeftModel):
            model = model.base_model.model
        owner = owner_of(model)
        if owner is None:
            owner = LoraModel(model, autocast_adapter_dtype=autocast_adapter_dtype)
        name = adapter_name if adapter_name not in owner.peft_config else adapter_name_for(model_id, owner.peft_config)
        _load_into(owner, model_id, name, is_trainable, config)
        if not owner.active_adapters:
            owner.set_adapter(name)
        handle = cls._handle(owner, name)
        return handle


# set by lorakit.integrations' trainers while transformers' Trainer starts (see accepts_loss_kwargs)
_KNOWN_TRAINER: ContextVar[bool] = ContextVar("lorakit_known_trainer", default=False)


def _read_by_trainer(frame) -> bool:
    """Whether `frame` (the reader of accepts_loss_kwargs) is transformers' Trainer or TRL code."""
    module = frame.f_globals.get("__name__", "") if frame is not None else ""
    return module.split(".")[0] in ("transformers", "trl")


@contextmanager
def known_trainer() -> Iterator[None]:
    token = _KNOWN_TRAINER.set(True)
    try:
        yield
    finally:
        _KNOWN_TRAINER.reset(token)


def get_peft_model(model: nn.Module, peft_config: LoraConfig, adapter_name: str = "default", mixed: bool = False,
                   autocast_adapter_dtype: bool = True, *, fuse: bool = True, **_: Any) -> PeftModel:
    """Freeze `model`, add a trainable LoRA adapter, and return the PeftModel handle.

    PEFT's arguments: adapters live in fp32 beside a 16-bit base unless `autocast_adapter_dtype=False`
    (then in the base's dtype). lorakit's own: `fuse=False` keeps every layer on its own forward
    (no block fusions, `fast.fusion`).
    """
    if isinstance(model, PeftModel) or owner_of(model) is not None:
        raise ValueError("this model already carries lorakit adapters; use add_adapter() on its PeftModel")
    return PeftModel(model, peft_config, adapter_name, autocast_adapter_dtype, fuse)


def _load_into(
    owner: LoraModel, model_id, name: str, is_trainable: bool, config: LoraConfig | None = None
) -> None:
    model_id = os.fspath(model_id)
    if model_id.lower().endswith(".gguf"):  # llama.cpp's LoRA adapter file
        from ..export.gguf_adapter import read_gguf_adapter

        gguf_config, tensors = read_gguf_adapter(model_id, owner.model)
        config = config or gguf_config
    elif not os.path.isdir(model_id):
        raise FileNotFoundError(f"adapter directory not found: {model_id}")
    else:
        config = config or LoraConfig.from_pretrained(model_id)
        tensors = load_adapter_weights(model_id)
    config = config.as_trained()  # the weights come from the file
    config.inference_mode = not is_trainable
    owner.add_adapter(name, config)
    try:
        owner.load_adapter_state(name, tensors)
    except Exception:
        owner.delete_adapter(name)  # leave the model as it was
        raise
    owner.set_adapter(owner.active_adapters or [name])


def _detached_copy(lora_model: LoraModel) -> LoraModel:
    """A deep copy of base + adapters that owns itself (for merging without touching the original)."""
    import copy

    owner_backup = lora_model.model.__dict__.pop(OWNER_ATTR)
    try:
        model_copy = copy.deepcopy(lora_model.model)
    finally:
        lora_model.model.__dict__[OWNER_ATTR] = owner_backup
    clone = LoraModel(model_copy, autocast_adapter_dtype=lora_model.autocast_adapter_dtype, fuse=lora_model.fuse)
    clone.peft_config = {k: v for k, v in lora_model.peft_config.items()}
    clone.active_adapters = list(lora_model.active_adapters)
    return clone


def _prepare_cpu_training(model: nn.Module, args: tuple, kwargs: dict) -> None:
    """The trainer's CPU set-up (`fast.allocator.prepare_cpu_training`), when this call trains on a CPU."""
    inputs = next((v for v in (*args, kwargs.get("input_ids"), kwargs.get("inputs_embeds"))
                   if isinstance(v, torch.Tensor)), None)
    if inputs is not None and inputs.device.type == "cpu":
        name = "is_activation_checkpointing" if hasattr(type(model), "is_activation_checkpointing") \
            else "is_gradient_checkpointing"  # transformers >= 5.x's name, then the older one
        allocator.prepare_cpu_training(bool(getattr(model, name, False)))


def _batch_size(args: tuple, kwargs: dict) -> int | None:
    for value in (*args, kwargs.get("input_ids"), kwargs.get("inputs_embeds")):
        if isinstance(value, torch.Tensor):
            return value.shape[0]
    return None


def _check_rows(adapter_names: Sequence[str], args: tuple, kwargs: dict) -> None:
    if isinstance(adapter_names, str):
        raise ValueError("adapter_names must be a list with one adapter name per batch row")
    batch = _batch_size(args, kwargs)
    if batch is not None and batch != len(adapter_names):
        raise ValueError(f"adapter_names has {len(adapter_names)} entries but the batch has {batch} rows")


# generate arguments that see rows in batch order (or return more than sequences): rows stay put
_ROW_ORDER_ARGS = ("streamer", "prefix_allowed_tokens_fn", "logits_processor", "stopping_criteria", "assistant_model",
                   "negative_prompt_ids", "negative_prompt_attention_mask", "return_dict_in_generate")


def _grouping_order(model: nn.Module, rows: Sequence[str], kwargs: dict) -> list[int] | None:
    """A stable order putting each adapter's rows together, when it changes anything and `generate`
    returns a plain tensor of sequences that can be put back in the caller's order."""
    order = sorted(range(len(rows)), key=lambda i: rows[i])
    if order == list(range(len(rows))) or any(kwargs.get(k) is not None for k in _ROW_ORDER_ARGS):
        return None
    config = kwargs.get("generation_config") or getattr(model, "generation_config", None)
    if getattr(config, "return_dict_in_generate", False):
        return None
    return order


def _take_rows(values, order: list[int], batch: int):
    """`values` (a tuple or dict) with every tensor of `batch` rows reordered by `order`."""
    index = torch.tensor(order)

    def take(v):
        if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == batch:
            return v.index_select(0, index.to(v.device))
        return v

    if isinstance(values, dict):
        return {k: take(v) for k, v in values.items()}
    return tuple(take(v) for v in values)


def _restore_order(order: list[int], per_row: int) -> torch.Tensor:
    """Indices that put `generate`'s output (per_row sequences per prompt, prompts in `order`) back
    in the caller's prompt order."""
    position = torch.argsort(torch.tensor(order))  # where each original prompt went
    return (position.repeat_interleave(per_row) * per_row) + torch.arange(per_row).repeat(len(order))


def _generation_expansion(model: nn.Module, kwargs: dict) -> int:
    """How many rows `generate` makes of each input row (beams or returned sequences)."""
    gen = getattr(model, "generation_config", None)
    beams = kwargs.get("num_beams", getattr(gen, "num_beams", 1)) or 1
    returned = kwargs.get("num_return_sequences", getattr(gen, "num_return_sequences", 1)) or 1
    return max(beams, returned) if beams > 1 else returned
