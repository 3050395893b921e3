"""One battery of behaviour checks, run over tiny models x adapter configurations.

PEFT (the reference implementation) is the oracle for file format and math.
"""

from __future__ import annotations

import copy

import peft
import pytest
import torch

from lorakit import LoraConfig, PeftModel, get_peft_model

from tinymodels import MODELS, logits

CASES = {
    "mlp-linear": ("mlp", dict(target_modules=["lin0", "lin1"])),
    "mlp-embedding": ("mlp", dict(target_modules=["emb", "lin1"])),
    "llama-qv": ("llama", dict(target_modules=["q_proj", "v_proj"])),
    "llama-all-linear-rslora": ("llama", dict(target_modules="all-linear", use_rslora=True)),
    "llama-regex-dropout": ("llama", dict(target_modules=r".*\.(q_proj|down_proj)", lora_dropout=0.1)),
    "llama-dora": ("llama", dict(target_modules=["q_proj", "v_proj", "o_proj"], use_dora=True)),
    "llama-patterns-layers": (
        "llama",
        dict(target_modules=["q_proj", "v_proj"], rank_pattern={"v_proj": 2}, alpha_pattern={"q_proj": 16},
             layers_to_transform=[1]),
    ),
    "llama-embed-modules-to-save": ("llama", dict(target_modules=["embed_tokens", "q_proj"], modules_to_save=["lm_head"])),
    "gpt2-conv1d-lora-only-bias": ("gpt2", dict(target_modules=["c_attn", "c_proj"], bias="lora_only")),
    "gpt2-lora-bias-all-bias": ("gpt2", dict(target_modules=["c_attn"], lora_bias=True, bias="all")),
}


def _config(kwargs: dict, init=False, lib=None) -> object:
    cls = peft.LoraConfig if lib == "peft" else LoraConfig
    return cls(r=4, lora_alpha=8, init_lora_weights=init, **copy.deepcopy(kwargs))


def _ids(model_kind: str) -> torch.Tensor:
    return torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(3))


@pytest.fixture(params=list(CASES), ids=list(CASES))
def case(request):
    kind, kwargs = CASES[request.param]
    return MODELS[kind], kwargs, _ids(kind)


def _nonzero(make, kwargs, seed: int = 0) -> PeftModel:
    """A fresh model with a non-zero adapter (random A and B)."""
    torch.manual_seed(100 + seed)
    model = get_peft_model(make(), _config(kwargs, init=False))
    return model.eval()


def test_default_init_keeps_output(case):
    make, kwargs, ids = case
    ref = logits(make(), ids)
    model = get_peft_model(make(), _config(kwargs, init=True)).eval()
    torch.testing.assert_close(logits(model, ids), ref, rtol=0, atol=1e-6)


def test_nonzero_adapter_changes_output(case):
    make, kwargs, ids = case
    ref = logits(make(), ids)
    assert (logits(_nonzero(make, kwargs), ids) - ref).abs().max() > 1e-3


def test_save_load_round_trip(case, tmp_path):
    make, kwargs, ids = case
    model = _nonzero(make, kwargs)
    expected = logits(model, ids)
    model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    loaded = PeftModel.from_pretrained(make(), tmp_path).eval()
    torch.testing.assert_close(logits(loaded, ids), expected, rtol=0, atol=0)
    assert loaded.get_nb_trainable_parameters()[0] == 0  # is_trainable=False


def test_merge_equals_unmerged_and_unmerge_restores(case):
    make, kwargs, ids = case
    model = _nonzero(make, kwargs)
    before = {k: v.clone() for k, v in model.base_model.model.state_dict().items() if "lora_" not in k}
    expected = logits(model, ids)
    model.merge_adapter()
    torch.testing.assert_close(logits(model, ids), expected, rtol=1e-5, atol=1e-5)
    model.merge_adapter()  # idempotent: a second merge changes nothing
    torch.testing.assert_close(logits(model, ids), expected, rtol=1e-5, atol=1e-5)
    model.unmerge_adapter()
    after = model.base_model.model.state_dict()
    for key, value in before.items():
        torch.testing.assert_close(after[key], value, rtol=0, atol=1e-6)
    torch.testing.assert_close(logits(model, ids), expected, rtol=1e-5, atol=1e-5)


def test_merge_and_unload_gives_plain_model(case):
    make, kwargs, ids = case
    model = _nonzero(make, kwargs)
    expected = logits(model, ids)
    merged = model.merge_and_unload()
    assert not any("lora" in n for n, _ in merged.named_modules())
    assert type(merged) is type(make())
    torch.testing.assert_close(logits(merged, ids), expected, rtol=1e-5, atol=1e-5)


def test_disable_adapter_runs_base_and_restores(case):
    make, kwargs, ids = case
    ref = logits(make(), ids)
    model = _nonzero(make, kwargs)
    adapted = logits(model, ids)
    with model.disable_adapter():
        torch.testing.assert_close(logits(model, ids), ref, rtol=0, atol=1e-6)
    with pytest.raises(RuntimeError, match="boom"):
        with model.disable_adapter():
            raise RuntimeError("boom")
    torch.testing.assert_close(logits(model, ids), adapted, rtol=0, atol=1e-6)


def test_only_adapter_parameters_move(case):
    make, kwargs, ids = case
    model = _nonzero(make, kwargs).train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    expected = {n for n in before if "lora_" in n or "modules_to_save" in n}
    if kwargs.get("bias") == "all":
        expected |= {n for n in before if n.endswith("bias") and "original_module" not in n}
    if kwargs.get("bias") == "lora_only":
        expected |= {n for n in before if n.endswith("base_layer.bias")}
    assert trainable == expected
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    logits(model, ids).float().pow(2).mean().backward()
    optimizer.step()
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert moved and moved <= trainable
    assert all(not torch.equal(dict(model.named_parameters())[n], before[n]) for n in trainable if "lora_A" in n)


def _peft_model(make, kwargs):
    torch.manual_seed(7)
    return peft.get_peft_model(make(), _config(kwargs, init=False, lib="peft")).eval()


def test_peft_files_load_in_lorakit(case, tmp_path):
    make, kwargs, ids = case
    reference = _peft_model(make, kwargs)
    expected = logits(reference, ids)
    reference.save_pretrained(tmp_path)
    ours = PeftModel.from_pretrained(make(), tmp_path).eval()
    torch.testing.assert_close(logits(ours, ids), expected, rtol=1e-5, atol=1e-6)
    merged_ref = reference.merge_and_unload().state_dict()
    merged_ours = ours.merge_and_unload().state_dict()
    assert merged_ref.keys() == merged_ours.keys()
    for key in merged_ref:
        torch.testing.assert_close(merged_ours[key], merged_ref[key], rtol=1e-5, atol=1e-6)


def test_lorakit_files_load_in_peft(case, tmp_path):
    make, kwargs, ids = case
    ours = _nonzero(make, kwargs)
    expected = logits(ours, ids)
    ours.save_pretrained(tmp_path)
    reference = peft.PeftModel.from_pretrained(make(), tmp_path).eval()
    torch.testing.assert_close(logits(reference, ids), expected, rtol=1e-5, atol=1e-6)
