"""`lorakit estimate` on the command line: the table, --json round trips, and bad input."""

from __future__ import annotations

import json

import pytest

from lorakit.cli import main
from lorakit.estimate import PRESETS, Estimate, estimate
from lorakit.estimate.ranks import RankTable, rank_table


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(["estimate", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_table_shows_every_part_the_issue_asks_for(capsys):
    code, out, _ = _run(capsys, "--model", "llama-3.1-8b", "--targets", "q_proj,k_proj,v_proj,o_proj")
    assert code == 0
    assert "trainable params: 13,631,488 || all params: 8,043,892,736 || trainable%: 0.1695" in out
    for label in ("weights", "gradients", "optimizer states", "activations", "logits/loss", "total (peak)",
                  "assumes:", "adapter file", "24 GB", "40 GB", "48 GB", "80 GB"):
        assert label in out, label
    assert len([line for line in out.splitlines() if line.startswith("assumes:")]) == 1


def test_json_round_trips_to_the_python_result(capsys):
    argv = ["--model", "smollm2-135m", "--method", "lora", "--rank", "8", "--alpha", "16", "--targets", "all-linear",
            "--batch-size", "2", "--seq-len", "256", "--dtype", "fp32", "--optimizer", "adamw8bit",
            "--gradient-checkpointing", "--json"]
    code, out, _ = _run(capsys, *argv)
    assert code == 0
    parsed = Estimate.from_dict(json.loads(out))
    direct = estimate("smollm2-135m", "lora", rank=8, alpha=16, targets="all-linear", batch_size=2, seq_len=256,
                      dtype="fp32", optimizer="adamw8bit", gradient_checkpointing=True)
    assert parsed == direct
    assert json.loads(out)["params"]["trainable_percent"] == round(direct.params.trainable_percent, 4)


def test_full_fine_tuning_has_no_adapter_file(capsys):
    code, out, _ = _run(capsys, "--model", "smollm2-135m", "--method", "full", "--json")
    data = json.loads(out)
    assert code == 0 and data["adapter_file_bytes"] is None and data["rank"] is None
    assert data["params"]["trainable"] == data["params"]["total"]


def test_layer_view_prints_the_rank_table(capsys):
    code, out, _ = _run(capsys, "--layer", "4096x4096", "--ranks", "4,8,16,32,64")
    assert code == 0
    for count, share in [("32,768", "0.20"), ("65,536", "0.39"), ("131,072", "0.78"), ("262,144", "1.56"),
                         ("524,288", "3.12")]:
        assert f"{count}  {share} %" in out
    code, out, _ = _run(capsys, "--layer", "4096x4096", "--ranks", "4,8", "--json")
    assert RankTable.from_dict(json.loads(out)) == rank_table(4096, 4096, [4, 8])


def test_unknown_preset_lists_the_presets(capsys):
    code, _, err = _run(capsys, "--model", "llama-9")
    assert code == 2
    assert "llama-9" in err and all(name in err for name in PRESETS)
    assert len(err.strip().splitlines()) == 1


def test_config_missing_a_field_names_it(tmp_path, capsys):
    config = dict(PRESETS["llama-3.2-1b"])
    del config["num_attention_heads"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    code, _, err = _run(capsys, "--model", str(tmp_path / "config.json"))
    assert code == 2 and "'num_attention_heads'" in err
    no_type = {k: v for k, v in PRESETS["llama-3.2-1b"].items() if k != "model_type"}
    (tmp_path / "config.json").write_text(json.dumps(no_type))
    code, _, err = _run(capsys, "--model", str(tmp_path))
    assert code == 2 and "'model_type'" in err


def test_gpt2_style_config_names_its_fields_by_alias(tmp_path):
    config = {"model_type": "gpt2", "n_embd": 64, "n_layer": 2, "n_head": 4, "vocab_size": 100, "n_positions": 64}
    (tmp_path / "config.json").write_text(json.dumps(config))
    result = estimate(tmp_path, "lora", targets="c_attn")
    assert result.params.trainable == 2 * 16 * (64 + 192)  # two c_attn layers (64 -> 192), r=16
    assert "approximate for 'gpt2'" in result.assumptions


def test_directory_without_config_is_reported(tmp_path, capsys):
    code, _, err = _run(capsys, "--model", str(tmp_path))
    assert code == 2 and "config.json" in err


@pytest.mark.parametrize("argv,flag", [
    (["--rank", "0"], "--rank"),
    (["--rank", "-4"], "--rank"),
    (["--seq-len", "0"], "--seq-len"),
    (["--seq-len", "-1"], "--seq-len"),
    (["--batch-size", "0"], "--batch-size"),
    (["--alpha", "0"], "--alpha"),
    (["--targets", "nope_proj"], "--targets"),
    (["--targets", ","], "--targets"),
])
def test_bad_numbers_and_targets_name_the_flag(argv, flag, capsys):
    code, _, err = _run(capsys, "--model", "smollm2-135m", *argv)
    assert code == 2 and flag in err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("argv,flag", [
    (["--layer", "4096"], "--layer"),
    (["--layer", "0x4096"], "--layer"),
    (["--layer", "64x64", "--ranks", "4,0"], "--ranks"),
    (["--layer", "64x64", "--ranks", "four"], "--ranks"),
    (["--layer", "64x64", "--model", "smollm2-135m"], "--layer"),
    ([], "--model"),
])
def test_bad_layer_view_input_names_the_flag(argv, flag, capsys):
    code, _, err = _run(capsys, *argv)
    assert code == 2 and flag in err


def test_python_api_names_the_argument_too():
    with pytest.raises(ValueError, match="--seq-len"):
        estimate("smollm2-135m", seq_len=0)
    with pytest.raises(ValueError, match="--dtype"):
        estimate("smollm2-135m", dtype="int3")
    with pytest.raises(ValueError, match="--method"):
        estimate("smollm2-135m", "prefix")
