"""lorakit export --format gguf: llama.cpp's LoRA adapter GGUF, written and read back.

The format is checked by the spec llama.cpp's loader applies (src/llama-adapter.cpp): the metadata
keys, `<base tensor>.lora_a` / `.lora_b` pairs whose shapes fit the base GGUF's tensors, and the
scale alpha / rank. The references are independent: llama.cpp's converter permutation written out
here in its own form, PEFT's delta weights for rsLoRA / rank_pattern / alpha_pattern, and the
original adapter's logits for the round trip through `PeftModel.from_pretrained`.
"""

from __future__ import annotations

import copy
import json
import os
import re
from pathlib import Path

import pytest
import torch

gguf = pytest.importorskip("gguf")

from lorakit import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from lorakit.cli import main  # noqa: E402
from lorakit.export import export_gguf_adapter, inspect_adapter  # noqa: E402
from lorakit.export.gguf_adapter import llamacpp_scale, permute_rows  # noqa: E402
from lorakit.models.gguf_packed import unpermute_rows  # noqa: E402
from ggufmodels import converter_permute  # noqa: E402
from tinymodels import save_tiny_model  # noqa: E402

SEVEN = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
HEADS, KV_HEADS = 4, 2


def tiny(kind: str, seed: int = 0, **extra) -> torch.nn.Module:
    """A random 2-layer model of a family the GGUF adapter map knows (hidden 32, 4 heads, 2 kv heads)."""
    import transformers as tf

    torch.manual_seed(seed)
    common = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=HEADS,
                  num_key_value_heads=KV_HEADS, vocab_size=100, max_position_embeddings=64, **extra)
    if kind == "gpt2":
        return tf.GPT2LMHeadModel(tf.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=100, n_positions=64)).eval()
    config = {
        "llama": lambda: tf.LlamaConfig(**common),
        "mistral": lambda: tf.MistralConfig(**common),
        "qwen2": lambda: tf.Qwen2Config(**common),
        "qwen3": lambda: tf.Qwen3Config(head_dim=8, **common),
        "gemma": lambda: tf.GemmaConfig(head_dim=8, **common),
        "gemma2": lambda: tf.Gemma2Config(head_dim=8, **common),
        "gemma3_text": lambda: tf.Gemma3TextConfig(head_dim=8, **common),
        "phi3": lambda: tf.Phi3Config(pad_token_id=0, bos_token_id=1, eos_token_id=2, **common),
    }[kind]()
    return tf.AutoModelForCausalLM.from_config(config).eval()


def saved_adapter(tmp_path: Path, model: torch.nn.Module, name: str = "adapter", **fields) -> Path:
    """A random adapter (B non-zero) saved by lorakit in PEFT's layout."""
    fields = {"r": 4, "lora_alpha": 8, "target_modules": "all-linear", "init_lora_weights": False, **fields}
    torch.manual_seed(1)
    peft = get_peft_model(copy.deepcopy(model), LoraConfig(**fields))
    peft.save_pretrained(tmp_path / name)
    return tmp_path / name


def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


IDS = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(3))


def reader_pairs(path: Path) -> dict[str, dict[str, torch.Tensor]]:
    """{base tensor: {"a": lora_a, "b": lora_b}} in torch's order (float32), read with gguf's reader."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    for t in gguf.GGUFReader(path).tensors:
        base, part = t.name.rsplit(".lora_", 1)
        values = gguf.quants.dequantize(t.data, t.tensor_type).reshape(tuple(reversed(t.shape.tolist())))
        out.setdefault(base, {})[part] = torch.from_numpy(values.astype("float32"))
    return out


def llamacpp_load_checks(adapter: Path, base_tensors: dict[str, list[int]]) -> None:
    """What llama_adapter_lora_init checks, by GGUF `ne`: every pair complete, named after a base
    tensor, a.ne[0] == base.ne[0], b.ne[1] == base.ne[1], a.ne[1] == b.ne[0] (token_embd: flipped)."""
    reader = gguf.GGUFReader(adapter)
    fields = {k: f.contents() for k, f in reader.fields.items()}
    assert fields["general.type"] == "adapter" and fields["adapter.type"] == "lora"
    pairs: dict[str, dict[str, list[int]]] = {}
    for t in reader.tensors:
        assert t.name.endswith((".lora_a", ".lora_b")), t.name
        pairs.setdefault(t.name[:-7], {})[t.name[-1]] = t.shape.tolist()
    for name, ne in pairs.items():
        assert set(ne) == {"a", "b"}, name
        base = base_tensors[name]
        if name == "token_embd.weight":
            assert (base[0], base[1]) == (ne["b"][1], ne["a"][1]), name
        else:
            assert (base[0], base[1]) == (ne["a"][0], ne["b"][1]), name
            assert ne["a"][1] == ne["b"][0], name


# -- the file ---------------------------------------------------------------------------------
def test_written_file_is_llamacpp_lora_adapter(tmp_path):
    model = tiny("llama")
    adapter = saved_adapter(tmp_path, model, target_modules=SEVEN + ["embed_tokens"])
    out = export_gguf_adapter(adapter, tmp_path / "adapter.gguf", base=model)
    reader = gguf.GGUFReader(out)
    fields = {k: f.contents() for k, f in reader.fields.items()}
    assert fields["general.architecture"] == "llama"
    assert fields["general.type"] == "adapter" and fields["adapter.type"] == "lora"
    assert fields["adapter.lora.alpha"] == 8.0
    assert reader.fields["adapter.lora.alpha"].types == [gguf.GGUFValueType.FLOAT32]
    kinds = {"q_proj": ("attn_q", 32), "k_proj": ("attn_k", 16), "v_proj": ("attn_v", 16),
             "o_proj": ("attn_output", 32), "gate_proj": ("ffn_gate", 64), "up_proj": ("ffn_up", 64),
             "down_proj": ("ffn_down", 32)}
    expected = {"token_embd.weight.lora_a": [4, 100], "token_embd.weight.lora_b": [4, 32]}
    for layer in range(2):
        for proj, (kind, out_features) in kinds.items():
            in_features = 64 if proj == "down_proj" else 32
            expected[f"blk.{layer}.{kind}.weight.lora_a"] = [in_features, 4]  # ne: (in, r)
            expected[f"blk.{layer}.{kind}.weight.lora_b"] = [4, out_features]  # ne: (r, out)
    assert {t.name: t.shape.tolist() for t in reader.tensors} == expected
    assert {t.tensor_type for t in reader.tensors} == {gguf.GGMLQuantizationType.F32}
    assert sorted(os.listdir(tmp_path)) == ["adapter", "adapter.gguf"]  # no temp file left beside it


@pytest.mark.parametrize("outtype,a_type,b_type", [
    ("f16", "F16", "F16"), ("bf16", "BF16", "BF16"), ("q8_0", "Q8_0", "F16"),  # rank-4 rows are no Q8_0 block
])
def test_outtypes(tmp_path, outtype, a_type, b_type):
    model = tiny("llama")
    adapter = saved_adapter(tmp_path, model, target_modules=["q_proj", "v_proj"])
    out = export_gguf_adapter(adapter, tmp_path / "a.gguf", base=model, outtype=outtype)
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(out).tensors}
    assert {v for k, v in types.items() if k.endswith("lora_a")} == {a_type}
    assert {v for k, v in types.items() if k.endswith("lora_b")} == {b_type}
    info = inspect_adapter(out)
    assert info["outtype"] == outtype and info["dtypes"] == sorted({a_type, b_type})


# -- the math ---------------------------------------------------------------------------------
def test_permute_rows_is_the_converters_permutation():
    w = torch.arange(48 * 3, dtype=torch.float32).reshape(48, 3)
    for heads in (1, 2, 4, 6):
        assert torch.equal(permute_rows(w, heads), converter_permute(w, heads))
        assert torch.equal(unpermute_rows(permute_rows(w, heads), heads), w)


def test_llamacpp_scale():
    assert llamacpp_scale(16.0, 8) == 2.0 and llamacpp_scale(0.0, 8) == 1.0


def test_qk_rows_permuted_as_llamacpp_lays_out_the_base(tmp_path):
    """Through llama.cpp's layout (base rows permuted), W_file + s B_file A_file is the transformers
    merge W + s B A with its rows permuted the converter's way; v and o are left as they are."""
    model = tiny("llama")
    adapter = saved_adapter(tmp_path, model, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    out = export_gguf_adapter(adapter, tmp_path / "a.gguf", base=model)
    from safetensors.torch import load_file

    saved = load_file(adapter / "adapter_model.safetensors")
    pairs = reader_pairs(out)
    for proj, kind, heads in (("q_proj", "attn_q", HEADS), ("k_proj", "attn_k", KV_HEADS),
                              ("v_proj", "attn_v", None), ("o_proj", "attn_output", None)):
        stem = f"base_model.model.model.layers.1.self_attn.{proj}"
        hf_delta = 8 / 4 * saved[f"{stem}.lora_B.weight"] @ saved[f"{stem}.lora_A.weight"]
        pair = pairs[f"blk.1.{kind}.weight"]
        file_delta = llamacpp_scale(8.0, pair["b"].shape[1]) * pair["b"] @ pair["a"]
        weight = getattr(model.model.layers[1].self_attn, proj).weight.detach()
        if heads is None:
            torch.testing.assert_close(file_delta, hf_delta)
        else:
            torch.testing.assert_close(converter_permute(weight, heads) + file_delta,
                                       converter_permute(weight + hf_delta, heads))
            torch.testing.assert_close(unpermute_rows(file_delta, heads), hf_delta)


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_rslora_rank_and_alpha_patterns_fold_into_b(tmp_path, kind):
    """llama.cpp's delta, alpha / (tensor rank) * B A, equals PEFT's delta of each module."""
    peft = pytest.importorskip("peft")
    model = tiny(kind)
    adapter = saved_adapter(tmp_path, model, r=8, lora_alpha=12, target_modules=SEVEN, use_rslora=True,
                            rank_pattern={"v_proj": 2, r"layers\.1\.mlp\.down_proj": 6},
                            alpha_pattern={"o_proj": 5, "gate_proj": 20})
    out = export_gguf_adapter(adapter, tmp_path / "a.gguf", base=model)
    alpha = gguf.GGUFReader(out).fields["adapter.lora.alpha"].contents()
    assert alpha == 12.0
    pairs = reader_pairs(out)
    oracle = peft.PeftModel.from_pretrained(copy.deepcopy(model), str(adapter))
    kinds = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
             "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}
    heads = {"q_proj": HEADS, "k_proj": KV_HEADS} if kind == "llama" else {}
    checked = set()
    for name, module in oracle.base_model.model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if leaf not in kinds or not hasattr(module, "get_delta_weight"):
            continue
        layer = int(name.split(".layers.")[1].split(".")[0])
        pair = pairs[f"blk.{layer}.{kinds[leaf]}.weight"]
        delta = llamacpp_scale(alpha, pair["b"].shape[1]) * pair["b"] @ pair["a"]
        if leaf in heads:
            delta = unpermute_rows(delta, heads[leaf])
        torch.testing.assert_close(delta, module.get_delta_weight("default"), rtol=1e-5, atol=1e-6)
        checked.add((layer, leaf, pair["b"].shape[1]))
    assert len(checked) == 14 and (0, "v_proj", 2) in checked and (1, "down_proj", 6) in checked


# -- round trips ------------------------------------------------------------------------------
ARCHS = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma": "gemma",
         "gemma2": "gemma2", "gemma3_text": "gemma3", "phi3": "phi3", "gpt2": "gpt2"}


@pytest.mark.parametrize("kind", list(ARCHS))
def test_round_trip_through_from_pretrained_f32(tmp_path, kind):
    model = tiny(kind)
    adapter = saved_adapter(tmp_path, model, use_rslora=True, rank_pattern={"0.mlp": 2})
    want = logits(PeftModel.from_pretrained(copy.deepcopy(model), adapter), IDS)
    out = export_gguf_adapter(adapter, tmp_path / "a.gguf", base=model)
    assert gguf.GGUFReader(out).fields["general.architecture"].contents() == ARCHS[kind]
    got = logits(PeftModel.from_pretrained(copy.deepcopy(model), out), IDS)
    assert not torch.allclose(want, logits(model, IDS), atol=1e-3)  # the adapter changes the output
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["llama", "gemma"])
@pytest.mark.parametrize("outtype,tolerance", [("f16", 2e-3), ("bf16", 2e-2), ("q8_0", 2e-2)])
def test_round_trip_within_the_outtypes_rounding(tmp_path, kind, outtype, tolerance):
    model = tiny(kind)
    adapter = saved_adapter(tmp_path, model, target_modules=SEVEN + ["embed_tokens"])
    base = logits(model, IDS)
    want = logits(PeftModel.from_pretrained(copy.deepcopy(model), adapter), IDS) - base
    out = export_gguf_adapter(adapter, tmp_path / "a.gguf", base=model, outtype=outtype)
    got = logits(PeftModel.from_pretrained(copy.deepcopy(model), out), IDS) - base
    error = ((got - want).norm() / want.norm()).item()
    assert 0 < error < tolerance


def test_load_adapter_beside_a_directory_adapter(tmp_path):
    model = tiny("qwen2")
    first = saved_adapter(tmp_path, model, name="first", target_modules=["q_proj", "v_proj"])
    torch.manual_seed(5)
    second = saved_adapter(tmp_path, tiny("qwen2", seed=0), name="second", r=2, target_modules=["k_proj", "up_proj"])
    want = logits(PeftModel.from_pretrained(copy.deepcopy(model), second), IDS)
    gguf_file = export_gguf_adapter(second, tmp_path / "second.gguf", base=model)
    handle = PeftModel.from_pretrained(model, first)
    handle.load_adapter(gguf_file, adapter_name="g")
    handle.set_adapter("g")
    torch.testing.assert_close(logits(handle, IDS), want, rtol=1e-5, atol=1e-5)


def test_embedded_smollm2_fits_its_base_gguf_and_round_trips(tmp_path):
    """On the embedded Q4_1 SmolLM2: every pair passes llama.cpp's shape checks against the base
    GGUF's own tensors, the base file's attn_q rows are `permute_rows` of transformers' weight, and
    the adapter round-trips."""
    from lorakit.bases import gguf_blocks
    from lorakit.models import builtin_gguf_path, load_model

    try:
        path = builtin_gguf_path("smollm2-135m")
    except (ModuleNotFoundError, FileNotFoundError) as err:
        pytest.skip(str(err))
    model, _ = load_model("smollm2-135m", dtype="float32", device="cpu", packed=False)  # dense: its q weight
    ids = IDS[:1, :6]
    torch.manual_seed(1)
    peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "down_proj"],
                                            layers_to_transform=[0, 29], init_lora_weights=False,
                                            base_model_name_or_path="smollm2-135m"))
    peft.save_pretrained(tmp_path / "adapter")
    want = logits(peft, ids)
    model = peft.unload()  # the plain base again (no copy of 135M parameters)
    out = export_gguf_adapter(tmp_path / "adapter", tmp_path / "a.gguf")  # the recorded base: its GGUF file
    base_reader = gguf.GGUFReader(path)
    llamacpp_load_checks(out, {t.name: t.shape.tolist() for t in base_reader.tensors})
    q = next(t for t in base_reader.tensors if t.name == "blk.0.attn_q.weight")
    file_q = gguf_blocks.dequantize(torch.from_numpy(q.data.reshape(-1).copy()), q.tensor_type,
                                    tuple(reversed(q.shape.tolist())))
    torch.testing.assert_close(file_q, permute_rows(model.model.layers[0].self_attn.q_proj.weight.detach(),
                                                    model.config.num_attention_heads))
    assert not torch.allclose(want, logits(model, ids), atol=1e-3)  # the adapter changes the output
    torch.testing.assert_close(logits(PeftModel.from_pretrained(model, out), ids), want, rtol=1e-4, atol=1e-4)


# -- refusals and bad files -------------------------------------------------------------------
@pytest.mark.parametrize("fields,culprit", [
    ({"use_dora": True}, "use_dora"), ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
    ({"bias": "all"}, "bias: all"), ({"lora_bias": True}, "lora_bias"),
])
def test_forms_a_gguf_adapter_lacks_are_refused(tmp_path, fields, culprit):
    model = tiny("llama")
    adapter = saved_adapter(tmp_path, model, target_modules=["q_proj"], **fields)
    with pytest.raises(ValueError, match=culprit) as err:
        export_gguf_adapter(adapter, tmp_path / "a.gguf", base=model)
    assert "lorakit merge --adapter DIR --output model.gguf" in str(err.value) and "\n" not in str(err.value)
    assert list(tmp_path.glob("*.gguf")) == [] and not list(tmp_path.glob(".*tmp"))


def test_head_tied_to_the_embeddings_is_refused(tmp_path):
    model = tiny("llama", tie_word_embeddings=True)
    adapter = saved_adapter(tmp_path, model, target_modules=["q_proj", "lm_head"])
    with pytest.raises(ValueError, match="lm_head.*tied"):
        export_gguf_adapter(adapter, tmp_path / "a.gguf", base=model)


def test_unknown_architecture_is_refused(tmp_path):
    from transformers import OPTConfig, OPTForCausalLM

    model = OPTForCausalLM(OPTConfig(hidden_size=32, num_hidden_layers=2, ffn_dim=64, num_attention_heads=4,
                                     vocab_size=100, max_position_embeddings=64, word_embed_proj_dim=32)).eval()
    adapter = saved_adapter(tmp_path, model, target_modules=["q_proj"])
    with pytest.raises(ValueError, match="model_type 'opt' has no GGUF adapter name map"):
        export_gguf_adapter(adapter, tmp_path / "a.gguf", base=model)


def test_shapes_that_do_not_fit_the_base_are_refused(tmp_path):
    adapter = saved_adapter(tmp_path, tiny("llama"), target_modules=["q_proj"])
    wider = tiny("llama", head_dim=16)  # q_proj (64, 32)
    with pytest.raises(ValueError, match=r"q_proj .* does not fit blk.0.attn_q.weight \(64, 32\)"):
        export_gguf_adapter(adapter, tmp_path / "a.gguf", base=wider)


def test_existing_output_is_kept_unless_overwrite_and_a_failed_write_leaves_it_whole(tmp_path, monkeypatch):
    model = tiny("llama")
    adapter = saved_adapter(tmp_path, model, target_modules=["q_proj"])
    out = tmp_path / "a.gguf"
    out.write_bytes(b"old")
    with pytest.raises(FileExistsError, match="a.gguf exists; pass --overwrite"):
        export_gguf_adapter(adapter, out, base=model)

    def broken(self, **_):
        raise OSError("disk full")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", broken)
    with pytest.raises(OSError, match="disk full"):
        export_gguf_adapter(adapter, out, base=model, overwrite=True)
    assert out.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["a.gguf", "adapter"]
    monkeypatch.undo()
    export_gguf_adapter(adapter, out, base=model, overwrite=True)
    assert inspect_adapter(out)["n_modules"] == 2


def test_from_pretrained_refuses_files_that_are_no_adapter_for_the_model(tmp_path):
    llama = tiny("llama")
    qwen_file = export_gguf_adapter(saved_adapter(tmp_path, tiny("qwen2"), target_modules=["q_proj"]),
                                    tmp_path / "qwen.gguf", base=tiny("qwen2"))
    with pytest.raises(ValueError, match="qwen.gguf: general.architecture is 'qwen2', the model's is 'llama'"):
        PeftModel.from_pretrained(llama, qwen_file)

    model_file = tmp_path / "model.gguf"
    writer = gguf.GGUFWriter(str(model_file), "llama")
    writer.add_type("model")
    writer.add_tensor("token_embd.weight", torch.zeros(4, 8).numpy())
    writer.write_header_to_file(), writer.write_kv_data_to_file(), writer.write_tensors_to_file(), writer.close()
    with pytest.raises(ValueError, match="model.gguf: general.type is 'model', not 'adapter'"):
        PeftModel.from_pretrained(llama, model_file)

    good = export_gguf_adapter(saved_adapter(tmp_path, tiny("llama"), name="l", target_modules=["q_proj"]),
                               tmp_path / "good.gguf", base=tiny("llama"))
    data = good.read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[:-64])
    (tmp_path / "magic.gguf").write_bytes(b"GGML" + data[4:])
    with pytest.raises(ValueError, match="cut.gguf: truncated or corrupt GGUF"):
        PeftModel.from_pretrained(llama, tmp_path / "cut.gguf")
    with pytest.raises(ValueError, match=r"magic.gguf: bad magic b'GGML'"):
        PeftModel.from_pretrained(llama, tmp_path / "magic.gguf")
    with pytest.raises(FileNotFoundError, match="GGUF file not found"):
        PeftModel.from_pretrained(llama, tmp_path / "absent.gguf")
    assert not any("lora" in n for n, _ in llama.named_modules())  # nothing was added on the way
    torch.testing.assert_close(logits(PeftModel.from_pretrained(llama, good), IDS),
                               logits(PeftModel.from_pretrained(copy.deepcopy(tiny("llama")), tmp_path / "l"), IDS))


# -- the command line -------------------------------------------------------------------------
def test_cli_export_inspect_and_modelfile(tmp_path, capsys):
    base_dir = save_tiny_model(tmp_path / "base")
    from transformers import AutoModelForCausalLM

    adapter = saved_adapter(tmp_path, AutoModelForCausalLM.from_pretrained(base_dir), target_modules=SEVEN)
    out = tmp_path / "gguf" / "adapter.gguf"
    argv = ["export", str(adapter), "--format", "gguf", "--output", str(out), "--model", str(base_dir),
            "--outtype", "f16", "--modelfile"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "14 modules, rank 4, alpha 8, llama, F16" in printed and "--lora" in printed
    assert (out.parent / "Modelfile").read_text() == f"FROM {base_dir.absolute()}\nADAPTER ./adapter.gguf\n"

    assert main(argv) == 2
    assert "adapter.gguf exists; pass --overwrite" in capsys.readouterr().err
    assert main(argv + ["--overwrite"]) == 0
    capsys.readouterr()

    assert main(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    assert re.search(r"r / lora_alpha +4 / 8 ", text) and "attn_k, attn_output, attn_q, attn_v, ffn_down, ffn_gate, ffn_up" in text
    assert main(["inspect", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert (info["architecture"], info["r"], info["lora_alpha"], info["n_modules"], info["outtype"]) == \
        ("llama", 4, 8.0, 14, "f16")
