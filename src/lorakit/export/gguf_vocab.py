"""A transformers tokenizer as GGUF tokenizer metadata (``tokenizer.ggml.*``), the way llama.cpp reads it.

Byte-level BPE tokenizers (GPT-2 style: SmolLM2, Qwen2, Llama 3) are written as llama.cpp's
"gpt2" tokenizer model: the vocabulary by id (ids the tokenizer lacks up to the model's
vocab_size become unused ``[PAD{id}]`` entries), a token type per id (special added tokens are
control tokens, other added tokens user-defined), the merges, the special ids, whether a BOS/EOS is
added, and the pre-tokenizer by llama.cpp's name. llama.cpp splits text before BPE with a regex set
it picks by that name, so the name must describe the tokenizer's own pre-tokenizer:
`pre_tokenizer_name` reads it from tokenizer.json's structure, or takes the base GGUF's when the
base came from one.

SentencePiece-style tokenizers (Llama 2, Mistral 7B v0.1, Gemma: BPE over "▁"-escaped text with
byte fallback) are written as llama.cpp's "llama" tokenizer model: the pieces by id, a score per
piece, types (``<0xNN>`` byte pieces BYTE, the unknown token UNKNOWN), no merges, and whether a
"▁" is prepended to the text (`add_space_prefix`). llama.cpp's SentencePiece tokenizer merges the
adjacent pair whose joined piece scores highest, so each piece made by a merge scores minus that
merge's rank (the first merge scores highest), which gives the tokenizer's own merge order; pieces no
merge makes score below every merge. transformers reads such a file back into the same tokenizer
(its GGUF converter rebuilds the merges from the scores), which the tests use as the oracle.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

# llama.cpp token types (gguf.TokenType values)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
_BYTE_PIECE = re.compile(r"<0x[0-9A-Fa-f]{2}>")
SPACE = "\u2581"  # SentencePiece's "▁", what spaces become before its BPE

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

    model: str  # tokenizer.ggml.model: "gpt2" (byte-level BPE) or "llama" (SentencePiece)
    pre: str | None  # tokenizer.ggml.pre (byte-level BPE only)
    tokens: list[str]
    token_types: list[int]
    merges: list[str] | None  # byte-level BPE only
    special_ids: dict[str, int]  # "bos", "eos", "unk", "pad" -> id (those the tokenizer has)
    add_bos: bool
    add_eos: bool
    chat_template: str | None
    scores: list[float] | None = None  # SentencePiece only
    add_space_prefix: bool | None = None  # SentencePiece only


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

    `pre` overrides the pre-tokenizer name of a byte-level BPE tokenizer (the base GGUF's, when the
    base came from one).
    """
    spec = _tokenizer_json(tokenizer)
    model = spec.get("model", {})
    decoder = json.dumps(spec.get("decoder"))
    if model.get("type") == "BPE" and not model.get("byte_fallback") and "ByteLevel" in decoder:
        return _byte_level_vocab(tokenizer, spec, vocab_size, pre)
    if model.get("type") == "BPE" and model.get("byte_fallback") and "ByteFallback" in decoder:
        return _sentencepiece_vocab(tokenizer, spec, vocab_size)
    fallback = " with byte fallback" if model.get("byte_fallback") else ""
    raise ValueError("GGUF export writes byte-level BPE tokenizers (GPT-2, SmolLM2, Qwen2, Llama 3 style) and "
                     f"SentencePiece-style BPE ones with byte fallback (Llama 2, Gemma); this one is "
                     f"{model.get('type')!r}{fallback}")


def _byte_level_vocab(tokenizer: PreTrainedTokenizerBase, spec: dict, vocab_size: int, pre: str | None) -> GGUFVocab:
    pre = pre or pre_tokenizer_name(spec)
    if pre is None:
        raise ValueError(f"GGUF export: no llama.cpp pre-tokenizer matches this tokenizer's "
                         f"{json.dumps(spec.get('pre_tokenizer'))[:200]}; llama.cpp would split text differently")
    tokens, types = _token_table(spec, vocab_size, lambda i, piece: NORMAL)
    return GGUFVocab("gpt2", pre, tokens, types, _merge_strings(spec["model"].get("merges", [])),
                     *_specials(tokenizer))


def _sentencepiece_vocab(tokenizer: PreTrainedTokenizerBase, spec: dict, vocab_size: int) -> GGUFVocab:
    steps = json.dumps([spec.get("normalizer"), spec.get("pre_tokenizer")], ensure_ascii=False)
    if SPACE not in steps:
        raise ValueError("GGUF export: this byte-fallback tokenizer does not turn spaces into '\u2581' before its "
                         "BPE, as llama.cpp's SentencePiece tokenizer does; it would split text differently")
    unk = tokenizer.unk_token_id
    tokens, types = _token_table(spec, vocab_size, lambda i, piece: (
        UNKNOWN if i == unk else BYTE if _BYTE_PIECE.fullmatch(piece) else NORMAL))
    merges = _merge_strings(spec["model"].get("merges", []))
    made_by = {}
    for rank, merge in enumerate(merges):
        made_by.setdefault(merge.replace(" ", "", 1), rank)
    scores = [-float(made_by.get(piece, len(merges) + i)) if kind == NORMAL else 0.0
              for i, (piece, kind) in enumerate(zip(tokens, types))]
    return GGUFVocab("llama", None, tokens, types, None, *_specials(tokenizer), scores=scores,
                     add_space_prefix=_prepends_space(spec))


def _prepends_space(spec: dict) -> bool:
    """Whether the tokenizer puts a "▁" before the text (Llama 2: yes; Gemma: no), from tokenizer.json."""
    normalizers = [spec.get("normalizer") or {}]
    if normalizers[0].get("type") == "Sequence":
        normalizers = normalizers[0]["normalizers"]
    if any(n.get("type") == "Prepend" and n.get("prepend") == SPACE for n in normalizers):
        return True
    return any(step.get("type") == "Metaspace" and step.get("prepend_scheme", "always") != "never"
               for step in _pre_steps(spec.get("pre_tokenizer")))


def _token_table(spec: dict, vocab_size: int, kind) -> tuple[list[str], list[int]]:
    """Every id's token and type: the model's pieces (typed by `kind(id, piece)`), added tokens (special
    ones CONTROL), and ``[PAD{id}]`` UNUSED for ids up to `vocab_size` the tokenizer lacks."""
    by_id: dict[int, str] = {i: t for t, i in spec["model"]["vocab"].items()}
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
            continue
        tokens.append(by_id[i])
        kind_i = kind(i, by_id[i])
        if i in added and kind_i == NORMAL:
            kind_i = CONTROL if added[i].get("special") else USER_DEFINED
        types.append(kind_i)
    return tokens, types


def _specials(tokenizer: PreTrainedTokenizerBase) -> tuple[dict[str, int], bool, bool, str | None]:
    """(special ids, add BOS, add EOS, chat template): GGUFVocab's fields after the merges."""
    special_ids = {}
    for key in ("bos", "eos", "unk", "pad"):
        token_id = getattr(tokenizer, f"{key}_token_id", None)
        if token_id is not None:
            special_ids[key] = int(token_id)
    add_bos, add_eos = _adds(tokenizer)
    template = tokenizer.chat_template
    if isinstance(template, dict):
        template = template.get("default")
    return special_ids, add_bos, add_eos, template


def write_vocab(writer, vocab: GGUFVocab) -> None:
    """Add `vocab`'s keys to a gguf.GGUFWriter."""
    writer.add_tokenizer_model(vocab.model)
    if vocab.pre is not None:
        writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    if vocab.scores is not None:
        writer.add_token_scores(vocab.scores)
    writer.add_token_types(vocab.token_types)
    if vocab.merges is not None:
        writer.add_token_merges(vocab.merges)
    if vocab.add_space_prefix is not None:
        writer.add_add_space_prefix(vocab.add_space_prefix)
    adders = {"bos": writer.add_bos_token_id, "eos": writer.add_eos_token_id, "unk": writer.add_unk_token_id,
              "pad": writer.add_pad_token_id}
    for key, token_id in vocab.special_ids.items():
        adders[key](token_id)
    writer.add_add_bos_token(vocab.add_bos)
    writer.add_add_eos_token(vocab.add_eos)
    if vocab.chat_template:
        writer.add_chat_template(vocab.chat_template)
