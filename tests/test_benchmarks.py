"""benchmarks/train_speed.py's summary line: the ratios docs quote, nan where a contender is missing."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmark_scripts import BENCHMARKS, load_script

SCRIPT = BENCHMARKS / "train_speed.py"
train_speed = load_script("train_speed")


def _result(step_s: float, peak: float, losses: list[float]) -> dict:
    return {"step_s": step_s, "cpu_s": 2 * step_s, "tokens_per_s": 1024 / step_s, "peak_rss_gb": peak,
            "losses": losses}


def _figures(line: str) -> dict[str, str]:
    return dict(part.split("=") for part in line.split())


def test_ratios_from_the_contenders_they_name():
    results = {
        "peft": _result(4.0, 4.0, [10.0, 8.0]),
        "lorakit": _result(2.0, 1.0, [10.0, 8.0]),
        "floor": _result(2.0, 3.0, [10.0, 10.0]),
        "lorakit-plain": _result(2.5, 2.0, [10.0, 8.8]),
        "peft-bf16": _result(3.0, 2.0, [10.0, 8.0]),
        "lorakit-bf16": _result(1.5, 1.5, [10.1, 8.0]),
    }
    figures = _figures(train_speed._summary(results))
    assert figures["speed_vs_peft"] == "2.00"
    assert figures["memory_vs_peft"] == "0.25"
    assert figures["loss_rel_diff"] == "0.0e+00"
    assert figures["plain_speed_vs_peft"] == "1.60"
    assert figures["plain_memory_vs_peft"] == "0.50"
    assert figures["plain_vs_train_step"] == "1.25"
    assert figures["plain_loss_rel_diff"] == "1.0e-01"
    assert figures["bf16_speed_vs_peft"] == "2.00"
    assert figures["bf16_memory_vs_peft"] == "0.75"
    assert figures["bf16_loss_rel_diff"] == "1.0e-02"
    assert "medium_speed_vs_peft" not in figures  # lorakit-medium did not run
    assert "plain_bf16_speed_vs_peft" not in figures


def test_a_missing_reference_gives_nan_and_no_contender_no_line():
    figures = _figures(train_speed._summary({"lorakit-bf16": _result(1.5, 1.5, [10.0])}))
    assert figures == {"bf16_speed_vs_peft": "nan", "bf16_memory_vs_peft": "nan", "bf16_loss_rel_diff": "nan"}
    figures = _figures(train_speed._summary({"lorakit-plain": _result(2.5, 2.0, [10.0])}))
    assert set(figures.values()) == {"nan"} and "plain_vs_train_step" in figures
    assert train_speed._summary({"full": _result(3.0, 4.0, [10.0])}) == ""


def test_qlora_ratios_compare_each_lorakit_row_with_peft_and_bitsandbytes_at_its_compute_dtype():
    results = {
        "peft-qlora": _result(4.0, 3.0, [10.0, 8.0]),
        "lorakit-qlora": _result(2.0, 1.5, [10.0, 8.08]),
        "lorakit-plain-qlora": _result(2.5, 1.8, [10.0, 8.0]),
        "peft-qlora-fp32": _result(6.0, 5.0, [10.0, 8.0]),
        "lorakit-qlora-fp32": _result(3.0, 2.0, [10.0, 8.0]),
    }
    figures = _figures(train_speed._summary(results))
    assert figures["qlora_speed_vs_peft"] == "2.00" and figures["qlora_memory_vs_peft"] == "0.50"
    assert figures["qlora_loss_rel_diff"] == "1.0e-02"
    assert figures["plain_qlora_speed_vs_peft"] == "1.60" and figures["plain_qlora_memory_vs_peft"] == "0.60"
    assert figures["qlora_fp32_speed_vs_peft"] == "2.00" and figures["qlora_fp32_memory_vs_peft"] == "0.40"
    assert "plain_qlora_fp32_speed_vs_peft" not in figures  # lorakit-plain-qlora-fp32 did not run
    assert "speed_vs_peft" not in figures
    alone = _figures(train_speed._summary({"lorakit-plain-qlora-fp32": _result(3.0, 2.0, [10.0])}))
    assert alone == {"plain_qlora_fp32_speed_vs_peft": "nan", "plain_qlora_fp32_memory_vs_peft": "nan",
                     "plain_qlora_fp32_loss_rel_diff": "nan"}


def tiny_model_dir(out: Path) -> Path:
    """A 2-layer random Llama whose projections hold whole 64-blocks, and a word-level tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<unk>", "</s>", *(f"w{i}" for i in range(62))])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>").save_pretrained(out)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(vocab), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    LlamaForCausalLM(config).save_pretrained(out)
    return out


@pytest.mark.slow  # four contender processes (~10 s each on a quiet machine, mostly imports)
def test_qlora_contenders_run_a_step_on_a_tiny_model(tmp_path):
    pytest.importorskip("bitsandbytes")
    model = tiny_model_dir(tmp_path)
    names = ["lorakit-qlora", "peft-qlora", "lorakit-plain-qlora-fp32", "peft-qlora-fp32"]
    out = subprocess.run([sys.executable, str(SCRIPT), "--model", str(model), "--only", *names, "--steps", "1",
                          "--warmup", "1"], capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                         timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.strip().splitlines()
    rows = {line.split(" | ")[0].removeprefix("| "): line.split(" | ")[-1].rstrip(" |").split() for line in lines[2:-1]}
    assert set(rows) == {train_speed.CONTENDERS[n].label for n in names}
    # both libraries start from the same adapter on the same 4-bit bytes: the losses agree within
    # the de-quantizers' and bf16's rounding (fp32 compute: closer), and every row learns
    losses = {n: [float(v) for v in rows[train_speed.CONTENDERS[n].label]] for n in names}
    pairs = (("lorakit-qlora", "peft-qlora", 2e-3), ("lorakit-plain-qlora-fp32", "peft-qlora-fp32", 1e-4))
    for mine, theirs, tolerance in pairs:
        mine, theirs = losses[mine], losses[theirs]
        assert all(abs(a - b) <= tolerance * b for a, b in zip(mine, theirs)), (mine, theirs)
    assert all(curve[1] < curve[0] for curve in losses.values())
    summary = _figures(lines[-1])
    assert {"qlora_speed_vs_peft", "qlora_memory_vs_peft", "plain_qlora_fp32_loss_rel_diff"} <= set(summary)
    assert summary["qlora_speed_vs_peft"] != "nan" and summary["plain_qlora_fp32_speed_vs_peft"] != "nan"
