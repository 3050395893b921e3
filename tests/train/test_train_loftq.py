"""LoftQ in the trainer: `init_lora_weights: loftq` on a 4-bit base, and the base it rewrites saved
beside the adapter so that the adapter runs where it was trained."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from train_helpers import assert_resumes_as_uninterrupted, losses, poison_loss

from lorakit import PeftModel
from lorakit.bases.linear4bit import Linear4bit
from lorakit.models import load_model
from lorakit.train import ConfigError, TrainConfig, TrainingDiverged, load_train_config, train
from lorakit.train import loop as train_loop

PROMPT = torch.tensor([[5, 60, 70, 80, 90, 100, 33]])


def codes(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n.replace(".base_layer", ""): m.weight for n, m in model.named_modules() if isinstance(m, Linear4bit)}


def test_a_rewritten_base_is_saved_and_the_adapter_runs_on_it(base_config, tiny_model, capsys):
    config = load_train_config(None, ["quantize=nf4", "init_lora_weights=loftq", "loftq_config={loftq_iter: 3}"],
                               **dict(base_config, quiet=False), max_steps=6)
    assert config.loftq_config == {"loftq_iter": 3} and config.rewrites_base()
    result = train(config)
    out = Path(base_config["output_dir"])
    assert f"(double quant), LoftQ start (3 rounds; base saved in {out / 'base'}):" in capsys.readouterr().err
    run = losses(out)
    assert run[6] < run[1]
    adapter = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == str((out / "base").resolve())
    assert (adapter["init_lora_weights"], adapter["loftq_config"]) == (True, {})

    saved, _ = load_model(adapter["base_model_name_or_path"])  # a transformers + bitsandbytes 4-bit directory
    trained = codes(result.model.base_model.model)
    assert all(torch.equal(trained[n], c) for n, c in codes(saved).items()) and len(trained) == 14
    plain, _ = load_model(str(tiny_model), quantization="nf4")
    assert any(not torch.equal(trained[n], c) for n, c in codes(plain).items())  # LoftQ rewrote it
    with torch.no_grad():
        ours = result.model(PROMPT).logits
        torch.testing.assert_close(PeftModel.from_pretrained(saved, out / "adapter")(PROMPT).logits, ours)


def test_one_iteration_keeps_the_model_as_the_base(base_config, tiny_model):
    result = train(TrainConfig(**base_config, max_steps=2, quantize="nf4", init_lora_weights="loftq"))
    out = Path(base_config["output_dir"])
    assert not (out / "base").exists()
    adapter = json.loads((result.adapter_dir / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == str(tiny_model)


@pytest.mark.parametrize("items, message", [
    (["init_lora_weights=loftq"], r"^init_lora_weights: loftq starts the adapter against a 4-bit base; set quantize"),
    (["quantize=nf4", "init_lora_weights=loftq", "loftq_config={loftq_bits: 8}"],
     r"^loftq_config\.loftq_bits: lorakit's LoftQ quantizes to 4 bits, got 8$"),
])
def test_bad_loftq_recipes_are_one_line_errors(items, message, base_config):
    with pytest.raises(ConfigError, match=message):
        train(load_train_config(None, items, **base_config))


def test_a_resumed_loftq_run_continues_as_the_uninterrupted_one(base_config, monkeypatch, tmp_path):
    real = train_loop.causal_lm_loss
    poison_loss(monkeypatch, from_call=5)
    config = dict(base_config, max_steps=8, save_every=2, quantize="nf4", init_lora_weights="loftq",
                  loftq_config={"loftq_iter": 2})
    with pytest.raises(TrainingDiverged):
        train(TrainConfig(**config))
    monkeypatch.setattr(train_loop, "causal_lm_loss", real)
    with pytest.raises(ConfigError, match="loftq_config"):  # a different start is a different run
        train(TrainConfig(**{**config, "loftq_config": {"loftq_iter": 3}}, resume="latest"))
    assert_resumes_as_uninterrupted(config, tmp_path / "reference")
