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


def _run(mode: str, script: str = _STEPS, **env: str) -> str:
    tests = Path(__file__).resolve().parents[1]
    paths = os.pathsep.join([str(tests), str(tests.parent / "src")])  # this tree's lorakit, whatever is installed
    # "plain": the default allocator, so the plain API's own set-up (below) is opted out of
    env = {**os.environ, "PYTHONPATH": paths, **({"LORAKIT_CPU_ALLOCATOR": "0"} if mode == "plain" else {}), **env}
    out = subprocess.run([sys.executable, "-c", script, mode], capture_output=True, text=True, cwd=tests,
                         env=env, timeout=600)
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


_PLAIN_API = r"""
import sys
import torch
from lorakit import LoraConfig, get_peft_model
from lorakit.fast import allocator
from tinymodels import tiny_llama

model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules="all-linear"))
ids = torch.randint(0, 100, (8, 48), generator=torch.Generator().manual_seed(0))
seen = []
with torch.no_grad():
    model.train()(input_ids=ids, labels=ids)  # no gradients: not training
model.eval()(input_ids=ids, labels=ids).loss.backward()  # eval mode: not training
seen.append(allocator._prepared)
model.train()
model.cpu_allocator = False  # the handle's opt-out
model(input_ids=ids, labels=ids).loss.backward()
seen.append(allocator._prepared)
model.cpu_allocator = True
model(input_ids=ids, labels=ids).loss.backward()  # the first training forward on a CPU
seen.append(allocator._prepared)
print(repr(seen))
"""


def test_the_plain_api_sets_up_the_cpu_allocator_at_its_first_training_forward():
    seen = ast.literal_eval(_run("api", _PLAIN_API))
    assert seen[:2] == [None, None]
    if seen[2] == "default":
        pytest.skip("no C++ compiler or ninja here: the plain API falls back to glibc's allocator")
    assert seen[2] == "caching"


def test_the_environment_opts_out_of_the_automatic_cpu_allocator():
    seen = ast.literal_eval(_run("api", _PLAIN_API, LORAKIT_CPU_ALLOCATOR="0"))
    assert seen == [None, None, "off"]
