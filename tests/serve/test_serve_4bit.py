"""A 4-bit base with unmerged adapters: lorakit.generation, mixed-adapter generate and the OpenAI
server give the tokens of a dense model holding the de-quantized weights + the same adapters.

The models are float64 (as the other server tests): a 4-bit layer de-quantizes to the exact
values the dense reference stores, so any difference is the serving logic's, not rounding luck.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from lorakit import PeftModel, load_model, quantize_model, save_quantized
from fourbit import dequantized_copy, four_bit_layers
from serve_helpers import BASE_NAME, chat_ids, load_tiny, make_tokenizer, reference_tokens

ADAPTERS = ("a0", "a1", "a2", "a3")


@pytest.fixture(scope="module")
def four_bit_dirs(serve_model_dir: Path, tmp_path_factory) -> tuple[Path, Path]:
    """(the tiny serving model in NF4 with double quant, saved in bitsandbytes' layout; the dense
    float64 model holding its de-quantized weights), each with the tokenizer."""
    root = tmp_path_factory.mktemp("serve-4bit")
    model, tokenizer = load_tiny(serve_model_dir)
    four = save_quantized(quantize_model(model, "nf4"), root / "nf4")
    tokenizer.save_pretrained(four)
    dense = root / "dense"
    dequantized_copy(load_four(four)).save_pretrained(dense)
    tokenizer.save_pretrained(dense)
    return four, dense


def load_four(four: Path):
    model, _ = load_model(str(four), device="cpu")
    assert len(four_bit_layers(model)) == 14 and model.model.embed_tokens.weight.dtype == torch.float64
    return model


@contextmanager
def server(model, tokenizer, adapters: dict[str, Path]):
    from lorakit.serve import AdapterRegistry, Engine, create_app
    from lorakit.serve.server import serving

    registry = AdapterRegistry(model, BASE_NAME)
    for name, path in adapters.items():
        registry.add(name, os.fspath(path))
    engine = Engine(model, tokenizer, registry)
    with engine, serving(create_app(engine, BASE_NAME)) as url:
        import openai

        yield openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def client(four_bit_dirs, adapter_dirs):
    with server(load_four(four_bit_dirs[0]), make_tokenizer(), {n: adapter_dirs[n] for n in ADAPTERS}) as c:
        yield c


def prompt(i: int) -> str:
    return " ".join(f"w{(5 * i + 3 * k) % 94}" for k in range(2 + i % 5))


@pytest.mark.parametrize("model", [BASE_NAME, *ADAPTERS])
def test_chat_on_the_4bit_server_equals_the_dense_reference(client, four_bit_dirs, adapter_dirs, model):
    messages = [{"role": "user", "content": "w1 w2 w3 w4"}]
    reply = client.chat.completions.create(model=model, messages=messages, max_tokens=10, temperature=0)
    tokenizer = make_tokenizer()
    want = reference_tokens(four_bit_dirs[1], None if model == BASE_NAME else adapter_dirs[model],
                            chat_ids(tokenizer, messages), 10)
    assert reply.choices[0].message.content == tokenizer.decode(want, skip_special_tokens=True)
    assert reply.usage.completion_tokens == len(want)


def test_concurrent_requests_across_adapters_on_the_4bit_server_equal_the_dense_reference(
        client, four_bit_dirs, adapter_dirs):
    """Requests for different adapters decode together (mixed-adapter batches over the 4-bit base)."""
    jobs = [(ADAPTERS[i % 4] if i % 5 else BASE_NAME, prompt(i)) for i in range(10)]

    def ask(job):
        model, text = job
        return client.completions.create(model=model, prompt=text, max_tokens=8, temperature=0).choices[0].text

    with ThreadPoolExecutor(len(jobs)) as pool:
        got = list(pool.map(ask, jobs))
    tokenizer = make_tokenizer()
    for (model, text), answer in zip(jobs, got):
        ids = tokenizer(text).input_ids
        want = reference_tokens(four_bit_dirs[1], None if model == BASE_NAME else adapter_dirs[model], ids, 8)
        assert answer == tokenizer.decode(want, skip_special_tokens=True), (model, text)
    assert len(set(got)) > 1


def with_adapters(model, adapter_dirs):
    peft = PeftModel.from_pretrained(model, adapter_dirs["a0"], adapter_name="a0")
    for name in ADAPTERS[1:]:
        peft.load_adapter(adapter_dirs[name], adapter_name=name)
    return peft.eval()


def test_generation_and_mixed_batches_on_the_4bit_base_equal_the_dense_reference(four_bit_dirs, adapter_dirs):
    from lorakit.generation import generate

    four = with_adapters(load_four(four_bit_dirs[0]), adapter_dirs)
    dense = with_adapters(load_tiny(four_bit_dirs[1])[0], adapter_dirs)
    tokenizer = make_tokenizer()
    prompts = [prompt(i) for i in range(8)]
    rows = [*ADAPTERS, "__base__", "a2", "a0", "a3"]
    got = generate(four, tokenizer, prompts, max_new_tokens=8, chat=False, adapter_names=rows)
    assert got == generate(dense, tokenizer, prompts, max_new_tokens=8, chat=False, adapter_names=rows)
    assert len(set(got)) > 1
    # one forward with a different adapter per row: the logits of the dense reference
    ids = torch.randint(6, 100, (len(rows), 7), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        mixed = four(ids, adapter_names=rows).logits
        torch.testing.assert_close(mixed, dense(ids, adapter_names=rows).logits, rtol=1e-10, atol=1e-10)
        for i, name in enumerate(rows):  # each row is its adapter alone
            if name == "__base__":
                with four.disable_adapter():
                    alone = four(ids[i:i + 1]).logits
            else:
                four.set_adapter(name)
                alone = four(ids[i:i + 1]).logits
            torch.testing.assert_close(mixed[i:i + 1], alone, rtol=1e-10, atol=1e-10)
