"""`lorakit demo`'s pieces: finding its data, the recipe as a TrainConfig, and the whole flow on a tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lorakit import cli
from lorakit.demo.run import DemoResult, demo_train_config, find_data_dir, format_report, read_heldout, run_demo
from lorakit.demo.task import DEMO_RECIPE

REPO_DEMO = Path(__file__).resolve().parents[2] / "examples" / "demo"


def test_data_is_found_in_the_checkout():
    assert find_data_dir() == REPO_DEMO
    prompts, references = read_heldout(REPO_DEMO / "heldout.jsonl")
    assert len(prompts) == len(references) == 64
    assert prompts[0][-1]["role"] == "user" and json.loads(references[0])  # answers are JSON objects


def test_missing_data_dir_says_what_to_pass(tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match="--data-dir"):
        find_data_dir(tmp_path)
    assert cli.main(["demo", "--data-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "train.jsonl and heldout.jsonl" in err and str(tmp_path) in err


def test_recipe_becomes_the_train_config(tmp_path):
    config = demo_train_config(REPO_DEMO / "train.jsonl", tmp_path / "out", "smollm2-135m")
    recipe = DEMO_RECIPE
    assert (config.r, config.lora_alpha, config.lora_dropout) == (recipe["r"], recipe["alpha"], recipe["dropout"])
    assert config.target_modules == recipe["target_modules"]
    assert (config.lr, config.weight_decay, config.scheduler) == (recipe["lr"], recipe["weight_decay"],
                                                                  recipe["schedule"])
    assert (config.batch_size, config.max_steps, config.max_seq_len) == (
        recipe["batch_size"], recipe["steps"], recipe["max_seq_len"])
    assert (config.warmup_steps, config.seed, config.train_on_prompt) == (recipe["warmup_steps"], recipe["seed"], False)
    assert config.overwrite and config.output_dir == str(tmp_path / "out")


def tiny_task(directory: Path) -> Path:
    directory.mkdir()
    rows = [("book a table for two", '{"guests":2}'), ("book a table for four", '{"guests":4}'),
            ("hello world", '{"guests":7}')]
    lines = [json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]})
             for q, a in rows]
    (directory / "train.jsonl").write_text("\n".join(lines * 3) + "\n")
    (directory / "heldout.jsonl").write_text("\n".join(lines) + "\n")
    return directory


def test_demo_flow_on_a_tiny_model(tiny_dir, tmp_path):
    data = tiny_task(tmp_path / "data")
    out = tmp_path / "runs" / "demo"
    (out / "adapter").mkdir(parents=True)
    (out / "adapter" / "from-last-run.txt").write_text("old")  # each run replaces the last one's
    result = run_demo(data_dir=data, output_dir=out, model=str(tiny_dir), max_steps=2, log=lambda _: None)
    assert result.adapter_dir == out / "adapter"
    assert sorted(p.name for p in result.adapter_dir.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert len(result.before_answers) == len(result.after_answers) == 3
    assert result.before == 0.0  # a random model writes no JSON
    assert result.train_info["steps"] == 2 and result.train_seconds > 0
    report = format_report(result)
    assert "before fine-tuning:   0.0%" in report and str(out / "adapter") in report
    assert report.count("request:  ") == 3


def test_report_shows_right_answers_first():
    result = DemoResult(
        before=0.0, after=0.5, train_seconds=12.3, adapter_dir=Path("runs/demo/adapter"),
        prompts=["a", "b", "c", "d"], references=['{"x":1}'] * 4,
        before_answers=["no"] * 4, after_answers=["no", '{"x":1}', "no", '{"x": 1}'],
    )
    report = format_report(result, examples=2)
    assert "after fine-tuning:   50.0%" in report and "fine-tune wall time: 12 s" in report
    assert "request:  b" in report and "request:  d" in report and "request:  a" not in report
