"""2 processes x batch 2 train what 1 process x batch 4 trains: DDP, FSDP, DDP with accumulation,
FSDP full fine-tuning, DDP on an NF4 base (QLoRA).

One torchrun launch runs all four (a launch costs more than the training here); the tests then
compare each with one process, and resume a checkpoint with another number of processes.
"""

from __future__ import annotations

import json
import shutil

import pytest
from dist_helpers import WORKER, assert_same_run, eval_losses, free_port, max_difference, run, torchrun

from lorakit.train import ConfigError, load_train_config, train

# every weight trains (the tied embedding/head too), activations recomputed in backward
FULL = ["method=full", "lr=3e-3", "gradient_checkpointing=true"]
QLORA = ["quantize=nf4"]  # the base in 4 bits on every rank (each quantizes the same files alike)

RUNS = {  # name -> overrides; global batch 4 in each
    "ddp": ["batch_size=2"],
    "fsdp": ["batch_size=2", "distributed=fsdp"],
    "ddp_accum": ["batch_size=1", "grad_accum=2"],
    "fsdp_full": ["batch_size=2", "distributed=fsdp", *FULL],
    "ddp_nf4": ["batch_size=2", *QLORA],
}


@pytest.fixture(scope="module")
def launched(dist_files, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("two-processes")
    lines = [" ".join(["train", str(dist_files["recipe"]), f"output_dir={root / name}", *overrides])
             for name, overrides in RUNS.items()]
    result = run([*torchrun(2, free_port()), str(WORKER), *lines], timeout=150, DIST_TEST_SPY=str(root / "spy"))
    spies = {name: [json.loads((root / "spy" / f"run{i}-rank{r}.json").read_text()) for r in (0, 1)]
             for i, name in enumerate(RUNS)}
    return {"root": root, "stdout": result.stdout, "spies": spies}


# Each process's batch of 2 rounds differently from the reference's batch of 4 (and micro-batches
# of 1 are padded differently); Adam's first steps (g / sqrt(g^2)) magnify that to ~2e-5 in the weights.
@pytest.mark.parametrize("name, tol", [("ddp", 5e-5), ("fsdp", 5e-5), ("ddp_accum", 5e-5)])
def test_two_processes_match_one(launched, reference, name, tol):
    out = launched["root"] / name
    assert_same_run(out, reference, range(1, 9), tol=tol)
    expected = eval_losses(reference)
    assert sorted(eval_losses(out)) == sorted(expected) == [4, 8]
    for step, value in eval_losses(out).items():
        assert value == pytest.approx(expected[step], abs=1e-5)
    # the checkpoint holds whole tensors (FSDP: gathered from the shards), the same as one process's
    for file in ("trainable.safetensors", "optimizer.safetensors", "adapter/adapter_model.safetensors"):
        assert max_difference(out / "checkpoints/step-8" / file, reference / "checkpoints/step-8" / file) < tol
    state = json.loads((out / "checkpoints/step-8/trainer_state.json").read_text())
    assert (state["world_size"], state["global_batch"]) == (2, 4)


def test_fsdp_full_fine_tuning_matches_one_process(launched, one_process):
    reference = one_process(*FULL)
    out = launched["root"] / "fsdp_full"
    assert_same_run(out, reference, range(1, 9), weights="model/model.safetensors")
    assert max_difference(out / "checkpoints/step-8/optimizer.safetensors",
                          reference / "checkpoints/step-8/optimizer.safetensors") < 1e-5
    assert (out / "model/tokenizer.json").is_file()


def test_ddp_on_a_4bit_base_matches_one_process(launched, one_process):
    reference = one_process(*QLORA)
    out = launched["root"] / "ddp_nf4"
    assert_same_run(out, reference, range(1, 9))
    assert "quantize: nf4" in (out / "config.yaml").read_text()
    for file in ("trainable.safetensors", "optimizer.safetensors"):
        assert max_difference(out / "checkpoints/step-8" / file, reference / "checkpoints/step-8" / file) < 5e-5


def test_global_batch_is_logged_once_per_run(launched):
    stdout = launched["stdout"]  # both ranks' output: only rank 0 describes the run
    assert stdout.count("2 processes (ddp): global batch 4 = batch_size 2 x grad_accum 1 x 2 processes") == 2
    assert stdout.count("2 processes (fsdp): global batch 4 = batch_size 2 x grad_accum 1 x 2 processes") == 2
    assert stdout.count("2 processes (ddp): global batch 4 = batch_size 1 x grad_accum 2 x 2 processes") == 1


@pytest.mark.parametrize("name", ["ddp", "fsdp"])
def test_fused_kernels_run_on_plain_tensors(launched, name):
    """Inside DDP's and FSDP's forward the fused head and LoRA kernels see whole plain tensors."""
    for rank, calls in enumerate(launched["spies"][name]):
        assert calls["linear_cross_entropy"] > 0 and calls["lora_linear"] > 0, (rank, calls)
        assert calls["dtensor_args"] == 0, (rank, calls)


def test_resume_with_one_process_and_the_same_global_batch_is_exact(launched, reference, tmp_path):
    """FSDP's checkpoint at step 4 (2 processes x batch 2), continued by 1 process x batch 4."""
    out = tmp_path / "run"
    shutil.copytree(launched["root"] / "fsdp", out)
    shutil.rmtree(out / "adapter")
    result = train(load_train_config(out / "config.yaml", [
        f"output_dir={out}", f"resume={out / 'checkpoints/step-4'}", "batch_size=4", "distributed=auto"]))
    assert (result.world_size, result.stats["global_batch"]) == (1, 4)
    assert_same_run(out, reference, range(1, 9))


def test_resume_with_another_global_batch_is_refused(launched, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(launched["root"] / "ddp", out)
    before = (out / "metrics.jsonl").read_text()
    with pytest.raises(ConfigError, match=r"global batch of 4 \(batch_size 2 x grad_accum 1 x 2 processes\), "
                                          r"but this run's is 2 .*set batch_size=4 to continue it with 1 process"):
        train(load_train_config(out / "config.yaml", [f"output_dir={out}", "resume=latest"]))
    assert (out / "metrics.jsonl").read_text() == before  # nothing was touched
