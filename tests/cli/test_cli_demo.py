"""`lorakit demo`'s pieces: finding its data, the recipe as a TrainConfig, and the whole flow on a tiny model."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest

from lorakit import cli
from lorakit.demo.run import (DemoResult, GGUFExport, demo_train_config, find_data_dir, format_report, read_heldout,
                              run_demo)
from lorakit.export import inspect_adapter
from lorakit.models.embedded import builtin_gguf_path
from lorakit.train import load_train_config
from lorakit.train.config import SEVEN_PROJECTIONS

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


def test_recipe_keeps_the_demos_hyper_parameters(tmp_path):
    config = demo_train_config(REPO_DEMO, tmp_path / "out")
    assert (config.model, config.r, config.lora_alpha, config.lora_dropout) == ("smollm2-135m", 16, 32.0, 0.0)
    assert config.target_modules == SEVEN_PROJECTIONS and config.method == "lora"
    assert (config.lr, config.weight_decay, config.scheduler, config.warmup_steps) == (1e-3, 0.0, "cosine", 6)
    assert (config.batch_size, config.max_steps, config.epochs, config.max_seq_len) == (8, 60, 1, 96)
    assert (config.seed, config.train_on_prompt) == (0, False)
    assert config.overwrite and config.output_dir == str(tmp_path / "out")
    assert config.data == str(REPO_DEMO / "train.jsonl")


def test_recipe_is_what_lorakit_train_runs(tmp_path):
    trained = load_train_config(REPO_DEMO / "recipe.yaml")  # `lorakit train examples/demo/recipe.yaml`
    assert (REPO_DEMO.parents[1] / trained.data).resolve() == (REPO_DEMO / "train.jsonl").resolve()
    demo = demo_train_config(REPO_DEMO, trained.output_dir)
    assert demo == dataclasses.replace(trained, data=demo.data, overwrite=True)


def test_shorter_run_keeps_its_warmup_within_it(tmp_path):
    config = demo_train_config(REPO_DEMO, tmp_path, model="other", max_steps=2, quiet=True)
    assert (config.model, config.max_steps, config.warmup_steps, config.quiet) == ("other", 2, 2, True)


def tiny_task(directory: Path) -> Path:
    directory.mkdir()
    shutil.copy(REPO_DEMO / "recipe.yaml", directory)
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
    # the adapter for llama.cpp and Ollama: the GGUF reads back as the saved adapter's modules
    assert result.gguf.adapter == (out / "adapter.gguf").absolute() and result.gguf.base is None  # a model dir
    info = inspect_adapter(result.gguf.adapter)
    assert info["n_modules"] == len(SEVEN_PROJECTIONS) * 2 and info["architecture"] == "llama"
    assert "ADAPTER ./adapter.gguf" in result.gguf.modelfile.read_text()
    assert f"llama-cli -m BASE.gguf --lora {result.gguf.adapter}" in report
    assert f"ollama create lorakit-demo -f {result.gguf.modelfile}" in report


def test_the_report_names_the_base_gguf_for_llama_cpp(tmp_path):
    export = GGUFExport(tmp_path / "adapter.gguf", tmp_path / "Modelfile", builtin_gguf_path("smollm2-135m"))
    result = DemoResult(before=0.0, after=1.0, train_seconds=1.0, adapter_dir=tmp_path / "adapter", gguf=export)
    report = format_report(result, examples=0)
    assert f"llama-cli -m {builtin_gguf_path('smollm2-135m')} --lora {tmp_path / 'adapter.gguf'} -p 'Table" in report


def test_report_shows_right_answers_first():
    result = DemoResult(
        before=0.0, after=0.5, train_seconds=12.3, adapter_dir=Path("runs/demo/adapter"),
        prompts=["a", "b", "c", "d"], references=['{"x":1}'] * 4,
        before_answers=["no"] * 4, after_answers=["no", '{"x":1}', "no", '{"x": 1}'],
    )
    report = format_report(result, examples=2)
    assert "after fine-tuning:   50.0%" in report and "fine-tune wall time: 12 s" in report
    assert "request:  b" in report and "request:  d" in report and "request:  a" not in report


def test_demo_with_quantize_nf4_trains_on_a_4bit_base_and_reports_its_memory(tiny_dir, tmp_path, capsys):
    from lorakit.bases.linear4bit import Linear4bit
    from lorakit.demo.memory import base_memory
    from lorakit.models import load_model

    data = tiny_task(tmp_path / "data")
    out = tmp_path / "runs" / "demo"
    assert cli.main(["demo", "--data-dir", str(data), "--output-dir", str(out), "--model", str(tiny_dir),
                     "--max-steps", "2", "--quantize", "nf4"]) == 0
    printed = capsys.readouterr().out
    assert "fine-tuning with QLoRA (NF4 base, r=16, 2 steps of 8)" in printed
    assert "quantize: nf4" in (out / "config.yaml").read_text()

    # the figures are the base's own: the 4-bit model's tensors against its dense elements
    dense_model, _ = load_model(str(tiny_dir))
    dense = base_memory(dense_model)
    quantized = load_model(str(tiny_dir), quantization="nf4")[0]
    nf4 = base_memory(quantized, dense)
    assert any(isinstance(m, Linear4bit) for m in quantized.modules())
    buffers = sum(b.nbytes for b in dense_model.buffers())  # rotary frequencies
    assert nf4.elements == dense.elements and dense.bytes == 4 * dense.elements + buffers
    assert dense.bytes > nf4.bytes > sum(p.nbytes for p in quantized.parameters())
    assert f"base weights in memory: {nf4.line()}" in printed
    assert "held-out accuracy (exact JSON match" in printed and "adapter: " in printed


def test_demo_quantize_flag_refuses_other_values(capsys):
    assert cli.main(["demo", "--quantize", "int8"]) == 2
    assert "--quantize" in capsys.readouterr().err


def test_demo_on_a_packed_gguf_base_reports_the_memory_it_saves(tmp_path, capsys, monkeypatch):
    pytest.importorskip("gguf")
    from tinymodels import save_tiny_model

    from lorakit.demo.memory import base_memory
    from lorakit.export.gguf_model import write_gguf_model
    from lorakit.models import load_model

    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path / "cache"))
    source = save_tiny_model(tmp_path / "tiny", merges=(("Ġ", "w"),))
    model, tokenizer = load_model(str(source), dtype="float32", device="cpu")
    path = tmp_path / "tiny-q8_0.gguf"
    write_gguf_model(model, tokenizer, path, "q8_0")

    data = tiny_task(tmp_path / "data")
    out = tmp_path / "runs" / "demo"
    assert cli.main(["demo", "--data-dir", str(data), "--output-dir", str(out), "--model", str(path),
                     "--max-steps", "2", "--gguf-base", "packed"]) == 0
    printed = capsys.readouterr().out
    assert "fine-tuning with LoRA (packed GGUF base, r=16, 2 steps of 8)" in printed
    assert "gguf_base: packed" in (out / "config.yaml").read_text()
    packed = base_memory(load_model(str(path), packed=True)[0])
    dense = base_memory(load_model(str(path), packed=False)[0])
    assert packed.elements == dense.elements and packed.bytes < dense.bytes
    assert packed.kind == "GGUF Q8_0 blocks in its"
    assert f"base weights in memory: {packed.line()}" in printed and f"memory saved: {packed.saved_line()}" in printed
