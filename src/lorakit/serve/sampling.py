"""Choosing the next token: greedy, or temperature + top-p from a request's own random generator.

Each request carries its own `torch.Generator`, so a seeded request draws the same tokens
whatever else shares its batch: the batch only changes which rows sit next to it.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass(frozen=True)
class SamplingParams:
    """How one request decodes. `temperature == 0` means greedy (argmax)."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = field(default=())
    ignore_eos: bool = False  # keep going past end-of-sequence (benchmarks want fixed lengths)

    def __post_init__(self) -> None:
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be a positive integer, got {self.max_tokens!r}")
        if not 0 <= self.temperature <= 2:
            raise ValueError(f"temperature must be between 0 and 2, got {self.temperature!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError("stop must be a list of non-empty strings")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def generator(self) -> torch.Generator | None:
        """A fresh generator for one request: seeded from `seed`, else from the OS."""
        if self.greedy:
            return None
        seed = self.seed if self.seed is not None else secrets.randbits(63)
        return torch.Generator().manual_seed(seed)


def top_p_filter(probs: Tensor, top_p: float) -> Tensor:
    """Zero all but the smallest set of most likely tokens whose mass reaches `top_p`; renormalised.

    `probs` is one distribution over the vocabulary, shape (vocab,). The token that crosses the
    threshold is kept, so at least one token always survives.
    """
    if top_p >= 1:
        return probs
    sorted_probs, order = torch.sort(probs, descending=True)
    mass_before = torch.cumsum(sorted_probs, dim=0) - sorted_probs  # mass of strictly likelier tokens
    sorted_probs = torch.where(mass_before < top_p, sorted_probs, torch.zeros_like(sorted_probs))
    kept = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return kept / kept.sum()


def sample_token(logits: Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """The next token for one row of logits, shape (vocab,)."""
    if params.greedy:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.float() / params.temperature, dim=-1)
    probs = top_p_filter(probs, params.top_p)
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))


def greedy_tokens(logits: Tensor) -> list[int]:
    """Argmax of every row at once, shape (rows, vocab) -> rows ints (ties go to the lowest id, as in generate)."""
    return torch.argmax(logits, dim=-1).tolist()
