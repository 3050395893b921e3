"""What torch's matmul precision does on this machine: products and attention, fp32 vs reduced.

Shapes are those of a SmolLM2-135M training step (batch 4 x 256 tokens): a gate/up projection,
a rank-16 LoRA product, one 256-token chunk of the 49,152-word head, and the attention of one
layer forward + backward. Each is timed at "highest" and at "medium" (bf16 operands where the
CPU has AVX512-BF16/AMX, TF32 on NVIDIA GPUs), and plain bf16 tensors for the products.
docs/benchmarks.md quotes the table.

    python benchmarks/matmul_precision.py            # median of 10 repetitions each
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F


def _time(fn, reps: int) -> float:
    for _ in range(2):
        fn()
    samples = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples) * 1e3  # ms


def _cases() -> dict[str, tuple]:
    gen = torch.Generator().manual_seed(0)
    x, w = torch.randn(1024, 576, generator=gen), torch.randn(1536, 576, generator=gen)
    a = torch.randn(16, 576, generator=gen)
    h, head = torch.randn(256, 576, generator=gen), torch.randn(49152, 576, generator=gen)
    q = torch.randn(4, 9, 256, 64, generator=gen, requires_grad=True)
    k = torch.randn(4, 9, 256, 64, generator=gen, requires_grad=True)
    v = torch.randn(4, 9, 256, 64, generator=gen, requires_grad=True)

    def attention():
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        out.sum().backward()

    return {
        "projection (1024, 576) x (576, 1536)": (lambda: x @ w.t(), 2 * 1024 * 576 * 1536, (x, w)),
        "LoRA A (1024, 576) x (576, 16)": (lambda: x @ a.t(), 2 * 1024 * 576 * 16, (x, a)),
        "head chunk (256, 576) x (576, 49152)": (lambda: h @ head.t(), 2 * 256 * 576 * 49152, (h, head)),
        "attention forward + backward (4, 9, 256, 64)": (attention, None, None),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=10, help="repetitions per case (the median is shown)")
    args = parser.parse_args()
    print("| case | fp32 highest (ms) | fp32 medium (ms) | bf16 tensors (ms) | medium speed-up | error of medium |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, (fn, flops, operands) in _cases().items():
        torch.set_float32_matmul_precision("highest")
        exact_ms = _time(fn, args.reps)
        exact = fn() if operands else None
        torch.set_float32_matmul_precision("medium")
        medium_ms = _time(fn, args.reps)
        error = "-"
        if operands:
            reduced = fn()
            error = f"{float((reduced - exact).norm() / exact.norm()):.1e}"
        torch.set_float32_matmul_precision("highest")
        bf16 = "-"
        if operands:
            left, right = (t.bfloat16() for t in operands)
            bf16 = f"{_time(lambda: left @ right.t(), args.reps):.2f}"
        rate = f" ({flops / exact_ms / 1e6:.0f} GFLOP/s fp32)" if flops else ""
        print(f"| {name}{rate} | {exact_ms:.2f} | {medium_ms:.2f} | {bf16} | {exact_ms / medium_ms:.2f}x | {error} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
