"""Training runs on a tiny random Llama: LoRA and full, the run directory, errors, invariances."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from train_helpers import assert_resumes_as_uninterrupted, losses, poison_loss
from safetensors.torch import load_file

from lorakit import PeftModel
from lorakit.models import load_model
from lorakit.train import TrainConfig, TrainingDiverged, train
from lorakit.train import loop as train_loop

PROMPT = torch.tensor([[5, 60, 70, 80, 90, 100, 33]])


def test_lora_run_learns_only_the_adapter_and_saves_a_peft_adapter(base_config, tiny_model, capsys):
    result = train(TrainConfig(**base_config, max_steps=12, eval_fraction=0.25, eval_every=6, save_every=6))
    out = Path(base_config["output_dir"])
    run = losses(out)
    assert sorted(run) == list(range(1, 13))
    assert run[12] < run[1] - 0.1  # it learns
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert set(records[0]) == {"step", "epoch", "loss", "lr", "tokens_per_s", "grad_norm"}
    assert [r["step"] for r in records if "eval_loss" in r] == [6, 12]
    assert result.eval_loss == records[-1]["eval_loss"] and result.train_loss == run[12]
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "lr: 0.01" in (out / "config.yaml").read_text()
    assert result.adapter_dir == out / "adapter" and result.model_dir is None
    assert "step 12/12 | loss" in capsys.readouterr().out  # quiet: plain lines

    # only adapter weights moved; the base is the model on disk
    base, _ = load_model(str(tiny_model))
    reference = base.state_dict()
    trained = result.model.base_model.model.state_dict()
    moved = {k for k, v in trained.items() if "lora_" not in k and not torch.equal(v, reference[k.replace(".base_layer", "")])}
    assert not moved
    assert any(v.abs().sum() > 0 for k, v in trained.items() if "lora_B" in k)

    # the saved adapter is PEFT's format: PEFT itself loads it and computes the same logits
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(tiny_model) and config["r"] == 16
    with torch.no_grad():
        ours = result.model(PROMPT).logits
        import peft

        theirs = peft.PeftModel.from_pretrained(base, out / "adapter").eval()(PROMPT).logits
        mine = PeftModel.from_pretrained(load_model(str(tiny_model))[0], out / "adapter").eval()(PROMPT).logits
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mine, ours, rtol=1e-5, atol=1e-5)


def test_full_method_trains_every_weight_and_saves_a_model_dir(base_config, tiny_model):
    result = train(TrainConfig(**{**base_config, "lr": 3e-3}, method="full", max_steps=8))
    run = losses(Path(base_config["output_dir"]))
    assert run[8] < run[1] - 0.1
    assert result.adapter_dir is None and result.model_dir is not None
    saved, tokenizer = load_model(str(result.model_dir))
    base, _ = load_model(str(tiny_model))
    assert tokenizer.chat_template
    for (name, p), (_, q) in zip(result.model.named_parameters(), saved.named_parameters()):
        assert torch.equal(p, q), name
    assert not torch.equal(base.lm_head.weight, saved.lm_head.weight)
    assert result.stats["trainable_params"] == result.stats["total_params"]


def test_checkpoints_hold_no_pickle(base_config):
    train(TrainConfig(**base_config, max_steps=4, save_every=2, keep_checkpoints=1))
    checkpoints = Path(base_config["output_dir"]) / "checkpoints"
    assert [p.name for p in checkpoints.iterdir()] == ["step-4"]
    files = [p for p in checkpoints.rglob("*") if p.is_file()]
    assert {p.suffix for p in files} == {".safetensors", ".json", ".yaml"}
    for p in files:
        head = p.read_bytes()[:2]
        assert head[:1] != b"\x80" and head != b"PK", f"{p} looks like a pickle or a torch zip"
        if p.suffix == ".safetensors":
            load_file(p)
        elif p.suffix == ".json":
            json.loads(p.read_text())
    names = load_file(checkpoints / "step-4" / "optimizer.safetensors")
    assert any(k.startswith("state.0.exp_avg") for k in names)
    state = json.loads((checkpoints / "step-4" / "trainer_state.json").read_text())
    assert (state["step"], state["epoch"], state["index_in_epoch"]) == (4, 0, 4)
    assert (checkpoints / "step-4" / "adapter" / "adapter_model.safetensors").is_file()


def test_grad_accum_does_not_change_the_steps(base_config, tmp_path):
    whole = dict(base_config, output_dir=str(tmp_path / "a"), batch_size=4, grad_accum=1)
    split = dict(base_config, output_dir=str(tmp_path / "b"), batch_size=2, grad_accum=2)
    a, b = train(TrainConfig(**whole, max_steps=6)), train(TrainConfig(**split, max_steps=6))
    la, lb = losses(tmp_path / "a"), losses(tmp_path / "b")
    assert la.keys() == lb.keys()
    for step in la:
        assert la[step] == pytest.approx(lb[step], abs=1e-5)
    wa, wb = load_file(a.adapter_dir / "adapter_model.safetensors"), load_file(b.adapter_dir / "adapter_model.safetensors")
    for key in wa:  # Adam turns rounding in near-zero gradients (summed in another order) into ~lr-sized steps
        torch.testing.assert_close(wa[key], wb[key], rtol=1e-3, atol=1e-4)


def test_non_empty_output_dir_is_refused_unless_overwrite(base_config):
    out = Path(base_config["output_dir"])
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="is not empty.*overwrite=true"):
        train(TrainConfig(**base_config, max_steps=1))
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    train(TrainConfig(**base_config, max_steps=1, overwrite=True))
    assert (out / "notes.txt").read_text() == "mine"  # overwrite replaces run files only
    assert len(losses(out)) == 1
    with pytest.raises(FileNotFoundError, match="no data at"):  # bad input: the old run is kept
        train(TrainConfig(**{**base_config, "data": str(out / "missing.jsonl")}, max_steps=1, overwrite=True))
    assert len(losses(out)) == 1 and (out / "adapter").is_dir()


def test_nan_stops_with_the_step_and_keeps_the_last_checkpoint(base_config, monkeypatch, tmp_path):
    real = train_loop.causal_lm_loss
    poison_loss(monkeypatch, from_call=5)
    config = dict(base_config, max_steps=8, save_every=2, lora_dropout=0.1)
    with pytest.raises(TrainingDiverged, match=r"loss is nan at step 5.*checkpoints/step-4"):
        train(TrainConfig(**config))
    out = Path(config["output_dir"])
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-2", "step-4"]
    assert not (out / "adapter").exists()
    assert max(losses(out)) == 4

    # the checkpoint is intact: resuming from it gives the uninterrupted run's losses
    monkeypatch.setattr(train_loop, "causal_lm_loss", real)
    assert_resumes_as_uninterrupted(config, tmp_path / "reference")


def test_resume_refuses_changed_options_and_missing_checkpoints(base_config):
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        train(TrainConfig(**base_config, max_steps=2, resume="latest"))
    train(TrainConfig(**base_config, max_steps=2, save_every=2))
    with pytest.raises(ValueError, match="trained with lr=0.01, but this config has lr=0.02"):
        train(TrainConfig(**{**base_config, "lr": 2e-2}, max_steps=4, resume="latest"))


def test_packing_trains(base_config):
    result = train(TrainConfig(**{**base_config, "max_seq_len": 128}, packing=True, max_steps=3, eval_fraction=0.2))
    assert result.stats["train_rows"] < result.stats["train_examples"]
    assert result.eval_loss is not None and result.eval_loss == result.eval_loss


def test_gradient_checkpointing_and_the_progress_bar(base_config, tmp_path, capsys):
    plain = dict(base_config, output_dir=str(tmp_path / "plain"))
    train(TrainConfig(**plain, max_steps=3))
    capsys.readouterr()
    checkpointed = dict(base_config, output_dir=str(tmp_path / "ckpt"), quiet=False)
    result = train(TrainConfig(**checkpointed, max_steps=3, gradient_checkpointing=True))
    assert result.model.base_model.model.is_activation_checkpointing
    for step, loss in losses(tmp_path / "plain").items():
        assert losses(tmp_path / "ckpt")[step] == pytest.approx(loss, abs=1e-6)
    err = capsys.readouterr().err
    assert "3/3" in err and "loss=" in err and "tok_s=" in err  # tqdm: steps, postfix, ETA


def test_frozen_matmul_precision_reaches_the_training_products(base_config, monkeypatch, capsys):
    import lorakit.fast.kernels as kernels

    levels = []
    real = kernels.products
    monkeypatch.setattr(kernels, "products", lambda level: levels.append(level) or real(level))
    result = train(TrainConfig(**base_config, max_steps=2, frozen_matmul_precision="medium"))
    assert levels and set(levels) == {"medium"}  # no eval data: every product is a training step's
    assert "frozen products at medium precision" in capsys.readouterr().out
    assert torch.get_float32_matmul_precision() == "highest" and result.train_loss is not None


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_16bit_bases_train_with_fp32_adapters(base_config, dtype):
    result = train(TrainConfig(**base_config, max_steps=8, dtype=dtype))
    run = losses(Path(base_config["output_dir"]))
    assert run[8] < run[1] - 0.1 and all(map(math.isfinite, run.values()))
    params = dict(result.model.named_parameters())
    assert {p.dtype for n, p in params.items() if "lora_" in n} == {torch.float32}
    assert {p.dtype for n, p in params.items() if "lora_" not in n} == {getattr(torch, dtype)}
