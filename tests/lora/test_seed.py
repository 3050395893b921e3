"""The seed article's snippets (../shared/seed/) run as written, with `peft` -> `lorakit`.

The only other changes are the model (the embedded SmolLM2-135M-Instruct instead of Llama-3.1-8B)
and its dtype: fp32 instead of fp16, since fp16 on a CPU is slow and too noisy to compare outputs.
"""

from __future__ import annotations

import textwrap

import pytest
import torch

SNIPPET_LAYER = """
import torch
import torch.nn as nn
class LoRALayer(nn.Module):
    def __init__(self, in_features, out_features, rank=16, alpha=32):
        super().__init__()
        # Original weights — frozen
        self.linear = nn.Linear(in_features, out_features, bias=False)
        self.linear.weight.requires_grad = False # Frozen!
        # LoRA matrices — only these get trained
        self.lora_A = nn.Parameter(torch.randn(in_features, rank) * 0.01)
        self.lora_B = nn.Parameter(torch.zeros(rank, out_features))
        self.scaling = alpha / rank
    def forward(self, x):
        # Original output + LoRA modification
        original = self.linear(x)
        lora_output = (x @ self.lora_A @ self.lora_B) * self.scaling
        return original + lora_output
"""

SNIPPET_COUNTS = """
d = 4096 # Model dimension
print("Full Fine-tuning:")
print(f" Parameters: {d * d:,} = {d * d / 1e6:.1f}M")
for r in [4, 8, 16, 32, 64]:
    lora_params = 2 * d * r
    ratio = lora_params / (d * d) * 100
    print(f"LoRA (rank={r}):")
    print(f" Parameters: {lora_params:,} ({ratio:.2f}% of original)")
"""

SNIPPET_CONFIG = """
from lorakit import LoraConfig
config = LoraConfig(
    r=16,
    lora_alpha=32,
    # Which layers get LoRA
    target_modules=[
        "q_proj", # Query projection
        "k_proj", # Key projection
        "v_proj", # Value projection
        "o_proj", # Output projection
        "gate_proj", # MLP gate
        "up_proj", # MLP up
        "down_proj", # MLP down
    ],
    lora_dropout=0.05,
    bias="none",
    task_type="CAUSAL_LM",
)
"""

SNIPPET_PRACTICAL = """
from transformers import AutoModelForCausalLM, AutoTokenizer
from lorakit import get_peft_model, LoraConfig
# 1. Load base model
model = AutoModelForCausalLM.from_pretrained(
    "MODEL",
    torch_dtype=torch.float16,
    device_map="auto",
)
tokenizer = AutoTokenizer.from_pretrained("MODEL")
# 2. Configure LoRA
lora_config = LoraConfig(
    r=16,
    lora_alpha=32,
    target_modules=["q_proj", "v_proj", "k_proj", "o_proj"],
    lora_dropout=0.05,
    bias="none",
    task_type="CAUSAL_LM",
)
# 3. Apply LoRA to model
model = get_peft_model(model, lora_config)
# See how many parameters are being trained
model.print_trainable_parameters()
"""

SNIPPET_MERGE = """
# After training — merge adapter with base model
merged_model = model.merge_and_unload()
# Save the merged model
merged_model.save_pretrained("./my-merged-model")
tokenizer.save_pretrained("./my-merged-model")
# Or save just the adapter (much smaller)
model.save_pretrained("./my-lora-adapter")
"""

SNIPPET_MULTI = """
# You can have multiple different adapters
from lorakit import PeftModel
base_model = AutoModelForCausalLM.from_pretrained("MODEL")
# For translation
translation_model = PeftModel.from_pretrained(base_model, "./adapter-translation")
# For summarization
summary_model = PeftModel.from_pretrained(base_model, "./adapter-summary")
# For coding
code_model = PeftModel.from_pretrained(base_model, "./adapter-code")
# One base model, three different behaviors!
"""


def test_lora_layer_and_counts(capsys):
    scope: dict = {}
    exec(SNIPPET_LAYER, scope)
    layer = scope["LoRALayer"](8, 4)
    assert layer(torch.randn(2, 8)).shape == (2, 4)
    exec(SNIPPET_COUNTS, scope)
    out = capsys.readouterr().out
    assert "Parameters: 16,777,216 = 16.8M" in out and "Parameters: 131,072 (0.78% of original)" in out
    exec(SNIPPET_CONFIG, scope)
    assert scope["config"].target_modules == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


@pytest.mark.slow
def test_practical_merge_and_multi_adapter_snippets(tmp_path, monkeypatch, capsys):
    from lorakit import LoraConfig, get_peft_model
    from lorakit.models import resolve_model_path
    from transformers import AutoModelForCausalLM

    model_dir = resolve_model_path("smollm2-135m")
    monkeypatch.chdir(tmp_path)
    scope: dict = {"torch": torch}
    exec(SNIPPET_PRACTICAL.replace("MODEL", model_dir).replace("float16", "float32"), scope)
    peft_model = scope["model"]
    # r=16 on q/k/v/o of 30 layers, hidden 576, k/v 192 wide: 16 x (2x(576+576) + 2x(576+192)) x 30
    trainable = 16 * (2 * (576 + 576) + 2 * (576 + 192)) * 30
    total = sum(p.numel() for n, p in peft_model.named_parameters() if "lora_" not in n) + trainable
    line = f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}"
    assert line in capsys.readouterr().out
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        for p in peft_model.parameters():  # a trained adapter: make B non-zero
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.01)
        expected = peft_model(ids).logits.float()
    exec(SNIPPET_MERGE, scope)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "my-merged-model")
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, expected, rtol=1e-4, atol=1e-3)
    assert (tmp_path / "my-lora-adapter" / "adapter_model.safetensors").exists()

    # three adapters for the multi-adapter snippet, then each handle must run its own
    outputs = {}
    for i, name in enumerate(["translation", "summary", "code"]):
        torch.manual_seed(i)
        base = AutoModelForCausalLM.from_pretrained(model_dir)
        adapter = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
        adapter.save_pretrained(tmp_path / f"adapter-{name}")
        with torch.no_grad():
            outputs[name] = adapter(ids).logits
    exec(SNIPPET_MULTI.replace("MODEL", model_dir), scope)
    with torch.no_grad():
        for name in ["code", "translation", "summary"]:
            got = scope[f"{name}_model"](ids).logits
            torch.testing.assert_close(got, outputs[name], rtol=0, atol=1e-4)
