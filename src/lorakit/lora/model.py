"""LoraModel: puts named adapters on a model in place, and merges, combines or removes them."""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from . import functional as LF
from . import loftq, quantized_merge
from ..fast import attention, fusion
from .config import LoraConfig
from .layers import Embedding, Linear, LoraLayer, ModulesToSaveWrapper, wrapper_for
from .routing import BASE, disabled
from .targeting import find_targets, saved_module_names

OWNER_ATTR = "_lorakit_owner"  # set on the base model so a second wrap finds the first


class LoraModel(nn.Module):
    """Holds the base model (`self.model`, modified in place) and the configs of its adapters."""

    def __init__(self, model: nn.Module, config: LoraConfig | None = None, adapter_name: str = "default",
                 autocast_adapter_dtype: bool = True, fuse: bool = True) -> None:
        super().__init__()
        if getattr(model, OWNER_ATTR, None) is not None:
            raise ValueError("this model already carries lorakit adapters; add more with add_adapter/load_adapter")
        self.model = model
        self.training = model.training
        self.peft_config: dict[str, LoraConfig] = {}
        self.active_adapters: list[str] = []
        self.autocast_adapter_dtype = autocast_adapter_dtype  # False: adapters in the base's dtype
        self.fuse = fuse  # False: no block fusions (fast.fusion, fast.attention), each layer on its own
        model.__dict__[OWNER_ATTR] = self  # a plain attribute: not a submodule, no cycle in the module tree
        if config is not None:
            self.add_adapter(adapter_name, config)
            self.set_adapter(adapter_name)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model":
                raise
            return getattr(self.model, name)

    def forward(self, *args, **kwargs):
        """The model with its active adapters (PEFT's LoraModel.forward); handles route their own."""
        return self.model(*args, **kwargs)

    # -- walking ------------------------------------------------------------------------------
    def lora_layers(self) -> Iterator[tuple[str, LoraLayer]]:
        for name, module in self.model.named_modules():
            if isinstance(module, LoraLayer):
                yield name, module

    def _wrappers(self) -> Iterator[ModulesToSaveWrapper]:
        return (m for m in self.model.modules() if isinstance(m, ModulesToSaveWrapper))

    # -- adapters -----------------------------------------------------------------------------
    def add_adapter(self, adapter_name: str, config: LoraConfig) -> None:
        """Put a new adapter on every module `config` targets (inactive until `set_adapter`)."""
        if adapter_name in self.peft_config:
            raise ValueError(f"an adapter named {adapter_name!r} already exists")
        if adapter_name == BASE:
            raise ValueError(f"{BASE!r} is reserved for 'no adapter' in mixed batches")
        config = copy.deepcopy(config)
        targets = find_targets(self.model, config)
        starts = loftq.plan(self.model, targets) if config.init_lora_weights == "loftq" else None
        for p in self.model.parameters():
            p.requires_grad_(False)
        for name in targets:
            layer = self.model.get_submodule(name)
            if not isinstance(layer, LoraLayer):
                layer = wrapper_for(name, layer)
                self.model.set_submodule(name, layer)
            layer.update_layer(
                adapter_name,
                r=config.rank_for(name),
                lora_alpha=config.alpha_for(name),
                lora_dropout=config.lora_dropout,
                init_lora_weights=True if starts is not None else config.init_lora_weights,
                use_rslora=config.use_rslora,
                use_dora=config.use_dora,
                lora_bias=config.lora_bias,
                autocast_adapter_dtype=self.autocast_adapter_dtype,
            )
        if starts is not None:
            loftq.initialise(self.model, starts, adapter_name, config.loftq_config["loftq_iter"])
        self._add_saved_modules(adapter_name, config)
        for name in targets:  # new dropout modules follow the model's train/eval mode
            layer = self.model.get_submodule(name)
            layer.train(layer.base_layer.training)
        if config.base_model_name_or_path is None:
            config.base_model_name_or_path = getattr(getattr(self.model, "config", None), "name_or_path", None) or None
        self.peft_config[adapter_name] = config
        self._update_trainable()
        if self.fuse:
            fusion.attach(self.model)
            attention.attach(self.model)

    def _add_saved_modules(self, adapter_name: str, config: LoraConfig) -> None:
        if not config.modules_to_save:
            return
        names = saved_module_names(self.model, config)
        if not names:
            raise ValueError(f"modules_to_save {config.modules_to_save} matched no module of the model")
        for name in names:
            module = self.model.get_submodule(name)
            if not isinstance(module, ModulesToSaveWrapper):
                module = ModulesToSaveWrapper(module)
                self.model.set_submodule(name, module)
            module.add(adapter_name)
            module.train(module.original_module.training)

    def set_adapter(self, adapter_name: str | Sequence[str]) -> None:
        """Make these adapters the ones used by default, and the trainable ones."""
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        for name in names:
            self._check_name(name)
        self.active_adapters = names
        for _, layer in self.lora_layers():
            layer.active_adapters = [n for n in names if n in layer.r]
        for wrapper in self._wrappers():
            wrapper.active_adapters = [n for n in names if n in wrapper.modules_to_save]
        self._update_trainable()

    def _check_name(self, name: str) -> None:
        if name not in self.peft_config:
            raise ValueError(f"unknown adapter {name!r}; loaded adapters: {', '.join(self.peft_config) or 'none'}")

    def _update_trainable(self) -> None:
        """Only the active adapters' weights (and biases per `bias`) train, as in PEFT."""
        for p in self.model.parameters():
            p.requires_grad_(False)
        for name in self.active_adapters:
            config = self.peft_config[name]
            if config.inference_mode:
                continue
            for _, layer in self.lora_layers():
                for p in layer.adapter_parameters(name):
                    p.requires_grad_(True)
                if config.bias == "lora_only" and getattr(layer.base_layer, "bias", None) is not None:
                    layer.base_layer.bias.requires_grad_(True)
            for wrapper in self._wrappers():
                if name in wrapper.modules_to_save:
                    wrapper.modules_to_save[name].requires_grad_(True)
            if config.bias == "all":
                for pname, p in self.model.named_parameters():
                    if pname.endswith("bias"):
                        p.requires_grad_(True)

    def delete_adapter(self, adapter_name: str) -> None:
        self._check_name(adapter_name)
        for _, layer in self.lora_layers():
            layer.delete_adapter(adapter_name)
        for wrapper in self._wrappers():
            wrapper.delete_adapter(adapter_name)
        del self.peft_config[adapter_name]
        remaining = [n for n in self.active_adapters if n != adapter_name]
        if not remaining and self.peft_config:
            remaining = [next(iter(self.peft_config))]
        self.set_adapter(remaining) if remaining else setattr(self, "active_adapters", [])

    def adapter_state(self, adapter_name: str) -> dict[str, torch.Tensor]:
        """In-memory parameters of one adapter (keys relative to the base model), biases per `bias`."""
        from .io import file_key

        self._check_name(adapter_name)
        if adapter_name in getattr(self, "_unloaded", {}):
            return self._unloaded[adapter_name]
        config = self.peft_config[adapter_name]
        lora_biases = {f"{n}.base_layer.bias" for n, _ in self.lora_layers()}
        state: dict[str, torch.Tensor] = {}
        for key, value in self.model.state_dict(keep_vars=True).items():
            if file_key(key, adapter_name) != "base_model.model." + key:
                state[key] = value
            elif config.bias == "all" and key.endswith("bias") and not _is_adapter_key(key):
                state[key] = value
            elif config.bias == "lora_only" and key in lora_biases:
                state[key] = value
        return state

    def load_adapter_state(self, adapter_name: str, tensors: dict[str, torch.Tensor]) -> None:
        """Copy file tensors (PEFT keys) into the adapter; any key or shape that does not fit raises."""
        from .io import PREFIX, file_key

        expected = {file_key(k, adapter_name): v for k, v in self.adapter_state(adapter_name).items()}
        base = self.model.state_dict(keep_vars=True)
        embedding_bases = {f"{n}.base_layer.weight" for n, l in self.lora_layers() if isinstance(l, Embedding)}
        pairs: list[tuple[torch.Tensor, torch.Tensor]] = []
        seen = set()
        for key in sorted(tensors):  # validate everything before touching the model
            value = tensors[key]
            full = key if key.startswith(PREFIX) else PREFIX + key
            target = expected.get(full)
            inner = full[len(PREFIX):]
            if target is None and (inner in embedding_bases or inner.endswith("bias")) and inner in base:
                target = base[inner]  # PEFT also saves resized embeddings and trained biases
            if target is None:
                raise ValueError(
                    f"adapter weight {key!r} does not fit the base model: no such adapted module "
                    f"(the base has e.g. {next(iter(expected), 'no adapter keys')!r})"
                )
            if tuple(value.shape) != tuple(target.shape):
                raise ValueError(
                    f"adapter weight {key!r} has shape {tuple(value.shape)} but the base model expects "
                    f"{tuple(target.shape)}"
                )
            pairs.append((target, value))
            seen.add(full)
        missing = [k for k in expected if k not in seen and not k.endswith("bias")]
        if missing:
            raise ValueError(f"adapter file lacks {missing[0]!r} (and {len(missing) - 1} more) that its config implies")
        with torch.no_grad():
            for target, value in pairs:
                target.copy_(value.to(target.dtype))

    # -- merging ------------------------------------------------------------------------------
    def merge_adapter(self, adapter_names: Sequence[str] | None = None, safe_merge: bool = False) -> None:
        names = list(adapter_names) if adapter_names is not None else list(self.active_adapters)
        for name in names:
            self._check_name(name)
        layers = [layer for _, layer in self.lora_layers()]
        for layer in layers:  # a base that refuses merges refuses before any layer is merged
            layer.check_mergeable()
        if safe_merge:  # check every layer first, so that a refusal leaves the model untouched
            for layer in layers:
                if not layer.merge_is_finite(names):
                    raise ValueError(f"merging {names} would produce NaN or inf weights; the model was left unchanged")
        for layer in layers:
            layer.merge(names)

    def unmerge_adapter(self) -> None:
        for _, layer in self.lora_layers():
            layer.unmerge()

    def merge_and_unload(
        self, progressbar: bool = False, safe_merge: bool = False, adapter_names: Sequence[str] | None = None, *,
        dtype: torch.dtype | str | None = None, requantize: bool = False,
    ) -> nn.Module:
        """Merge the adapters into the base weights and return the plain base model.

        On quantized (4-bit) layers the merge goes onto their de-quantized weights and they come
        back dense, in `dtype` (default: the dtype they were quantized from), or with
        `requantize=True` quantized again (`lora.quantized_merge`; the rounding it caused is
        `model.lorakit_requantize_report`).
        """
        merged = list(adapter_names) if adapter_names is not None else list(self.active_adapters)
        if requantize or dtype is not None or quantized_merge.has_quantized(self.model):
            return quantized_merge.merge_and_unload(self, merged, safe_merge=safe_merge, dtype=dtype,
                                                    requantize=requantize)
        self.merge_adapter(merged, safe_merge=safe_merge)
        return self._unload(keep=merged)

    def unload(self) -> nn.Module:
        """Remove every adapter without merging; returns the original base model."""
        self.unmerge_adapter()
        return self._unload(keep=[])

    @contextmanager
    def base_only(self) -> Iterator[nn.Module]:
        """The base model with each wrapped module's base back in its place (to save the base as
        it is, e.g. a 4-bit base LoftQ rewrote); the adapters are put back on exit."""
        swapped = [(n, m, m.base_layer) for n, m in self.lora_layers()]
        swapped += [(n, m, m.original_module) for n, m in self.model.named_modules() if isinstance(m, ModulesToSaveWrapper)]
        for name, _, base in swapped:
            self.model.set_submodule(name, base)
        try:
            yield self.model
        finally:
            for name, wrapper, _ in swapped:
                self.model.set_submodule(name, wrapper)

    def _unload(self, keep: Sequence[str]) -> nn.Module:
        # keep a copy of the adapters so that save_pretrained still works afterwards (the seed's
        # snippet merges first, then saves the adapter)
        self._unloaded = {n: {k: v.detach().clone() for k, v in self.adapter_state(n).items()} for n in self.peft_config}
        for name, layer in list(self.lora_layers()):
            self.model.set_submodule(name, layer.base_layer)
        for name, wrapper in [(n, m) for n, m in self.model.named_modules() if isinstance(m, ModulesToSaveWrapper)]:
            chosen = next((wrapper.modules_to_save[k] for k in keep if k in wrapper.modules_to_save), None)
            self.model.set_submodule(name, chosen if chosen is not None else wrapper.original_module)
        self.model.__dict__.pop(OWNER_ATTR, None)
        fusion.detach(self.model)
        attention.detach(self.model)
        return self.model

    @contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Calls made inside the block, from this thread or asyncio task, run the bare base model
        (the route is a context variable); other threads keep their adapters. Merged adapters are
        the exception: the weights are shared, so they are unmerged for every caller during the
        block and merged back after it."""
        merged = {id(layer): list(layer.merged_adapters) for _, layer in self.lora_layers()}
        self.unmerge_adapter()
        try:
            with disabled():
                yield
        finally:
            for _, layer in self.lora_layers():
                layer.merge(merged[id(layer)])

    # -- combination --------------------------------------------------------------------------
    def add_weighted_adapter(
        self,
        adapters: Sequence[str],
        weights: Sequence[float],
        adapter_name: str,
        combination_type: str = "svd",
        svd_rank: int | None = None,
        svd_clamp: float | None = None,
    ) -> None:
        """A new adapter combining existing ones, with PEFT's "linear", "cat" and "svd" rules."""
        if adapter_name in self.peft_config:
            raise ValueError(f"an adapter named {adapter_name!r} already exists")
        if len(adapters) != len(weights) or not adapters:
            raise ValueError("adapters and weights must be non-empty lists of the same length")
        for name in adapters:
            self._check_name(name)
        configs = [self.peft_config[a] for a in adapters]
        if any(c.use_dora for c in configs):
            raise ValueError("add_weighted_adapter does not support DoRA adapters")
        combination_type = "linear" if len(adapters) == 1 else combination_type
        ranks = [max([c.r, *c.rank_pattern.values()]) for c in configs]
        if combination_type == "linear":
            if len(set(ranks)) != 1:
                raise ValueError("combination_type='linear' needs adapters of the same r; use 'cat' or 'svd'")
            new_rank = ranks[0]
        elif combination_type == "cat":
            new_rank = sum(ranks)
        elif combination_type == "svd":
            new_rank = svd_rank or max(ranks)
        else:
            raise ValueError(f"combination_type must be 'linear', 'cat' or 'svd', got {combination_type!r}")
        target_types = {type(c.target_modules) for c in configs}
        if len(target_types) > 1:
            raise ValueError("cannot combine adapters whose target_modules mix a regex string and a list")
        if isinstance(configs[0].target_modules, str):
            targets = "|".join(f"({c.target_modules})" for c in configs)
        else:
            targets = set().union(*(c.target_modules for c in configs))
        new_config = copy.deepcopy(configs[0])
        new_config.r, new_config.lora_alpha, new_config.target_modules = new_rank, new_rank, targets
        new_config.rank_pattern, new_config.alpha_pattern = {}, {}
        self.add_adapter(adapter_name, new_config)
        with torch.no_grad():
            for _, layer in self.lora_layers():
                if adapter_name in layer.r:
                    self._combine_into(layer, adapters, weights, adapter_name, combination_type, new_rank, svd_clamp)

    @staticmethod
    def _combine_into(layer, adapters, weights, target, combination_type, rank, clamp) -> None:
        present = [(a, w) for a, w in zip(adapters, weights) if a in layer.r]
        if not present:
            return
        names, ws = [a for a, _ in present], [w for _, w in present]
        scalings = [layer.scaling[a] for a in names]
        is_embedding = isinstance(layer, Embedding)
        if is_embedding:
            As = [layer.lora_embedding_A[a] for a in names]
            Bs = [layer.lora_embedding_B[a] for a in names]
            dest_A, dest_B = layer.lora_embedding_A[target], layer.lora_embedding_B[target]
        else:
            As = [layer.lora_A[a].weight for a in names]
            Bs = [layer.lora_B[a].weight for a in names]
            dest_A, dest_B = layer.lora_A[target].weight, layer.lora_B[target].weight
        if combination_type == "linear":
            A, B = LF.combine_linear(As, Bs, ws, scalings)
        elif combination_type == "cat":
            A, B = LF.combine_cat(As, Bs, ws, scalings)
        else:
            # delta laid out (out, in) for linear layers; (dim, num_embeddings) for embeddings
            deltas = [(b @ a) * s for a, b, s in zip(As, Bs, scalings)]
            A, B = LF.combine_svd(deltas, ws, rank, clamp)
        dest_A.zero_()
        dest_B.zero_()
        dest_A[: A.shape[0], :] = A.to(dest_A.dtype)
        dest_B[:, : B.shape[1]] = B.to(dest_B.dtype)


def _is_adapter_key(key: str) -> bool:
    return any(f".{c}." in key for c in ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "modules_to_save"))


def owner_of(model: nn.Module) -> LoraModel | None:
    """The LoraModel that already put adapters on `model`, if any."""
    return model.__dict__.get(OWNER_ATTR)


__all__ = ["LoraModel", "owner_of", "Linear", "Embedding"]
