"""The seed's figures, as tests: the 8B adapter count, full vs LoRA memory, the rank table."""

from __future__ import annotations

import pytest

from lorakit.estimate import estimate
from lorakit.estimate.ranks import rank_table
from lorakit.estimate.report import format_rank_table

QKVO = ["q_proj", "k_proj", "v_proj", "o_proj"]
GB = 1e9  # the seed's unit: "8 billion parameters x 2 bytes = 16 GB"


def test_llama_8b_r16_qkvo_trains_the_seeds_count():
    result = estimate("llama-3.1-8b", "lora", rank=16, alpha=32, targets=QKVO)
    assert result.params.trainable == 13_631_488
    assert result.params.total - result.params.trainable == 8_030_261_248  # the published base size
    assert f"{result.params.trainable_percent:.4f}" == "0.1695"  # the seed's "trainable%: 0.1695%"


@pytest.fixture(scope="module")
def modest_run() -> dict:
    """The seed's setup with "modest activations", chosen explicitly: batch 1 x 512 tokens with
    gradient checkpointing; full fine-tuning keeps weights, gradients and AdamW states all in
    16-bit (no fp32 master copy), as the seed's "optimizer states: double the weights" does."""
    return dict(batch_size=1, seq_len=512, gradient_checkpointing=True, dtype="bf16",
                optimizer="adamw", master_weights="none")


def test_full_fine_tuning_8b_needs_the_seeds_60_to_70_gb(modest_run):
    full = estimate("llama-3.1-8b", "full", **modest_run)
    weights = 8_030_261_248 * 2
    assert full.memory.weights == weights
    assert full.memory.gradients == weights  # "Gradients: another 14 GB" (of 16 GB for 8.03 B)
    assert full.memory.optimizer_states == 2 * weights  # "double the weights"
    assert 60 * GB <= full.memory.total <= 70 * GB
    assert not any(f.fits for f in full.fits if f.gpu != "80 GB")  # "even with an A100 80GB it's tight"


def test_lora_8b_needs_the_seeds_16_to_20_gb(modest_run):
    lora = estimate("llama-3.1-8b", "lora", rank=16, alpha=32, targets=QKVO, **modest_run)
    assert 16 * GB <= lora.memory.total <= 20 * GB
    full = estimate("llama-3.1-8b", "full", **modest_run)
    saving = 1 - lora.memory.total / full.memory.total
    assert 0.70 <= saving <= 0.80  # the seed: "70-80% less than full fine-tuning"


def test_rank_table_reproduces_the_seed():
    table = rank_table(4096, 4096, [4, 8, 16, 32, 64])
    assert table.layer_params == 16_777_216
    assert [row.params for row in table.rows] == [32_768, 65_536, 131_072, 262_144, 524_288]
    assert [f"{row.percent:.2f}" for row in table.rows] == ["0.20", "0.39", "0.78", "1.56", "3.12"]
    text = format_rank_table(table)
    assert "16,777,216" in text and "524,288  3.12 %" in text


def test_rank_table_of_a_rectangular_layer_counts_both_sides():
    (row,) = rank_table(4096, 14336, [16]).rows  # an 8B MLP projection
    assert row.params == 16 * (4096 + 14336)


def test_qlora_70b_fits_a_48_gb_card():
    """Sanity: QLoRA's headline, a 70B model on one 48 GB card (all-linear r=16, 512 tokens, checkpointing)."""
    result = estimate("llama-3.1-70b", "qlora", rank=16, targets="all-linear", seq_len=512,
                      gradient_checkpointing=True)
    fits = {f.gpu: f.fits for f in result.fits}
    assert fits["48 GB"] and fits["80 GB"] and not fits["24 GB"]
    # NF4 weights: ~0.516 bytes per quantised weight, embeddings and head stay in bf16
    assert 34 * 2**30 < result.memory.weights < 40 * 2**30


def test_lorakit_estimate_is_callable_however_it_was_imported():
    import lorakit
    import lorakit.estimate.report  # noqa: F401  (binds the package name first)

    assert lorakit.estimate("llama-3.1-8b", rank=16, targets=["q_proj", "k_proj", "v_proj", "o_proj"]).params.trainable == 13_631_488
