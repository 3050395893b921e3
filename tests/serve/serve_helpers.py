"""Helpers for the server tests: a tiny float64 Llama with a word tokenizer, references, a live server.

The tiny model runs in float64 so that "the same tokens whatever the batch" is a property of
the engine's logic (positions, masks, slots, adapter routing), not of float32 rounding luck:
batch composition changes fp32 matmul rounding by ~1e-6, which can flip a near-tie argmax.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

WORDS = ["<unk>", "<s>", "</s>", "system", "user", "assistant"] + [f"w{i}" for i in range(94)]
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }} {{ m['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}assistant {% endif %}"
)
BASE_NAME = "tiny"


def make_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="</s>"
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def load_tiny(model_dir: Path):
    """(model, tokenizer) from the saved tiny model, float64, eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64).eval()
    return model, AutoTokenizer.from_pretrained(model_dir)


def reference_tokens(model_dir: Path, adapter: Path | None, ids: list[int], max_new_tokens: int) -> list[int]:
    """Greedy tokens from the library's own generate (a fresh model, the adapter via PeftModel)."""
    from lorakit import PeftModel

    model, _ = load_tiny(model_dir)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter).eval()
    x = torch.tensor([ids])
    with torch.inference_mode():
        out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=max_new_tokens, do_sample=False)
    return out[0, len(ids):].tolist()


def chat_ids(tokenizer, messages: list[dict[str, str]]) -> list[int]:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False).input_ids


@dataclass
class Served:
    url: str
    engine: object
    registry: object
    api_key: str | None

    def client(self, api_key: str | None = None):
        import openai

        key = api_key if api_key is not None else (self.api_key or "unused")
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, timeout=60)


@contextmanager
def running_server(
    model_dir: Path, adapters: dict[str, Path], *, api_key: str | None = None,
    max_adapters: int | None = None, max_batch_size: int = 32,
) -> Iterator[Served]:
    """The whole stack on a free loopback port: engine thread, FastAPI app, uvicorn thread."""
    from lorakit.serve import AdapterRegistry, Engine, create_app
    from lorakit.serve.server import serving

    model, tokenizer = load_tiny(model_dir)
    registry = AdapterRegistry(model, BASE_NAME, max_adapters=max_adapters)
    for name, path in adapters.items():
        registry.add(name, os.fspath(path))
    engine = Engine(model, tokenizer, registry, max_batch_size=max_batch_size)
    app = create_app(engine, BASE_NAME, api_key=api_key)
    with engine, serving(app) as url:
        yield Served(url, engine, registry, api_key)
