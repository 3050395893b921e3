"""README's quickstart code runs as written and prints what README says it prints."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


@pytest.mark.slow
def test_quickstart_runs_and_prints_the_documented_count(tmp_path, monkeypatch):
    block = next(b for b in _python_blocks() if "get_peft_model(model, config)" in b)
    expected = re.search(r"# (trainable params: .*)", block).group(1)
    monkeypatch.chdir(tmp_path)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(block, {})
    assert expected in out.getvalue()
    assert (tmp_path / "my-lora-adapter" / "adapter_model.safetensors").exists()


@pytest.mark.slow
def test_the_qlora_quickstart_runs_and_saves_an_adapter_for_the_4bit_base(tmp_path, monkeypatch):
    from lorakit.bases.linear4bit import Linear4bit

    block = next(b for b in _python_blocks() if "prepare_model_for_kbit_training(model)" in b)
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(block, scope)
    assert (tmp_path / "my-qlora-adapter" / "adapter_model.safetensors").exists()
    assert not any(isinstance(m, Linear4bit) for m in scope["merged"].modules())
    assert scope["merged"].model.layers[0].mlp.down_proj.weight.is_floating_point()  # merged onto de-quantized W
