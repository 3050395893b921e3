"""Tiny models shared by tests: a toy MLP and small random Llama / GPT-2."""

from __future__ import annotations

import torch
from torch import nn


class ToyMLP(nn.Module):
    """A plain PyTorch model (no transformers): embedding, two linear layers, a head."""

    def __init__(self, vocab: int = 50, dim: int = 16) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.lin0 = nn.Linear(dim, 32)
        self.lin1 = nn.Linear(32, dim)
        self.head = nn.Linear(dim, vocab)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.lin1(torch.relu(self.lin0(self.emb(input_ids)))))


def tiny_llama(seed: int = 0) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=100, max_position_embeddings=64,
    )
    return LlamaForCausalLM(config).eval()


def tiny_gpt2(seed: int = 0) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=100, n_positions=64)
    return GPT2LMHeadModel(config).eval()


def toy_mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return ToyMLP().eval()


MODELS = {"mlp": toy_mlp, "llama": tiny_llama, "gpt2": tiny_gpt2}


def logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = model(x)
    return out if isinstance(out, torch.Tensor) else out.logits
