"""How transformers models and GGUF files name and order the same weights, both directions.

One table of the architectures lorakit reads and writes as GGUF (`GGUF_ARCHS`), the tensor name
mapping through gguf's own table (`gguf.get_tensor_name_map`), and llama.cpp's rotary row
permutation of attn_q/attn_k (`permute_rows`, its inverse `unpermute_rows`). The packed loader
(`models.gguf_packed`) and the GGUF writers in `export/` all use these, so each rule is written once.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from torch import Tensor


@dataclass(frozen=True)
class GGUFArch:
    """One GGUF architecture (`general.architecture`) and the transformers family it holds."""

    name: str  # general.architecture, e.g. "llama"
    member: str  # gguf.MODEL_ARCH member name, e.g. "LLAMA"
    model_type: str  # transformers config.model_type a file of this architecture is read as
    rope_permuted: bool  # attn_q/attn_k rows stored in llama.cpp's rotary order (LlamaModel.permute)
    merged: bool = False  # `export.gguf_model` writes whole models of it (its hyperparameter keys are known)
    norm_offset: float = 0.0  # added to every RMSNorm weight in the file: llama.cpp scales by w, Gemma by 1 + w
    aliases: tuple[str, ...] = ()  # other model_types llama.cpp's converter writes as this architecture


# Families whose llama.cpp converter (convert_hf_to_gguf.py) lorakit has checked, keyed by
# general.architecture. GGUF adapters can be written for all of them; merged models where `merged`.
# Gemma's norm_offset: the converter's Gemma, Gemma2 and Gemma3 classes add 1 to each "*norm.weight".
GGUF_ARCHS: dict[str, GGUFArch] = {a.name: a for a in (
    GGUFArch("llama", "LLAMA", "llama", rope_permuted=True, merged=True, aliases=("mistral",)),
    GGUFArch("qwen2", "QWEN2", "qwen2", rope_permuted=False, merged=True),
    GGUFArch("qwen3", "QWEN3", "qwen3", rope_permuted=False),
    GGUFArch("gemma", "GEMMA", "gemma", rope_permuted=False, merged=True, norm_offset=1.0),
    GGUFArch("gemma2", "GEMMA2", "gemma2", rope_permuted=False, merged=True, norm_offset=1.0),
    GGUFArch("gemma3", "GEMMA3", "gemma3_text", rope_permuted=False, merged=True, norm_offset=1.0),
    GGUFArch("phi3", "PHI3", "phi3", rope_permuted=False),
    GGUFArch("gpt2", "GPT2", "gpt2", rope_permuted=False),
)}


def arch_for_model_type(model_type: str | None, *, merged: bool = False) -> GGUFArch:
    """The GGUF architecture a transformers `model_type` is written as (with `merged`: only those
    `export.gguf_model` writes whole); a one-line ValueError naming the known families otherwise."""
    archs = [a for a in GGUF_ARCHS.values() if a.merged or not merged]
    for arch in archs:
        if model_type == arch.model_type or model_type in arch.aliases:
            return arch
    known = ", ".join(sorted(t for a in archs for t in (a.model_type, *a.aliases)))
    what = "a merged GGUF model" if merged else "GGUF"
    raise ValueError(f"{what} export supports the model families {known}, not {model_type!r}")


def gguf_names(hf_names: Iterable[str], arch: str, n_blocks: int) -> dict[str, str]:
    """transformers parameter name -> GGUF tensor name (``model.layers.3.self_attn.q_proj.weight``
    -> ``blk.3.attn_q.weight``), by gguf's table for MODEL_ARCH member `arch`; names it lacks are left out."""
    import gguf

    table = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch], n_blocks)
    found = {}
    for name in hf_names:
        mapped = table.get_name(name, try_suffixes=(".weight", ".bias"))
        if mapped is not None:
            found[name] = mapped
    return found


def rotary_heads(config, gguf_name: str) -> int | None:
    """The heads whose rotary pairs a q or k tensor's rows are permuted by; None for other tensors."""
    kind = gguf_name.split(".")[-2]
    if kind == "attn_q":
        return config.num_attention_heads
    if kind == "attn_k":
        return getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    return None


def _pairs(rows: Tensor, n_head: int) -> int:
    half = rows.shape[0] // n_head // 2
    if n_head * 2 * half != rows.shape[0]:
        raise ValueError(f"{rows.shape[0]} rows do not split into {n_head} heads of rotary pairs")
    return half


def permute_rows(rows: Tensor, n_head: int) -> Tensor:
    """llama.cpp's rotary permutation of a q or k weight's rows (or a bias), on any dtype.

    transformers rotates the two halves of each head's rows (rotate_half); llama.cpp rotates
    adjacent pairs. Viewing the (n_head * 2 * half, ...) rows as (n_head, 2, half) and swapping the
    last two axes gives file row (h, d, s) = model row (h, s, d).
    """
    half = _pairs(rows, n_head)
    return rows.reshape(n_head, 2, half, *rows.shape[1:]).transpose(1, 2).reshape(rows.shape).contiguous()


def unpermute_rows(rows: Tensor, n_head: int) -> Tensor:
    """The inverse of `permute_rows`: a file's q or k rows back in the model's order."""
    half = _pairs(rows, n_head)
    return rows.reshape(n_head, half, 2, *rows.shape[1:]).transpose(1, 2).reshape(rows.shape).contiguous()
