"""`lorakit merge` / `lorakit inspect` and lorakit.export, checked against transformers and the engine."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lorakit import LoraConfig, PeftModel, cli, get_peft_model
from lorakit.export import inspect_adapter, merge_adapter_to_dir
from lorakit.lora.layers import LoraLayer

IDS = torch.tensor([[2, 3, 9, 10, 11, 12, 13, 4, 6], [2, 3, 14, 15, 16, 7, 8, 4, 6]])


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def adapter_logits(tiny_dir, adapter) -> torch.Tensor:
    tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_dir), adapter).eval()
    with torch.no_grad():
        return tuned(IDS).logits


def test_merged_dir_loads_in_transformers_and_equals_the_adapter(capsys, tiny_dir, adapter_dir, tmp_path):
    out = tmp_path / "merged"
    code, stdout, _ = run_cli(capsys, "merge", "--model", str(tiny_dir), "--adapter", str(adapter_dir),
                              "--output", str(out))
    assert code == 0 and str(out) in stdout
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        got = merged(IDS).logits
        base = AutoModelForCausalLM.from_pretrained(tiny_dir).eval()(IDS).logits
    want = adapter_logits(tiny_dir, adapter_dir)
    assert not torch.allclose(want, base, atol=1e-3)  # the adapter changes the output...
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)  # ...and the merged model matches it
    assert not any(k.startswith(("base_model", "lora")) for k in merged.state_dict())
    assert AutoTokenizer.from_pretrained(out).chat_template == AutoTokenizer.from_pretrained(tiny_dir).chat_template
    files = {p.name for p in out.iterdir()}
    assert "model.safetensors" in files and not any(f.endswith((".bin", ".pt", ".pkl")) for f in files)
    assert [p.name for p in tmp_path.iterdir()] == ["merged"]  # no temp dirs left behind


def test_merge_refuses_a_non_empty_output_and_keeps_it(capsys, tiny_dir, adapter_dir, tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    code, _, err = run_cli(capsys, "merge", "--model", str(tiny_dir), "--adapter", str(adapter_dir),
                           "--output", str(out))
    assert code == 2 and err.count("\n") == 1
    assert err.startswith("lorakit: error: output dir") and "--overwrite" in err
    assert [p.name for p in out.iterdir()] == ["notes.txt"] and (out / "notes.txt").read_text() == "mine"

    code, _, _ = run_cli(capsys, "merge", "--model", str(tiny_dir), "--adapter", str(adapter_dir),
                         "--output", str(out), "--overwrite")
    assert code == 0 and not (out / "notes.txt").exists() and (out / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]


def test_failed_merge_leaves_nothing(tiny_dir, tmp_path, adapter_factory):
    bad = adapter_factory(tiny_dir, tmp_path / "bad", seed=3)
    config = json.loads((bad / "adapter_config.json").read_text())
    (bad / "adapter_config.json").write_text(json.dumps({**config, "r": 3}))  # shapes no longer fit
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="shape"):
        merge_adapter_to_dir(str(tiny_dir), bad, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad"]


def test_merge_to_half_precision(tiny_dir, adapter_dir, tmp_path):
    out = merge_adapter_to_dir(str(tiny_dir), adapter_dir, tmp_path / "bf16", dtype="bfloat16")
    merged = AutoModelForCausalLM.from_pretrained(out, dtype="auto")
    assert merged.dtype == torch.bfloat16
    with torch.no_grad():
        got = merged.float()(IDS).logits
    torch.testing.assert_close(got, adapter_logits(tiny_dir, adapter_dir), atol=0.1, rtol=0.05)


CONFIGS = {
    "qv": dict(target_modules=["q_proj", "v_proj"]),
    "all-linear-patterns": dict(target_modules="all-linear", rank_pattern={"down_proj": 2}),
    "dora": dict(target_modules=["q_proj", "v_proj"], use_dora=True),
    "embedding": dict(target_modules=["q_proj", "embed_tokens"]),
    "bias-saved-head": dict(target_modules=["o_proj"], modules_to_save=["lm_head"]),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_inspect_counts_equal_the_engine(capsys, tiny_dir, tmp_path, name):
    settings = {"r": 4, "lora_alpha": 16, **CONFIGS[name]}
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_dir), LoraConfig(**settings))
    trainable, _ = model.get_nb_trainable_parameters()
    adapted = [n for n, m in model.named_modules() if isinstance(m, LoraLayer) and "default" in m.r]
    model.save_pretrained(tmp_path / name)

    info = inspect_adapter(tmp_path / name)
    assert info["n_parameters"] == trainable
    assert info["n_modules"] == len(adapted)
    assert info["ranks"] == sorted({model.get_submodule(n).r["default"] for n in adapted})
    assert info["use_dora"] == settings.get("use_dora", False)
    assert (info["r"], info["lora_alpha"]) == (4, 16)
    assert info["base_model"] == str(tiny_dir)
    weights = tmp_path / name / "adapter_model.safetensors"
    assert info["size_bytes"] == weights.stat().st_size

    code, out, _ = run_cli(capsys, "inspect", str(tmp_path / name), "--json")
    assert code == 0 and json.loads(out) == json.loads(json.dumps(info))
    code, out, _ = run_cli(capsys, "inspect", str(tmp_path / name))
    assert code == 0 and f"{trainable:,}" in out and f"adapted modules  {len(adapted)}\n" in out


def test_inspect_lists_adapters_in_sub_folders(tiny_dir, adapter_dir, adapter_dir_2, tmp_path):
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_dir), adapter_dir)
    model.load_adapter(adapter_dir_2, adapter_name="beta")
    model.save_pretrained(tmp_path / "both")
    info = inspect_adapter(tmp_path / "both")
    assert info["other_adapters"] == ["beta"] and info["ranks"] == [4]
    assert inspect_adapter(tmp_path / "both" / "beta")["ranks"] == [2]


def test_inspect_rejects_a_non_safetensors_file(tmp_path, adapter_dir):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "adapter_config.json").write_text((adapter_dir / "adapter_config.json").read_text())
    (broken / "adapter_model.safetensors").write_bytes(b"not a tensor file at all")
    with pytest.raises(ValueError, match="safetensors"):
        inspect_adapter(broken)
