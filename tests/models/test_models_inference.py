"""models.inference: which base an adapter gets and which directories count as adapters."""

from __future__ import annotations

import json

import pytest

import lorakit.generation
from lorakit.models import DEFAULT_MODEL, base_model_of, check_adapter_dir, model_is_available


def adapter_with_base(directory, base) -> str:
    directory.mkdir(parents=True)
    (directory / "adapter_config.json").write_text(json.dumps({"r": 4, "base_model_name_or_path": base}))
    return str(directory)


def test_recorded_base_is_used_when_it_is_here(tmp_path):
    (tmp_path / "base").mkdir()
    assert base_model_of(adapter_with_base(tmp_path / "a", str(tmp_path / "base"))) == str(tmp_path / "base")
    assert base_model_of(adapter_with_base(tmp_path / "b", "SmolLM2-135M")) == "SmolLM2-135M"  # built-in


def test_missing_recorded_base_falls_back_with_a_note(tmp_path, capsys):
    missing = str(tmp_path / "gone")
    assert not model_is_available(missing)
    assert base_model_of(adapter_with_base(tmp_path / "a", missing)) == DEFAULT_MODEL
    assert missing in capsys.readouterr().err
    assert base_model_of(adapter_with_base(tmp_path / "b", None)) == DEFAULT_MODEL


def test_adapter_dir_check_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="adapter directory not found"):
        check_adapter_dir(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="is not an adapter directory"):
        check_adapter_dir(tmp_path)
    check_adapter_dir(adapter_with_base(tmp_path / "ok", None))


def test_generation_only_generates():
    public = {name for name in vars(lorakit.generation) if not name.startswith("_") and callable(
        getattr(lorakit.generation, name)) and getattr(lorakit.generation, name).__module__ == "lorakit.generation"}
    assert public == {"generate", "prompt_text"}
