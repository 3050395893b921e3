"""SentencePiece-style tokenizers (Llama 2, Gemma: byte fallback) in a merged GGUF: llama.cpp's
"llama" tokenizer model. The oracle is transformers' GGUF tokenizer loader, which rebuilds the BPE
merges from the scores the file holds, as llama.cpp's SentencePiece tokenizer orders them: the
tokenizer it reads back must encode and decode every text as the original does."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

gguf = pytest.importorskip("gguf")
pytest.importorskip("accelerate")

from lorakit.export.gguf_model import write_gguf_model  # noqa: E402
from lorakit.export.gguf_vocab import BYTE, CONTROL, NORMAL, UNKNOWN, gguf_vocab  # noqa: E402
from ggufmodels import spm_tokenizer  # noqa: E402

TEXTS = ["the quick brown fox", "table for two on saturday at eight", "hello  there,world",
         "Zebra 42 café über", "the lazy dog jumps over the fox", "ünïcödé ✓ 漢字"]
# (a text that starts with a space is left out: transformers reads the prefix space back as a
# Metaspace, which does not add a second "▁" there; llama.cpp does, as the original tokenizer)


def tiny_llama(vocab_size: int, tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                        max_position_embeddings=64, bos_token_id=tokenizer.bos_token_id,
                                        eos_token_id=tokenizer.eos_token_id)).eval()


def test_pieces_scores_and_types(tmp_path: Path):
    tokenizer = spm_tokenizer()
    vocab = gguf_vocab(tokenizer, len(tokenizer) + 4)
    assert (vocab.model, vocab.pre, vocab.merges, vocab.add_space_prefix) == ("llama", None, None, True)
    assert vocab.token_types[:4] == [UNKNOWN, CONTROL, CONTROL, BYTE]
    assert vocab.tokens[3:259] == [f"<0x{b:02X}>" for b in range(256)] and set(vocab.token_types[3:259]) == {BYTE}
    assert vocab.tokens[-4:] == [f"[PAD{i}]" for i in range(len(tokenizer), len(tokenizer) + 4)]
    merged = {m.replace(" ", "") for m in _merges(tokenizer)}
    normal = [i for i, t in enumerate(vocab.token_types) if t == NORMAL]
    made = [i for i in normal if vocab.tokens[i] in merged]
    assert made and all(vocab.scores[i] > vocab.scores[j] for i in made for j in normal if j not in made)
    assert gguf_vocab(spm_tokenizer(prepend_space=False), len(tokenizer)).add_space_prefix is False


def _merges(tokenizer) -> list[str]:
    import json

    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    return [m if isinstance(m, str) else " ".join(m) for m in merges]


def test_transformers_reads_back_the_same_tokenizer(tmp_path: Path):
    from transformers import AutoTokenizer

    tokenizer = spm_tokenizer()
    path = tmp_path / "spm.gguf"
    write_gguf_model(tiny_llama(len(tokenizer), tokenizer), tokenizer, path, "f16")
    fields = gguf.GGUFReader(path).fields
    assert fields["tokenizer.ggml.model"].contents() == "llama"
    assert "tokenizer.ggml.merges" not in fields and "tokenizer.ggml.scores" in fields
    assert fields["tokenizer.ggml.add_space_prefix"].contents() is True
    back = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    for text in TEXTS:
        want = tokenizer(text).input_ids
        assert back(text).input_ids == want, (text, tokenizer.convert_ids_to_tokens(want),
                                              back.convert_ids_to_tokens(back(text).input_ids))
        assert back.decode(want, skip_special_tokens=True) == tokenizer.decode(want, skip_special_tokens=True)


def test_a_tokenizer_that_keeps_spaces_is_refused(tmp_path: Path):
    from tokenizers import normalizers

    tokenizer = spm_tokenizer()
    tokenizer.backend_tokenizer.normalizer = normalizers.Lowercase()
    with pytest.raises(ValueError, match="does not turn spaces into") as err:
        gguf_vocab(tokenizer, len(tokenizer))
    assert "\n" not in str(err.value)
