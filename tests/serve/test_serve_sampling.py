"""Sampling (greedy, temperature, top-p, seeds) and text pieces with stop strings."""

from __future__ import annotations

import math

import pytest
import torch

from lorakit.serve.detokenize import TextStream, find_stop, undecided_tail
from lorakit.serve.sampling import SamplingParams, greedy_tokens, sample_token, top_p_filter
from serve_helpers import make_tokenizer


# -- sampling -------------------------------------------------------------------------------------
def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([0.15, 0.5, 0.05, 0.3], dtype=torch.float64)
    torch.testing.assert_close(top_p_filter(probs, 0.7), torch.tensor([0, 0.625, 0, 0.375], dtype=torch.float64))
    torch.testing.assert_close(top_p_filter(probs, 0.5), torch.tensor([0, 1.0, 0, 0], dtype=torch.float64))
    torch.testing.assert_close(top_p_filter(probs, 0.81), torch.tensor([0.15, 0.5, 0, 0.3], dtype=torch.float64) / 0.95)
    assert top_p_filter(probs, 1.0) is probs
    assert top_p_filter(probs, 1e-9)[1] == 1  # at least the likeliest token survives


def test_greedy_is_argmax_per_row():
    logits = torch.tensor([[0.1, 3.0, -1.0], [2.0, 2.0, 1.0], [-5.0, -4.0, -6.0]])
    assert greedy_tokens(logits) == [1, 0, 1]  # ties go to the lowest id, as torch.argmax in generate
    assert sample_token(logits[0], SamplingParams(max_tokens=1, temperature=0), None) == 1


def test_sampling_follows_the_distribution_and_seeds_repeat():
    probs = torch.tensor([0.6, 0.3, 0.1])
    params = SamplingParams(max_tokens=1, temperature=1.0, seed=3)
    gen = params.generator()
    draws = [sample_token(probs.log(), params, gen) for _ in range(3000)]
    freq = [draws.count(i) / len(draws) for i in range(3)]
    assert all(abs(f - p) < 0.03 for f, p in zip(freq, probs.tolist()))
    again = params.generator()
    assert [sample_token(probs.log(), params, again) for _ in range(3000)] == draws
    # temperature sharpens: at 0.25 the likeliest token's share rises to 0.6^4 / sum(p^4)
    cold = SamplingParams(max_tokens=1, temperature=0.25, seed=3)
    gen = cold.generator()
    share = sum(sample_token(probs.log(), cold, gen) == 0 for _ in range(3000)) / 3000
    expected = 0.6**4 / (0.6**4 + 0.3**4 + 0.1**4)
    assert math.isclose(share, expected, abs_tol=0.03)
    # top_p=0.5 leaves only the likeliest token
    narrow = SamplingParams(max_tokens=1, temperature=1.0, top_p=0.5, seed=1)
    gen = narrow.generator()
    assert {sample_token(probs.log(), narrow, gen) for _ in range(200)} == {0}


@pytest.mark.parametrize("bad, field", [
    (dict(max_tokens=0), "max_tokens"), (dict(max_tokens=1, temperature=2.5), "temperature"),
    (dict(max_tokens=1, top_p=0), "top_p"), (dict(max_tokens=1, stop=("",)), "stop"),
])
def test_bad_sampling_params_name_the_field(bad, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**bad)


# -- text pieces ----------------------------------------------------------------------------------
def test_find_stop_and_undecided_tail():
    assert find_stop("abc END def", ["END", "c"]) == 2
    assert find_stop("abc", ["x"]) is None
    assert undecided_tail("hello EN", ["END"]) == 2
    assert undecided_tail("hello E", ["END", "E!"]) == 1
    assert undecided_tail("hello", ["END"]) == 0
    assert undecided_tail("a###", ["####"]) == 3


def test_text_stream_cuts_at_a_stop_string_across_tokens():
    tok = make_tokenizer()
    ids = tok("w1 w2 w3 w4 w5").input_ids
    stream = TextStream(tok, stops=["w3 w4"])
    pieces = [stream.push(i) for i in ids[:3]]
    assert "".join(pieces) == "w1 w2 "  # "w3" might start the stop string: held back
    assert not stream.stopped
    assert stream.push(ids[3]) == "" and stream.stopped
    assert "".join(pieces) == "w1 w2 "
    assert stream.finish() == ""


def test_text_stream_without_stops_hands_out_everything_once():
    tok = make_tokenizer()
    ids = tok("w7 w8 w9").input_ids
    stream = TextStream(tok)
    assert "".join(stream.push(i) for i in ids) + stream.finish() == "w7 w8 w9"


def test_text_stream_holds_half_a_character():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    raw = Tokenizer(models.BPE({c: i for i, c in enumerate(sorted(alphabet))}, []))
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=raw)
    ids = tok("é!").input_ids
    assert len(ids) == 3  # two bytes for é, one for !
    stream = TextStream(tok)
    assert stream.push(ids[0]) == ""  # half of é decodes to U+FFFD: not handed out
    assert stream.push(ids[1]) == "é"
    assert stream.push(ids[2]) == "!"
