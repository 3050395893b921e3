import pytest
import torch

from lorakit.data import IGNORE, Example, collate, pack


def example(*ids: int, train_all: bool = True) -> Example:
    return Example(list(ids), list(ids) if train_all else [IGNORE] * len(ids))


def test_rows_fit_and_keep_every_example():
    examples = [example(*range(1 + i, 1 + i + n)) for i, n in enumerate([7, 3, 5, 2, 6, 1, 4])]
    rows = pack(examples, max_seq_len=8)
    assert all(len(r.input_ids) <= 8 for r in rows)
    assert len(rows) == 4  # 28 tokens need at least 4 rows of 8
    pieces = sorted(tuple(r.input_ids[s:e]) for r in rows for s, e in _segments(r.position_ids))
    assert pieces == sorted(tuple(e.input_ids) for e in examples)


def test_first_token_of_each_example_is_not_a_target():
    rows = pack([example(10, 11, 12), example(20, 21), example(30, 31, 32)], max_seq_len=8)
    row = next(r for r in rows if len(r.input_ids) == 8)
    for start, end in _segments(row.position_ids):
        assert row.labels[start] == IGNORE  # the previous example's last token predicts nothing
        assert row.labels[start + 1 : end] == row.input_ids[start + 1 : end]


def test_too_long_example_is_refused():
    with pytest.raises(ValueError, match="does not fit max_seq_len=2"):
        pack([example(1, 2, 3)], max_seq_len=2)


def _segments(position_ids: list[int]) -> list[tuple[int, int]]:
    starts = [i for i, p in enumerate(position_ids) if p == 0] + [len(position_ids)]
    return list(zip(starts, starts[1:]))


@pytest.fixture(scope="module")
def llama():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )
    return transformers.LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_packed_logits_equal_each_example_alone(llama, attention):
    llama.config._attn_implementation = attention
    generator = torch.Generator().manual_seed(1)
    lengths = [9, 5, 3, 7, 6, 2]
    examples = [example(*torch.randint(1, 128, (n,), generator=generator).tolist()) for n in lengths]
    rows = pack(examples, max_seq_len=12)
    assert any(len(_segments(r.position_ids)) > 1 for r in rows)
    assert len({len(r.input_ids) for r in rows}) > 1  # so the batch has padding too
    batch = collate(rows, pad_id=0)
    with torch.no_grad():
        packed = llama(**batch, use_cache=False).logits  # (rows, width, vocab)
        for r, row in enumerate(rows):
            for start, end in _segments(row.position_ids):
                alone = llama(input_ids=torch.tensor([row.input_ids[start:end]])).logits[0]
                torch.testing.assert_close(packed[r, start:end], alone, atol=1e-5, rtol=1e-5)


def test_without_restarting_positions_examples_would_see_each_other(llama):
    """The control for the test above: plain concatenation does leak."""
    llama.config._attn_implementation = "sdpa"
    a, b = list(range(1, 6)), list(range(40, 47))
    with torch.no_grad():
        joined = llama(input_ids=torch.tensor([a + b]), use_cache=False).logits[0, len(a):]
        alone = llama(input_ids=torch.tensor([b])).logits[0]
    assert not torch.allclose(joined, alone, atol=1e-3)


def test_packed_loss_equals_loss_over_the_examples(llama):
    llama.config._attn_implementation = "sdpa"
    examples = [example(5, 6, 7, 8), example(9, 10, 11), Example([12, 13, 14], [IGNORE, IGNORE, 14])]
    rows = pack(examples, max_seq_len=10)
    assert len(rows) == 1
    with torch.no_grad():
        packed = llama(**collate(rows, pad_id=0), use_cache=False).loss
        separate = llama(**collate(examples, pad_id=0)).loss
    # both are the mean over the same 3 + 2 + 1 targets
    torch.testing.assert_close(packed, separate, atol=1e-5, rtol=1e-5)
