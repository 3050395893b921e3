"""`lorakit train`: YAML, key=value and --flags reach the trainer's TrainConfig in the right order."""

from __future__ import annotations

from pathlib import Path

import pytest

import lorakit.train
from lorakit import cli
from lorakit.train import TrainConfig, TrainResult


@pytest.fixture
def captured(monkeypatch, tmp_path) -> list[TrainConfig]:
    """Replace the trainer with one that records its config and returns a finished-looking result."""
    configs: list[TrainConfig] = []

    def fake_train(config: TrainConfig) -> TrainResult:
        configs.append(config)
        out = Path(config.output_dir)
        return TrainResult(
            output_dir=out, adapter_dir=out / "adapter", model_dir=None, metrics_path=out / "metrics.jsonl",
            plot_path=None, last_checkpoint=None, steps=config.max_steps or 1, train_loss=0.25,
            eval_loss=None, tokens_per_s=1000.0, train_time_s=2.0, wall_time_s=3.0,
        )

    monkeypatch.setattr(lorakit.train, "train", fake_train)
    return configs


def test_file_then_overrides_then_flags(captured, tmp_path, capsys):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("data: train.jsonl\nlr: 1.0e-4\nbatch_size: 3\nr: 4\n")
    code = cli.main(["train", str(recipe), "lr=2e-4", "r=8", "--lr", "5e-4", "--packing",
                     "--target-modules", "q_proj,v_proj", "--output-dir", str(tmp_path / "run")])
    assert code == 0
    [config] = captured
    assert config.lr == 5e-4  # the flag wins over key=value, which wins over the file
    assert (config.r, config.batch_size, config.data) == (8, 3, "train.jsonl")
    assert config.packing is True and config.target_modules == ["q_proj", "v_proj"]
    assert config.epochs == TrainConfig.__dataclass_fields__["epochs"].default  # untouched: default
    out = capsys.readouterr().out
    assert f"adapter: {tmp_path / 'run' / 'adapter'}" in out and "final loss 0.2500" in out


def test_flags_alone_without_a_file(captured):
    assert cli.main(["train", "--data", "d.jsonl", "--max-steps", "7", "--no-overwrite"]) == 0
    assert (captured[0].data, captured[0].max_steps, captured[0].overwrite) == ("d.jsonl", 7, False)


def test_lora_config_fields_are_flags_too(captured, capsys):
    assert cli.main(["train", "--data", "d.jsonl", "--rank-pattern", "{q_proj: 4}", "--layers-to-transform", "0,1",
                     "--layers-pattern", "layers", "--exclude-modules", "k_proj,o_proj", "--use-dora",
                     "--bias", "all"]) == 0
    lora = captured[0].lora_config()
    assert (lora.rank_pattern, lora.layers_to_transform, lora.layers_pattern) == ({"q_proj": 4}, [0, 1], "layers")
    assert (lora.exclude_modules, lora.use_dora, lora.bias) == ({"k_proj", "o_proj"}, True, "all")
    assert cli.main(["train", "--data", "d.jsonl", "--use-dora", "--lora-bias"]) == 2
    assert capsys.readouterr().err == "lorakit: error: lora_bias: not supported together with use_dora\n"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["data=d.jsonl", "learning_rate=1e-3"], "unknown option 'learning_rate'; did you mean 'lr'?"),
        (["data=d.jsonl", "lr=fast"], "lr: expected a number, got 'fast'"),
        (["cfg.yaml", "stray"], "expected key=value, got 'stray'"),
        (["missing.yaml"], "config file not found: missing.yaml"),
        (["max_steps=3"], "data: required"),
    ],
)
def test_bad_training_input_is_one_line(captured, capsys, argv, message):
    assert cli.main(["train", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lorakit: error: ") and err.count("\n") == 1 and message in err
    assert captured == []  # nothing ran


def test_bad_flag_type_is_caught_by_the_parser(captured, capsys):
    assert cli.main(["train", "--data", "d.jsonl", "--batch-size", "eight"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lorakit train: error: argument --batch-size") and err.count("\n") == 1
