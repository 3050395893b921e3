"""A merged model as one GGUF file that llama.cpp (and so Ollama, LM Studio) loads and runs.

    merge_adapter_to_gguf("smollm2-135m", "runs/demo/adapter", "model.gguf", outtype="q8_0")

The file holds what llama.cpp's loader reads: the architecture's hyperparameters
(``{arch}.context_length``, embedding_length, block_count, heads, rope, norm epsilon, ...), the
tokenizer (`export.gguf_vocab`) with its chat template, and every weight under llama.cpp's tensor
name (gguf's own table, `models.gguf_names`), with Llama's q/k rows in llama.cpp's rotary order
and Gemma's RMSNorm weights stored as 1 + w (llama.cpp's norm scales by the stored weight).
Weights are quantized by gguf-py (`gguf.quants.quantize`) from the fp32 merge, so each is rounded
once. Types follow llama.cpp's converter: 1-D tensors (norms, biases) stay F32; a weight whose rows
are not whole blocks falls back to F16; with q4_0/q4_1 the token embedding and the output head are
Q8_0 (llama-quantize keeps those two wider as well). gguf-py cannot quantize K-quants (Q4_K_M ...):
write f16 and run llama.cpp's ``llama-quantize``.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..models.gguf_names import GGUFArch, arch_for_model_type, gguf_names, permute_rows, rotary_heads
from .gguf_vocab import gguf_vocab, write_vocab

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

OUTTYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1")
K_QUANTS = ("q2_k", "q3_k_s", "q3_k_m", "q3_k_l", "q4_k_s", "q4_k_m", "q5_k_s", "q5_k_m", "q6_k")
# rope_type (transformers) -> gguf.RopeScalingType member; the rest have no plain GGUF form here
_ROPE_SCALING = {"linear": "LINEAR", "yarn": "YARN"}


@dataclass(frozen=True)
class GGUFModelFile:
    path: Path
    outtype: str
    tensors: int
    modelfile: Path | None  # the Ollama Modelfile written beside it, if any
    notes: tuple[str, ...] = ()  # what the Modelfile could not carry (an untranslatable template)


def check_outtype(outtype: str) -> str:
    """`outtype` lower-cased if this writer can produce it; one-line error otherwise."""
    key = outtype.lower()
    if key in K_QUANTS:
        raise ValueError(f"--outtype {outtype}: gguf-py cannot quantize K-quants; write --outtype f16 and run "
                         f"llama.cpp's `llama-quantize model.gguf model-{key}.gguf {key.upper()}`")
    if key not in OUTTYPES:
        raise ValueError(f"--outtype must be one of {', '.join(OUTTYPES)}, not {outtype!r}")
    return key


def tensor_type(gguf_name: str, shape: tuple[int, ...], outtype: str):
    """The GGML type a weight named `gguf_name` with torch `shape` is stored in for `outtype`."""
    import gguf

    Q = gguf.GGMLQuantizationType
    if len(shape) == 1 or outtype == "f32":
        return Q.F32
    wanted = Q[outtype.upper()]
    if outtype in ("q4_0", "q4_1") and gguf_name in ("token_embd.weight", "output.weight"):
        wanted = Q.Q8_0
    block, _ = gguf.GGML_QUANT_SIZES[wanted]
    if shape[-1] % block:
        return Q.F16  # rows that are not whole blocks, as llama.cpp's converter falls back
    return wanted


def encode(value: np.ndarray, qtype) -> np.ndarray:
    """fp32 `value` in GGML type `qtype` (gguf-py's quantizers; F16/F32 as numpy floats)."""
    import gguf

    return gguf.quants.quantize(np.ascontiguousarray(value, dtype=np.float32), qtype)


def _rope(config, layer_type: str = "full_attention") -> tuple[float, dict]:
    """(rope theta, scaling parameters) from a transformers 4 or 5 config; Gemma 3 keeps one set
    per layer type (`layer_type`: "full_attention" or "sliding_attention")."""
    params = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    if isinstance(params.get(layer_type), dict):
        params = dict(params[layer_type])
    theta = params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    return float(theta), params


def _gemma_keys(writer, config, arch: GGUFArch) -> None:
    """What llama.cpp's gemma/gemma2/gemma3 loaders read beyond the common keys, and what they assume.

    Both tie the head to token_embd (gemma3 may store its own); gemma2 always soft-caps attention and
    final logits; gemma2/gemma3 scale queries by 1/sqrt(head_dim) (by 1/sqrt(hidden/heads) for the
    27B sizes, which transformers expresses as query_pre_attn_scalar) and read which layers use the
    sliding window from ``{arch}.attention.sliding_window_pattern`` (written here per layer).
    """
    if arch.name in ("gemma", "gemma2") and not config.tie_word_embeddings:
        raise ValueError(f"GGUF export: llama.cpp's {arch.name} reads the output head from token_embd; "
                         "this model's head is untied (tie_word_embeddings is false)")
    if arch.name == "gemma":
        return
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    scalar = getattr(config, "query_pre_attn_scalar", None)
    if scalar not in (None, head_dim, config.hidden_size // heads):
        raise ValueError(f"GGUF export: query_pre_attn_scalar {scalar} has no GGUF form: llama.cpp's {arch.name} "
                         f"scales queries by head_dim ({head_dim}) or hidden_size/heads")
    caps = {"attn_logit_softcapping": writer.add_attn_logit_softcapping,
            "final_logit_softcapping": writer.add_final_logit_softcapping}
    for key, add in caps.items():
        value = getattr(config, key, None)
        if value:
            add(float(value))
        elif arch.name == "gemma2":  # its loader caps with defaults (50, 30) when the keys are absent
            raise ValueError(f"GGUF export: llama.cpp's gemma2 always applies {key}; this model's is {value!r}")
    layer_types = getattr(config, "layer_types", None)
    if getattr(config, "sliding_window", None) and layer_types:
        writer.add_sliding_window(int(config.sliding_window))
        writer.add_sliding_window_pattern([t == "sliding_attention" for t in layer_types])
        theta, local = _rope(config, "sliding_attention")
        if local.get("rope_type", "default") != "default":
            raise ValueError(f"GGUF export: rope scaling {local['rope_type']!r} on sliding-window layers "
                             "has no GGUF form here")
        writer.add_rope_freq_base_swa(theta)


# general.architecture -> the family's own keys (and checks), after the common ones
_FAMILY_KEYS = {"gemma": _gemma_keys, "gemma2": _gemma_keys, "gemma3": _gemma_keys}


def write_hparams(writer, config, arch: GGUFArch, name: str) -> None:
    """The ``general.*`` and ``{arch}.*`` keys llama.cpp's loader reads for `config`."""
    import gguf

    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or heads)
    if head_dim != config.hidden_size // heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    theta, rope = _rope(config)
    writer.add_rope_freq_base(theta)
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        if rope_type not in _ROPE_SCALING:
            raise ValueError(f"GGUF export: rope scaling {rope_type!r} has no GGUF form here "
                             f"(supported: {', '.join(_ROPE_SCALING)})")
        writer.add_rope_scaling_type(gguf.RopeScalingType[_ROPE_SCALING[rope_type]])
        writer.add_rope_scaling_factor(float(rope["factor"]))
        if "original_max_position_embeddings" in rope:
            writer.add_rope_scaling_orig_ctx_len(int(rope["original_max_position_embeddings"]))
    if arch.name in _FAMILY_KEYS:
        _FAMILY_KEYS[arch.name](writer, config, arch)


def gguf_tensors(model: PreTrainedModel, arch: GGUFArch):
    """(GGUF name, fp32 numpy value in llama.cpp's row order) for each weight of `model`, in order."""
    config = model.config
    state = model.state_dict()
    if config.tie_word_embeddings:  # llama.cpp reads a missing output.weight as tied to token_embd
        head = model.get_output_embeddings()
        tied = {f"{n}.weight" for n, m in model.named_modules() if m is head}
        state = {k: v for k, v in state.items() if k not in tied}
    names = gguf_names(state, arch.member, config.num_hidden_layers)
    unnamed = [k for k in state if k not in names]
    if unnamed:
        raise ValueError(f"GGUF export: no llama.cpp tensor name for {', '.join(unnamed[:3])}"
                         f"{' ...' if len(unnamed) > 3 else ''} ({arch.name})")
    for hf_name, value in state.items():
        gguf_name = names[hf_name]
        value = value.detach().to("cpu").float()
        heads = rotary_heads(config, gguf_name) if arch.rope_permuted else None
        if heads is not None:
            value = permute_rows(value, heads)
        if arch.norm_offset and hf_name.endswith("norm.weight"):  # as llama.cpp's converter matches them
            value = value + arch.norm_offset
        yield gguf_name, value.numpy()


def write_gguf_model(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, path: str | os.PathLike,
                     outtype: str = "f16", *, pre: str | None = None, name: str | None = None) -> int:
    """Write `model` (a plain transformers causal LM) and `tokenizer` as a GGUF at `path`, a file
    opened by the caller (no atomicity here: see `merge_adapter_to_gguf`). Returns the tensor count.

    `pre` names llama.cpp's pre-tokenizer when it is known from elsewhere (the base's GGUF).
    """
    import gguf

    outtype = check_outtype(outtype)
    arch = arch_for_model_type(model.config.model_type, merged=True)
    vocab = gguf_vocab(tokenizer, model.config.vocab_size, pre=pre)
    writer = gguf.GGUFWriter(os.fspath(path), arch.name)
    try:
        write_hparams(writer, model.config, arch, name or Path(path).stem)
        file_type = "ALL_F32" if outtype == "f32" else f"MOSTLY_{outtype.upper()}"
        writer.add_file_type(getattr(gguf.LlamaFileType, file_type))
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        write_vocab(writer, vocab)
        count = 0
        for gguf_name, value in gguf_tensors(model, arch):
            qtype = tensor_type(gguf_name, value.shape, outtype)
            writer.add_tensor(gguf_name, encode(value, qtype), raw_dtype=qtype)
            count += 1
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
    return count


def source_pre_tokenizer(model_name: str) -> str | None:
    """The base GGUF's ``tokenizer.ggml.pre`` when the base is a GGUF (built-in or a .gguf path)."""
    from ..models.gguf_header import read_header
    from ..models.load import packed_gguf_path

    try:
        path = packed_gguf_path(model_name)
    except (ValueError, FileNotFoundError):
        return None
    return read_header(path).field("tokenizer.ggml.pre")


def merge_adapter_to_gguf(
    model_name: str | None,
    adapter_path: str | os.PathLike,
    output: str | os.PathLike,
    *,
    outtype: str = "f16",
    overwrite: bool = False,
    modelfile: str | os.PathLike | bool = True,
    quantization: Any = None,
) -> GGUFModelFile:
    """Merge the adapter into its base (fp32, CPU) and write one GGUF at `output`, plus an Ollama
    Modelfile (`modelfile=True`: ``Modelfile`` beside it; a path; or False for none).

    Both files are written to temp files and renamed into place together at the end, so an error
    leaves neither; an existing file is replaced only with `overwrite`. `quantization` (a QuantConfig)
    quantizes the base first, as the QLoRA run that trained the adapter did, so the merge goes onto
    the de-quantized 4-bit weights (a 4-bit base directory needs nothing).
    """
    from ..lora.io import atomic_files
    from ..models.inference import base_model_of, load_for_inference
    from .modelfile import modelfile_for

    out = Path(output).expanduser().absolute()
    outtype = check_outtype(outtype)
    if out.suffix.lower() != ".gguf":
        raise ValueError(f"a GGUF output path ends in .gguf, not {out.name!r}")
    mf = None if modelfile is False else out.parent / "Modelfile" if modelfile is True else Path(modelfile).absolute()
    for path in filter(None, (out, mf)):
        if path.exists() and not overwrite:
            raise FileExistsError(f"{path} exists; pass --overwrite to replace it")
        if path.is_dir():
            raise FileExistsError(f"{path} is a directory")
    base = model_name if model_name is not None else base_model_of(adapter_path)
    peft, tokenizer = load_for_inference(base, [adapter_path], dtype="float32", device="cpu",
                                         quantization=quantization)
    merged = peft.merge_and_unload()
    arch_for_model_type(merged.config.model_type, merged=True)  # refuse other families before any work
    notes: tuple[str, ...] = ()
    text = None
    if mf is not None:
        text, notes = modelfile_for(tokenizer, os.path.relpath(out, mf.parent))
    with atomic_files(*filter(None, (out, mf))) as temps:
        count = write_gguf_model(merged, tokenizer, temps[0], outtype, pre=source_pre_tokenizer(base), name=out.stem)
        if mf is not None:
            temps[1].write_text(text, encoding="utf-8")
    for note in notes:
        print(f"lorakit: note: {note}", file=sys.stderr)
    return GGUFModelFile(out, outtype, count, mf, notes)
