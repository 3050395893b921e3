"""Generating text: batched, left-padded, greedy or sampled, with or without adapters.

    model, tokenizer = load_for_inference("smollm2-135m", ["runs/demo/adapter"])  # lorakit.models
    generate(model, tokenizer, ["Table for two, Friday 8pm, name Ada Byrne."], max_new_tokens=32)

Prompts are plain strings (wrapped in the chat template when the tokenizer has one and
`chat=True`) or whole conversations (lists of `{role, content}` messages).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Union

import torch

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

Message = dict[str, str]
Prompt = Union[str, list[Message]]


@torch.inference_mode()
def generate(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[Prompt],
    *,
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    top_p: float = 1.0,
    chat: bool = True,
    adapter_names: Sequence[str] | None = None,
    seed: int | None = None,
    batch_size: int = 32,
    system: str | None = None,
) -> list[str]:
    """The completion of each prompt (new text only, special tokens removed), in input order.

    Prompts run in batches of `batch_size`, grouped by length so little padding is spent;
    `temperature=0` is greedy. `adapter_names` gives one adapter (or `routing.BASE`) per prompt,
    run together in mixed batches.
    """
    _check_sampling(max_new_tokens, temperature, top_p, batch_size)
    prompts = list(prompts)
    if adapter_names is not None and len(adapter_names) != len(prompts):
        raise ValueError(f"adapter_names has {len(adapter_names)} entries for {len(prompts)} prompts")
    texts = [prompt_text(p, tokenizer, chat=chat, system=system) for p in prompts]
    ids = [tokenizer(t, add_special_tokens=not _templated(p, tokenizer, chat))["input_ids"]
           for p, t in zip(prompts, texts)]
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    device = next(model.parameters()).device
    config = _generation_config(model, tokenizer, max_new_tokens, temperature, top_p)
    out: list[str] = [""] * len(prompts)
    with _seeded(seed):
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            batch = _left_pad([ids[i] for i in chunk], config.pad_token_id, device)
            kwargs: dict[str, Any] = {}
            if adapter_names is not None:
                kwargs["adapter_names"] = [adapter_names[i] for i in chunk]
            generated = model.generate(**batch, generation_config=config, **kwargs)
            new = generated[:, batch["input_ids"].shape[1]:]  # (batch, new tokens)
            for i, row in zip(chunk, new):
                out[i] = tokenizer.decode(row, skip_special_tokens=True).strip()
    return out


def prompt_text(prompt: Prompt, tokenizer: Any, *, chat: bool = True, system: str | None = None) -> str:
    """The text the model sees: the chat template's rendering when used, else the prompt itself."""
    if not isinstance(prompt, str) and not getattr(tokenizer, "chat_template", None):
        raise ValueError("a conversation (list of messages) needs a tokenizer with a chat template")
    if _templated(prompt, tokenizer, chat):
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        if system is not None and messages[0]["role"] != "system":
            messages = [{"role": "system", "content": system}, *messages]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return prompt


def _templated(prompt: Prompt, tokenizer: Any, chat: bool) -> bool:
    return not isinstance(prompt, str) or (chat and bool(getattr(tokenizer, "chat_template", None)))


def _check_sampling(max_new_tokens: int, temperature: float, top_p: float, batch_size: int) -> None:
    if not (isinstance(max_new_tokens, int) and max_new_tokens > 0):
        raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    if not temperature >= 0:
        raise ValueError(f"temperature must be >= 0, got {temperature!r}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
    if not batch_size > 0:
        raise ValueError(f"batch_size must be positive, got {batch_size!r}")


def _generation_config(model: Any, tokenizer: Any, max_new_tokens: int, temperature: float, top_p: float):
    """A fresh GenerationConfig: the model's stop tokens, our decoding settings, nothing inherited."""
    from transformers import GenerationConfig

    own = getattr(model, "generation_config", None)
    eos = getattr(own, "eos_token_id", None)
    eos = eos if eos is not None else tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    if isinstance(pad, list):
        pad = pad[0]
    sampling = temperature > 0
    return GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=sampling,
        temperature=temperature if sampling else None,
        top_p=top_p if sampling else None,
        top_k=None,
        eos_token_id=eos,
        pad_token_id=pad,
        bos_token_id=getattr(own, "bos_token_id", None),
    )


def _left_pad(rows: list[list[int]], pad_id: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Left padding, so every row's last prompt token sits in the last column where generation starts."""
    width = max(len(r) for r in rows)
    input_ids = torch.tensor([[pad_id] * (width - len(r)) + r for r in rows], dtype=torch.long)
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], dtype=torch.long)
    return {"input_ids": input_ids.to(device), "attention_mask": mask.to(device)}


@contextmanager
def _seeded(seed: int | None) -> Iterator[None]:
    """Seed torch's generators for the block only; the caller's random state is restored after."""
    if seed is None:
        yield
        return
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield
