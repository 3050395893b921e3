"""Named adapters, targeting, merging edge cases, weighted combination, file errors."""

import os

import peft
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from lorakit import LoraConfig, PeftModel, get_peft_model
from tinymodels import ToyMLP, logits, tiny_gpt2, tiny_llama


def _ids():
    return torch.randint(0, 100, (2, 6), generator=torch.Generator().manual_seed(5))


def test_unmatched_targets_list_adaptable_names():
    with pytest.raises(ValueError, match=r"matched no module.*q_proj.*k_proj.*v_proj.*o_proj.*gate_proj"):
        get_peft_model(tiny_llama(), LoraConfig(target_modules=["qproj"]))


def test_unsupported_module_type_is_named():
    with pytest.raises(TypeError, match="LlamaRMSNorm"):
        get_peft_model(tiny_llama(), LoraConfig(target_modules=["input_layernorm"]))


def test_target_matching_rules():
    model = get_peft_model(tiny_llama(), LoraConfig(target_modules=["self_attn.q_proj", "v_proj"], exclude_modules=[r"k_proj"]))
    names = {n for n, m in model.named_modules() if hasattr(m, "lora_A")}
    assert names == {f"base_model.model.model.layers.{i}.self_attn.{p}" for i in (0, 1) for p in ("q_proj", "v_proj")}
    regex = get_peft_model(tiny_llama(), LoraConfig(target_modules=r".*layers\.1\.mlp\.(up|down)_proj"))
    assert {n.removeprefix("base_model.model.model.") for n, m in regex.named_modules() if hasattr(m, "lora_A")} == {
        "layers.1.mlp.up_proj", "layers.1.mlp.down_proj"}


def test_all_linear_skips_the_head():
    model = get_peft_model(tiny_llama(), LoraConfig(target_modules="all-linear"))
    wrapped = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if hasattr(m, "lora_A")}
    assert wrapped == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def test_default_targets_by_model_type():
    model = get_peft_model(tiny_llama(), LoraConfig())
    assert {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if hasattr(m, "lora_A")} == {"q_proj", "v_proj"}
    with pytest.raises(ValueError, match="target_modules"):
        get_peft_model(ToyMLP(), LoraConfig())


def test_trainable_count_matches_peft():
    kwargs = dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "embed_tokens"], modules_to_save=["lm_head"])
    ours = get_peft_model(tiny_llama(), LoraConfig(**kwargs)).get_nb_trainable_parameters()
    reference = peft.get_peft_model(tiny_llama(), peft.LoraConfig(**kwargs)).get_nb_trainable_parameters()
    assert ours == reference


def test_print_format_matches_peft(capsys):
    kwargs = dict(r=4, target_modules=["q_proj"])
    get_peft_model(tiny_llama(), LoraConfig(**kwargs)).print_trainable_parameters()
    ours = capsys.readouterr().out
    peft.get_peft_model(tiny_llama(), peft.LoraConfig(**kwargs)).print_trainable_parameters()
    assert ours == capsys.readouterr().out


def test_llama_8b_on_meta_has_the_seeds_count():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=128256)
    with torch.device("meta"):
        base = LlamaForCausalLM(config)
    model = get_peft_model(base, LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    trainable, total = model.get_nb_trainable_parameters()
    assert trainable == 13_631_488  # the seed's figure
    assert total - trainable == 8_030_261_248  # Llama-3.1-8B's published size


def test_named_adapters():
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False))
    ids = _ids()
    first = logits(model, ids)
    model.add_adapter("second", LoraConfig(r=2, target_modules=["v_proj"], init_lora_weights=False))
    assert model.active_adapter == "default"
    torch.testing.assert_close(logits(model, ids), first)  # added adapters start inactive
    model.set_adapter("second")
    assert model.active_adapter == "second"
    second = logits(model, ids)
    assert (second - first).abs().max() > 1e-3
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".second." in n for n in trainable)  # only the active adapter trains
    model.set_adapter("default")
    model.delete_adapter("second")
    assert list(model.peft_config) == ["default"]
    assert not any(".second" in n for n, _ in model.named_parameters())
    torch.testing.assert_close(logits(model, ids), first)
    with pytest.raises(ValueError, match="unknown adapter 'nope'"):
        model.set_adapter("nope")


def test_load_adapter_by_name_and_subfolders(tmp_path):
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False))
    model.add_adapter("other", LoraConfig(r=2, target_modules=["k_proj"], init_lora_weights=False))
    model.save_pretrained(tmp_path)
    assert (tmp_path / "adapter_model.safetensors").exists() and (tmp_path / "other" / "adapter_config.json").exists()
    ids = _ids()
    model.set_adapter("other")
    expected_other = logits(model, ids)
    fresh = PeftModel.from_pretrained(tiny_llama(), tmp_path)
    fresh.load_adapter(tmp_path / "other", adapter_name="other")
    fresh.set_adapter("other")
    torch.testing.assert_close(logits(fresh, ids), expected_other, rtol=0, atol=0)


def test_safe_merge_refuses_non_finite_and_leaves_model_untouched():
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    layer = model.base_model.model.model.layers[1].self_attn.v_proj
    with torch.no_grad():
        layer.lora_B["default"].weight[0, 0] = float("inf")
    with pytest.raises(ValueError, match="NaN or inf"):
        model.merge_and_unload(safe_merge=True)
    after = model.state_dict()
    for key in before:
        if "layers.1.self_attn.v_proj.lora_B" not in key:
            assert torch.equal(after[key], before[key]), key
    assert not any(m.merged for m in model.modules() if hasattr(m, "merged_adapters"))


def test_merge_and_unload_subset_and_unload():
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False))
    ids = _ids()
    base_out = logits(tiny_llama(), ids)
    plain = model.unload()
    assert not any("lora" in n for n, _ in plain.named_parameters())
    torch.testing.assert_close(logits(plain, ids), base_out)


@pytest.mark.parametrize("combination", ["linear", "cat", "svd"])
def test_weighted_adapter_matches_peft(combination):
    torch.manual_seed(0)
    kwargs = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    reference = peft.get_peft_model(tiny_llama(), peft.LoraConfig(**kwargs))
    reference.add_adapter("b", peft.LoraConfig(**{**kwargs, "lora_alpha": 4}))
    ours = get_peft_model(tiny_llama(), LoraConfig(**kwargs))
    ours.add_adapter("b", LoraConfig(**{**kwargs, "lora_alpha": 4}))
    ours.load_state_dict(reference.state_dict(), strict=False)  # same adapter weights in both
    args = (["default", "b"], [0.6, 1.3], "mix")
    reference.add_weighted_adapter(*args, combination_type=combination, svd_rank=3)
    ours.add_weighted_adapter(*args, combination_type=combination, svd_rank=3)
    reference.set_adapter("mix")
    ours.set_adapter("mix")
    ids = _ids()
    torch.testing.assert_close(logits(ours.eval(), ids), logits(reference.eval(), ids), rtol=1e-4, atol=1e-5)
    assert ours.peft_config["mix"].r == reference.peft_config["mix"].r


def test_weighted_cat_equals_dense_sum():
    kwargs = dict(r=4, lora_alpha=8, target_modules=["q_proj"], init_lora_weights=False)
    model = get_peft_model(tiny_llama(), LoraConfig(**kwargs))
    model.add_adapter("b", LoraConfig(**{**kwargs, "r": 2}))
    model.add_weighted_adapter(["default", "b"], [0.5, 2.0], "mix", combination_type="cat")
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    dense = 0.5 * layer.get_delta_weight("default") + 2.0 * layer.get_delta_weight("b")
    torch.testing.assert_close(layer.get_delta_weight("mix"), dense)


def test_mismatched_adapter_file_names_key_and_shapes(tmp_path):
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"]))
    model.save_pretrained(tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    tensors = load_file(path)
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    tensors[key] = torch.zeros(4, 31)
    save_file(tensors, path)
    base = tiny_llama()
    with pytest.raises(ValueError, match=r"q_proj\.lora_A\.weight.*\(4, 31\).*\(4, 32\)"):
        PeftModel.from_pretrained(base, tmp_path)
    assert not any("lora" in n for n, _ in base.named_parameters())  # nothing half-loaded stays


def test_adapter_for_another_model_is_refused(tmp_path):
    get_peft_model(tiny_gpt2(), LoraConfig(r=4, target_modules=["c_attn"])).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="c_attn"):
        PeftModel.from_pretrained(tiny_llama(), tmp_path)


def test_legacy_bin_loads_with_weights_only(tmp_path):
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False))
    model.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    os.remove(tmp_path / "adapter_model.safetensors")
    torch.save(tensors, tmp_path / "adapter_model.bin")
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path)
    ids = _ids()
    torch.testing.assert_close(logits(loaded, ids), logits(model.eval(), ids))


def test_save_is_atomic(tmp_path, monkeypatch):
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"]))
    model.save_pretrained(tmp_path)
    original = (tmp_path / "adapter_model.safetensors").read_bytes()
    import lorakit.lora.io as lio

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(lio.os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        model.save_pretrained(tmp_path)
    assert (tmp_path / "adapter_model.safetensors").read_bytes() == original
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]


def test_wrapper_passes_attributes_and_generate():
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"]))
    assert model.config.model_type == "llama"
    out = model.generate(_ids(), max_new_tokens=3, do_sample=False)
    assert out.shape == (2, 9)


def test_dora_on_conv1d_is_refused():
    with pytest.raises(ValueError, match="use_dora"):
        get_peft_model(tiny_gpt2(), LoraConfig(target_modules=["c_attn"], use_dora=True))


def test_new_adapter_follows_eval_mode():
    model = get_peft_model(tiny_llama().eval(), LoraConfig(target_modules=["q_proj"], lora_dropout=0.5, init_lora_weights=False))
    ids = _ids()
    torch.testing.assert_close(logits(model, ids), logits(model, ids), rtol=0, atol=0)
    assert not any(m.training for m in model.modules())
