"""`lorakit check` and lorakit.export.check: adapters made to break each rule, one that passes them all,
and the real PEFT as the oracle for the rules PEFT enforces."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from lorakit import LoraConfig, cli, get_peft_model
from lorakit.export.check import Options, check_adapter, planned_adapter, read_adapter
from tinymodels import save_tiny_model

SEVEN = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
WEIGHTS = "adapter_model.safetensors"


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("base"))


def make(base: Path, out: Path, **kwargs) -> Path:
    """Save an adapter for `base` (recorded as its base_model_name_or_path) with LoraConfig(**kwargs)."""
    options = dict(r=16, lora_alpha=32, target_modules=SEVEN, init_lora_weights=False)
    options.update(kwargs)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                           LoraConfig(base_model_name_or_path=str(base), **options))
    model.save_pretrained(out)
    return out


def edit_config(adapter: Path, **changes) -> None:
    file = adapter / "adapter_config.json"
    file.write_text(json.dumps({**json.loads(file.read_text()), **changes}))


def edit_tensors(adapter: Path, edit) -> None:
    tensors = load_file(adapter / WEIGHTS)
    edit(tensors)
    save_file(tensors, adapter / WEIGHTS, metadata={"format": "pt"})


def errors(adapter: Path, target: str, **kwargs) -> list[str]:
    return [f.line() for f in check_adapter(read_adapter(adapter, **kwargs), target) if f.error]


def test_a_plain_adapter_passes_every_target(base_dir, tmp_path, capsys):
    adapter = make(base_dir, tmp_path / "ok")
    assert [f.line() for f in check_adapter(read_adapter(adapter))] == []
    assert read_adapter(adapter).model_type == "llama"  # read from base_model_name_or_path's config.json
    assert cli.main(["check", str(adapter)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out == ["vllm: ok", "lorax: ok", "llama.cpp: ok", "ollama: ok", "peft: ok"]


# (LoraConfig options, target, the rule's words, the fix's words)
BROKEN = [
    (dict(use_dora=True), "vllm", "no DoRA", "lorakit merge"),
    (dict(use_dora=True), "lorax", "no DoRA", "use_dora: false"),
    (dict(use_dora=True), "llama.cpp", "no DoRA", "merge"),
    (dict(use_dora=True), "ollama", "no DoRA", "merge"),
    (dict(modules_to_save=["lm_head"]), "vllm", "modules_to_save must be empty", "merge"),
    (dict(modules_to_save=["lm_head"]), "llama.cpp", "modules_to_save must be empty", "merge"),
    (dict(r=64), "vllm", "rank within --max-lora-rank (default 16): rank 64", "--max-lora-rank 64"),
    (dict(r=24), "vllm", "rank 24", "--max-lora-rank 32"),
    (dict(r=600), "vllm", "rank 600", "largest rank is 512"),
    (dict(bias="all"), "vllm", 'bias must be "none"', "bias: none"),
    (dict(lora_bias=True), "vllm", "no lora_B bias", "lora_bias: false"),
    (dict(lora_bias=True), "llama.cpp", "no lora_B bias", "merge"),
    (dict(rank_pattern={"v_proj": 8}), "vllm", "rank_pattern is not read", "fold"),
    (dict(alpha_pattern={"v_proj": 8}), "lorax", "alpha_pattern is not read", "fold"),
    (dict(use_rslora=True), "llama.cpp", "no rsLoRA", "fold"),
    (dict(alpha_pattern={"v_proj": 8}), "llama.cpp", "one lora_alpha", "fold"),
    (dict(use_rslora=True), "ollama", "no rsLoRA", "fold"),
    (dict(lora_alpha=32.0), "ollama", "lora_alpha is an integer", '"lora_alpha": 32'),
    (dict(target_modules=["q_proj", "embed_tokens"]), "ollama", "only q/k/v/o/gate/up/down_proj",
     "convert_lora_to_gguf.py"),
    (dict(target_modules=["q_proj", "lm_head"]), "lorax:gemma", "targets must be modules LoRAX's gemma class",
     "LoRAX drops them"),
    (dict(target_modules=["q_proj", "embed_tokens"]), "vllm:qwen2", "['embed_tokens']", "train without"),
    (dict(), "vllm:gpt2", "architecture must be one vLLM serves LoRA on", "merge"),
    (dict(), "ollama:qwen2", "only on Llama/Mistral/Gemma 2 bases: model_type 'qwen2'", "convert_lora_to_gguf.py"),
]


@pytest.mark.parametrize("options, target, rule, fix", BROKEN, ids=[f"{t}-{r[:24]}" for _, t, r, _ in BROKEN])
def test_each_rule_fails_with_its_fix(base_dir, tmp_path, options, target, rule, fix):
    adapter = make(base_dir, tmp_path / "a", **options)
    target, _, model_type = target.partition(":")
    lines = errors(adapter, target, model_type=model_type or None)
    assert any(rule in line and fix in line.split("; fix: ")[1] for line in lines), lines
    assert all(line.startswith(f"{target}: ") and line.count("; fix: ") == 1 for line in lines)


def test_rules_the_source_does_not_have_do_not_fire(base_dir, tmp_path):
    """llama.cpp scales each tensor by alpha / its own rank, so rank_pattern alone is fine there;
    vLLM reads rsLoRA; partial q/k/v is packed with empty slices; a flag raises vLLM's limit."""
    assert errors(make(base_dir, tmp_path / "a", rank_pattern={"v_proj": 8}), "llama.cpp") == []
    assert errors(make(base_dir, tmp_path / "b", use_rslora=True), "vllm") == []
    assert errors(make(base_dir, tmp_path / "c", target_modules=["q_proj", "v_proj"]), "vllm") == []
    wide = read_adapter(make(base_dir, tmp_path / "d", r=64))
    assert [f for f in check_adapter(wide, "vllm", Options(max_lora_rank=64)) if f.error] == []
    odd = check_adapter(wide, "vllm", Options(max_lora_rank=48))
    assert any("--max-lora-rank is one of" in f.line() and "--max-lora-rank 64" in f.fix for f in odd)


def test_base_weights_inside_the_adapter(base_dir, tmp_path):
    adapter = make(base_dir, tmp_path / "a")
    edit_tensors(adapter, lambda t: t.update({"base_model.model.model.norm.weight": torch.ones(32)}))
    for target in ("vllm", "llama.cpp", "ollama"):
        assert any("no base weights inside the adapter: base_model.model.model.norm.weight" in line
                   for line in errors(adapter, target)), target


def test_lorax_off_graph_rank_is_a_warning(base_dir, tmp_path, capsys):
    adapter = make(base_dir, tmp_path / "a", r=4, lora_alpha=8)
    findings = check_adapter(read_adapter(adapter), "lorax")
    assert [f.error for f in findings] == [False] and "rank 4" in findings[0].line()
    assert cli.main(["check", str(adapter), "--target", "lorax"]) == 0  # warnings do not fail
    assert "lorax: warning: ranks 8, 16, 32 or 64" in capsys.readouterr().out


def test_tied_lm_head_for_llama_cpp(tmp_path):
    base = save_tiny_model(tmp_path / "tied", tie_word_embeddings=True)
    adapter = make(base, tmp_path / "a", target_modules=["q_proj", "lm_head"])
    assert any("no lm_head adapter on a base with tied embeddings" in line for line in errors(adapter, "llama.cpp"))


def test_unknown_architecture_is_a_warning_with_a_way_out(base_dir, tmp_path):
    adapter = make(base_dir, tmp_path / "a")
    edit_config(adapter, base_model_name_or_path="someone/unknown-model")
    findings = check_adapter(read_adapter(adapter), "vllm")
    assert [f.error for f in findings] == [False] and "--model-type" in findings[0].fix
    assert check_adapter(read_adapter(adapter, base=str(base_dir)), "vllm") == []


# -- PEFT: the real library is the oracle -------------------------------------------------------
def peft_loads(base: Path, adapter: Path) -> None:
    from peft import PeftModel

    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), str(adapter))


def test_peft_rank_mismatch_fails_here_and_in_peft(base_dir, tmp_path):
    adapter = make(base_dir, tmp_path / "a")
    peft_loads(base_dir, adapter)  # as saved: loads
    edit_config(adapter, rank_pattern={"q_proj": 8})
    lines = errors(adapter, "peft")
    assert any("model.layers.0.self_attn.q_proj has rank 16, the config says 8" in line for line in lines), lines
    with pytest.raises(RuntimeError, match="size mismatch"):
        peft_loads(base_dir, adapter)


def test_peft_unpaired_tensor_and_untargeted_module(base_dir, tmp_path):
    adapter = make(base_dir, tmp_path / "a")
    edit_tensors(adapter, lambda t: t.pop("base_model.model.model.layers.1.mlp.up_proj.lora_B.weight"))
    assert any("model.layers.1.mlp.up_proj has lora_A without its pair" in line for line in errors(adapter, "peft"))
    other = make(base_dir, tmp_path / "b")
    edit_config(other, target_modules=["q_proj", "k_proj"])
    lines = errors(other, "peft")
    assert any(re.search(r"matched by target_modules: model\.layers\.0\.\w+\.(down|gate|up|o|v)_proj;", line)
               for line in lines), lines


def test_peft_unknown_config_key_is_a_warning(base_dir, tmp_path):
    adapter = make(base_dir, tmp_path / "a")
    edit_config(adapter, some_future_field=3)
    with pytest.warns(UserWarning, match="some_future_field"):
        findings = check_adapter(read_adapter(adapter), "peft")
    assert [f.error for f in findings] == [False] and "some_future_field" in findings[0].culprit


# -- planned adapters (what `lorakit train` checks) and the command --------------------------------
@pytest.mark.parametrize("options", [dict(), dict(use_dora=True, r=64, rank_pattern={"v_proj": 8}),
                                     dict(modules_to_save=["lm_head"], target_modules=["q_proj", "embed_tokens"])])
def test_a_planned_adapter_checks_like_the_saved_one(base_dir, tmp_path, options):
    config = LoraConfig(**{**dict(r=16, lora_alpha=32, target_modules=SEVEN, base_model_name_or_path=str(base_dir)),
                           **options})
    planned = planned_adapter(AutoModelForCausalLM.from_pretrained(base_dir), config)
    saved = read_adapter(make(base_dir, tmp_path / "a", **options))
    assert sorted(planned.modules, key=lambda m: m.name) == sorted(saved.modules, key=lambda m: m.name)
    assert planned.other == saved.other and planned.model_type == saved.model_type
    assert check_adapter(planned) == check_adapter(saved)


def test_cli_exit_status_lines_and_json(base_dir, tmp_path, capsys):
    adapter = make(base_dir, tmp_path / "a", r=32, use_dora=True)
    assert cli.main(["check", str(adapter), "--target", "vllm", "--target", "peft"]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out == [
        "vllm: no DoRA: use_dora: true; fix: merge it into the base (lorakit merge) and serve the merged model, "
        "or train with use_dora: false",
        "vllm: rank within --max-lora-rank (default 16): rank 32; fix: serve with --max-lora-rank 32",
        "peft: ok",
    ]
    assert cli.main(["check", str(adapter), "--target", "vllm", "--max-lora-rank", "32", "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["failed"] == ["vllm"] and [f["rule"] for f in report["findings"]] == ["no DoRA"]
    assert cli.main(["check", str(tmp_path / "missing")]) == 2
    assert "error" in capsys.readouterr().err
