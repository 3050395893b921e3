"""A transformers tokenizer as GGUF tokenizer metadata (``tokenizer.ggml.*``), the way llama.cpp reads it.

Byte-level BPE tokenizers (GPT-2 style: SmolLM2, Qwen2, Llama 3) are written as llama.cpp's
"gpt2" tokenizer model: the vocabulary by id (ids the tokenizer lacks up to the model's
vocab_size become unused ``[PAD{id}]`` entries), a token type per id (special added tokens are
control tokens, other added tokens user-defined), the merges, the special ids, whether a BOS/EOS is
added, and the pre-tokenizer by llama.cpp's name. llama.cpp splits text before BPE with a regex set
it picks by that name, so the name must describe the tokenizer's own pre-tokenizer:
`pre_tokenizer_name` reads it from tokenizer.json's structure, or takes the base GGUF's when the
base came from one. SentencePiece-style tokenizers (byte fallback, llama.cpp's "llama" model) are
not written yet and refuse in one line.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

# llama.cpp token types (gguf.TokenType values)
NORMAL, CONTROL, USER_DEFINED, UNUSED = 1, 3, 4, 5

# transformers' regex in a Split pre-tokenizer -> llama.cpp's pre-tokenizer of the same split
_SPLIT_REGEX_PRE = {
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+":
        "qwen2",
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+":
        "llama-bpe",
}


@dataclass(frozen=True)
class GGUFVocab:
    """What a GGUF's ``tokenizer.ggml.*`` keys hold."""

    model: str  # tokenizer.ggml.model
    pre: str  # tokenizer.ggml.pre
    tokens: list[str]
    token_types: list[int]
    merges: list[str]
    special_ids: dict[str, int]  # "bos", "eos", "unk", "pad" -> id (those the tokenizer has)
    add_bos: bool
    add_eos: bool
    chat_template: str | None


def _tokenizer_json(tokenizer: PreTrainedTokenizerBase) -> dict:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ValueError(f"GGUF export needs a fast (tokenizers) tokenizer, not {type(tokenizer).__name__}")
    return json.loads(backend.to_str())


def _pre_steps(pre: dict | None) -> list[dict]:
    if pre is None:
        return []
    return list(pre["pretokenizers"]) if pre.get("type") == "Sequence" else [pre]


def pre_tokenizer_name(spec: dict) -> str | None:
    """llama.cpp's name for the pre-tokenizer of tokenizer.json `spec`, or None when none matches."""
    steps = _pre_steps(spec.get("pre_tokenizer"))
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"  # digits one by one, then GPT-2's split (llama.cpp: the starcoder regexes)
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        return _SPLIT_REGEX_PRE.get(steps[0].get("pattern", {}).get("Regex"))
    return None


def _merge_strings(merges: list) -> list[str]:
    return [m if isinstance(m, str) else " ".join(m) for m in merges]


def _adds(tokenizer: PreTrainedTokenizerBase) -> tuple[bool, bool]:
    """Whether encoding a text adds BOS / EOS, seen on the tokenizer's own output."""
    plain = tokenizer("a b", add_special_tokens=False)["input_ids"]
    full = tokenizer("a b")["input_ids"]
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    add_bos = bos is not None and len(full) > len(plain) and full[0] == bos and full[1:len(plain) + 1] == plain
    add_eos = eos is not None and len(full) > len(plain) and full[-1] == eos and full[-len(plain) - 1:-1] == plain
    return add_bos, add_eos


def gguf_vocab(tokenizer: PreTrainedTokenizerBase, vocab_size: int, *, pre: str | None = None) -> GGUFVocab:
    """`tokenizer` as GGUF metadata for a model with `vocab_size` embedding rows.

    `pre` overrides the pre-tokenizer name (the base GGUF's, when the base came from one).
    """
    spec = _tokenizer_json(tokenizer)
    model = spec.get("model", {})
    if model.get("type") != "BPE" or model.get("byte_fallback") or "ByteLevel" not in json.dumps(spec.get("decoder")):
        fallback = " with byte fallback" if model.get("byte_fallback") else ""
        raise ValueError("GGUF export writes byte-level BPE tokenizers (GPT-2, SmolLM2, Qwen2, Llama 3 style); "
                         f"this one is {model.get('type')!r}{fallback}")
    pre = pre or pre_tokenizer_name(spec)
    if pre is None:
        raise ValueError(f"GGUF export: no llama.cpp pre-tokenizer matches this tokenizer's "
                         f"{json.dumps(spec.get('pre_tokenizer'))[:200]}; llama.cpp would split text differently")

    by_id: dict[int, str] = {i: t for t, i in model["vocab"].items()}
    added: dict[int, dict] = {a["id"]: a for a in spec.get("added_tokens", [])}
    for i, a in added.items():
        by_id[i] = a["content"]
    size = max(vocab_size, max(by_id) + 1)
    if size > vocab_size:
        raise ValueError(f"the tokenizer has ids up to {size - 1}, the model only {vocab_size} embedding rows")
    tokens, types = [], []
    for i in range(size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(UNUSED)
        elif i in added:
            tokens.append(by_id[i])
            types.append(CONTROL if added[i].get("special") else USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(NORMAL)

    special_ids = {}
    for key in ("bos", "eos", "unk", "pad"):
        token_id = getattr(tokenizer, f"{key}_token_id", None)
        if token_id is not None:
            special_ids[key] = int(token_id)
    add_bos, add_eos = _adds(tokenizer)
    template = tokenizer.chat_template
    if isinstance(template, dict):
        template = template.get("default")
    return GGUFVocab("gpt2", pre, tokens, types, _merge_strings(model.get("merges", [])), special_ids,
                     add_bos, add_eos, template)


def write_vocab(writer, vocab: GGUFVocab) -> None:
    """Add `vocab`'s keys to a gguf.GGUFWriter."""
    writer.add_tokenizer_model(vocab.model)
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.token_types)
    writer.add_token_merges(vocab.merges)
    adders = {"bos": writer.add_bos_token_id, "eos": writer.add_eos_token_id, "unk": writer.add_unk_token_id,
              "pad": writer.add_pad_token_id}
    for key, token_id in vocab.special_ids.items():
        adders[key](token_id)
    writer.add_add_bos_token(vocab.add_bos)
    writer.add_add_eos_token(vocab.add_eos)
    if vocab.chat_template:
        writer.add_chat_template(vocab.chat_template)
