"""How much memory a model's weights take, and what the same base would take in 16 and 32 bits.

A 4-bit layer (lorakit's Linear4bit) or a packed GGUF layer (GGUFLinear) holds its weight as
buffers: packed codes and scales, or the file's blocks; it counts as its `in_features *
out_features` elements when sized dense (`bases.registry.uncounted_weight_elements`). Tensors shared between
modules (tied embeddings) count once.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

MiB = 1024**2


@dataclass(frozen=True)
class BaseMemory:
    """Bytes of a model's weights as stored (`bytes`), and of its `elements` in 16 and 32 bits."""

    bytes: int
    elements: int
    dense_bytes: int | None = None  # what the same model took before it was quantized
    kind: str = "4-bit"  # what its linear layers hold: "4-bit", "GGUF Q4_1 blocks"

    def line(self) -> str:
        before = f" (loaded: {self.dense_bytes / MiB:,.0f} MiB)" if self.dense_bytes is not None else ""
        return (f"{self.bytes / MiB:,.0f} MiB with {self.kind} linear layers vs the whole base "
                f"{2 * self.elements / MiB:,.0f} MiB in 16 bits and {4 * self.elements / MiB:,.0f} MiB in 32 bits{before}")

    def saved_line(self) -> str:
        """What the packed linear layers save against the whole base in 32 bits."""
        return f"{(4 * self.elements - self.bytes) / MiB:,.0f} MiB less than the fp32 base"


def base_memory(model: nn.Module, before: BaseMemory | None = None) -> BaseMemory:
    """The weights of `model` now; `before`: the same model measured before it was quantized."""
    from ..bases.gguf_linear import GGUFLinear
    from ..bases.registry import uncounted_weight_elements

    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    stored = sum(t.nbytes for t in tensors.values())
    elements = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values()) + uncounted_weight_elements(model)
    gguf = sorted({m.kind for m in model.modules() if isinstance(m, GGUFLinear)})
    kind = f"GGUF {'/'.join(gguf)} blocks in its" if gguf else "4-bit"
    return BaseMemory(stored, elements, None if before is None else before.bytes, kind)
