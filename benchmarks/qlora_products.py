"""One 4-bit layer's cost on SmolLM2-135M's shapes: de-quantizing it, and a LoRA layer's forward +
backward over it against the same layer over a dense base.

Each row is one projection shape of SmolLM2-135M (hidden 576, intermediate 1536, k/v 192) with
NF4 + double quant, blocksize 64, a batch of 4 x 256 tokens, r=16; the times are medians of
`--repeat` runs in this process, with `--threads` threads (default 1, so a shared machine's other
load moves them less).

    python benchmarks/qlora_products.py                    # fp32 and bf16 weights
    python benchmarks/qlora_products.py --repeat 5 --dtype bfloat16

Columns: `dequantize` is `Linear4bit.dequantize(compute)` (the weight in the compute dtype);
`4-bit fwd+bwd` is `fast.kernels.lora_linear` over the Linear4bit base, forward and backward
(two de-quantizations: forward and the gradient to the input); `dense fwd+bwd` the same over an
nn.Linear holding the de-quantized weight in the weight dtype, so the difference is what 4 bits
cost.
"""

from __future__ import annotations

import argparse
import statistics
import time

SHAPES = {"q/o (576, 576)": (576, 576), "k/v (192, 576)": (192, 576), "gate/up (1536, 576)": (1536, 576),
          "down (576, 1536)": (576, 1536)}
TOKENS, RANK = 4 * 256, 16


def _median_ms(fn, repeat: int) -> float:
    fn()  # warm-up: allocator and kernels
    times = []
    for _ in range(repeat):
        start = time.process_time()
        fn()
        times.append(time.process_time() - start)
    return 1e3 * statistics.median(times)


def _rows(dtype_name: str, repeat: int) -> list[str]:
    import torch
    from torch import nn

    from lorakit.bases import frozen_base
    from lorakit.bases.linear4bit import quantize_linear
    from lorakit.fast.kernels import Adapted, lora_linear

    dtype = getattr(torch, dtype_name)
    rows = []
    for label, (out_features, in_features) in SHAPES.items():
        torch.manual_seed(0)
        layer = quantize_linear(nn.Linear(in_features, out_features, bias=False).to(dtype), double_quant=True)
        base4 = frozen_base(layer)
        compute = base4.compute_dtype()
        dense = nn.Linear(in_features, out_features, bias=False).to(dtype).requires_grad_(False)
        dense.weight.copy_(layer.dequantize())
        A = (torch.randn(RANK, in_features) * 0.01).requires_grad_(True)
        B = (torch.randn(out_features, RANK) * 0.01).requires_grad_(True)
        x = torch.randn(TOKENS, in_features, dtype=dtype, requires_grad=True)
        g = torch.randn(TOKENS, out_features, dtype=dtype)

        def step(base):
            lora_linear(x, Adapted(base, A, B, 2.0)).backward(g)

        deq = _median_ms(lambda: layer.dequantize(compute), repeat)
        four = _median_ms(lambda: step(base4), repeat)
        plain = _median_ms(lambda: step(frozen_base(dense)), repeat)
        rows.append(f"| {label} | {dtype_name} | {str(compute).removeprefix('torch.')} | {deq:.2f} | {four:.1f} "
                    f"| {plain:.1f} | {four / plain:.2f} |")
    return rows


def main() -> int:
    import torch

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", nargs="*", default=["float32", "bfloat16"],
                        choices=["float32", "bfloat16", "float16"], help="the weights' dtypes (the 4-bit layer de-quantizes to it)")
    parser.add_argument("--repeat", type=int, default=10, help="timed runs per figure (median)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print("| layer | weight dtype | compute | dequantize (ms) | 4-bit fwd+bwd (ms) | dense fwd+bwd (ms) "
          "| 4-bit / dense |")
    print("|---|---|---|---:|---:|---:|---:|")
    for name in args.dtype:
        print("\n".join(_rows(name, args.repeat)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
