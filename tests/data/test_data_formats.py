import pytest

from lorakit.data import DataError, detect_format
from lorakit.data.formats import as_chat, as_plain, resolve_format

USER_ASSISTANT = [{"role": "user", "content": "add\n\n1 2"}, {"role": "assistant", "content": "3"}]


@pytest.mark.parametrize(
    "record, fmt",
    [
        ({"messages": []}, "messages"),
        ({"instruction": "i", "output": "o"}, "alpaca"),
        ({"instruction": "i", "input": "x", "output": "o"}, "alpaca"),
        ({"prompt": "p", "completion": "c"}, "prompt_completion"),
        ({"text": "t", "id": 7}, "text"),
        # several shapes at once: the most structured wins
        ({"messages": [], "text": "t"}, "messages"),
        ({"prompt": "p", "completion": "c", "text": "p c"}, "prompt_completion"),
    ],
)
def test_detect(record, fmt):
    assert detect_format(record) == fmt


def test_detect_names_keys_when_nothing_fits():
    with pytest.raises(DataError, match=r"fits no format \(keys: question, output\)"):
        detect_format({"question": "q", "output": "o"})


def test_override_reads_record_another_way():
    record = {"prompt": "p", "completion": "c", "text": "whole"}
    assert resolve_format(record, "text") == "text"
    assert as_plain(record, "text") == ("", "whole")
    assert as_plain(record, "prompt_completion") == ("p", "c")


def test_override_that_does_not_fit_and_unknown_format():
    with pytest.raises(DataError, match="format 'alpaca' needs string field 'instruction'"):
        resolve_format({"text": "t"}, "alpaca")
    with pytest.raises(ValueError, match="unknown format 'sharegpt'"):
        resolve_format({"text": "t"}, "sharegpt")


def test_alpaca_becomes_one_exchange():
    record = {"instruction": "add", "input": "1 2", "output": "3"}
    assert as_chat(record, "alpaca") == USER_ASSISTANT
    assert as_plain(record, "alpaca") == ("add\n\n1 2\n\n", "3")
    assert as_plain({"instruction": "hi", "input": None, "output": "yo"}, "alpaca") == ("hi\n\n", "yo")


def test_chat_keeps_only_role_and_content():
    record = {"messages": [{"role": "user", "content": "q", "name": "x"}]}
    assert as_chat(record, resolve_format(record)) == [{"role": "user", "content": "q"}]


def test_empty_messages_is_an_error():
    with pytest.raises(DataError, match="non-empty list"):
        resolve_format({"messages": []})
