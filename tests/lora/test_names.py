"""The one rule naming an adapter after its directory, and the three places that use it."""

from __future__ import annotations

import pytest

from lorakit import BASE, LoraConfig, PeftModel, get_peft_model
from lorakit.commands.serve import parse_adapter_spec
from lorakit.lora.names import adapter_name_for, adapter_names_for
from tinymodels import tiny_llama


@pytest.mark.parametrize("path,name", [
    ("x/alpha", "alpha"),
    ("runs/a/adapter", "a"),  # a run's adapter/ folder is named by the run
    ("runs/a/adapter/", "a"),
    ("z/my adapter!", "my-adapter"),
    ("v/model.v2", "model.v2"),
    ("w/_private_", "private"),  # never starts with `_`, `.` or `-` (the server's name rule)
    ("w/__base__", "base"),
    ("w/!!!", "adapter"),
    ("w/" + "a" * 300, "a" * 100),
])
def test_name_is_the_folder_made_safe(path, name):
    assert adapter_name_for(path) == name


def test_taken_names_and_base_get_numbered():
    assert adapter_name_for("x/alpha", {"alpha", "alpha-2"}) == "alpha-3"
    assert adapter_names_for(["runs/a/adapter", "runs/b/adapter", "x/alpha", "y/alpha", "z/my adapter!"]) == [
        "a", "b", "alpha", "alpha-2", "my-adapter"]
    assert adapter_names_for(["x/alpha"], taken={"alpha"}) == ["alpha-2"]
    assert BASE not in adapter_names_for(["a/__base__", "b/__base__"])


def test_symlinks_are_not_followed(tmp_path):
    (tmp_path / "run-7").mkdir()
    (tmp_path / "latest").symlink_to(tmp_path / "run-7")
    assert adapter_name_for(tmp_path / "latest") == "latest"


def test_serve_names_a_bare_path_by_the_rule(tmp_path):
    (tmp_path / "a" / "adapter").mkdir(parents=True)
    (tmp_path / "b" / "adapter").mkdir(parents=True)
    assert parse_adapter_spec(str(tmp_path / "a" / "adapter")) == ("a", str(tmp_path / "a" / "adapter"))
    assert parse_adapter_spec(str(tmp_path / "b"), taken=["b"])[0] == "b-2"
    assert parse_adapter_spec(f"b={tmp_path / 'b'}", taken=["b"])[0] == "b"  # a given name is left alone


def test_from_pretrained_names_a_clashing_adapter_by_the_rule(tmp_path):
    path = tmp_path / "run-3" / "adapter"
    get_peft_model(tiny_llama(), LoraConfig(target_modules=["q_proj"])).save_pretrained(path)
    base = tiny_llama()
    PeftModel.from_pretrained(base, path)  # takes "default"
    second = PeftModel.from_pretrained(base, path)
    third = PeftModel.from_pretrained(base, path)
    assert (second.active_adapter, third.active_adapter) == ("run-3", "run-3-2")
