"""The OpenAI server on a GGUF base loaded the default way: its decoder linears stay as the file's
blocks, and concurrent requests for different adapters (mixed-adapter batches over those blocks)
give the tokens of the dense model holding the de-quantized weights with the same adapters.

float64, as the other server tests: the blocks de-quantize to exactly the reference's values, so a
difference would be the serving logic's, not rounding luck."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

pytest.importorskip("gguf")
pytest.importorskip("accelerate")

from gguf import GGMLQuantizationType as Q  # noqa: E402

from lorakit import LoraConfig, PeftModel, get_peft_model, load_model  # noqa: E402
from lorakit.bases.gguf_linear import GGUFLinear  # noqa: E402
from ggufmodels import write_tiny_llama  # noqa: E402

ADAPTERS = {"a0": dict(r=4, lora_alpha=8, target_modules="all-linear"),
            "a1": dict(r=2, lora_alpha=8, target_modules=["q_proj", "k_proj", "down_proj"])}
BASE = "tiny-gguf"


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(the GGUF file, the dense float64 reference, {adapter name: dir})."""
    root = tmp_path_factory.mktemp("serve-gguf")
    path = root / "tiny.gguf"
    reference = write_tiny_llama(path, Q.Q4_1, tied=True).to(torch.float64).eval()
    dirs = {}
    for i, (name, spec) in enumerate(ADAPTERS.items()):
        torch.manual_seed(10 + i)
        peft = get_peft_model(write_tiny_llama(root / "scratch.gguf", Q.Q4_1, tied=True),
                              LoraConfig(init_lora_weights=False, **spec))
        dirs[name] = root / name
        peft.save_pretrained(dirs[name])
    return path, reference, dirs


def reference_text(reference, tokenizer, adapter: Path | None, text: str, max_new_tokens: int) -> str:
    import copy

    model = reference if adapter is None else PeftModel.from_pretrained(copy.deepcopy(reference), adapter).eval()
    x = torch.tensor([tokenizer(text).input_ids])
    with torch.inference_mode():
        out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, x.shape[1]:], skip_special_tokens=True)


def test_concurrent_requests_on_a_packed_gguf_server_equal_the_dense_reference(served):
    import openai

    from lorakit.serve import AdapterRegistry, Engine, create_app
    from lorakit.serve.server import serving

    path, reference, dirs = served
    model, tokenizer = load_model(str(path), dtype=torch.float64, device="cpu")  # packed: the default
    assert isinstance(model.model.layers[1].self_attn.q_proj, GGUFLinear)
    registry = AdapterRegistry(model, BASE)
    for name, adapter in dirs.items():
        registry.add(name, os.fspath(adapter))
    engine = Engine(model, tokenizer, registry)
    words = ["abc", "bcdab", "zyx", "hello", "abab", "qrs", "lmnop", "cab"]
    jobs = [([BASE, *ADAPTERS][i % 3], words[i]) for i in range(len(words))]
    with engine, serving(create_app(engine, BASE)) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)

        def ask(job):
            name, text = job
            return client.completions.create(model=name, prompt=text, max_tokens=6, temperature=0).choices[0].text

        with ThreadPoolExecutor(len(jobs)) as pool:
            got = list(pool.map(ask, jobs))
    for (name, text), answer in zip(jobs, got):
        assert answer == reference_text(reference, tokenizer, dirs.get(name), text, 6), (name, text)
    by_route = {name: [a for (n, _), a in zip(jobs, got) if n == name] for name in (BASE, *ADAPTERS)}
    assert len({tuple(v) for v in by_route.values()}) == 3  # each route answers its own way
