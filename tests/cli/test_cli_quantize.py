"""`lorakit quantize`: a model streamed into 4 bits and written in transformers + bitsandbytes' layout,
read back by lorakit (equal) and by transformers + bitsandbytes (equal de-quantized weights)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from torch import nn

from lorakit import QuantConfig, cli, load_model
from lorakit.bases.linear4bit import Linear4bit
from lorakit.models.stream import load_streaming

pytestmark = [pytest.mark.filterwarnings("ignore:_check_is_size:FutureWarning"),
              pytest.mark.filterwarnings("ignore:The 8-bit optimizer:UserWarning")]


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def four_bit(model: nn.Module) -> dict[str, Linear4bit]:
    return {n: m for n, m in model.named_modules() if isinstance(m, Linear4bit)}


@pytest.fixture
def sharded_dir(tiny_dir, tmp_path):
    """tiny_dir's model in bf16, in several shards, with its tokenizer."""
    from transformers import AutoModelForCausalLM

    out = tmp_path / "sharded"
    AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.bfloat16).save_pretrained(out, max_shard_size="20KB")
    for f in tiny_dir.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copy(f, out / f.name)
    return out


def test_quantize_writes_a_dir_lorakit_reads_back_equal(capsys, sharded_dir, tmp_path):
    out = tmp_path / "q4"
    code, stdout, err = run_cli(capsys, "quantize", "--model", str(sharded_dir), "--output", str(out))
    assert code == 0, err
    assert f"-> {out} (" in stdout and "nf4, double quant, blocksize 64, bfloat16" in stdout
    before = sum(f.stat().st_size for f in sharded_dir.glob("*.safetensors"))
    after = (out / "model.safetensors").stat().st_size
    assert after < before and f"({before / 1e3:.2f} kB) -> " in stdout and f"({after / 1e3:.2f} kB, " in stdout
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert (config["bnb_4bit_quant_type"], config["bnb_4bit_use_double_quant"]) == ("nf4", True)
    assert config["bnb_4bit_compute_dtype"] == "bfloat16"
    want = load_streaming(sharded_dir, QuantConfig(), dtype=torch.bfloat16)
    got, tokenizer = load_model(str(out), device="cpu")
    assert four_bit(got).keys() == four_bit(want).keys() and len(four_bit(got)) == 14
    mine, theirs = got.state_dict(), want.state_dict()
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    assert tokenizer("hello world").input_ids and sorted(p.name for p in tmp_path.iterdir()) == ["q4", "sharded"]


def test_settings_reach_the_file_and_an_existing_output_is_kept_unless_overwrite(capsys, tiny_dir, tmp_path):
    out = tmp_path / "q4"
    argv = ["quantize", "--model", str(tiny_dir), "--output", str(out), "--quant", "fp4", "--no-double-quant",
            "--blocksize", "128", "--compute-dtype", "float32", "--skip", "down_proj"]
    assert run_cli(capsys, *argv)[0] == 0
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert (config["bnb_4bit_quant_type"], config["bnb_4bit_use_double_quant"]) == ("fp4", False)
    assert config["llm_int8_skip_modules"] == ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj", "lm_head"]
    layers = four_bit(load_model(str(out), device="cpu")[0])
    assert len(layers) == 12 and {(m.quant_type, m.blocksize, m.double_quant) for m in layers.values()} == {("fp4", 128, False)}
    written = {f.name: f.stat().st_mtime_ns for f in out.iterdir()}
    code, _, err = run_cli(capsys, "quantize", "--model", str(tiny_dir), "--output", str(out))
    assert code == 2 and err.strip() == f"lorakit: error: output dir {out} is not empty; pass --overwrite to replace it"
    assert {f.name: f.stat().st_mtime_ns for f in out.iterdir()} == written
    assert run_cli(capsys, "quantize", "--model", str(tiny_dir), "--output", str(out), "--overwrite")[0] == 0
    assert json.loads((out / "config.json").read_text())["quantization_config"]["bnb_4bit_quant_type"] == "nf4"


@pytest.mark.parametrize("argv, message", [
    (["--blocksize", "32"], r"QuantConfig.blocksize must be one of 64, .*4096, not 32"),
    (["--compute-dtype", "int8"], r"argument --compute-dtype: invalid choice"),
])
def test_bad_settings_are_one_line_and_write_nothing(capsys, tiny_dir, tmp_path, argv, message):
    import re

    code, _, err = run_cli(capsys, "quantize", "--model", str(tiny_dir), "--output", str(tmp_path / "q"), *argv)
    assert code == 2 and len(err.strip().splitlines()) == 1 and re.search(message, err)
    assert not any(tmp_path.iterdir())


def test_a_pickled_checkpoint_and_the_model_itself_as_output_are_refused(capsys, tiny_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    pickled = tmp_path / "pickled"
    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    model.config.save_pretrained(pickled)
    torch.save(model.state_dict(), pickled / "pytorch_model.bin")  # as transformers 4 wrote them
    for f in tiny_dir.glob("tokenizer*"):
        shutil.copy(f, pickled / f.name)
    code, _, err = run_cli(capsys, "quantize", "--model", str(pickled), "--output", str(tmp_path / "q"))
    assert code == 2 and f"lorakit: error: {pickled / 'pytorch_model.bin'}: not a safetensors checkpoint" in err
    code, _, err = run_cli(capsys, "quantize", "--model", str(tiny_dir), "--output", str(tiny_dir), "--overwrite")
    assert code == 2 and "is the model itself; choose another --output" in err
    assert not (tmp_path / "q").exists() and (tiny_dir / "model.safetensors").is_file()


def test_transformers_and_bitsandbytes_read_the_dir_to_the_same_weights(capsys, sharded_dir, tmp_path):
    transformers = pytest.importorskip("transformers")
    bf = pytest.importorskip("bitsandbytes.functional")
    out = tmp_path / "q4"
    assert run_cli(capsys, "quantize", "--model", str(sharded_dir), "--output", str(out), "--dtype", "float32")[0] == 0
    mine = load_model(str(out), device="cpu")[0]
    try:
        theirs = transformers.AutoModelForCausalLM.from_pretrained(out, device_map="cpu")
    except Exception as e:  # noqa: BLE001 - the reason is reported in the skip
        pytest.skip(f"transformers cannot load a bitsandbytes 4-bit model on this machine: {str(e).splitlines()[0]}")
    for name, layer in four_bit(mine).items():
        weight = theirs.get_submodule(name).weight
        assert torch.equal(bf.dequantize_4bit(weight.data, weight.quant_state), layer.dequantize()), name
    dense = {k: v for k, v in theirs.state_dict().items() if not any(k.startswith(n + ".weight") for n in four_bit(mine))}
    assert dense and all(torch.equal(v, mine.state_dict()[k]) for k, v in dense.items())
