"""The model across processes: DDP all-reduces the adapter's gradients, FSDP2 shards the whole model.

The unit that DDP or FSDP wraps is `LossModule`, whose forward *is* the loss, so their hooks run
around lorakit's fused head and LoRA kernels: DDP's reducer sees every trainable parameter used,
and FSDP's root unit gathers the embeddings and head before the loss reads the head's weight
directly. Inside a forward every parameter is a plain tensor; between steps, under FSDP, they are
sharded DTensors, which `whole_parameters` / `full_state` / `shard_like` convert for files.

Both DDP and FSDP *average* gradients over ranks; the loop scales each rank's loss by the world
size, so the average is the sum that one process would have computed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from typing import Any

import torch
from torch import Tensor, nn

from .world import World

try:
    from torch.distributed.tensor import DTensor, distribute_tensor
except ImportError:  # a PyTorch build without torch.distributed: nothing is ever sharded

    class DTensor:  # type: ignore[no-redef]
        pass

LossFn = Callable[[nn.Module, dict[str, Tensor]], tuple[Tensor, int]]


class LossModule(nn.Module):
    """forward(batch) -> (sum of token losses, target tokens) of `model`: what DDP and FSDP wrap."""

    def __init__(self, model: nn.Module, loss_fn: LossFn) -> None:
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, batch: dict[str, Tensor]) -> tuple[Tensor, int]:
        return self.loss_fn(self.model, batch)


def wrap(model: nn.Module, loss_fn: LossFn, world: World, device: torch.device) -> nn.Module:
    """The module to call for each micro-batch's loss: plain, DDP or FSDP2 by `world.strategy`.

    Under FSDP the parameters of `model` are replaced by sharded DTensors (and moved to `device`);
    collect parameter lists from `model` after this call.
    """
    if world.strategy == "fsdp":
        check_fsdp_base(model)
    unit = LossModule(model, loss_fn)
    if world.strategy == "ddp":
        return _ddp(unit, device)
    if world.strategy == "fsdp":
        return _fsdp(unit, device, world)
    return unit


def check_fsdp_base(model: nn.Module) -> None:
    """ValueError, before anything is wrapped or moved, when the base holds 4-bit or GGUF layers:
    their packed weights are buffers, which fully_shard does not shard (every rank would hold the
    whole base, and this combination is untested). DDP runs them: only the adapter's gradients
    travel."""
    from lorakit.bases.registry import weight_in_buffers

    found = next(((n, m) for n, m in model.named_modules() if weight_in_buffers(m) is not None), None)
    if found is not None:
        name, module = found
        raise ValueError(f"distributed: fsdp: FSDP cannot shard lorakit's {weight_in_buffers(module)} base ({name} is "
                         f"a {type(module).__name__} whose packed weights are buffers); use distributed: ddp")


def _ddp(unit: LossModule, device: torch.device) -> nn.Module:
    from torch.nn.parallel import DistributedDataParallel

    # The base is identical on every rank (each loads the same files), so only trainable
    # parameters are broadcast at the start; the reducer all-reduces only their gradients.
    frozen = [name for name, p in unit.named_parameters() if not p.requires_grad]
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(unit, frozen)
    return DistributedDataParallel(
        unit.to(device), device_ids=[device.index] if device.type == "cuda" else None,
        forward_sync_buffers=False, gradient_as_bucket_view=True,
    )


def _fsdp(unit: LossModule, device: torch.device, world: World) -> nn.Module:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (world.size,))
    for block in decoder_layers(unit.model):
        fully_shard(block, mesh=mesh)  # frozen base and trainable adapter of a layer: one unit
    fully_shard(unit, mesh=mesh)  # the rest (embeddings, final norm, head) in the root unit
    return unit


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks FSDP shards one by one: the classes transformers lists in `_no_split_modules`."""
    from lorakit.lora.peft_model import PeftModel

    inner = model.base_model.model if isinstance(model, PeftModel) else model
    names = set(getattr(inner, "_no_split_modules", None) or ())
    blocks = [m for m in inner.modules() if type(m).__name__ in names]
    if not blocks:
        raise ValueError(f"distributed: fsdp: cannot find the decoder layers of {type(inner).__name__} "
                         "(no _no_split_modules); use distributed: ddp")
    return blocks


def inner_model(wrapped: nn.Module) -> nn.Module:
    """The trained model inside a `wrap` result."""
    unit = getattr(wrapped, "module", wrapped)  # DDP keeps it as .module
    return unit.model


@contextmanager
def gradient_sync(wrapped: nn.Module, enabled: bool) -> Iterator[None]:
    """Forward and backward inside communicate gradients only if `enabled` (a step's last micro-batch).

    Gradients of the other micro-batches accumulate locally and travel once, with the last one's.
    """
    if type(wrapped) is LossModule:  # one process (fully_shard changes the class; DDP wraps it)
        yield
        return
    from torch.distributed.fsdp import FSDPModule
    from torch.nn.parallel import DistributedDataParallel

    if isinstance(wrapped, DistributedDataParallel):
        with nullcontext() if enabled else wrapped.no_sync():
            yield
    elif isinstance(wrapped, FSDPModule):
        wrapped.set_requires_gradient_sync(enabled)
        try:
            yield
        finally:
            wrapped.set_requires_gradient_sync(True)
    else:
        yield


def grad_norm(tensors: Sequence[Tensor]) -> Tensor:
    """The global L2 norm of the gradients (a plain tensor, equal on every rank)."""
    grads = [p.grad for p in tensors if p.grad is not None]
    if not grads:
        return torch.zeros(())
    norm = torch.nn.utils.get_total_norm(grads, 2.0)
    return norm.full_tensor() if isinstance(norm, DTensor) else norm  # sharded grads: sum of shards


def clip_gradients(tensors: Sequence[Tensor], max_norm: float | None) -> Tensor:
    """Scale the gradients so their global norm is at most `max_norm`; return the norm before."""
    norm = grad_norm(tensors)
    if max_norm is not None:
        torch.nn.utils.clip_grads_with_norm_(tensors, max_norm, norm)
    return norm


# -- whole tensors for files ------------------------------------------------------------------
def full_state(obj: Any) -> Any:
    """`obj` (an optimizer state dict) with every DTensor gathered whole onto the CPU, in a fixed order."""
    if isinstance(obj, DTensor):
        return obj.full_tensor().cpu()
    if isinstance(obj, dict):
        return {key: full_state(value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(full_state(value) for value in obj)
    return obj


def shard_like(whole: Tensor, ref: Tensor) -> Tensor:
    """`whole` laid out as `ref`: this rank's shard if `ref` is a DTensor (no communication: every
    rank holds `whole`), else `whole` itself."""
    if not isinstance(ref, DTensor):
        return whole
    return distribute_tensor(whole.to(ref.device, ref.dtype), ref.device_mesh, ref.placements, src_data_rank=None)


@contextmanager
def whole_parameters(wrapped: nn.Module, names: Sequence[str]) -> Iterator[nn.Module]:
    """Yield the model inside `wrapped` with the named parameters as whole plain tensors (on every
    rank; gathered ones on the CPU), so that `save_pretrained` and checkpoints write them as one
    process would. Only for writing files; restored on exit.

    Sharded parameters are gathered (a collective: every rank must enter); plain ones are left alone.
    """
    model = inner_model(wrapped)
    if type(wrapped) is LossModule:  # one process: nothing is sharded
        yield model
        return
    from torch.distributed.fsdp import FSDPModule

    for module in wrapped.modules():
        if isinstance(module, FSDPModule):
            # The same layout on every rank first: a forward without backward (eval) leaves the
            # root unit gathered, and a state_dict() on rank 0 alone would reshard it there only.
            module.reshard()
    wanted = dict(model.named_parameters())
    originals = {id(wanted[name]): wanted[name] for name in names if isinstance(wanted[name], DTensor)}
    # one tensor at a time onto the CPU: a model too big for one device is never whole on one
    gathered = {key: nn.Parameter(p.full_tensor().cpu(), requires_grad=p.requires_grad)
                for key, p in originals.items()}
    swapped: list[tuple[nn.Module, str, nn.Parameter]] = []
    try:
        for module in model.modules():
            for attr, param in list(module._parameters.items()):
                if param is not None and id(param) in gathered:  # every module that shares it
                    module._parameters[attr] = gathered[id(param)]
                    swapped.append((module, attr, param))
        yield model
    finally:
        for module, attr, param in reversed(swapped):
            module._parameters[attr] = param
