import pytest

from lorakit.data import IGNORE, DataError, tokenize_records


def trained(tokenizer, example) -> str:
    """What the loss is computed on: the decoded tokens that carry a label."""
    return tokenizer.decode([t for t in example.labels if t != IGNORE])


def chat(*turns: str) -> dict:
    roles = ["user", "assistant"] * len(turns)
    return {"messages": [{"role": r, "content": c} for r, c in zip(roles, turns)]}


def one(records, tokenizer, **kwargs):
    data = tokenize_records(records, tokenizer, kwargs.pop("max_seq_len", 512), **kwargs)
    assert len(data.examples) == 1
    return data.examples[0]


def test_only_the_assistant_reply_is_trained(chat_tokenizer):
    example = one([chat("hi", "yo")], chat_tokenizer)
    assert chat_tokenizer.decode(example.input_ids) == (
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nyo<|im_end|>\n"
    )
    assert trained(chat_tokenizer, example) == "yo<|im_end|>\n"
    assert len(example.labels) == len(example.input_ids)
    # labels equal the ids exactly where they are not ignored
    assert all(l in (IGNORE, t) for t, l in zip(example.input_ids, example.labels))


def test_every_assistant_turn_is_trained(chat_tokenizer):
    record = chat("one", "A1", "two", "A2", "three", "A3")
    record["messages"].insert(0, {"role": "system", "content": "be brief"})
    example = one([record], chat_tokenizer)
    assert trained(chat_tokenizer, example) == "A1<|im_end|>\nA2<|im_end|>\nA3<|im_end|>\n"


def test_trailing_user_turn_is_context_only(chat_tokenizer):
    assert trained(chat_tokenizer, one([chat("q", "a", "q2")], chat_tokenizer)) == "a<|im_end|>\n"


def test_train_on_prompt_trains_everything_but_the_first_token(chat_tokenizer):
    example = one([chat("hi", "yo")], chat_tokenizer, train_on_prompt=True)
    assert example.labels[0] == IGNORE
    assert example.labels[1:] == example.input_ids[1:]


@pytest.mark.parametrize("record", [{"prompt": "2+2=", "completion": "4"},
                                    {"instruction": "2+2=", "output": "4"}])
def test_pairs_use_the_chat_template_when_there_is_one(chat_tokenizer, record):
    example = one([record], chat_tokenizer)
    assert chat_tokenizer.decode(example.input_ids).startswith("<|im_start|>user\n2+2=<|im_end|>")
    assert trained(chat_tokenizer, example) == "4<|im_end|>\n"


def test_pairs_without_template_are_concatenated_with_eos(plain_tokenizer):
    pair = one([{"prompt": "Q: x\nA:", "completion": " y"}], plain_tokenizer)
    assert plain_tokenizer.decode(pair.input_ids) == "<s>Q: x\nA: y<|im_end|>"
    assert trained(plain_tokenizer, pair) == " y<|im_end|>"
    alpaca = one([{"instruction": "do", "input": "it", "output": "done"}], plain_tokenizer)
    assert plain_tokenizer.decode(alpaca.input_ids) == "<s>do\n\nit\n\ndone<|im_end|>"
    assert trained(plain_tokenizer, alpaca) == "done<|im_end|>"


def test_text_is_trained_whole(plain_tokenizer, chat_tokenizer):
    for tokenizer in (plain_tokenizer, chat_tokenizer):  # text never goes through a template
        example = one([{"text": "abc"}], tokenizer)
        assert tokenizer.decode(example.input_ids).endswith("abc<|im_end|>")
        assert trained(tokenizer, example).endswith("bc<|im_end|>")


def test_token_straddling_prompt_and_completion_is_trained(make_tokenizer):
    # with the merge "Ġ"+"y", " y" is one token starting inside the prompt "A: "
    tokenizer = make_tokenizer(merges=[("Ġ", "y")], chat_template=None)
    example = one([{"prompt": "A: ", "completion": "y"}], tokenizer)
    assert trained(tokenizer, example) == " y<|im_end|>"


def test_chat_without_template_is_an_error(plain_tokenizer):
    with pytest.raises(DataError, match="record 1: chat 'messages' need a tokenizer with a chat template"):
        tokenize_records([{"text": "a"}, chat("q", "a")], plain_tokenizer, 64)


def test_default_system_prompt_in_template_is_not_trained(make_tokenizer):
    template = "<|im_start|>system\nYou help.<|im_end|>\n" + make_tokenizer().chat_template
    tokenizer = make_tokenizer(chat_template=template)
    example = one([chat("q", "a", "q2", "b")], tokenizer)
    assert trained(tokenizer, example) == "a<|im_end|>\nb<|im_end|>\n"


def test_template_that_rewrites_history_is_reported(make_tokenizer):
    # shows only the last assistant reply in full: earlier renders are not prefixes
    template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
        "{% if m['role'] == 'assistant' and not loop.last %}...{% else %}{{ m['content'] }}{% endif %}"
        "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    tokenizer = make_tokenizer(chat_template=template)
    assert trained(tokenizer, one([chat("q", "a")], tokenizer)) == "a<|im_end|>\n"
    with pytest.raises(DataError, match="record 0: .*message 1 .*growing prefix"):
        tokenize_records([chat("q", "a", "q2", "b")], tokenizer, 512)
    # the suggested way out works
    example = one([chat("q", "a", "q2", "b")], tokenizer, train_on_prompt=True)
    assert example.labels[1:] == example.input_ids[1:]


def test_assistant_first_is_an_error(chat_tokenizer):
    record = {"messages": [{"role": "assistant", "content": "hello"}]}
    with pytest.raises(DataError, match="record 0: message 0 is an assistant reply to nothing"):
        tokenize_records([record], chat_tokenizer, 64)


def test_truncation_and_dropping_are_counted(chat_tokenizer):
    prompt = chat_tokenizer.apply_chat_template(
        [{"role": "user", "content": "x" * 20}], add_generation_prompt=True, tokenize=False)
    prompt_len = len(chat_tokenizer(prompt, add_special_tokens=False)["input_ids"])
    records = [
        chat("short", "ok"),  # fits
        chat("x" * 20, "y" * 50),  # reply cut short: kept, truncated
        chat("x" * 200, "z"),  # reply entirely past the limit: dropped
    ]
    data = tokenize_records(records, chat_tokenizer, max_seq_len=prompt_len + 10)
    assert (data.n_records, data.n_truncated, data.n_dropped) == (3, 1, 1)
    assert len(data.examples) == 2
    assert max(len(e.input_ids) for e in data.examples) == prompt_len + 10
    assert trained(chat_tokenizer, data.examples[1]) == "y" * 10
    assert data.n_tokens == sum(len(e.input_ids) for e in data.examples)
    assert data.n_trainable == 4 + 10  # o k <|im_end|> \n, then ten y


def test_nothing_left_is_an_error(chat_tokenizer):
    with pytest.raises(ValueError, match=r"no training examples left: all 2 records were dropped"):
        tokenize_records([chat("x" * 100, "y")] * 2, chat_tokenizer, max_seq_len=16)
    with pytest.raises(ValueError, match="no training records"):
        tokenize_records([], chat_tokenizer, max_seq_len=16)
