"""read_header / hf_dir: a GGUF's metadata and tensor table parsed once, then read from the cache.

The oracle is gguf-py's own GGUFReader on the same file: every short field, every tensor's type,
shape and bytes; and transformers' config from the file itself."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
pytest.importorskip("accelerate")

from gguf import GGMLQuantizationType as Q  # noqa: E402

from lorakit.models import gguf_header  # noqa: E402
from lorakit.models.gguf_header import hf_dir, read_header  # noqa: E402
from ggufmodels import write_tiny_llama  # noqa: E402


@pytest.fixture
def tiny_gguf(tmp_path: Path, tmp_cache: Path) -> Path:
    path = tmp_path / "tiny.gguf"
    write_tiny_llama(path, Q.Q4_1, tied=False)
    return path


def test_header_matches_gguf_reader(tiny_gguf: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(gguf_header, "LONG_ARRAY", 8)  # the tiny vocabulary (64 tokens) counts as long
    header = read_header(tiny_gguf)
    reader = gguf.GGUFReader(tiny_gguf)
    assert header.architecture == "llama"
    assert header.field("llama.attention.head_count_kv") == reader.fields["llama.attention.head_count_kv"].contents()
    assert "tokenizer.ggml.tokens" not in header.fields  # a vocabulary-long array stays in the file
    assert header.field("tokenizer.ggml.merges") == ["a b"]  # a short one is kept
    assert set(header.tensors) == {t.name for t in reader.tensors}
    for t in reader.tensors:
        entry = header.tensors[t.name]
        assert entry.qtype == int(t.tensor_type)
        assert entry.shape == tuple(int(n) for n in reversed(t.shape.tolist()))
        ours = header.tensor_bytes(t.name).numpy()
        assert np.array_equal(ours, np.asarray(t.data).reshape(-1).view(np.uint8))


def test_second_read_comes_from_the_cache(tiny_gguf: Path, tmp_cache: Path, monkeypatch: pytest.MonkeyPatch):
    read_header(tiny_gguf)
    gguf_header._header.cache_clear()  # a new process: only the disk cache is left

    def no_parse(path):
        raise AssertionError(f"parsed {path} again")

    monkeypatch.setattr(gguf_header, "open_gguf", no_parse)
    assert read_header(tiny_gguf).architecture == "llama"
    assert any((tmp_cache / "gguf-headers").iterdir())


def test_an_edited_file_is_parsed_again(tiny_gguf: Path, tmp_path: Path):
    first = read_header(tiny_gguf)
    other = tmp_path / "other.gguf"
    write_tiny_llama(other, Q.Q8_0, tied=True, seed=1)
    os.replace(other, tiny_gguf)
    os.utime(tiny_gguf, ns=(1, 1))  # a different mtime even on a coarse clock
    second = read_header(tiny_gguf)
    assert first.tensors["blk.0.attn_q.weight"].qtype == Q.Q4_1
    assert second.tensors["blk.0.attn_q.weight"].qtype == Q.Q8_0
    assert "output.weight" not in second.tensors


def test_hf_dir_holds_the_config_transformers_derives(tiny_gguf: Path):
    from transformers import AutoConfig, AutoTokenizer

    direct = AutoConfig.from_pretrained(str(tiny_gguf.parent), gguf_file=tiny_gguf.name)
    cached = AutoConfig.from_pretrained(hf_dir(tiny_gguf))
    for key in ("model_type", "hidden_size", "num_hidden_layers", "num_key_value_heads", "vocab_size"):
        assert getattr(cached, key) == getattr(direct, key)
    assert not hasattr(cached, "quantization_config")
    assert cached.pad_token_id is not None
    tokenizer = AutoTokenizer.from_pretrained(hf_dir(tiny_gguf))
    assert tokenizer.convert_ids_to_tokens([2]) == ["ab"]


@pytest.mark.parametrize("damage", ["magic", "truncated"])
def test_a_corrupt_file_is_refused_in_one_line(tiny_gguf: Path, damage: str):
    data = tiny_gguf.read_bytes()
    tiny_gguf.write_bytes(b"GGUX" + data[4:] if damage == "magic" else data[: len(data) - 100])
    with pytest.raises(ValueError) as err:
        read_header(tiny_gguf)
    message = str(err.value)
    assert "\n" not in message and str(tiny_gguf) in message
    assert ("bad magic" if damage == "magic" else "past the end") in message
