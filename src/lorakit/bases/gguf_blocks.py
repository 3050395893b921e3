"""GGUF tensor blocks to float32, in torch: the layouts a packed GGUF base de-quantizes.

A GGUF tensor is a run of fixed-size blocks, each holding `block` values in `nbytes` bytes (a
16-bit scale or two, then packed integers). A row's length is a multiple of the block size, so
every row is whole blocks and any range of rows can be de-quantized on its own: a base expands a
few rows at a time instead of the whole weight.

Every decoder works on all blocks at once, (n_blocks, nbytes) uint8 -> (n_blocks, block) float32,
and does its float arithmetic in the order llama.cpp does (`d * sc` first, then `* q`, then
`- m`), so the result equals llama.cpp's and gguf-py's bit for bit (tests/bases/
test_bases_gguf_blocks.py). Bytes are read little-endian (GGUF's order, and the host's that torch
runs on). `shape` is torch's order, (..., row length): (out, in) for a linear weight, the reverse
of the `ne` that GGUF files list.
"""

from __future__ import annotations

import contextlib
import functools
import math
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

QK_K = 256  # values in a K-quant super-block


@dataclass(frozen=True)
class Layout:
    """One GGML type: `block` values stored in `nbytes` bytes, decoded by `decode`."""

    name: str
    block: int
    nbytes: int
    decode: Callable[[Tensor], Tensor]  # (n_blocks, nbytes) uint8 -> (n_blocks, block) float32


# -- reading bytes --------------------------------------------------------------------------------
def _as(data: Tensor, dtype: torch.dtype) -> Tensor:
    """Bytes (..., k) reinterpreted as `dtype` (..., k / size); copied first when misaligned."""
    data = data.contiguous()
    if data.storage_offset() % dtype.itemsize:
        data = data.clone()
    return data.view(dtype)


def _f16(data: Tensor) -> Tensor:
    """(n, 2) bytes of an fp16 scale -> (n, 1) float32."""
    return _as(data, torch.float16).float()


def _shifted(data: Tensor, shifts: Sequence[int], mask: int) -> Tensor:
    """(n, g, k) bytes -> (n, g, len(shifts), k): (byte >> shift) & mask for each shift."""
    by = torch.tensor(shifts, dtype=torch.uint8, device=data.device).view(1, 1, -1, 1)
    return (data.unsqueeze(2) >> by) & mask


def _nibbles(qs: Tensor) -> Tensor:
    """(n, g, k) bytes -> (n, g, 2, k): all low nibbles, then all high ones (the ggml order)."""
    return _shifted(qs, (0, 4), 0x0F)


def _bits(data: Tensor) -> Tensor:
    """(n, k) bytes -> (n, 8, k): plane i holds bit i of every byte."""
    return _shifted(data.unsqueeze(1), range(8), 1).squeeze(1)


def _split(blocks: Tensor, *sizes: int) -> tuple[Tensor, ...]:
    return torch.split(blocks, list(sizes), dim=1)


# -- plain floats ---------------------------------------------------------------------------------
def _f32(blocks: Tensor) -> Tensor:
    return _as(blocks, torch.float32)


def _f16_values(blocks: Tensor) -> Tensor:
    return _as(blocks, torch.float16).float()


def _bf16(blocks: Tensor) -> Tensor:
    return _as(blocks, torch.bfloat16).float()


# -- 32-value blocks: scale d (fp16), optional minimum m (fp16), packed q ---------------------
# These are the types most files hold, so each decoder is a handful of whole-layer operations,
# the float ones in place: the bytes are viewed as fp16 for the scales (every layout here has an
# even size, so a block's first bytes are aligned fp16 values), the nibbles are split straight
# into the output's byte layout, and one conversion gives the floats that `mul_`/`add_` finish.
def _scales(blocks: Tensor, count: int) -> list[Tensor]:
    """The first `count` fp16 values of every block, (n, 1) float32 each."""
    halves = _as(blocks, torch.float16)  # (n, nbytes / 2)
    return [halves[:, i:i + 1].float() for i in range(count)]


def _q4(qs: Tensor) -> Tensor:
    """(n, 16) bytes -> (n, 32) 4-bit values (uint8): value j is byte j's low nibble, value j + 16
    its high one.

    The nibbles are split four bytes at a time (two where the blocks align only so): a mask and a
    shift of little-endian words act on every byte of the word alike, so the bytes come out the
    same from a quarter (a half) of the elements."""
    q = torch.empty(qs.shape[0], 2, 16, dtype=torch.uint8, device=qs.device)
    words = _words(qs)
    if words is None:
        torch.bitwise_and(qs, 0x0F, out=q[:, 0])
        torch.bitwise_right_shift(qs, 4, out=q[:, 1])
        return q.view(qs.shape[0], 32)
    mask = _NIBBLE_MASKS[words.dtype]
    out = q.view(words.dtype)  # (n, 2, 16 / size)
    torch.bitwise_and(words, mask, out=out[:, 0])
    torch.bitwise_right_shift(words, 4, out=out[:, 1])
    out[:, 1].bitwise_and_(mask)  # drop the next byte's low bits (and an arithmetic shift's sign)
    return q.view(qs.shape[0], 32)


_NIBBLE_MASKS = {torch.int32: 0x0F0F0F0F, torch.int16: 0x0F0F}


def _words(data: Tensor) -> Tensor | None:
    """`data` (n, k) bytes viewed as int32 or int16 words without a copy where its layout allows
    (little-endian machines only), else None."""
    if sys.byteorder != "little" or data.stride(-1) != 1:
        return None
    for dtype in _NIBBLE_MASKS:
        size = dtype.itemsize
        if data.shape[-1] % size == 0 and data.storage_offset() % size == 0 and all(
                stride % size == 0 for stride in data.stride()[:-1]):
            return data.view(dtype)
    return None


def _q5(qh: Tensor, qs: Tensor) -> Tensor:
    """4 bytes of fifth bits (bit j for value j, little-endian) over 16 bytes of nibbles."""
    high = _bits(qh).transpose(1, 2).reshape(qh.shape[0], 32)  # (n, 32): byte j // 8, bit j % 8
    return _q4(qs) | (high << 4)


def _q8_0(blocks: Tensor) -> Tensor:
    (d,) = _scales(blocks, 1)
    return blocks[:, 2:].view(torch.int8).float().mul_(d)


def _q4_0(blocks: Tensor) -> Tensor:
    (d,) = _scales(blocks, 1)
    return _q4(blocks[:, 2:]).view(torch.int8).sub_(8).float().mul_(d)


def _q4_1(blocks: Tensor) -> Tensor:
    d, m = _scales(blocks, 2)
    return _q4(blocks[:, 4:]).float().mul_(d).add_(m)  # d * q, then + m: llama.cpp's order


def _q5_0(blocks: Tensor) -> Tensor:
    (d,) = _scales(blocks, 1)
    return _q5(blocks[:, 2:6], blocks[:, 6:]).view(torch.int8).sub_(16).float().mul_(d)


def _q5_1(blocks: Tensor) -> Tensor:
    d, m = _scales(blocks, 2)
    return _q5(blocks[:, 4:8], blocks[:, 8:]).float().mul_(d).add_(m)


# -- K-quants: 256-value super-blocks of 16 or 8 sub-blocks, each with its own scale ------------
def _scales_k4(packed: Tensor) -> tuple[Tensor, Tensor]:
    """Q4_K/Q5_K's 12 bytes -> 8 six-bit scales and 8 six-bit minima (n, 8) each.

    Bytes 0-3 hold scales 0-3 (low 6 bits), bytes 4-7 minima 0-3; scales and minima 4-7 take their
    low 4 bits from bytes 8-11 (low, high nibble) and their top 2 bits from the top of bytes 0-7.
    """
    a, b, c = packed[:, 0:4], packed[:, 4:8], packed[:, 8:12]
    scales = torch.cat([a & 63, (c & 0x0F) | ((a >> 6) << 4)], dim=1)
    mins = torch.cat([b & 63, (c >> 4) | ((b >> 6) << 4)], dim=1)
    return scales, mins


def _sub_blocks_k4(blocks: Tensor, q: Tensor, d: Tensor, dmin: Tensor, packed: Tensor) -> Tensor:
    """(d * scale) * q - (dmin * min) over 8 sub-blocks of 32; q (n, 8, 32)."""
    scales, mins = _scales_k4(packed)
    step = (_f16(d) * scales.float()).unsqueeze(2)  # (n, 8, 1)
    low = (_f16(dmin) * mins.float()).unsqueeze(2)
    return (step * q.float() - low).reshape(blocks.shape[0], QK_K)


def _q4_k(blocks: Tensor) -> Tensor:
    d, dmin, packed, qs = _split(blocks, 2, 2, 12, 128)
    q = _nibbles(qs.reshape(-1, 4, 32)).reshape(-1, 8, 32)  # 64 values per 32 bytes: low, high
    return _sub_blocks_k4(blocks, q, d, dmin, packed)


def _q5_k(blocks: Tensor) -> Tensor:
    d, dmin, packed, qh, qs = _split(blocks, 2, 2, 12, 32, 128)
    low = _nibbles(qs.reshape(-1, 4, 32)).reshape(-1, 8, 32)
    q = low | (_bits(qh) << 4)  # sub-block i's fifth bits: bit i of the 32 qh bytes
    return _sub_blocks_k4(blocks, q, d, dmin, packed)


def _q6_k(blocks: Tensor) -> Tensor:
    ql, qh, scales, d = _split(blocks, 128, 64, 16, 2)
    n = blocks.shape[0]
    # each half of 128 values: 64 bytes of low nibbles (4 runs of 32), 32 bytes of 2-bit tops
    low = _nibbles(ql.reshape(n, 2, 64)).reshape(n, 2, 4, 32)
    high = _shifted(qh.reshape(n, 2, 32), (0, 2, 4, 6), 0x03)  # (n, 2, 4, 32)
    q = ((low | (high << 4)).to(torch.int8) - 32).reshape(n, 16, 16)
    step = (_f16(d) * _as(scales, torch.int8).float()).unsqueeze(2)  # (n, 16, 1)
    return (step * q.float()).reshape(n, QK_K)


def _q2_k(blocks: Tensor) -> Tensor:
    scales, qs, d, dmin = _split(blocks, 16, 64, 2, 2)
    n = blocks.shape[0]
    q = _shifted(qs.reshape(n, 2, 32), (0, 2, 4, 6), 0x03).reshape(n, 16, 16)
    step = (_f16(d) * (scales & 0x0F).float()).unsqueeze(2)  # (n, 16, 1)
    low = (_f16(dmin) * (scales >> 4).float()).unsqueeze(2)
    return (step * q.float() - low).reshape(n, QK_K)


def _scales_q3_k(packed: Tensor) -> Tensor:
    """Q3_K's 12 bytes -> 16 signed six-bit scales: low 4 bits from bytes 0-7 (low nibbles, then
    high ones), top 2 bits from bytes 8-11 (scale 4 k + j: bits 2 k.. of byte j)."""
    low = _nibbles(packed[:, None, 0:8]).reshape(-1, 16)
    top = _shifted(packed[:, None, 8:12], (0, 2, 4, 6), 0x03).reshape(-1, 16)
    return ((low | (top << 4)).to(torch.int8) - 32).float()


def _q3_k(blocks: Tensor) -> Tensor:
    hmask, qs, packed, d = _split(blocks, 32, 64, 12, 2)
    n = blocks.shape[0]
    low = _shifted(qs.reshape(n, 2, 32), (0, 2, 4, 6), 0x03).reshape(n, 16, 16)
    high = _bits(hmask).reshape(n, 16, 16)  # a set bit means no offset; a clear one, -4
    q = (low.to(torch.int8) - ((high ^ 1) << 2).to(torch.int8)).float()
    step = (_f16(d) * _scales_q3_k(packed)).unsqueeze(2)  # (n, 16, 1)
    return (step * q).reshape(n, QK_K)


# GGML type id -> layout (ids from ggml.h, as gguf.GGMLQuantizationType numbers them)
LAYOUTS: dict[int, Layout] = {
    0: Layout("F32", 1, 4, _f32),
    1: Layout("F16", 1, 2, _f16_values),
    30: Layout("BF16", 1, 2, _bf16),
    8: Layout("Q8_0", 32, 34, _q8_0),
    2: Layout("Q4_0", 32, 18, _q4_0),
    3: Layout("Q4_1", 32, 20, _q4_1),
    6: Layout("Q5_0", 32, 22, _q5_0),
    7: Layout("Q5_1", 32, 24, _q5_1),
    10: Layout("Q2_K", QK_K, 84, _q2_k),
    11: Layout("Q3_K", QK_K, 110, _q3_k),
    12: Layout("Q4_K", QK_K, 144, _q4_k),
    13: Layout("Q5_K", QK_K, 176, _q5_k),
    14: Layout("Q6_K", QK_K, 210, _q6_k),
}


def _type_name(qtype: int) -> str:
    name = getattr(qtype, "name", None)
    if name is None:
        try:
            from gguf import GGMLQuantizationType

            name = GGMLQuantizationType(qtype).name
        except (ImportError, ValueError):
            name = f"type {int(qtype)}"
    return name


def layout(qtype: int, name: str | None = None) -> Layout:
    """The layout of GGML type `qtype` (a gguf.GGMLQuantizationType or its number); a ValueError
    naming the tensor and the type where lorakit has none."""
    found = LAYOUTS.get(int(qtype))
    if found is None:
        what = f"GGUF tensor {name!r}" if name else "a GGUF tensor"
        kinds = ", ".join(lay.name for lay in LAYOUTS.values())
        raise ValueError(
            f"{what} is stored as {_type_name(qtype)}, which a packed GGUF base cannot read (it reads {kinds}); "
            "load the file through the dense conversion instead (lorakit.load_model on the .gguf path)"
        )
    return found


def row_bytes(qtype: int, row_len: int, name: str | None = None) -> int:
    """Bytes in one row of `row_len` values; a ValueError when it is not whole blocks."""
    lay = layout(qtype, name)
    if row_len % lay.block:
        raise ValueError(f"a {lay.name} row of {row_len} values is not a whole number of {lay.block}-value blocks")
    return row_len // lay.block * lay.nbytes


def dequantize_rows(raw: Tensor, qtype: int, shape: Sequence[int], start: int, stop: int,
                    name: str | None = None) -> Tensor:
    """Rows [start, stop) of the tensor whose blocks are `raw` (uint8, any shape), as float32
    (stop - start, row length). Only those rows' bytes are read."""
    lay, row_len = layout(qtype, name), int(shape[-1])
    per_row = row_bytes(qtype, row_len, name)
    rows = math.prod(int(s) for s in shape[:-1])
    flat = raw.reshape(-1)
    if flat.dtype != torch.uint8 or flat.numel() != rows * per_row:
        raise ValueError(
            f"{name or 'a GGUF tensor'}: expected {rows * per_row} uint8 bytes of {lay.name} blocks for shape "
            f"{tuple(shape)}, got {flat.numel()} {flat.dtype}"
        )
    if not 0 <= start <= stop <= rows:
        raise ValueError(f"rows [{start}, {stop}) lie outside the {rows} rows of {name or 'a GGUF tensor'}")
    blocks = flat[start * per_row:stop * per_row].reshape(-1, lay.nbytes)  # (n_blocks, nbytes)
    with serial(blocks.device):
        return lay.decode(blocks).reshape(stop - start, row_len)


@contextlib.contextmanager
def serial(device: torch.device) -> Iterator[None]:
    """Run the enclosed CPU operations on this thread alone (torch's thread count is per thread).

    A decoder is a few element-wise passes over one layer, each worth a fraction of a millisecond
    on one core; run in parallel, each pass ends at a barrier of the thread pool, and on a machine
    whose cores are busy with other work a barrier waits for a descheduled thread: a time slice,
    milliseconds, per pass (a 1536 x 576 Q4_1 layer of SmolLM2 took 8-180 ms on 2 busy cores, 3-4 ms on
    one). The matrix products around it keep every thread.
    """
    threads = torch.get_num_threads()
    if device.type != "cpu" or threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def dequantize(raw: Tensor, qtype: int, shape: Sequence[int], name: str | None = None) -> Tensor:
    """The whole tensor whose blocks are `raw` (uint8), as float32 of `shape`."""
    rows = math.prod(int(s) for s in shape[:-1])
    return dequantize_rows(raw, qtype, shape, 0, rows, name).reshape(tuple(int(s) for s in shape))


# -- writing blocks -------------------------------------------------------------------------------
@functools.cache
def quantizable(qtype: int) -> bool:
    """Whether gguf-py can write blocks of GGML type `qtype` (it cannot quantize the K-quants)."""
    import gguf
    import numpy as np

    try:
        gguf.quants.quantize(np.zeros((1, layout(qtype).block), np.float32), int(qtype))
    except (NotImplementedError, ValueError):
        return False
    return True


def quantize(values: Tensor, qtype: int, name: str | None = None) -> Tensor:
    """`values` (..., row length) rounded into GGML type `qtype` by gguf-py's quantizers (llama.cpp's
    reference rounding), as flat uint8 blocks that `dequantize` reads back; a ValueError naming the
    tensor where gguf-py cannot write the type."""
    import gguf
    import numpy as np

    row_bytes(qtype, int(values.shape[-1]), name)  # refuses unknown types and partial blocks
    if not quantizable(qtype):
        raise ValueError(f"{name or 'a GGUF tensor'}: gguf-py cannot quantize {layout(qtype).name} blocks "
                         "(K-quants are written by llama.cpp's llama-quantize)")
    data = gguf.quants.quantize(values.detach().float().cpu().contiguous().numpy(), int(qtype))
    return torch.from_numpy(np.ascontiguousarray(data).view(np.uint8).reshape(-1).copy())
