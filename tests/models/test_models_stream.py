"""models.stream: a sharded safetensors checkpoint read straight into 4 bits, bit-identical to
transformers' from_pretrained followed by quantize_model, without ever holding the dense model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from lorakit import QuantConfig, load_model, quantize_model
from lorakit.bases.linear4bit import Linear4bit
from lorakit.models.stream import load_streaming
from tinymodels import logits, tiny_llama


def tiny_qwen2(seed: int = 0) -> nn.Module:
    """Tied embeddings and q/k/v biases (Qwen2's attention)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=100, max_position_embeddings=64, tie_word_embeddings=True)
    return Qwen2ForCausalLM(config).eval()


def tiny_gemma(seed: int = 0) -> nn.Module:
    """Tied embeddings (Gemma's default), a scaled embedding, (1 + w) norms."""
    from transformers import GemmaConfig, GemmaForCausalLM

    torch.manual_seed(seed)
    config = GemmaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=8, vocab_size=100, max_position_embeddings=64)
    model = GemmaForCausalLM(config).eval()
    with torch.no_grad():  # Gemma initialises its norms at zero; make them count
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(0, 0.1)
    return model


FAMILIES = {"llama": tiny_llama, "qwen2": tiny_qwen2, "gemma": tiny_gemma}


def save_sharded(build, out: Path, dtype: torch.dtype = torch.float32) -> Path:
    """The model saved by transformers in several small shards (and an index)."""
    build().to(dtype).save_pretrained(out, max_shard_size="20KB")
    assert len(list(out.glob("*.safetensors"))) >= 3 and (out / "model.safetensors.index.json").is_file()
    return out


def reference(directory: Path, config: QuantConfig, dtype: torch.dtype) -> nn.Module:
    from transformers import AutoModelForCausalLM

    return quantize_model(AutoModelForCausalLM.from_pretrained(directory, dtype=dtype), config).eval()


def assert_identical(got: nn.Module, want: nn.Module) -> None:
    """Same modules, parameters, buffers (non-persistent ones too), dtypes, ties and logits."""
    assert [(n, type(m)) for n, m in got.named_modules()] == [(n, type(m)) for n, m in want.named_modules()]
    for kind in ("named_parameters", "named_buffers"):
        mine, theirs = dict(getattr(got, kind)()), dict(getattr(want, kind)())
        assert mine.keys() == theirs.keys(), kind
        for key in mine:
            assert mine[key].dtype == theirs[key].dtype and torch.equal(mine[key], theirs[key]), key
            assert mine[key].requires_grad == theirs[key].requires_grad, key
    assert (got.lm_head.weight is got.model.embed_tokens.weight) == (want.lm_head.weight is want.model.embed_tokens.weight)
    for a, b in zip(got.modules(), want.modules()):
        if isinstance(a, Linear4bit):
            assert (a.quant_type, a.blocksize, a.double_quant, a.weight_dtype, a.compute_dtype) == (
                b.quant_type, b.blocksize, b.double_quant, b.weight_dtype, b.compute_dtype)
    assert got.config.to_dict() == want.config.to_dict() and got.generation_config == want.generation_config
    assert not got.training
    ids = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(logits(got, ids), logits(want, ids))


@pytest.mark.parametrize("family, stored, dtype, config", [
    ("llama", torch.float32, torch.float32, QuantConfig()),
    ("llama", torch.bfloat16, torch.float32, QuantConfig(quant_type="fp4", double_quant=False, blocksize=128)),
    ("llama", torch.float32, torch.bfloat16, QuantConfig(skip_modules=["down_proj"], compute_dtype="float32")),
    ("qwen2", torch.bfloat16, torch.bfloat16, QuantConfig()),
    ("gemma", torch.float32, torch.float32, QuantConfig()),
    ("gemma", torch.bfloat16, torch.float16, QuantConfig(quant_type="fp4")),
], ids=lambda v: str(v).removeprefix("torch.") if not isinstance(v, QuantConfig) else v.quant_type)
def test_streaming_equals_load_then_quantize(tmp_path, family, stored, dtype, config):
    directory = save_sharded(FAMILIES[family], tmp_path / family, stored)
    got = load_streaming(directory, config, dtype=dtype)
    assert_identical(got, reference(directory, config, dtype))
    if family != "llama":
        assert got.lm_head.weight is got.model.embed_tokens.weight and type(got.lm_head) is nn.Linear


def test_load_model_streams_and_never_builds_the_dense_model(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    from tinymodels import save_tiny_model

    directory = save_tiny_model(tmp_path / "m")
    want = reference(directory, QuantConfig(), torch.float32)

    def refuse(*args, **kwargs):
        raise AssertionError("from_pretrained called: the dense model was built")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", refuse)
    got, tokenizer = load_model(str(directory), device="cpu", quantization="nf4")
    assert_identical(got, want)
    assert tokenizer.pad_token is not None and got.config._name_or_path == str(directory)


@pytest.mark.slow
def test_builtin_model_streams_to_the_same_4bit_model():
    from lorakit.models import resolve_model_path

    got, _ = load_model("smollm2-135m", device="cpu", dtype="bfloat16", quantization="nf4")
    assert_identical(got, reference(Path(resolve_model_path("smollm2-135m")), QuantConfig(), torch.bfloat16))


# -- memory: the peak while loading is the 4-bit model plus about one tensor -----------------------
MEASURE = textwrap.dedent("""
    import gc, json, sys
    from lorakit import load_model, quantize_model
    def load():
        if sys.argv[2] == "stream":
            return load_model(sys.argv[1], device="cpu", quantization="nf4")[0]
        from transformers import AutoModelForCausalLM
        return quantize_model(AutoModelForCausalLM.from_pretrained(sys.argv[1]), "nf4")
    def status(key):
        return int(next(l for l in open("/proc/self/status") if l.startswith(key)).split()[1]) * 1024
    model = load()  # once first, so imports, caches and the allocator's pools are in place
    del model
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak (VmHWM) to the current RSS: the first load's peak is not this one's
    before = status("VmRSS")
    model = load()
    print(json.dumps({"peak": status("VmHWM") - before}))
""")


def _write_checkpoint(out: Path) -> int:
    """A 35M-parameter fp32 Llama (138 MB) written shard by shard from random tensors."""
    from transformers import LlamaConfig

    config = LlamaConfig(hidden_size=512, intermediate_size=2048, num_hidden_layers=8, num_attention_heads=8,
                         num_key_value_heads=8, vocab_size=1000, max_position_embeddings=64)
    config.save_pretrained(out)
    gen = torch.Generator().manual_seed(0)
    weight_map, total = {}, 0
    shapes = {"model.embed_tokens.weight": (1000, 512), "model.norm.weight": (512,), "lm_head.weight": (1000, 512)}
    for i in range(8):
        p = f"model.layers.{i}."
        shapes |= {p + f"self_attn.{x}_proj.weight": (512, 512) for x in "qkvo"}
        shapes |= {p + "mlp.gate_proj.weight": (2048, 512), p + "mlp.up_proj.weight": (2048, 512),
                   p + "mlp.down_proj.weight": (512, 2048), p + "input_layernorm.weight": (512,),
                   p + "post_attention_layernorm.weight": (512,)}
    names = list(shapes)
    for shard in range(4):
        file = f"model-{shard + 1:05d}-of-00004.safetensors"
        part = {k: torch.randn(shapes[k], generator=gen) * 0.02 for k in names[shard::4]}
        save_file(part, out / file, metadata={"format": "pt"})
        weight_map |= dict.fromkeys(part, file)
        total += sum(t.numel() * 4 for t in part.values())
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                   "weight_map": weight_map}))
    return total


@pytest.mark.skipif(not os.environ.get("LORAKIT_MEMORY_TESTS"), reason="a whole-process memory measure (two fresh "
                    "processes, a 138 MB checkpoint, about a minute); run with LORAKIT_MEMORY_TESTS=1")
def test_peak_memory_is_the_4bit_model_plus_about_one_tensor(tmp_path):
    from tinymodels import save_tiny_model

    tokenizer = save_tiny_model(tmp_path / "tokenizer")
    big = tmp_path / "big"
    big.mkdir()
    dense = _write_checkpoint(big)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (big / name).write_bytes((tokenizer / name).read_bytes())

    def peak(mode: str) -> int:
        """The second load's peak RSS above what the process held before it, in a fresh process."""
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}  # this checkout's lorakit
        out = subprocess.run([sys.executable, "-c", MEASURE, str(big), mode], capture_output=True, text=True,
                             check=True, env=env)
        return json.loads(out.stdout.strip().splitlines()[-1])["peak"]

    # the 4-bit model: 33.6M weights at 4.1 bits (17 MB) + embeddings and head in fp32 (4 MB); the
    # largest tensor is 4 MB in fp32, its quantization's working tensors 20 MB or so (measured: 40 MiB)
    streamed, loaded = peak("stream"), peak("dense")
    print(f"peak while loading: streamed {streamed / 2**20:.0f} MiB, dense then quantized {loaded / 2**20:.0f} MiB, "
          f"checkpoint {dense / 2**20:.0f} MiB")
    assert streamed < 0.5 * dense, (streamed, dense)
    assert loaded > dense, (loaded, dense)  # the measure sees a dense model when there is one


# -- bad input: one line naming the file and the key, before any tensor data is read ---------------
def test_a_missing_tensor_names_its_shard_and_key(tmp_path):
    directory = save_sharded(tiny_llama, tmp_path / "m")
    index = json.loads((directory / "model.safetensors.index.json").read_text())["weight_map"]
    key = "model.layers.1.mlp.up_proj.weight"
    shard = directory / index[key]
    tensors = load_file(shard)
    del tensors[key]
    save_file(tensors, shard, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=rf"^{shard}: key '{key}' is missing$"):
        load_streaming(directory)


def test_a_shape_that_disagrees_is_named(tmp_path):
    directory = save_sharded(tiny_llama, tmp_path / "m")
    config = json.loads((directory / "config.json").read_text())
    config["intermediate_size"] = 48
    (directory / "config.json").write_text(json.dumps(config))
    index = json.loads((directory / "model.safetensors.index.json").read_text())["weight_map"]
    with pytest.raises(ValueError, match=r"^(?P<file>.*\.safetensors): key 'model.layers.\d.mlp.\w+_proj.weight' has "
                                         r"shape \((64, 32|32, 64)\), the model expects \((48, 32|32, 48)\)$") as err:
        load_streaming(directory)
    file, key = str(err.value).split(": key '")[0], str(err.value).split("'")[1]
    assert Path(file) == directory / index[key]


def test_one_file_checkpoint_and_an_unknown_tensor(tmp_path):
    directory = tmp_path / "m"
    tiny_llama().save_pretrained(directory)
    tensors = load_file(directory / "model.safetensors")
    tensors["model.extra.weight"] = torch.ones(3)
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    with pytest.warns(UserWarning, match=r"model.safetensors: key 'model.extra.weight' is not in the model; ignored$"):
        got = load_streaming(directory)
    del tensors["model.extra.weight"], tensors["model.norm.weight"]
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=rf"^{directory / 'model.safetensors'}: key 'model.norm.weight' is missing$"):
        load_streaming(directory)
    assert sum(isinstance(m, Linear4bit) for m in got.modules()) == 14


def test_a_pickled_checkpoint_is_refused_unread(tmp_path, monkeypatch):
    directory = tmp_path / "m"
    model = tiny_llama()
    model.config.save_pretrained(directory)
    torch.save(model.state_dict(), directory / "pytorch_model.bin")  # as transformers 4 wrote them

    def refuse(*args, **kwargs):
        raise AssertionError("torch.load called")

    monkeypatch.setattr(torch, "load", refuse)
    with pytest.raises(ValueError, match=rf"^{directory / 'pytorch_model.bin'}: not a safetensors checkpoint; "
                                         r"lorakit reads only safetensors \(it never unpickles\)"):
        load_streaming(directory)


def test_an_index_naming_a_missing_shard(tmp_path):
    directory = save_sharded(tiny_llama, tmp_path / "m")
    shard = sorted(directory.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=rf"model.safetensors.index.json: names the shard "
                                                rf"'{shard.name}', which is not in "):
        load_streaming(directory)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=r"^no model.safetensors \(or model.safetensors.index.json\) in "):
        load_streaming(empty)


def test_nothing_to_quantize_and_already_quantized_are_refused(tmp_path):
    directory = save_sharded(tiny_llama, tmp_path / "m")
    with pytest.raises(ValueError, match=r"^no nn.Linear layer left to quantize \(the output head is kept; "
                                         r"skip_modules=\('layers',\)\)$"):
        load_streaming(directory, QuantConfig(skip_modules=["layers"]))
    config = json.loads((directory / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"config.json: the checkpoint is already quantized \(gptq\); "):
        load_streaming(directory)
