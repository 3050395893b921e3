"""The commands chained on the real embedded SmolLM2: train a few steps, then generate, inspect, merge."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from lorakit import cli

DEMO_TRAIN = Path(__file__).resolve().parents[2] / "examples" / "demo" / "train.jsonl"


def run_cli(capsys, *argv: str) -> str:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    assert code == 0, err
    return out


@pytest.mark.slow
def test_train_then_generate_inspect_merge(capsys, tmp_path):
    run = tmp_path / "run"
    out = run_cli(capsys, "train", f"data={DEMO_TRAIN}", "max_steps=3", "batch_size=2", "--max-seq-len", "96",
                  "--lr", "1e-3", "--output-dir", str(run), "--quiet")
    adapter = run / "adapter"
    assert f"adapter: {adapter}" in out and (adapter / "adapter_model.safetensors").is_file()
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 3

    # inspect agrees with the trainer's own count of trainable parameters
    trainable = int(re.search(r"([\d,]+) of [\d,]+ parameters train", out).group(1).replace(",", ""))
    info = json.loads(run_cli(capsys, "inspect", str(adapter), "--json"))
    assert info["n_parameters"] == trainable == 30 * 16 * (2 * 1152 + 2 * 768 + 3 * 2112)  # q,o + k,v + mlp
    assert (info["n_modules"], info["ranks"]) == (30 * 7, [16])

    # generate without --model: the adapter's recorded base model is found
    text = run_cli(capsys, "generate", "--adapter", str(adapter), "--prompt",
                   "Table for 3 on Sunday at 8pm, name Ada Byrne.", "--max-new-tokens", "8")
    assert text.strip()

    merged_dir = tmp_path / "merged"
    run_cli(capsys, "merge", "--adapter", str(adapter), "--output", str(merged_dir))
    from transformers import AutoModelForCausalLM

    from lorakit import PeftModel
    from lorakit.models import load_model

    ids = torch.tensor([[1, 9690, 198, 22503, 314, 216, 35, 30, 2]])
    with torch.no_grad():
        merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
        got = merged(ids).logits
        del merged
        base, _ = load_model("smollm2-135m")
        want = PeftModel.from_pretrained(base, adapter).eval()(ids).logits
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
