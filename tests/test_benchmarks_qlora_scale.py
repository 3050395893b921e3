"""benchmarks/qlora_scale.py at its tiny shape: the checkpoint it writes, and one contender end to end."""

from __future__ import annotations

import json

import torch

from benchmark_scripts import BENCHMARKS, load_script

SCRIPT = BENCHMARKS / "qlora_scale.py"
qlora_scale = load_script("qlora_scale")


def test_published_shapes():
    shapes = qlora_scale.tensor_shapes(qlora_scale.SHAPES["8b"])
    assert sum(qlora_scale._numel(s) for s in shapes.values()) == 8_030_261_248  # Llama-3.1-8B's parameter count
    assert shapes["model.layers.31.self_attn.k_proj.weight"] == (1024, 4096) and "lm_head.weight" in shapes
    one_b = qlora_scale.tensor_shapes(qlora_scale.SHAPES["1b"])
    assert sum(qlora_scale._numel(s) for s in one_b.values()) == 1_235_814_400 and "lm_head.weight" not in one_b
    shards = qlora_scale.plan_shards(shapes, qlora_scale.SHARD_BYTES["8b"])
    assert sum(map(len, shards)) == len(shapes) and len(shards) == 9
    assert all(sum(2 * qlora_scale._numel(shapes[k]) for k in shard) <= 2e9 for shard in shards)


def test_the_tiny_checkpoint_is_written_once_and_loads(tmp_path):
    from transformers import AutoModelForCausalLM

    directory = tmp_path / "ck"
    assert qlora_scale.write_checkpoint("tiny", directory)
    shards = sorted(directory.glob("model-*.safetensors"))
    assert len(shards) >= 2
    stamps = [f.stat().st_mtime_ns for f in shards]
    assert not qlora_scale.write_checkpoint("tiny", directory)  # complete: left as it is
    assert [f.stat().st_mtime_ns for f in shards] == stamps
    model = AutoModelForCausalLM.from_pretrained(directory)
    assert model.config.rope_scaling["rope_type"] == "llama3" and not model.config.tie_word_embeddings
    w = model.model.layers[0].mlp.up_proj.weight.detach()
    assert w.shape == (128, 64) and 0.015 < float(w.std()) < 0.025
    config = json.loads((directory / "config.json").read_text())
    config["hidden_size"] = 32
    (directory / "config.json").write_text(json.dumps(config))
    try:
        qlora_scale.write_checkpoint("tiny", directory)
    except SystemExit as e:
        assert "holds another checkpoint" in str(e)
    else:
        raise AssertionError("a directory with another checkpoint was accepted")


def test_one_contender_end_to_end(tmp_path, capsys):
    assert qlora_scale.main(["--shape", "tiny", "--dir", str(tmp_path / "ck"), "--only", "lorakit-qlora",
                             "--steps", "1"]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("| lorakit QLoRA"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1] == "ok" and all(float(c) >= 0 for c in cells[2:7])
    assert torch.isfinite(torch.tensor(float(cells[7])))
