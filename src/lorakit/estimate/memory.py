"""Training memory of weights, gradients and optimizer, and the step's peak, as pure functions.

The peak assumes what lorakit's trainer does on a GPU: a fused optimizer step (no temporaries
the size of the model) and gradients freed (`set_to_none`) before the next forward, with one
micro-batch per step (with gradient accumulation the gradients stay alive during forward too).
"""

from __future__ import annotations

from collections.abc import Sequence

from .activations import ADAPTER_BYTES, Activations

DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
NF4_BITS = 4 + 8 / 64 + 32 / (64 * 256)  # QLoRA (Dettmers et al. 2023, sec. 3): 4-bit codes,
# 8-bit absmax per 64 weights, fp32 constants per 256 absmax (double quantisation) = 4.127 bits
BLOCKSIZE = 64  # weights per absmax (QuantConfig's default)
NESTED_BLOCKSIZE = 256  # absmax values per fp32 nested absmax (bases.quant4.ABSMAX_BLOCKSIZE)
MAP_ENTRIES = 256  # the 8-bit dynamic map each double-quantised layer carries (fp32)
OPTIMIZER_STATES = {"adamw": 2, "adamw8bit": 2, "sgd": 0}  # states per trainable parameter
STATE_BYTES_8BIT = 1  # bitsandbytes' 8-bit Adam: one byte per state value (block constants ignored)


def linear4bit_bytes(n: int, double_quant: bool = True, blocksize: int = BLOCKSIZE) -> int:
    """One weight of `n` elements as lorakit's Linear4bit stores it (bitsandbytes' layout).

    uint8 codes, two a byte; one absmax per block of `blocksize`: fp32, or with double
    quantisation a uint8 code plus an fp32 nested absmax per 256 codes, an fp32 offset and the
    256-entry fp32 map. (The bias, if any, stays a dense parameter.)
    """
    blocks = -(-n // blocksize)
    codes = -(-n // 2)
    if not double_quant:
        return codes + 4 * blocks
    return codes + blocks + 4 * -(-blocks // NESTED_BLOCKSIZE) + 4 + 4 * MAP_ENTRIES


def weight_bytes(base: int, adapter: int, dtype_bytes: int, quantized: Sequence[int] = (),
                 double_quant: bool = True) -> int:
    """Base weights in `dtype` (the `quantized` linear weights, by size, in 4 bits instead), adapters in fp32."""
    four_bit = sum(linear4bit_bytes(n, double_quant) for n in quantized)
    return four_bit + (base - sum(quantized)) * dtype_bytes + adapter * ADAPTER_BYTES


def dequantized_bytes(n: int, weight_bytes: int, product_bytes: int) -> int:
    """The transient of one 4-bit layer's product: its weight de-quantized to the weight's dtype,
    then cast to the product's dtype when that differs (both alive while it is cast)."""
    return n * (weight_bytes + (product_bytes if product_bytes != weight_bytes else 0))


def gradient_bytes(trainable: int, param_bytes: int) -> int:
    """One gradient per trainable parameter, in the parameter's dtype."""
    return trainable * param_bytes


def optimizer_bytes(trainable: int, optimizer: str, param_bytes: int, master_weights: bool) -> int:
    """Optimizer states, plus the fp32 master copy of 16-bit trainable weights when asked for.

    AdamW keeps two moments in the dtype of the weights it updates: fp32 with a master copy
    (ZeRO's 12 bytes per parameter: master + two moments, Rajbhandari et al. 2020), else the
    parameter's own dtype (the seed's 16-bit "double the weights"). 8-bit AdamW keeps one byte
    per moment; SGD without momentum keeps nothing.
    """
    master = master_weights and param_bytes < 4
    state = STATE_BYTES_8BIT if optimizer == "adamw8bit" else (4 if master else param_bytes)
    return trainable * (OPTIMIZER_STATES[optimizer] * state + (4 if master else 0))


def peak_bytes(
    weights: int,
    gradients: int,
    optimizer: int,
    activations: Activations,
    loss: int,
    head_gradient: int = 0,
    late_gradient: int = 0,
) -> int:
    """Peak of one step: weights and optimizer states always, plus the larger of two moments.

    End of forward / start of backward: the kept activations with the loss at its peak, or with
    the output layer's gradient (made first in backward), with checkpointing the last layer
    recomputed, and that layer's backward under way. End of backward / optimizer step: all
    gradients, plus `late_gradient`, a
    gradient made last that is added into one already there (tied embeddings: the input
    embedding's into the head's). In between, each layer's backward frees its activations while
    adding its gradients, so the peak is at one end.
    """
    backward = activations.kept + max(loss, head_gradient + activations.recompute + activations.working)
    return weights + optimizer + max(backward, gradients + late_gradient)
