"""Issue #8: the seed's "one base model, three behaviours" snippet, done right.

Each `PeftModel.from_pretrained(base, path)` on the same base adds its adapter to the same
layers and returns a handle bound to it; handles share the base weights and never interfere.
"""

from __future__ import annotations

import itertools
import threading

import peft
import pytest
import torch

from lorakit import LoraConfig, PeftModel, get_peft_model
from tinymodels import logits, tiny_llama

NAMES = ("adapter-translation", "adapter-summary", "adapter-code")


def _ids():
    return torch.randint(0, 100, (2, 6), generator=torch.Generator().manual_seed(11))


@pytest.fixture(scope="module", params=["lorakit", "peft"])
def adapter_dirs(request, tmp_path_factory):
    """Three adapters of different shapes, saved by lorakit or by PEFT."""
    lib = request.param
    root = tmp_path_factory.mktemp(lib)
    configs = [
        dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
        dict(r=2, lora_alpha=4, target_modules=["k_proj", "o_proj", "down_proj"]),
        dict(r=8, lora_alpha=8, target_modules=["q_proj", "up_proj"], use_rslora=True),
    ]
    paths = []
    for i, (name, kwargs) in enumerate(zip(NAMES, configs)):
        torch.manual_seed(50 + i)
        if lib == "peft":
            model = peft.get_peft_model(tiny_llama(), peft.LoraConfig(init_lora_weights=False, **kwargs))
        else:
            model = get_peft_model(tiny_llama(), LoraConfig(init_lora_weights=False, **kwargs))
        model.save_pretrained(root / name)
        paths.append(root / name)
    return paths


def _alone(path) -> torch.Tensor:
    return logits(PeftModel.from_pretrained(tiny_llama(), path).eval(), _ids())


def _three_handles(paths):
    base_model = tiny_llama()
    handles = [PeftModel.from_pretrained(base_model, p) for p in paths]
    return base_model, handles


def test_each_handle_behaves_like_its_own_adapter(adapter_dirs):
    expected = [_alone(p) for p in adapter_dirs]
    base_model, handles = _three_handles(adapter_dirs)
    for order in itertools.permutations(range(3)):
        for i in order:
            torch.testing.assert_close(logits(handles[i], _ids()), expected[i], rtol=0, atol=1e-6)
    assert [h.active_adapter for h in handles] == ["default", *NAMES[1:]]


def test_handles_share_one_copy_of_the_base(adapter_dirs):
    base_model, handles = _three_handles(adapter_dirs)
    layer = base_model.model.layers[0].self_attn.q_proj
    assert sum(1 for m in base_model.modules() if type(m).__name__ == "Linear" and hasattr(m, "lora_A")) > 0
    assert not hasattr(layer.base_layer, "lora_A")  # wrapped once, not wrapped around a wrapper
    pointers = {h.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight.data_ptr() for h in handles}
    assert pointers == {layer.base_layer.weight.data_ptr()}


def test_each_handle_generates_with_its_own_adapter(adapter_dirs):
    expected = [
        PeftModel.from_pretrained(tiny_llama(), p).generate(_ids(), max_new_tokens=5, do_sample=False)
        for p in adapter_dirs
    ]
    _, handles = _three_handles(adapter_dirs)
    for i in (2, 0, 1):
        assert torch.equal(handles[i].generate(_ids(), max_new_tokens=5, do_sample=False), expected[i])


def test_threads_running_different_handles_get_their_sequential_outputs(adapter_dirs):
    _, handles = _three_handles(adapter_dirs)
    inputs = [torch.randint(0, 100, (2, 6), generator=torch.Generator().manual_seed(s)) for s in range(4)]
    with torch.no_grad():
        expected = {(h, j): logits(handles[h], x) for h in range(3) for j, x in enumerate(inputs)}
    failures: list[str] = []

    def work(h: int) -> None:
        with torch.no_grad():
            for it in range(25):
                j = (it + h) % len(inputs)
                if not torch.equal(logits(handles[h], inputs[j]), expected[(h, j)]):
                    failures.append(f"handle {h} iteration {it}")

    threads = [threading.Thread(target=work, args=(h,)) for h in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures


def test_merge_and_unload_on_a_shared_handle_leaves_the_others_alone(adapter_dirs):
    expected = [_alone(p) for p in adapter_dirs]
    base_model, handles = _three_handles(adapter_dirs)
    weight_before = base_model.model.layers[0].self_attn.q_proj.base_layer.weight.clone()
    merged = handles[1].merge_and_unload()
    assert merged is not base_model
    assert not any(hasattr(m, "lora_A") for m in merged.modules())
    torch.testing.assert_close(logits(merged, _ids()), expected[1], rtol=1e-5, atol=1e-5)
    assert torch.equal(base_model.model.layers[0].self_attn.q_proj.base_layer.weight, weight_before)
    for i in range(3):
        torch.testing.assert_close(logits(handles[i], _ids()), expected[i], rtol=0, atol=1e-6)


def test_merge_and_unload_on_a_sole_handle_merges_in_place(adapter_dirs):
    base_model = tiny_llama()
    handle = PeftModel.from_pretrained(base_model, adapter_dirs[0])
    assert handle.merge_and_unload() is base_model


def test_save_pretrained_on_a_handle_writes_its_adapter(adapter_dirs, tmp_path):
    _, handles = _three_handles(adapter_dirs)
    handles[2].save_pretrained(tmp_path / "code")
    assert sorted(p.name for p in (tmp_path / "code").iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    reloaded = PeftModel.from_pretrained(tiny_llama(), tmp_path / "code")
    torch.testing.assert_close(logits(reloaded, _ids()), _alone(adapter_dirs[2]), rtol=0, atol=1e-6)
    assert LoraConfig.from_pretrained(tmp_path / "code").r == 8


def test_get_peft_model_on_an_adapted_base_is_refused():
    base_model = tiny_llama()
    get_peft_model(base_model, LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="already carries lorakit adapters"):
        get_peft_model(base_model, LoraConfig(target_modules=["v_proj"]))
