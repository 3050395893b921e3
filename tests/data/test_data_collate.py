import pytest
import torch

from lorakit.data import IGNORE, Example, collate, pad_token_id


def test_right_pads_to_longest():
    batch = collate([Example([5, 6, 7], [IGNORE, 6, 7]), Example([8], [IGNORE])], pad_id=0)
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[IGNORE, 6, 7], [IGNORE, IGNORE, IGNORE]]
    assert all(t.dtype == torch.long for t in batch.values())


def test_packed_rows_get_positions_and_no_attention_mask():
    rows = [Example([1, 2, 3, 4], [IGNORE, 2, IGNORE, 4], [0, 1, 0, 1]), Example([5, 6], [IGNORE, 6], [0, 1])]
    batch = collate(rows, pad_id=9)
    assert set(batch) == {"input_ids", "position_ids", "labels"}
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4], [5, 6, 9, 9]]
    # padding restarts at 0: a sequence of its own that no real token attends to
    assert batch["position_ids"].tolist() == [[0, 1, 0, 1], [0, 1, 0, 1]]
    assert batch["labels"].tolist() == [[IGNORE, 2, IGNORE, 4], [IGNORE, 6, IGNORE, IGNORE]]


def test_mixed_or_empty_batch_is_refused():
    with pytest.raises(ValueError, match="mix packed and unpacked"):
        collate([Example([1], [1], [0]), Example([1], [1])], pad_id=0)
    with pytest.raises(ValueError, match="empty batch"):
        collate([], pad_id=0)


def test_pad_id_falls_back_to_eos(chat_tokenizer):
    assert pad_token_id(chat_tokenizer) == chat_tokenizer.convert_tokens_to_ids("<|pad|>")

    class NoPad:
        pad_token_id, eos_token_id = None, 7

    assert pad_token_id(NoPad()) == 7
