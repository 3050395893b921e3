"""Checkpoints that resume a run exactly, written without pickle and atomically.

    checkpoints/step-<N>/
      trainable.safetensors   trainable parameters by name (LoRA weights, or all for method full)
      adapter/                LoRA only: the adapter in PEFT format, usable as it is
      optimizer.safetensors   optimizer moments, keys `state.<param index>.<name>`
      optimizer.json          param groups, non-tensor state, the parameter names in index order
      rng.safetensors         torch CPU/CUDA generator states
      trainer_state.json      step, data position, schedule, python and numpy RNG states
      config.yaml             the run's TrainConfig

A step-<N> directory is built beside its final place and renamed in, so one that exists is
complete; `latest` is simply the highest N.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from lorakit.lora.io import atomic_dir

from .rundir import clean_temp_dirs, remove

STEP_DIR = re.compile(r"step-(\d+)")
REQUIRED = ("trainable.safetensors", "optimizer.safetensors", "optimizer.json", "trainer_state.json")


@dataclass
class Checkpoint:
    """What `load_checkpoint` hands back besides filling the model and optimizer."""

    path: Path
    step: int
    state: dict[str, Any]  # trainer_state.json
    config: str  # config.yaml text


def save_checkpoint(
    root: Path,
    step: int,
    params: list[tuple[str, torch.Tensor]],
    optimizer: torch.optim.Optimizer | dict[str, Any],
    state: dict[str, Any],
    config_yaml: str,
    keep: int,
    export: Callable[[Path], None] | None = None,
) -> Path:
    """Write checkpoint `root/step-<step>` (replacing one of that step), then keep the newest `keep`.

    `params` are the trainable parameters in optimizer order, `optimizer` the optimizer or its
    state dict (whole tensors: under FSDP the gathered ones); `export(dir)` may add files (the PEFT
    adapter). Returns the checkpoint's path.
    """
    final = root / f"step-{step}"
    with atomic_dir(final) as tmp:
        save_file({name: p.detach().cpu().contiguous() for name, p in params}, tmp / "trainable.safetensors")
        tensors, meta = flatten_optimizer(optimizer if isinstance(optimizer, dict) else optimizer.state_dict())
        meta["param_names"] = [name for name, _ in params]
        save_file(tensors, tmp / "optimizer.safetensors")
        _write_json(tmp / "optimizer.json", meta)
        save_file(torch_rng_state(), tmp / "rng.safetensors")
        _write_json(tmp / "trainer_state.json", {**state, "step": step, "rng": python_rng_state()})
        (tmp / "config.yaml").write_text(config_yaml)
        if export is not None:
            export(tmp)
    prune(root, keep)
    return final


def load_checkpoint(
    path: Path, params: list[tuple[str, nn.Parameter]], optimizer: torch.optim.Optimizer,
    place: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> Checkpoint:
    """Fill the trainable parameters and the optimizer from `path`, restore every RNG; return the rest.

    `place(whole, param)` lays a saved whole tensor out like `param` (under FSDP: this rank's
    shard); it is applied to each parameter and to optimizer moments of the parameter's shape.
    Raises ValueError if the checkpoint's parameters are not exactly these (another model or method).
    """
    missing = [name for name in REQUIRED if not (path / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{path} is not a complete checkpoint (no {missing[0]})")
    weights = load_file(path / "trainable.safetensors")
    names = [name for name, _ in params]
    if sorted(weights) != sorted(names):
        extra = sorted(set(weights) - set(names)) or sorted(set(names) - set(weights))
        raise ValueError(
            f"checkpoint {path} does not fit this model: its trainable parameters differ (e.g. {extra[0]!r}); "
            "was it written with another model, method or target_modules?"
        )
    meta = json.loads((path / "optimizer.json").read_text())
    if meta.pop("param_names") != names:
        raise ValueError(f"checkpoint {path}: optimizer parameter order differs from this model's")
    with torch.no_grad():
        for name, p in params:
            if weights[name].shape != p.shape:
                raise ValueError(f"checkpoint {path}: {name} has shape {tuple(weights[name].shape)}, "
                                 f"the model {tuple(p.shape)}")
            p.copy_(place(weights[name], p) if place else weights[name])
    optim_state = unflatten_optimizer(load_file(path / "optimizer.safetensors"), meta)
    if place is not None:
        for index, entry in optim_state["state"].items():
            p = params[index][1]
            for key, value in entry.items():
                if isinstance(value, torch.Tensor) and value.shape == p.shape:
                    entry[key] = place(value, p)
    optimizer.load_state_dict(optim_state)
    state = json.loads((path / "trainer_state.json").read_text())
    set_python_rng_state(state.pop("rng"))
    rng_file = path / "rng.safetensors"
    if rng_file.is_file():
        set_torch_rng_state(load_file(rng_file))
    config = (path / "config.yaml").read_text() if (path / "config.yaml").is_file() else ""
    return Checkpoint(path, int(state["step"]), state, config)


def find_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints under `root`, oldest step first."""
    if not root.is_dir():
        return []
    found = []
    for entry in root.iterdir():
        match = STEP_DIR.fullmatch(entry.name)
        if match and entry.is_dir() and all((entry / name).is_file() for name in REQUIRED):
            found.append((int(match.group(1)), entry))
    return sorted(found)


def latest_checkpoint(root: Path) -> Path | None:
    found = find_checkpoints(root)
    return found[-1][1] if found else None


def prune(root: Path, keep: int) -> None:
    """Delete all but the newest `keep` checkpoints, and leftovers of interrupted writes."""
    clean_temp_dirs(root)
    for _, path in find_checkpoints(root)[:-keep]:
        remove(path)


# -- optimizer state <-> (tensors, JSON) -------------------------------------------------------
def flatten_optimizer(state_dict: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Tensors as `state.<param index>.<name>`; everything else (param groups, plain values) as JSON."""
    tensors: dict[str, torch.Tensor] = {}
    plain: dict[str, dict[str, Any]] = {}
    for index, entry in state_dict["state"].items():
        for name, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{index}.{name}"] = value.detach().cpu().contiguous()
            else:
                plain.setdefault(str(index), {})[name] = value
    return tensors, {"param_groups": state_dict["param_groups"], "plain_state": plain}


def unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        _, index, name = key.split(".", 2)
        state.setdefault(int(index), {})[name] = value
    for index, entry in meta.get("plain_state", {}).items():
        state.setdefault(int(index), {}).update(entry)
    return {"state": state, "param_groups": meta["param_groups"]}


# -- random number generators -----------------------------------------------------------------
def torch_rng_state() -> dict[str, torch.Tensor]:
    states = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            states[f"cuda.{i}"] = s
    return states


def set_torch_rng_state(states: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(states["cpu"])
    cuda = [states[k] for k in sorted((k for k in states if k.startswith("cuda.")), key=lambda k: int(k[5:]))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[: torch.cuda.device_count()])


def python_rng_state() -> dict[str, Any]:
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": [version, list(internal), gauss],
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
    }


def set_python_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=1))
