"""lorakit.integrations.Trainer on two torchrun processes (DDP, gloo) equals one process with the whole batch."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from ddp_worker import train
from distributed.dist_helpers import free_port, run, torchrun
from safetensors.torch import load_file

HERE = Path(__file__).parent


def test_two_processes_save_the_adapter_one_process_would(tmp_path):
    run([*torchrun(2, free_port()), str(HERE / "ddp_worker.py"), str(tmp_path / "ddp"), "2"], timeout=150)
    train(str(tmp_path / "one"), 4)
    for where in ("final", "checkpoint-2"):
        names = set(os.listdir(tmp_path / "ddp" / where))
        assert "adapter_model.safetensors" in names and "model.safetensors" not in names
    ddp = load_file(tmp_path / "ddp" / "final" / "adapter_model.safetensors")
    one = load_file(tmp_path / "one" / "final" / "adapter_model.safetensors")
    assert ddp.keys() == one.keys()
    for key in one:
        torch.testing.assert_close(ddp[key], one[key], rtol=1e-5, atol=1e-6)
    assert any(not torch.equal(v, torch.zeros_like(v)) for k, v in one.items() if "lora_B" in k)
