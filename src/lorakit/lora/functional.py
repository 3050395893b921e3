"""LoRA's math as pure functions on tensors: scaling, delta weight, merge, DoRA, combination.

Shapes follow PEFT: for a linear layer with weight W (out, in), A is (r, in) and B is (out, r),
and the adapted layer computes x W^T + scaling * (x A^T) B^T. A layer stored transposed
(`fan_in_fan_out`, e.g. GPT-2's Conv1D) keeps W as (in, out), so its delta is transposed too.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor


def lora_scaling(alpha: float, r: int, use_rslora: bool = False) -> float:
    """alpha / r, or alpha / sqrt(r) with rank-stabilised LoRA (Kalajdzievski, 2023)."""
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def delta_weight(A: Tensor, B: Tensor, scaling: float, fan_in_fan_out: bool = False) -> Tensor:
    """scaling * B @ A, laid out like the base weight: (out, in), or (in, out) when fan_in_fan_out."""
    delta = (B @ A) * scaling  # (out, in)
    return delta.T if fan_in_fan_out else delta


def embedding_delta_weight(A: Tensor, B: Tensor, scaling: float) -> Tensor:
    """Delta for an embedding table (num_embeddings, dim); PEFT stores A (r, num) and B (dim, r)."""
    return (B @ A).T * scaling


def _wide(dtype: torch.dtype) -> torch.dtype:
    """fp32 for 16-bit weights, else their own dtype: a merge adds wide and rounds once."""
    return torch.promote_types(dtype, torch.float32)


def merge(weight: Tensor, delta: Tensor) -> Tensor:
    """W + dW, added in fp32 (or wider) and cast back to W's dtype once."""
    wide = _wide(weight.dtype)
    return (weight.to(wide) + delta.to(wide)).to(weight.dtype)


def unmerge(weight: Tensor, delta: Tensor) -> Tensor:
    wide = _wide(weight.dtype)
    return (weight.to(wide) - delta.to(wide)).to(weight.dtype)


def dora_weight_norm(weight: Tensor, delta: Tensor) -> Tensor:
    """Per-output-row L2 norm of W + delta, for W laid out (out, in). Shape (out,)."""
    return torch.linalg.vector_norm(weight + delta.to(weight.dtype), dim=1)


def dora_merge(weight: Tensor, delta: Tensor, magnitude: Tensor) -> tuple[Tensor, Tensor]:
    """DoRA (Liu et al., 2024): W' = m * (W + dW) / ||W + dW||_row. Returns (W', the norm used)."""
    combined = weight + delta.to(weight.dtype)
    norm = torch.linalg.vector_norm(combined, dim=1)
    return combined * (magnitude / norm).unsqueeze(1), norm


def dora_unmerge(merged: Tensor, delta: Tensor, magnitude: Tensor, norm: Tensor) -> Tensor:
    """Inverse of `dora_merge`, given the norm it returned."""
    return merged * (norm / magnitude).unsqueeze(1) - delta.to(merged.dtype)


def weighted_sum(tensors: Sequence[Tensor], weights: Sequence[float]) -> Tensor:
    return sum(w * t for w, t in zip(weights, tensors))


def combine_linear(
    As: Sequence[Tensor], Bs: Sequence[Tensor], weights: Sequence[float], scalings: Sequence[float]
) -> tuple[Tensor, Tensor]:
    """PEFT's "linear" combination of same-rank adapters.

    A = sum(sign_i sqrt|w_i s_i| A_i), B = sum(sqrt|w_i s_i| B_i); the result has scaling 1. Note that
    B A is then *not* sum(w_i s_i B_i A_i): cross terms remain, as in PEFT.
    """
    ws = [w * s for w, s in zip(weights, scalings)]
    root = [math.sqrt(abs(w)) for w in ws]
    signed = [r if w >= 0 else -r for r, w in zip(root, ws)]
    return weighted_sum(As, signed), weighted_sum(Bs, root)


def combine_cat(
    As: Sequence[Tensor], Bs: Sequence[Tensor], weights: Sequence[float], scalings: Sequence[float]
) -> tuple[Tensor, Tensor]:
    """Stack the adapters along the rank: B A = sum(w_i s_i B_i A_i) exactly, rank = sum of ranks."""
    A = torch.cat([a * (w * s) for a, w, s in zip(As, weights, scalings)], dim=0)
    B = torch.cat(list(Bs), dim=1)
    return A, B


def combine_svd(
    deltas: Sequence[Tensor], weights: Sequence[float], rank: int, clamp: float | None = None
) -> tuple[Tensor, Tensor]:
    """Best rank-`rank` approximation of sum(w_i dW_i), with dW_i laid out (out, in); returns (A, B)."""
    total = weighted_sum(deltas, weights).float()
    U, S, Vh = torch.linalg.svd(total, full_matrices=False)
    B = U[:, :rank] * S[:rank]  # (out, rank)
    A = Vh[:rank, :]  # (rank, in)
    if clamp is not None:
        bound = torch.quantile(torch.cat([B.flatten(), A.flatten()]), clamp)
        B, A = B.clamp(-bound, bound), A.clamp(-bound, bound)
    return A, B
