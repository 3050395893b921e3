"""SlotKVCache against transformers' own DynamicCache: the same logits, slot by slot."""

from __future__ import annotations

import pytest
import torch

from lorakit.serve.kvcache import MIN_CAPACITY, SlotKVCache


@pytest.fixture(scope="module")
def model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=100, max_position_embeddings=160)
    return LlamaForCausalLM(config).to(torch.float64).eval()


def _alone(model, prompt: list[int], fed: list[int]) -> list[torch.Tensor]:
    """Logits after the prompt and after each fed token, one request, transformers' DynamicCache."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    with torch.inference_mode():
        out = model(torch.tensor([prompt]), cache=cache, use_cache=True)
        logits = [out.logits[0, -1]]
        for token in fed:
            out = model(torch.tensor([[token]]), cache=out.cache, use_cache=True)
            logits.append(out.logits[0, -1])
    return logits


def _prefill(model, cache: SlotKVCache, first_slot: int, prompts: list[list[int]]) -> torch.Tensor:
    lengths = torch.tensor([len(p) for p in prompts])
    width = int(lengths.max())
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, : len(p)] = torch.tensor(p)
    keys = torch.arange(width)
    mask = (keys[None, :] <= keys[:, None])[None] & (keys[None, None, :] < lengths[:, None, None])
    cache.plan_prefill(first_slot, len(prompts), width)
    with torch.inference_mode():
        out = model(ids, attention_mask=mask[:, None], position_ids=keys.expand(len(prompts), width),
                    cache=cache, use_cache=True, logits_to_keep=(lengths - 1)[:, None])
    return out.logits[:, -1]


def _decode(model, cache: SlotKVCache, tokens: list[int], positions: list[int]) -> torch.Tensor:
    pos = torch.tensor(positions)
    mask = torch.arange(int(pos.max()) + 1)[None, :] <= pos[:, None]
    cache.plan_decode(pos)
    with torch.inference_mode():
        out = model(torch.tensor(tokens)[:, None], attention_mask=mask[:, None, None], position_ids=pos[:, None],
                    cache=cache, use_cache=True)
    return out.logits[:, -1]


def test_slots_join_leave_and_grow_with_the_same_logits_as_alone(model):
    a, b, c = [5, 6, 7, 8, 9], [10, 11], list(range(20, 20 + MIN_CAPACITY + 3))  # c forces growth
    fed = {"a": [30, 31, 32, 33, 34], "b": [40, 41], "c": [50, 51, 52, 53]}
    ref = {"a": _alone(model, a, fed["a"]), "b": _alone(model, b, fed["b"]), "c": _alone(model, c, fed["c"])}
    cache = SlotKVCache(slots=4, max_len=160)

    got = _prefill(model, cache, 0, [a, b])  # a in slot 0, b in slot 1
    torch.testing.assert_close(got[0], ref["a"][0], rtol=0, atol=1e-10)
    torch.testing.assert_close(got[1], ref["b"][0], rtol=0, atol=1e-10)
    got = _decode(model, cache, [30, 40], [len(a), len(b)])
    torch.testing.assert_close(got[0], ref["a"][1], rtol=0, atol=1e-10)
    torch.testing.assert_close(got[1], ref["b"][1], rtol=0, atol=1e-10)

    got = _prefill(model, cache, 2, [c])  # c joins in slot 2; the cache grows past its first size
    assert cache.capacity > MIN_CAPACITY
    torch.testing.assert_close(got[0], ref["c"][0], rtol=0, atol=1e-10)
    got = _decode(model, cache, [31, 41, 50], [len(a) + 1, len(b) + 1, len(c)])
    for row, (name, step) in enumerate([("a", 2), ("b", 2), ("c", 1)]):
        torch.testing.assert_close(got[row], ref[name][step], rtol=0, atol=1e-10)

    cache.move(src=2, dst=1, length=len(c) + 1)  # b leaves; c takes its slot
    got = _decode(model, cache, [32, 51], [len(a) + 2, len(c) + 1])
    torch.testing.assert_close(got[0], ref["a"][3], rtol=0, atol=1e-10)
    torch.testing.assert_close(got[1], ref["c"][2], rtol=0, atol=1e-10)


def test_plans_that_do_not_fit_are_refused():
    cache = SlotKVCache(slots=2, max_len=16)
    with pytest.raises(ValueError, match="slots"):
        cache.plan_prefill(1, 2, 4)
    with pytest.raises(ValueError, match="context of 16"):
        cache.plan_decode(torch.tensor([3, 16]))
    with pytest.raises(RuntimeError, match="plan_"):
        cache.update(torch.zeros(1, 1, 1, 2), torch.zeros(1, 1, 1, 2), 0)
