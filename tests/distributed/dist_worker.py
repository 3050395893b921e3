"""Started by torchrun in the distributed tests: `lorakit` command lines, one after another, in one process.

    torchrun … dist_worker.py "train cfg.yaml output_dir=a" "train cfg.yaml output_dir=b distributed=fsdp"

Every argument is one `lorakit` command line; the runs share the process group, as they would in a
user's script. Test hooks, from the environment:
  DIST_TEST_PIDS  a directory: this process writes its pid to node<DIST_TEST_NODE> there
  DIST_TEST_SLOW  seconds to sleep before each micro-batch's loss, so that a kill lands mid-run
  DIST_TEST_SPY   a directory: per run, how often the fused kernels ran and whether they saw a DTensor
"""

from __future__ import annotations

import json
import os
import shlex
import sys
import time
from pathlib import Path

import torch

torch.set_num_threads(1)

import lorakit.lora.linear  # noqa: E402
import lorakit.fast.loss  # noqa: E402
import lorakit.train.loop  # noqa: E402
from lorakit.cli import main  # noqa: E402

RANK = os.environ["RANK"]
calls = {"linear_cross_entropy": 0, "lora_linear": 0, "dtensor_args": 0}


def spy(name: str, real):
    from torch.distributed.tensor import DTensor

    def wrapper(*args, **kwargs):
        calls[name] += 1
        tensors = [t for a in (*args, *kwargs.values()) for t in (a, getattr(a, "A", None), getattr(a, "B", None))]
        calls["dtensor_args"] += sum(isinstance(t, DTensor) for t in tensors)  # an op's adapters too
        return real(*args, **kwargs)

    return wrapper


if os.environ.get("DIST_TEST_PIDS"):
    Path(os.environ["DIST_TEST_PIDS"]).mkdir(exist_ok=True)
    (Path(os.environ["DIST_TEST_PIDS"]) / f"node{os.environ['DIST_TEST_NODE']}").write_text(str(os.getpid()))
if os.environ.get("DIST_TEST_SLOW"):
    real_loss = lorakit.train.loop.causal_lm_loss

    def slow_loss(model, batch):
        time.sleep(float(os.environ["DIST_TEST_SLOW"]))
        return real_loss(model, batch)

    lorakit.train.loop.causal_lm_loss = slow_loss
spy_dir = os.environ.get("DIST_TEST_SPY")
if spy_dir:
    Path(spy_dir).mkdir(parents=True, exist_ok=True)
    lorakit.fast.loss.linear_cross_entropy = spy("linear_cross_entropy", lorakit.fast.loss.linear_cross_entropy)
    lorakit.lora.linear.lora_linear = spy("lora_linear", lorakit.lora.linear.lora_linear)

for index, line in enumerate(sys.argv[1:]):
    status = main(shlex.split(line))
    if spy_dir:
        Path(spy_dir, f"run{index}-rank{RANK}.json").write_text(json.dumps(calls))
        calls.update(dict.fromkeys(calls, 0))
    if status:
        sys.exit(status)
