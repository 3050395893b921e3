"""AdapterRegistry: least-recently-used eviction that spares busy adapters, and refusals that change nothing."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from lorakit.serve import AdapterError, AdapterRegistry, BadRequest, NotFound
from serve_helpers import load_tiny


def _registry(model_dir, adapter_dirs, names, max_adapters=None):
    model, _ = load_tiny(model_dir)
    registry = AdapterRegistry(model, "tiny", max_adapters=max_adapters)
    for name in names:
        registry.add(name, adapter_dirs[name])
    return registry


def _lora_names(registry) -> set[str]:
    return set(registry.model.__dict__["_lorakit_owner"].peft_config)


def test_lru_eviction_spares_adapters_in_use(serve_model_dir, adapter_dirs):
    registry = _registry(serve_model_dir, adapter_dirs, ["a0", "a1", "a2"], max_adapters=2)
    assert registry.resident() == ["a1", "a2"]  # adding a2 evicted a0, the least recently used
    assert registry.names() == ["a0", "a1", "a2"]  # a0 is still registered: it reloads on demand
    assert registry.acquire("a1") and registry.acquire("a2")
    assert registry.acquire("a0") is False  # both resident adapters run requests: a0 must wait
    assert _lora_names(registry) == {"a1", "a2"}
    registry.release("a1")
    loads = registry.loads
    assert registry.acquire("a0")  # a1 is idle now, and least recently used
    assert registry.loads == loads + 1
    assert registry.resident() == ["a2", "a0"] and _lora_names(registry) == {"a2", "a0"}
    registry.release("a2")
    registry.release("a0")
    assert registry.acquire("a1")
    assert registry.resident() == ["a0", "a1"]
    assert registry.acquire("a1") and registry.loads == loads + 2  # resident: no reload


def test_reloaded_adapter_has_the_same_weights(serve_model_dir, adapter_dirs):
    registry = _registry(serve_model_dir, adapter_dirs, ["a0", "a1"], max_adapters=1)
    assert registry.resident() == ["a1"]
    assert registry.acquire("a0")
    layer = registry.model.model.layers[0].self_attn.q_proj
    from safetensors.torch import load_file

    saved = load_file(adapter_dirs["a0"] / "adapter_model.safetensors")
    torch.testing.assert_close(layer.lora_A["a0"].weight, saved["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"])


def test_remove_while_busy_unloads_after_the_last_request(serve_model_dir, adapter_dirs):
    registry = _registry(serve_model_dir, adapter_dirs, ["a0"])
    assert registry.acquire("a0")
    registry.remove("a0")
    assert "a0" not in registry and _lora_names(registry) == {"a0"}  # still running
    with pytest.raises(NotFound):
        registry.acquire("a0")
    with pytest.raises(BadRequest, match="already"):
        registry.add("a0", adapter_dirs["a0"])  # the old one is still leaving
    registry.release("a0")
    assert _lora_names(registry) == set()
    registry.add("a0", adapter_dirs["a0"])
    assert registry.resident() == ["a0"]


def test_refusals_leave_the_model_unchanged(serve_model_dir, adapter_dirs, tmp_path):
    registry = _registry(serve_model_dir, adapter_dirs, ["a0"])
    state = {k: v.clone() for k, v in registry.model.state_dict().items()}
    with pytest.raises(AdapterError, match="not found"):
        registry.add("x", tmp_path / "missing")
    with pytest.raises(AdapterError, match="shape"):
        registry.add("misfit", adapter_dirs["misfit"])
    dora = tmp_path / "dora"
    shutil.copytree(adapter_dirs["a1"], dora)
    config = json.loads((dora / "adapter_config.json").read_text())
    (dora / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(AdapterError, match="DoRA"):
        registry.add("dora", dora)
    for bad in ("", "a/b", "tiny", "__base__", "-x"):
        with pytest.raises(BadRequest, match="name"):
            registry.add(bad, adapter_dirs["a1"])
    assert registry.names() == ["a0"] and _lora_names(registry) == {"a0"}
    after = registry.model.state_dict()
    assert set(after) == set(state)
    assert all(torch.equal(after[k], v) for k, v in state.items())


def test_all_linear_adapters_stack_on_wrapped_layers(serve_model_dir, adapter_dirs):
    """a0 and a3 both say target_modules="all-linear"; the second must find the (wrapped) layers too."""
    registry = _registry(serve_model_dir, adapter_dirs, ["a1", "a0", "a3"])
    mlp = registry.model.model.layers[1].mlp.down_proj
    assert {"a0", "a3"} <= set(mlp.lora_A)
