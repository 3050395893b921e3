"""Recipes' serve_target (the serving check before training) and report_to (TensorBoard, W&B)."""

from __future__ import annotations

import importlib.util
import json
import sys

import pytest

from lorakit.train import ConfigError, TrainConfig, train
from lorakit.train.reporting import TensorBoardReporter, WandbReporter

HAS_TENSORBOARD = importlib.util.find_spec("tensorboard") is not None
HAS_WANDB = importlib.util.find_spec("wandb") is not None


def test_serve_target_stops_a_run_before_training(base_config, tmp_path):
    config = TrainConfig(**base_config, max_steps=2, serve_target=["vllm", "llama.cpp"], use_dora=True, r=64)
    with pytest.raises(ConfigError) as err:
        train(config)
    message = str(err.value)
    assert message.startswith("serve_target: the adapter would fail 3 rule(s): ")
    assert "vllm: no DoRA: use_dora: true; fix:" in message and "--max-lora-rank 64" in message
    assert "llama.cpp: no DoRA" in message
    out = tmp_path / "run"
    assert not (out / "metrics.jsonl").exists() and not (out / "adapter").exists()


def test_serve_target_that_passes_trains_and_the_saved_adapter_passes_too(base_config, tmp_path, capsys):
    from lorakit import cli

    result = train(TrainConfig(**base_config, max_steps=1, serve_target="vllm", lora_alpha=32))
    capsys.readouterr()
    assert cli.main(["check", str(result.adapter_dir), "--target", "vllm"]) == 0
    assert capsys.readouterr().out.strip() == "vllm: ok"


def test_serve_target_and_report_to_names_are_checked(base_config):
    with pytest.raises(ConfigError, match="serve_target: unknown serve target 'vlm'; targets: vllm, lorax"):
        TrainConfig(**base_config, serve_target="vlm")
    with pytest.raises(ConfigError, match="serve_target: checks a LoRA adapter"):
        TrainConfig(**base_config, serve_target="vllm", method="full")
    with pytest.raises(ConfigError, match="report_to: unknown 'tensorbord'; expected tensorboard, wandb or none"):
        TrainConfig(**base_config, report_to=["tensorbord"])
    assert TrainConfig(**base_config).reporters() == []


@pytest.mark.parametrize("name", ["tensorboard", "wandb"])
def test_missing_package_is_one_line(base_config, monkeypatch, name):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == name else real(n, *a))
    with pytest.raises(ConfigError, match=rf"^report_to: {name} needs the {name} package: "
                                          rf"pip install 'lorakit\[{name}\]'$"):
        TrainConfig(**base_config, report_to=[name])


def test_reporters_say_the_same_when_their_import_fails(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "wandb", None)
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    for cls, name in ((WandbReporter, "wandb"), (TensorBoardReporter, "tensorboard")):
        with pytest.raises(ImportError, match=rf"report_to: {name} needs the {name} package"):
            cls(tmp_path, {})


@pytest.mark.skipif(not HAS_TENSORBOARD, reason="tensorboard is not installed (pip install 'lorakit[tensorboard]')")
def test_tensorboard_has_the_metrics_hparams_and_config(base_config, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    result = train(TrainConfig(**{**base_config, "lr": 3e-3}, max_steps=3, report_to="tensorboard"))
    logged = [json.loads(line) for line in (result.output_dir / "metrics.jsonl").read_text().splitlines()]
    events = EventAccumulator(str(result.output_dir / "tensorboard"), size_guidance={"tensors": 0}).Reload()
    loss = events.Scalars("loss")
    assert [e.step for e in loss] == [r["step"] for r in logged] == [1, 2, 3]
    assert [e.value for e in loss] == pytest.approx([r["loss"] for r in logged], rel=1e-6)
    assert [e.value for e in events.Scalars("lr")] == pytest.approx([r["lr"] for r in logged], rel=1e-6)
    from tensorboard.plugins.hparams import plugin_data_pb2

    start = events.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    hparams = plugin_data_pb2.HParamsPluginData.FromString(start).session_start_info.hparams
    assert hparams["lr"].number_value == pytest.approx(3e-3) and hparams["r"].number_value == 16
    assert hparams["scheduler"].string_value == "cosine"
    text = events.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "lr: 0.003" in text and "report_to: tensorboard" in text


@pytest.mark.skipif(not HAS_TENSORBOARD, reason="tensorboard is not installed (pip install 'lorakit[tensorboard]')")
def test_tensorboard_resume_replaces_the_steps_logged_again(base_config, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    options = dict(base_config, report_to="tensorboard", save_every=2)
    train(TrainConfig(**options, max_steps=3))
    result = train(TrainConfig(**options, max_steps=4, resume="latest"))  # continues after step 2
    events = EventAccumulator(str(result.output_dir / "tensorboard")).Reload()
    steps = [e.step for e in events.Scalars("loss")]
    assert steps == [1, 2, 3, 4]


@pytest.mark.skipif(not HAS_WANDB, reason="wandb is not installed (pip install 'lorakit[wandb]')")
def test_wandb_runs_offline_with_the_config(base_config, tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    result = train(TrainConfig(**base_config, max_steps=2, report_to=["wandb"]))
    import os

    assert os.environ["WANDB_MODE"] == "offline"
    runs = list((result.output_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
