"""What autograd keeps between forward and backward in a Llama-style decoder, as pure functions.

Counted tensor by tensor for transformers' Llama layer (RMSNorm, SDPA attention, gated MLP) and
lorakit's LoRA layer, and checked against autograd's saved tensors in tests/estimate:

- SDPA (flash / memory-efficient) saves q, k, v (grouped-query k/v stay narrow), the output and
  a log-sum-exp per head; never a seq x seq matrix. No padding mask (packed or equal-length rows).
- RMSNorm upcasts its input to fp32 and keeps it (4 bytes per element in any dtype) with one
  fp32 rsqrt per token; its normalised value is kept only when the norm's weight trains.
- LoRA (lorakit's fused `lora_linear`, dropout 0) keeps the layer's input, which the layers
  reading the same tensor share (q/k/v; gate/up), and the fp32 (tokens, r) product x A^T.
- With LoRA on gate, up and down, lorakit's fused SwiGLU keeps only
  gate and up (silu and the product are recomputed in backward), and the stacked [A_gate; A_up].
- With LoRA on two or three of q, k and v, they run as one node that keeps what they would
  keep apart.
- In fp32, lorakit's q/k/v and fused MLP keep the norm's input (which the norm keeps anyway)
  instead of its output, and remake the output in backward (`lorakit.fast.recompute`); not in the
  first layer's attention, whose norm input needs no gradient and is not kept by the norm.
- Gradient checkpointing (transformers' per-layer, non-reentrant) keeps each layer's input and
  recomputes one layer at a time in backward.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

ADAPTER_BYTES = 4  # lorakit keeps adapter weights in fp32 whatever the base dtype
NORM_BYTES = 4  # RMSNorm computes in fp32

# Llama-family projection names -> the tensor they read; layers reading one tensor share it.
INPUT_OF = {
    "q_proj": "attn_in", "k_proj": "attn_in", "v_proj": "attn_in", "o_proj": "attn_out",
    "gate_proj": "mlp_in", "up_proj": "mlp_in", "down_proj": "mlp_out",
}
FUSED_MLP = {"gate_proj", "up_proj", "down_proj"}  # all three adapted: lorakit.fast.fusion runs the MLP as one node


@dataclass(frozen=True)
class Shape:
    """The dimensions of a decoder that activations depend on."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int

    @property
    def q_width(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_width(self) -> int:
        return self.kv_heads * self.head_dim


@dataclass(frozen=True)
class Activations:
    """`kept` lives from forward to backward; `recompute` (checkpointing) only while its layer's
    backward runs, after the loss's tensors are gone; `working`, the gradients one layer's backward
    makes on the way (transients, not reported as activations)."""

    kept: int
    recompute: int = 0
    working: int = 0

    @property
    def most(self) -> int:
        return self.kept + self.recompute


def _attention(shape: Shape, b: int) -> int:
    """Per token: SDPA's q, k, v, output (b bytes each element) and fp32 log-sum-exp per head."""
    return b * (2 * shape.q_width + 2 * shape.kv_width) + 4 * shape.heads


def full_layer_bytes(shape: Shape, tokens: int, b: int) -> int:
    """One decoder layer whose weights all train (b: bytes per element of the dtype).

    Per token: two RMSNorms (fp32 input, rsqrt, normalised value for the weight's gradient), the
    inputs of q/k/v and of gate/up, SDPA's tensors (its output is also o_proj's input), and the
    MLP's gate, silu(gate), up and their product (down_proj's input).
    """
    h = shape.hidden
    norms = 2 * (NORM_BYTES * h + 4 + b * h)
    projection_inputs = 2 * b * h
    mlp = 4 * b * shape.intermediate
    return tokens * (norms + projection_inputs + _attention(shape, b) + mlp)


def lora_layer_bytes(shape: Shape, tokens: int, b: int, adapted: Mapping[str, int], first: bool = False,
                     fused_blocks: bool = True) -> int:
    """One frozen decoder layer with LoRA on `adapted` (short name -> rank).

    A frozen layer still keeps what its input's gradient needs: the norms' fp32 inputs, SDPA's
    tensors, the MLP's gate, silu(gate) and up. Adapters add their inputs and x A^T. In the first
    layer nothing before the first adapter needs a gradient, so its input norm keeps nothing.
    `fused_blocks`: lorakit's fast paths for Llama-style blocks apply (see the module docstring).
    """
    norms = (1 if first else 2) * (NORM_BYTES * shape.hidden + 4)
    fused = fused_blocks and FUSED_MLP <= set(adapted)
    mlp = (2 if fused else 3) * b * shape.intermediate
    remade = set()  # norm outputs remade in backward instead of kept
    if fused_blocks and b == NORM_BYTES:
        remade = ({"mlp_in"} if fused else set()) | (set() if first else {"attn_in"})
    inputs = {n: r for n, r in adapted.items()
              if not (fused and n == "down_proj") and INPUT_OF.get(n) not in remade}  # the product is recomputed
    adapters = sum(ADAPTER_BYTES * r for r in adapted.values()) + _adapter_input_bytes(shape, b, inputs)
    stacked_a = ADAPTER_BYTES * (adapted["gate_proj"] + adapted["up_proj"]) * shape.hidden if fused else 0  # [A_gate; A_up]
    return tokens * (norms + _attention(shape, b) + mlp + adapters) + stacked_a


def _adapter_input_bytes(shape: Shape, b: int, adapted: Mapping[str, int]) -> int:
    """Per token: the inputs the adapters keep, once per distinct tensor."""
    groups = {INPUT_OF.get(name, name) for name in adapted}
    width = {"attn_in": shape.hidden, "mlp_in": shape.hidden, "mlp_out": shape.intermediate,
             "attn_out": 0}  # o_proj reads SDPA's output, which SDPA keeps already
    return sum(b * width.get(group, shape.hidden) for group in groups)  # unknown layers: hidden-wide


def outside_layers_bytes(shape: Shape, batch: int, seq: int, b: int, full: bool) -> int:
    """The final norm (fp32 input, rsqrt; normalised value when it trains), rotary cos/sin,
    the embedding's token ids when it trains."""
    tokens = batch * seq
    final_norm = NORM_BYTES * shape.hidden + 4 + (b * shape.hidden if full else 0)
    rotary = 2 * seq * shape.head_dim * b
    ids = 8 if full else 0
    return tokens * (final_norm + ids) + rotary


def activation_bytes(
    shape: Shape, batch: int, seq: int, b: int, adapted: Mapping[str, int] | None, checkpointing: bool,
    fused_blocks: bool = True,
) -> Activations:
    """Activations of one step (`adapted=None`: full fine-tuning). `fused_blocks=False` where
    lorakit's block fast paths do not apply (other model types, a quantized base)."""
    tokens = batch * seq
    full = adapted is None
    layer = full_layer_bytes(shape, tokens, b) if full else lora_layer_bytes(shape, tokens, b, adapted, fused_blocks=fused_blocks)
    outside = outside_layers_bytes(shape, batch, seq, b, full)
    working = 3 * tokens * shape.intermediate * b  # the MLP's backward: gradients of its product, up and gate
    if checkpointing:
        return Activations(kept=shape.layers * tokens * b * shape.hidden + outside, recompute=layer, working=working)
    first = layer if full else lora_layer_bytes(shape, tokens, b, adapted, first=True, fused_blocks=fused_blocks)
    return Activations(kept=first + (shape.layers - 1) * layer + outside, working=working)
