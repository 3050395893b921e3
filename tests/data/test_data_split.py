import pytest

from lorakit.data import split_records


def test_split_is_seeded_disjoint_and_complete():
    records = list(range(100))
    train, held = split_records(records, 0.1, seed=3)
    assert len(held) == 10 and sorted(train + held) == records
    assert train == sorted(train) and held == sorted(held)  # order kept
    assert split_records(records, 0.1, seed=3) == (train, held)
    assert split_records(records, 0.1, seed=4)[1] != held


def test_split_edges():
    assert split_records([1, 2, 3], 0.0) == ([1, 2, 3], [])
    assert len(split_records([1, 2, 3], 0.01)[1]) == 1  # a positive fraction holds out something
    with pytest.raises(ValueError, match="keep any for training"):
        split_records([1], 0.5)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        split_records([1, 2], 1.0)
