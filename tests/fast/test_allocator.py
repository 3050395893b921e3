"""The CPU caching allocator: the same numbers as glibc's (fp32 and bf16), and blocks reused from step to step."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

_STEPS = r"""
import sys
import torch
from lorakit import LoraConfig, get_peft_model
from lorakit.fast.allocator import cache_cpu_allocations, cached_bytes
from tinymodels import logits, tiny_llama

if sys.argv[1] == "cached" and not cache_cpu_allocations(threshold_bytes=1 << 12):
    print("UNAVAILABLE")
    raise SystemExit(0)
torch.manual_seed(0)
model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False)).train()
opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
ids = torch.randint(0, 100, (8, 48), generator=torch.Generator().manual_seed(0))
held, losses = [], []
for _ in range(3):
    loss = logits(model, ids).logsumexp(-1).mean()
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    losses.append(float(loss))
    held.append(cached_bytes())
weights = [float(p.detach().double().sum()) for p in model.parameters() if p.requires_grad]
# bf16 matmuls go through oneDNN, which takes its scratch memory with raw_allocate / raw_deallocate
bf16 = get_peft_model(tiny_llama().to(torch.bfloat16), LoraConfig(r=4, target_modules="all-linear")).train()
loss = logits(bf16, ids).float().logsumexp(-1).mean()
loss.backward()
losses.append(float(loss))
print(repr((losses, weights, held)))
"""


def _run(mode: str) -> str:
    tests = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", _STEPS, mode], capture_output=True, text=True, cwd=tests,
                         env={**os.environ, "PYTHONPATH": str(tests)}, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout.strip().splitlines()[-1]


def test_caching_allocator_gives_the_same_training_and_reuses_its_blocks():
    cached = _run("cached")
    if cached == "UNAVAILABLE":
        pytest.skip("no C++ compiler or ninja here: the trainer falls back to glibc's allocator")
    losses, weights, held = ast.literal_eval(cached)
    plain_losses, plain_weights, plain_held = ast.literal_eval(_run("plain"))
    assert losses == plain_losses and weights == plain_weights  # bit for bit
    assert plain_held == [0, 0, 0]
    assert held[0] > 0 and held[1] == held[2]  # from the second step on, every block is a reused one
