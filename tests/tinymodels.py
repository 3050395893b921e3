"""Tiny models shared by tests: a toy MLP and small random Llama / GPT-2."""

from __future__ import annotations

import json
import random
from pathlib import Path

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


def adamw_losses(model: nn.Module, params: list, steps: int, lr: float = 1e-2) -> list[float]:
    """Train `model` in train mode on one fixed random batch (vocab 100) for `steps` AdamW steps."""
    opt = torch.optim.AdamW(params, lr=lr)
    ids = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(0))
    model.train()
    losses = []
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


# A saved model directory with a chat tokenizer, for tests that load models by path.
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def save_tiny_model(out: Path, tie_word_embeddings: bool = False, merges: tuple[tuple[str, str], ...] = ()) -> Path:
    """One token per byte plus <|im_start|> and <|im_end|> (eos, also the pad, as in SmolLM2);
    `merges` add BPE merges (a GGUF's tokenizer needs at least one)."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(alphabet + ["".join(m) for m in merges])}
    core = Tokenizer(models.BPE(vocab=vocab, merges=list(merges)))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, eos_token="<|im_end|>", pad_token="<|im_end|>",
        additional_special_tokens=["<|im_start|>"],
    )
    tokenizer.chat_template = CHATML
    tokenizer.save_pretrained(out)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=None,
        tie_word_embeddings=tie_word_embeddings,
    )
    LlamaForCausalLM(config).save_pretrained(out)
    return out


def write_records(path: Path, n: int, seed: int = 0) -> Path:
    """Chat records with a learnable answer: the user's word, reversed."""
    rng = random.Random(seed)
    with open(path, "w") as fh:
        for _ in range(n):
            word = "".join(rng.choice("abcdefgh") for _ in range(rng.randint(3, 8)))
            messages = [{"role": "user", "content": f"reverse {word}"},
                        {"role": "assistant", "content": word[::-1]}]
            fh.write(json.dumps({"messages": messages}) + "\n")
    return path


def write_foreign_gguf(path: Path, arch: str = "mamba") -> Path:
    """A minimal GGUF of an architecture lorakit does not read (one token embedding, no metadata)."""
    import gguf

    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_tensor("token_embd.weight", torch.zeros(4, 32).numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
