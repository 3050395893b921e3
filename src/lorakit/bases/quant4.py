"""QLoRA's 4-bit weight format (bitsandbytes' NF4 and FP4), as pure torch functions.

A weight is read row-major and cut into blocks of `blocksize` consecutive elements. Each block
keeps its absolute maximum (fp32); each element is scaled by it (times the reciprocal, as
bitsandbytes does, so the rounding is the same) and stored as the index of the nearest of 16 code
values, ties to the lower index. Two indices share a byte, the first element in the high nibble.
The layout is bitsandbytes': packed bytes (ceil(n / 2), 1) uint8 and absmax (blocks,) fp32.

Double quantization (QLoRA's "double quant", bitsandbytes' compress_statistics) stores the
absmax themselves in 8 bits: minus their mean (the offset), in blocks of 256, each the index of
the nearest value of bitsandbytes' signed 8-bit dynamic map.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

BLOCKSIZES = (64, 128, 256, 512, 1024, 2048, 4096)  # what bitsandbytes documents as valid
QUANT_TYPES = ("nf4", "fp4")
ABSMAX_BLOCKSIZE = 256  # bitsandbytes quantizes the absmax in blocks of 256

# NF4: quantiles of N(0, 1) normalised to [-1, 1] with an exact zero (QLoRA, appendix E), the
# fp32 values bitsandbytes ships.
_NF4 = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)
# FP4 (1 sign, 2 exponent, 1 mantissa bits) as bitsandbytes' get_4bit_type("fp4") builds it: the
# low three bits index these magnitudes, bit 3 is the sign; divided by the largest, 12.
_FP4_MAGNITUDES = (0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0)


@functools.cache
def code(quant_type: str) -> Tensor:
    """The 16 fp32 values a 4-bit index stands for (index i is code[i])."""
    check_quant_type(quant_type)
    if quant_type == "nf4":
        return torch.tensor(_NF4, dtype=torch.float32)
    magnitudes = torch.tensor(_FP4_MAGNITUDES, dtype=torch.float32)
    return torch.cat([magnitudes, -magnitudes]) / 12.0


@functools.cache
def dynamic_map() -> Tensor:
    """bitsandbytes' signed 8-bit dynamic map (create_dynamic_map(signed=True)), 256 sorted fp32
    values: for each decade 10^(i-6), i = 0..6, the 2^i midpoints of linspace(0.1, 1, 2^i + 1)
    times the decade, with both signs; then 0 and 1 (254 + 2 values)."""
    values = [torch.tensor([0.0, 1.0])]
    for i in range(7):
        bounds = torch.linspace(0.1, 1, 2**i + 1, dtype=torch.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        values += [10.0 ** (i - 6) * means, -(10.0 ** (i - 6)) * means]
    return torch.cat(values).sort().values


def check_blocksize(blocksize: int) -> None:
    if blocksize not in BLOCKSIZES:
        raise ValueError(f"blocksize {blocksize!r} is not one bitsandbytes allows ({', '.join(map(str, BLOCKSIZES))})")


def check_quant_type(quant_type: str) -> None:
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"quant_type {quant_type!r} is not 'nf4' or 'fp4'")


def _scaled(flat: Tensor, blocksize: int) -> tuple[Tensor, Tensor]:
    """(each element times 1/its block's absmax, clamped to [-1, 1], fp32 (n,); absmax fp32 (blocks,)).
    An all-zero block scales to NaN (0 * inf), as in bitsandbytes; `_nearest` maps NaN to index 0."""
    n = flat.numel()
    padded = torch.nn.functional.pad(flat, (0, -n % blocksize)).view(-1, blocksize)  # (blocks, blocksize)
    absmax = padded.abs().amax(dim=1).float()
    scaled = padded.float() * (1 / absmax)[:, None]
    return scaled.clamp_(-1, 1).view(-1)[:n], absmax


def _nearest(scaled: Tensor, values: Tensor, chunk: int = 1 << 18) -> Tensor:
    """The index (uint8) of the nearest of `values` for each element, ties to the lower index,
    NaN to 0; in chunks so the (elements, codes) distance table stays small."""
    out = torch.empty(scaled.shape, dtype=torch.uint8, device=scaled.device)
    values = values.to(scaled.device)
    for start in range(0, scaled.numel(), chunk):
        part = scaled[start : start + chunk]
        index = (part[:, None] - values).abs_().argmin(dim=1)  # argmin: the first of equal minima
        out[start : start + chunk] = index.masked_fill_(part.isnan(), 0)
    return out


def pack(indices: Tensor) -> Tensor:
    """(n,) 4-bit indices -> (ceil(n / 2), 1) bytes, the first of each pair high; an odd last one
    gets a zero low nibble."""
    indices = torch.nn.functional.pad(indices, (0, indices.numel() % 2))
    return (indices[0::2] << 4 | indices[1::2]).view(-1, 1)


def unpack(packed: Tensor, n: int) -> Tensor:
    """(bytes,) or (bytes, 1) uint8 -> the first n 4-bit indices (int64)."""
    flat = packed.reshape(-1).long()
    return torch.stack([flat >> 4, flat & 0xF], dim=1).view(-1)[:n]


def quantize_4bit(w: Tensor, quant_type: str = "nf4", blocksize: int = 64) -> tuple[Tensor, Tensor]:
    """(packed uint8 (ceil(n / 2), 1), absmax fp32 (ceil(n / blocksize),)) for a float tensor w."""
    check_quant_type(quant_type)
    check_blocksize(blocksize)
    scaled, absmax = _scaled(w.detach().reshape(-1), blocksize)
    return pack(_nearest(scaled, code(quant_type))), absmax


@functools.cache
def _byte_pairs(quant_type: str, device: torch.device) -> Tensor:
    """(256,) int64: entry b holds the two fp32 values byte b stands for, (code[b >> 4], code[b & 15])
    in memory order, so one 8-byte gather per byte de-quantizes two elements (on CPU, torch's
    index_select of 8-byte items runs about 20x faster than unpacking nibbles and indexing code)."""
    values = code(quant_type)
    pairs = torch.stack([values.repeat_interleave(16), values.repeat(16)], dim=1)  # (256, 2): high nibble first
    return pairs.contiguous().view(torch.int64).view(-1).to(device)


def dequantize_4bit(packed: Tensor, absmax: Tensor, shape: torch.Size | tuple[int, ...], quant_type: str = "nf4",
                    blocksize: int = 64, dtype: torch.dtype = torch.float32,
                    out_dtype: torch.dtype | None = None) -> Tensor:
    """The weight of `shape` back from its bytes: code[index] * absmax in fp32, rounded once to
    `dtype` (as bitsandbytes' CUDA kernel; its CPU path rounds the code to a 16-bit dtype first).

    `out_dtype` (default `dtype`) is the dtype the values are returned in: `dtype=bfloat16,
    out_dtype=float32` gives bf16-rounded values in an fp32 tensor (a 16-bit weight multiplied in
    fp32) with one fp32 buffer, no second fp32 copy. Memory: one fp32 tensor of the weight's size
    (the result itself when it is fp32) plus an int32 copy of the bytes.
    """
    check_quant_type(quant_type)
    check_blocksize(blocksize)
    out_dtype = dtype if out_dtype is None else out_dtype
    n = torch.Size(shape).numel()
    flat = packed.reshape(-1)  # ceil(n / 2) bytes
    blocks = absmax.numel()
    if flat.numel() != (n + 1) // 2 or blocks != -(-n // blocksize):
        raise ValueError(f"{flat.numel()} bytes and {blocks} absmax do not hold a {tuple(shape)} weight "
                         f"in blocks of {blocksize}")
    values = torch.empty(blocks * blocksize, dtype=torch.float32, device=packed.device)  # whole blocks
    pairs = 2 * flat.numel()
    torch.index_select(_byte_pairs(quant_type, packed.device), 0, flat.int(), out=values[:pairs].view(torch.int64))
    values[pairs:].zero_()  # the last block's padding (sliced off below)
    values.view(blocks, blocksize).mul_(absmax.float()[:, None])
    w = values[:n].view(shape)
    if dtype == torch.float32 or dtype == out_dtype:
        return w.to(out_dtype)
    if out_dtype == torch.float32:
        return w.copy_(w.to(dtype))  # round to dtype, keep the fp32 buffer
    return w.to(dtype).to(out_dtype)


def quantize_absmax(absmax: Tensor, blocksize: int = ABSMAX_BLOCKSIZE) -> tuple[Tensor, Tensor, Tensor]:
    """Double quantization: (uint8 indices into `dynamic_map()` (blocks,), the nested absmax fp32
    (ceil(blocks / blocksize),), the offset: the absmax' mean, an fp32 scalar)."""
    absmax = absmax.float()
    offset = absmax.mean()
    scaled, nested = _scaled(absmax - offset, blocksize)
    return _nearest(scaled, dynamic_map()), nested, offset


def dequantize_absmax(indices: Tensor, nested: Tensor, offset: Tensor, blocksize: int = ABSMAX_BLOCKSIZE,
                      values: Tensor | None = None) -> Tensor:
    """The fp32 absmax back: values[index] * nested absmax + offset. `values` defaults to
    `dynamic_map()`; a file's own quant map can be passed instead (bitsandbytes' CPU kernel
    writes -1 in place of the map's first value, -0.99297)."""
    values = (dynamic_map() if values is None else values).to(indices.device, torch.float32)
    n = indices.numel()
    decoded = torch.zeros(nested.numel() * blocksize, dtype=torch.float32, device=indices.device)  # whole blocks
    torch.index_select(values, 0, indices.reshape(-1).int(), out=decoded[:n])
    decoded.view(-1, blocksize).mul_(nested.float()[:, None])
    return decoded[:n].add_(offset.float())
