"""Loading a GGUF file as a packed model: the decoder's linear weights stay in the file's blocks.

`load_packed_gguf` builds the transformers model from the config transformers derives from the
GGUF's metadata, with its parameters on the meta device (nothing allocated), then fills it:
every linear layer of the decoder (attention q/k/v/o, MLP gate/up/down) becomes a `GGUFLinear`
over the file's bytes, read through a memory map of the file without a copy; everything else (norms,
embeddings, an untied head) is de-quantized to float32, bit-exact with gguf-py and so with the
dense conversion (`models.gguf.convert_gguf`). A Q4_1 layer takes 0.625 bytes a value where the
dense model takes 4. The file's metadata, tensor table, config and tokenizer come from its cached
header (`models.gguf_header`), so a load after the first reads no vocabulary array again.

Tensor names map through gguf's own table (`gguf.get_tensor_name_map`), written once in
`models.gguf_names` (shared with the GGUF writers). llama.cpp's converter stores the rows of
attn_q and attn_k permuted for its rotary layout; since a row is whole blocks, `unpermute_rows`
undoes that on the bytes (one uint8 copy of those two weights), never de-quantizing.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from ..bases import gguf_blocks
from ..bases.gguf_linear import GGUFLinear
from .gguf import require_gguf
from .gguf_header import hf_dir, read_header
from .gguf_names import GGUF_ARCHS, GGUFArch, gguf_names, rotary_heads, unpermute_rows
from .tokens import ensure_pad_token

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


# Only families whose packed load lorakit has checked; others load through the dense conversion.
PACKED_ARCHS: dict[str, GGUFArch] = {name: GGUF_ARCHS[name] for name in ("llama", "qwen2")}


def packable(path: str | Path) -> bool:
    """True when `path`'s `general.architecture` is one a packed load reads (the cached header)."""
    return read_header(path).architecture in PACKED_ARCHS


def _set_parameter(model: nn.Module, name: str, value: Tensor) -> None:
    owner, _, leaf = name.rpartition(".")
    module = model.get_submodule(owner)
    old = module._parameters[leaf]
    module._parameters[leaf] = nn.Parameter(value, requires_grad=old.requires_grad)


def _replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    owner, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(owner), leaf, new)


def _is_decoder_linear(module: nn.Module, gguf_name: str | None) -> bool:
    return isinstance(module, nn.Linear) and gguf_name is not None and gguf_name.startswith("blk.")


def load_packed_gguf(path: str | Path, *, dtype: torch.dtype = torch.float32
                     ) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load `path` with its decoder linears kept as GGUF blocks; returns ``(model, tokenizer)``.

    The model is on the CPU in eval mode; its packed layers share memory with the file's map
    (copy-on-write, the file is never written). `dtype` is the dtype of the dense tensors and of
    the packed layers' products (float32: exactly the dense conversion's values).
    """
    require_gguf()
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    header = read_header(path)
    file_arch = header.architecture
    arch = PACKED_ARCHS.get(file_arch)
    if arch is None:
        known = ", ".join(PACKED_ARCHS)
        raise ValueError(f"{path.name}: a packed load reads GGUF architectures {known}, not {file_arch!r}; "
                         "load it through the dense conversion instead (lorakit.load_model)")

    meta = hf_dir(path)  # config + tokenizer, derived from the metadata once
    config = AutoConfig.from_pretrained(meta)
    tokenizer = ensure_pad_token(AutoTokenizer.from_pretrained(meta))
    with init_empty_weights():  # parameters on meta; buffers (rotary tables) made for real
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)

    tensors = header.tensors
    params = dict(model.named_parameters())
    names = gguf_names(params, arch.member, config.num_hidden_layers)

    def read(hf_name: str):
        gguf_name = names.get(hf_name)
        if gguf_name is None or gguf_name not in tensors:
            raise ValueError(f"{path.name}: no GGUF tensor for {hf_name} (looked for {gguf_name!r})")
        return gguf_name, tensors[gguf_name]

    def dense(hf_name: str) -> Tensor:
        gguf_name, tensor = read(hf_name)
        value = gguf_blocks.dequantize(header.tensor_bytes(gguf_name), tensor.qtype, tensor.shape, gguf_name)
        heads = rotary_heads(config, gguf_name) if arch.rope_permuted else None
        value = value if heads is None else unpermute_rows(value, heads)
        if value.shape != params[hf_name].shape:
            raise ValueError(f"{path.name}: {gguf_name} has shape {tuple(value.shape)}, "
                             f"the model's {hf_name} {tuple(params[hf_name].shape)}")
        return value.to(dtype)

    packed = set()
    for name, module in list(model.named_modules()):
        if not _is_decoder_linear(module, names.get(f"{name}.weight")):
            continue
        gguf_name, tensor = read(f"{name}.weight")
        out_features, in_features = tensor.shape
        if (out_features, in_features) != (module.out_features, module.in_features):
            raise ValueError(f"{path.name}: {gguf_name} is ({out_features}, {in_features}), "
                             f"the model's {name} ({module.out_features}, {module.in_features})")
        blocks = header.tensor_bytes(gguf_name)
        heads = rotary_heads(config, gguf_name) if arch.rope_permuted else None
        if heads is not None:  # whole rows of bytes move; nothing is de-quantized
            blocks = unpermute_rows(blocks.reshape(out_features, -1), heads)
        bias = dense(f"{name}.bias") if module.bias is not None else None
        _replace_module(model, name, GGUFLinear(blocks, tensor.qtype, out_features, in_features, bias,
                                                name=gguf_name, compute_dtype=dtype))
        packed.update((f"{name}.weight", f"{name}.bias"))

    head = model.get_output_embeddings()
    tied = {f"{n}.weight" for n, m in model.named_modules() if m is head} if config.tie_word_embeddings else set()
    for name in params:
        if name not in packed and name not in tied:
            _set_parameter(model, name, dense(name))
    if config.tie_word_embeddings:
        model.tie_weights()
    on_meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if on_meta:
        raise ValueError(f"{path.name}: no GGUF tensor filled {', '.join(on_meta)}")
    return model.eval(), tokenizer


def storage_bytes(model: nn.Module) -> int:
    """Bytes held by `model`'s parameters and buffers, a tied tensor counted once."""
    seen, total = set(), 0
    for tensor in [*model.parameters(), *model.buffers()]:
        key = (tensor.data_ptr(), tensor.numel())
        if key not in seen:
            seen.add(key)
            total += tensor.numel() * tensor.element_size()
    return total
