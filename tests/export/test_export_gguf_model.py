"""lorakit merge to one GGUF file: written from the fp32 merge, read back by lorakit itself.

The oracles: the merged transformers model (what the file should hold); gguf-py's own reader and
de-quantizer for what it does hold; transformers' GGUF loader (through `lorakit.load_model`) and
lorakit's packed loader for reading it as a model again; the embedded SmolLM2 GGUF, written by
llama.cpp's converter, for the tokenizer and hyperparameter keys.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

gguf = pytest.importorskip("gguf")
pytest.importorskip("accelerate")

from lorakit import LoraConfig, get_peft_model  # noqa: E402
from lorakit.export.gguf_model import check_outtype, merge_adapter_to_gguf  # noqa: E402
from lorakit.models.gguf_names import unpermute_rows  # noqa: E402
from lorakit.models.inference import load_for_inference  # noqa: E402
from lorakit.models.load import load_model  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CHATML_DEFAULT_SYSTEM = (
    "{% for m in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a tiny test model.<|im_end|>\\n' }}{% endif %}"
    "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
               r"\s*[\r\n]+|\s+(?!\S)|\s+")
TEXT = "hello world, hell 42 tokens"
VOCAB = 272  # more rows than the tokenizer has ids: the rest are [PAD] entries


def tiny_tokenizer(family: str):
    """Byte-level BPE with a few merges, SmolLM2's special tokens, a ChatML template."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    merges = [("h", "e"), ("l", "l"), ("he", "ll"), ("Ġ", "w"), ("o", "r")]
    vocab = {c: i for i, c in enumerate(alphabet + ["".join(m) for m in merges])}
    core = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    if family == "qwen2":
        core.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    else:
        core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<|endoftext|>", bos_token="<|im_start|>",
                                        eos_token="<|im_end|>", pad_token="<|im_end|>")
    tokenizer.chat_template = CHATML_DEFAULT_SYSTEM
    return tokenizer


GEMMAS = {"gemma": {}, "gemma2": dict(query_pre_attn_scalar=16, sliding_window=8),
          "gemma3_text": dict(query_pre_attn_scalar=16, sliding_window=8, layer_types=["sliding_attention",
                                                                                      "full_attention"])}


def save_tiny(out: Path, family: str, tied: bool) -> Path:
    """A tiny random model of `family` ("llama", "qwen2", or one of GEMMAS) with the tiny tokenizer."""
    from transformers import (AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, Qwen2Config,
                              Qwen2ForCausalLM)

    tokenizer = tiny_tokenizer(family)
    tokenizer.save_pretrained(out)
    kwargs = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5,
                  tie_word_embeddings=tied, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                  pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    if family in GEMMAS:
        config = AutoConfig.for_model(family, **kwargs, head_dim=16, **GEMMAS[family])
        model = AutoModelForCausalLM.from_config(config)
    elif family == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**kwargs, rope_theta=1e6))
    else:
        model = LlamaForCausalLM(LlamaConfig(**kwargs, rope_theta=10000.0))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:  # non-trivial biases and norms: their order shows
                p.copy_(torch.randn_like(p) * 0.1 + (1.0 if "norm" in name else 0.0))
    model.save_pretrained(out)
    return out


def save_adapter(model_dir: Path, out: Path) -> Path:
    model, _ = load_model(str(model_dir), dtype="float32")
    torch.manual_seed(1)
    peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False))
    peft.save_pretrained(out)
    return out


@pytest.fixture(scope="module", params=[("llama", False), ("qwen2", True)], ids=["llama-untied", "qwen2-tied"])
def tiny(request, tmp_path_factory):
    family, tied = request.param
    root = tmp_path_factory.mktemp(f"tiny-{family}")
    model_dir = save_tiny(root / "model", family, tied)
    adapter = save_adapter(model_dir, root / "adapter")
    peft, tokenizer = load_for_inference(str(model_dir), [adapter], dtype="float32", device="cpu")
    return family, model_dir, adapter, peft.merge_and_unload().eval(), tokenizer


@pytest.fixture(autouse=True)
def tmp_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path / "cache"))


def file_weights(path: Path, model) -> dict[str, torch.Tensor]:
    """What the file holds, de-quantized by gguf-py, under the model's names and in its row order."""
    from lorakit.models.gguf_names import GGUF_ARCHS, gguf_names, rotary_heads

    reader = gguf.GGUFReader(path)
    arch = GGUF_ARCHS[reader.fields["general.architecture"].contents()]
    names = gguf_names(model.state_dict(), arch.member, model.config.num_hidden_layers)
    tensors = {t.name: t for t in reader.tensors}
    out = {}
    for hf_name, gguf_name in names.items():
        if gguf_name not in tensors:
            continue
        t = tensors[gguf_name]
        shape = tuple(int(n) for n in reversed(t.shape.tolist()))
        value = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy()).reshape(shape)
        heads = rotary_heads(model.config, gguf_name) if arch.rope_permuted else None
        value = value if heads is None else unpermute_rows(value, heads)
        out[hf_name] = value - arch.norm_offset if hf_name.endswith("norm.weight") else value
    return out


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("outtype", ["f32", "f16", "bf16", "q8_0", "q4_0"])
def test_merged_gguf_reads_back_as_the_merged_model(tiny, tmp_path, outtype):
    family, model_dir, adapter, merged, tokenizer = tiny
    out = tmp_path / "model.gguf"
    result = merge_adapter_to_gguf(str(model_dir), adapter, out, outtype=outtype)
    assert result.path == out and result.modelfile == tmp_path / "Modelfile" and result.modelfile.is_file()
    assert not list(tmp_path.glob(".*.tmp"))

    # what the file holds is the merge, rounded once to the file's types (exactly, for f32)
    stored = file_weights(out, merged)
    state = merged.state_dict()
    assert set(stored) == set(state) - ({"lm_head.weight"} if merged.config.tie_word_embeddings else set())
    for name, value in stored.items():
        err = (value - state[name]).abs().max().item()
        bound = {"f32": 0.0, "f16": 1e-3, "bf16": 8e-3, "q8_0": 2e-2, "q4_0": 0.3}[outtype] * max(1.0, state[name].abs().max().item())
        assert err <= bound, (name, err)

    # read back as a model (transformers' GGUF loader, through lorakit): the file's weights exactly
    ids = torch.tensor([tokenizer(TEXT)["input_ids"]])
    loaded, loaded_tok = load_model(str(out), dtype="float32")
    reference = copy.deepcopy(merged)
    reference.load_state_dict(stored, strict=False)  # a tied head follows the stored embedding
    torch.testing.assert_close(logits(loaded, ids), logits(reference, ids), atol=1e-4, rtol=1e-4)
    if outtype in ("f32", "f16", "bf16"):
        torch.testing.assert_close(logits(loaded, ids), logits(merged, ids), atol={"f32": 1e-4, "f16": 2e-2, "bf16": 0.1}[outtype],
                                   rtol=0)
    else:  # quantization noise, but the same predictions nearly everywhere
        agree = (logits(loaded, ids).argmax(-1) == logits(merged, ids).argmax(-1)).float().mean().item()
        assert agree >= (0.9 if outtype == "q8_0" else 0.5)

    # the tokenizer and chat template survive the round trip
    assert loaded_tok(TEXT)["input_ids"] == tokenizer(TEXT)["input_ids"]
    chat = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "world"},
            {"role": "user", "content": "again"}]
    assert (loaded_tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
            == tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True))

    if family == "llama" and outtype in ("q8_0", "q4_0"):  # the packed loader reads the same blocks
        packed, _ = load_model(str(out), packed=True)
        torch.testing.assert_close(logits(packed, ids), logits(reference, ids), atol=1e-4, rtol=1e-4)


def test_metadata_keys_llama_cpp_reads(tiny, tmp_path):
    family, model_dir, adapter, merged, tokenizer = tiny
    out = merge_adapter_to_gguf(str(model_dir), adapter, tmp_path / "m.gguf", outtype="q8_0", modelfile=False).path
    assert not (tmp_path / "Modelfile").exists()
    fields = gguf.GGUFReader(out).fields
    kv = {k: f.contents() for k, f in fields.items() if not k.startswith("GGUF.")}
    c = merged.config
    assert kv["general.architecture"] == family and kv["general.type"] == "model"
    assert kv["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q8_0
    expected = {"context_length": c.max_position_embeddings, "embedding_length": c.hidden_size,
                "block_count": c.num_hidden_layers, "feed_forward_length": c.intermediate_size,
                "attention.head_count": c.num_attention_heads, "attention.head_count_kv": c.num_key_value_heads,
                "rope.dimension_count": c.hidden_size // c.num_attention_heads, "vocab_size": VOCAB}
    for key, value in expected.items():
        assert kv[f"{family}.{key}"] == value, key
    assert kv[f"{family}.rope.freq_base"] == pytest.approx(1e6 if family == "qwen2" else 1e4)
    assert kv[f"{family}.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-5)
    assert kv["tokenizer.ggml.model"] == "gpt2"
    assert kv["tokenizer.ggml.pre"] == ("qwen2" if family == "qwen2" else "gpt-2")
    tokens, types = kv["tokenizer.ggml.tokens"], kv["tokenizer.ggml.token_type"]
    assert len(tokens) == len(types) == VOCAB
    assert tokens[:len(tokenizer)] == tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    assert tokens[-1] == f"[PAD{VOCAB - 1}]" and types[-1] == gguf.TokenType.UNUSED
    assert types[tokenizer.eos_token_id] == gguf.TokenType.CONTROL and types[0] == gguf.TokenType.NORMAL
    assert kv["tokenizer.ggml.merges"] == ["h e", "l l", "he ll", "Ġ w", "o r"]
    assert kv["tokenizer.ggml.bos_token_id"] == tokenizer.bos_token_id
    assert kv["tokenizer.ggml.eos_token_id"] == kv["tokenizer.ggml.padding_token_id"] == tokenizer.eos_token_id
    assert kv["tokenizer.ggml.unknown_token_id"] == tokenizer.unk_token_id
    assert kv["tokenizer.ggml.add_bos_token"] is False
    assert kv["tokenizer.chat_template"] == tokenizer.chat_template
    names = {t.name for t in gguf.GGUFReader(out).tensors}
    assert ("output.weight" in names) == (not c.tie_word_embeddings)
    assert {"token_embd.weight", "output_norm.weight", "blk.1.attn_q.weight", "blk.1.ffn_down.weight"} <= names
    assert ("blk.0.attn_q.bias" in names) == (family == "qwen2")


def test_types_follow_llama_cpp(tiny, tmp_path):
    _, model_dir, adapter, _, _ = tiny
    out = merge_adapter_to_gguf(str(model_dir), adapter, tmp_path / "m.gguf", outtype="q4_1", modelfile=False).path
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(out).tensors}
    assert types["token_embd.weight"] == "Q8_0" and types["blk.0.attn_norm.weight"] == "F32"
    assert types["blk.0.attn_q.weight"] == types["blk.1.ffn_down.weight"] == "Q4_1"


def test_bad_outputs_and_types_refused_nothing_written(tiny, tmp_path, monkeypatch):
    _, model_dir, adapter, _, _ = tiny
    with pytest.raises(ValueError, match="gguf-py cannot quantize K-quants.*llama-quantize"):
        check_outtype("q4_k_m")
    with pytest.raises(ValueError, match="--outtype must be one of"):
        check_outtype("q3")
    out = tmp_path / "m.gguf"
    out.write_bytes(b"old")
    with pytest.raises(FileExistsError, match="m.gguf exists; pass --overwrite"):
        merge_adapter_to_gguf(str(model_dir), adapter, out, modelfile=False)
    assert out.read_bytes() == b"old"

    import lorakit.export.gguf_model as gm

    def broken(value, qtype):
        raise RuntimeError("disk full")

    monkeypatch.setattr(gm, "encode", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        merge_adapter_to_gguf(str(model_dir), adapter, out, overwrite=True)
    assert out.read_bytes() == b"old" and not (tmp_path / "Modelfile").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]  # no temp files left
    monkeypatch.undo()
    merge_adapter_to_gguf(str(model_dir), adapter, out, overwrite=True)
    assert gguf.GGUFReader(out).fields["general.architecture"].contents() in ("llama", "qwen2")


def test_other_families_refused_in_one_line(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    model_dir = tmp_path / "gpt2"
    tiny_tokenizer("llama").save_pretrained(model_dir)
    config = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=1, n_head=2, n_positions=64)
    GPT2LMHeadModel(config).save_pretrained(model_dir)
    model, _ = load_model(str(model_dir))
    get_peft_model(model, LoraConfig(r=2, target_modules=["c_attn"])).save_pretrained(tmp_path / "adapter")
    with pytest.raises(ValueError, match="merged GGUF model export supports the model families gemma, gemma2, "
                                         "gemma3_text, llama, mistral, qwen2, not 'gpt2'"):
        merge_adapter_to_gguf(str(model_dir), tmp_path / "adapter", tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists() and not (tmp_path / "Modelfile").exists()


def test_cli_merge_to_gguf(tiny, tmp_path, capsys):
    from lorakit.cli import main

    _, model_dir, adapter, _, _ = tiny
    out = tmp_path / "cli.gguf"
    assert main(["merge", "--model", str(model_dir), "--adapter", str(adapter), "--output", str(out),
                 "--outtype", "q8_0"]) == 0
    printed = capsys.readouterr().out
    assert f"llama-cli -m {out}" in printed and "ollama create NAME -f" in printed
    assert (tmp_path / "Modelfile").read_text().startswith("FROM ./cli.gguf\n")
    assert main(["merge", "--model", str(model_dir), "--adapter", str(adapter), "--output", str(out),
                 "--outtype", "q4_k_m"]) == 2
    assert "llama-quantize" in capsys.readouterr().err


@pytest.mark.parametrize("family", list(GEMMAS))
def test_gemma_merged_gguf_holds_the_merge_with_llama_cpps_norms_and_keys(family, tmp_path):
    """Gemma's RMSNorm scales by 1 + w; llama.cpp's by the stored weight, so the file holds 1 + w
    (as llama.cpp's converter writes it), with the keys llama.cpp's gemma loaders read."""
    model_dir = save_tiny(tmp_path / "model", family, tied=True)
    adapter = save_adapter(model_dir, tmp_path / "adapter")
    peft, _ = load_for_inference(str(model_dir), [adapter], dtype="float32", device="cpu")
    merged = peft.merge_and_unload().eval()
    out = merge_adapter_to_gguf(str(model_dir), adapter, tmp_path / "m.gguf", outtype="f32", modelfile=False).path
    reader = gguf.GGUFReader(out)
    kv = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    arch = {"gemma3_text": "gemma3"}.get(family, family)
    assert kv["general.architecture"] == arch

    state = merged.state_dict()
    stored = file_weights(out, merged)
    assert set(stored) == set(state) - {"lm_head.weight"}
    for name, value in stored.items():
        exact = 0.0 if not name.endswith("norm.weight") else 1e-6  # (w + 1) - 1 rounds in fp32
        torch.testing.assert_close(value, state[name], atol=exact, rtol=0, msg=name)
    raw = {t.name: torch.from_numpy(t.data.copy()) for t in reader.tensors}
    norm = state["model.layers.0.input_layernorm.weight"]
    torch.testing.assert_close(raw["blk.0.attn_norm.weight"], norm + 1.0, atol=0, rtol=0)
    torch.testing.assert_close(raw["blk.0.attn_q.weight"], state["model.layers.0.self_attn.q_proj.weight"],
                               atol=0, rtol=0)  # no rotary permutation: gemma rotates halves, as transformers

    c = merged.config
    assert kv[f"{arch}.rope.dimension_count"] == 16
    if family == "gemma2":
        assert kv["gemma2.attn_logit_softcapping"] == pytest.approx(c.attn_logit_softcapping)
        assert kv["gemma2.final_logit_softcapping"] == pytest.approx(c.final_logit_softcapping)
    if family != "gemma":
        assert kv[f"{arch}.attention.sliding_window"] == 8
        assert kv[f"{arch}.attention.sliding_window_pattern"] == [t == "sliding_attention" for t in c.layer_types]
        assert kv[f"{arch}.rope.freq_base_swa"] == pytest.approx(10000.0)


def test_gemma_untied_head_and_other_query_scale_refused(tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    from lorakit.export.gguf_model import write_gguf_model

    tokenizer = tiny_tokenizer("llama")
    base = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, max_position_embeddings=64)
    untied = AutoModelForCausalLM.from_config(AutoConfig.for_model("gemma", **base, tie_word_embeddings=False))
    with pytest.raises(ValueError, match="llama.cpp's gemma reads the output head from token_embd"):
        write_gguf_model(untied, tokenizer, tmp_path / "a.gguf")
    scaled = AutoModelForCausalLM.from_config(AutoConfig.for_model("gemma2", **base, query_pre_attn_scalar=100))
    with pytest.raises(ValueError, match="query_pre_attn_scalar 100 has no GGUF form"):
        write_gguf_model(scaled, tokenizer, tmp_path / "b.gguf")


@pytest.mark.slow
def test_embedded_smollm2_tokenizer_and_hparams_match_llama_cpps_converter(tmp_path):
    """The embedded GGUF was written by llama.cpp's converter: a merged export of it carries the same
    tokenizer keys and hyperparameters, and its q8_0 file runs in the packed loader like the merge."""
    from lorakit.models.embedded import builtin_gguf_path

    model, tokenizer = load_model("smollm2-135m", dtype="float32")
    torch.manual_seed(0)
    get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "k_proj", "down_proj"],
                                     init_lora_weights=False)).save_pretrained(tmp_path / "adapter")
    out = merge_adapter_to_gguf("smollm2-135m", tmp_path / "adapter", tmp_path / "smol.gguf", outtype="q8_0").path
    source = {k: f.contents() for k, f in gguf.GGUFReader(builtin_gguf_path("smollm2-135m")).fields.items()}
    written = {k: f.contents() for k, f in gguf.GGUFReader(out).fields.items()}
    same = [k for k in source if k.startswith(("llama.", "tokenizer.")) and k != "tokenizer.ggml.add_space_prefix"]
    assert "tokenizer.ggml.merges" in same and "llama.rope.freq_base" in same
    for key in same:
        assert written[key] == (pytest.approx(source[key]) if isinstance(source[key], float) else source[key]), key
    assert written["tokenizer.ggml.pre"] == "smollm"

    peft, _ = load_for_inference("smollm2-135m", [tmp_path / "adapter"], dtype="float32", device="cpu")
    merged = peft.merge_and_unload().eval()
    packed, _ = load_model(str(out), packed=True)
    ids = torch.tensor([tokenizer("The capital of France is")["input_ids"]])
    reference = copy.deepcopy(merged)
    reference.load_state_dict(file_weights(out, merged), strict=False)
    got, want = logits(packed, ids), logits(merged, ids)
    torch.testing.assert_close(got, logits(reference, ids), atol=2e-3, rtol=1e-4)  # the file's weights
    assert torch.equal(got.argmax(-1), want.argmax(-1))
    assert ((got - want).norm() / want.norm()).item() < 0.05  # Q8_0 rounding through 30 layers (measured 0.03)
    assert json.dumps(written["tokenizer.chat_template"]) == json.dumps(source["tokenizer.chat_template"])
