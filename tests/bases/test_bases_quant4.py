"""bases.quant4 against bitsandbytes (the oracle, CPU) and small hand-made blocks."""

from __future__ import annotations

import pytest
import torch

from lorakit.bases import quant4 as Q

BF = pytest.importorskip("bitsandbytes.functional")
pytestmark = pytest.mark.filterwarnings("ignore:_check_is_size:FutureWarning")

SHAPES = [(64, 128), (32, 96), (3, 50), (17, 96)]  # 150 and 1632 elements: a partial last block


def bnb_quantize(w: torch.Tensor, quant_type: str, blocksize: int, double_quant: bool = False):
    return BF.quantize_4bit(w, quant_type=quant_type, blocksize=blocksize, compress_statistics=double_quant)


def whole_blocks(shape, blocksize: int) -> bool:
    return torch.Size(shape).numel() % blocksize == 0


# -- the codes --------------------------------------------------------------------------------
def test_codes_are_bitsandbytes():
    assert torch.equal(Q.code("nf4"), BF.get_4bit_type("nf4", device="cpu"))
    assert torch.equal(Q.code("fp4"), BF.get_4bit_type("fp4", device="cpu"))
    assert torch.equal(Q.dynamic_map(), BF.create_dynamic_map(signed=True))


def test_fp4_reads_sign_exponent_mantissa():
    # index 0b0110 = +2 / 12, 0b1011 = -12 / 12
    assert Q.code("fp4")[0b0110].item() == pytest.approx(2 / 12)
    assert Q.code("fp4")[0b1011].item() == -1.0


def test_bad_blocksize_and_quant_type_name_the_value():
    with pytest.raises(ValueError, match=r"^blocksize 32 is not one bitsandbytes allows \(64, 128, .*4096\)$"):
        Q.quantize_4bit(torch.randn(64), blocksize=32)
    with pytest.raises(ValueError, match="^quant_type 'int4' is not 'nf4' or 'fp4'$"):
        Q.quantize_4bit(torch.randn(64), quant_type="int4")


# -- hand-made blocks -------------------------------------------------------------------------
def test_a_block_with_a_known_absmax():
    w = torch.zeros(64)
    w[:4] = torch.tensor([2.0, -2.0, 1.0, 0.0])  # absmax 2: scaled 1, -1, 0.5, 0
    packed, absmax = Q.quantize_4bit(w, "nf4", 64)
    assert absmax.tolist() == [2.0]
    # 1 -> index 15, -1 -> 0, 0.5 -> 12 (0.4407 is nearer than 0.5626), 0 -> 7; first element high
    assert packed.shape == (32, 1)
    assert packed[:2, 0].tolist() == [0xF0, 0xC7]
    assert packed[2:, 0].tolist() == [0x77] * 30
    back = Q.dequantize_4bit(packed, absmax, (64,), "nf4", 64)
    assert back[:4].tolist() == pytest.approx([2.0, -2.0, 2 * 0.44070982933044434, 0.0])


def test_ties_go_to_the_lower_code():
    nf4 = Q.code("nf4")
    # exact midpoints in fp32: between 0 (7) and 0.0796 (8), and between -0.0911 (6) and 0 (7)
    w = torch.zeros(64)
    w[:3] = torch.stack([torch.tensor(1.0), nf4[8] / 2, nf4[6] / 2])
    packed, _ = Q.quantize_4bit(w, "nf4", 64)
    assert packed[:2, 0].tolist() == [0xF7, 0x67]
    assert torch.equal(packed, bnb_quantize(w, "nf4", 64)[0])


def test_an_all_zero_block_is_code_zero_and_dequantizes_to_zero():
    # bitsandbytes scales 0 by 1/0 (NaN) and stores index 0; the value is 0 * absmax 0 either way
    w = torch.randn(2, 64)
    w[1] = 0
    packed, absmax = Q.quantize_4bit(w, "nf4", 64)
    assert absmax[1].item() == 0 and packed[32:, 0].tolist() == [0] * 32
    assert torch.equal(packed, bnb_quantize(w, "nf4", 64)[0])
    assert Q.dequantize_4bit(packed, absmax, (2, 64))[1].abs().sum().item() == 0


def test_odd_element_counts_pad_the_last_low_nibble():
    packed, absmax = Q.quantize_4bit(torch.tensor([1.0, -1.0, 1.0]), "nf4", 64)
    assert packed[:, 0].tolist() == [0xF0, 0xF0]
    assert Q.dequantize_4bit(packed, absmax, (3,)).tolist() == [1.0, -1.0, 1.0]


# -- against bitsandbytes ---------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("blocksize", [64, 128, 256])
def test_nf4_bytes_and_absmax_equal_bitsandbytes(dtype, shape, blocksize):
    torch.manual_seed(blocksize + len(shape))
    w = torch.randn(shape, dtype=dtype)
    packed, absmax = Q.quantize_4bit(w, "nf4", blocksize)
    # bitsandbytes' CPU path scales a partial last block of a 16-bit weight in 16 bits (a 0-dim fp32
    # absmax does not promote); every other block, and its CUDA kernel, scale in fp32, as on w.float()
    oracle = w if whole_blocks(shape, blocksize) or dtype == torch.float32 else w.float()
    ref, state = bnb_quantize(oracle, "nf4", blocksize)
    assert packed.dtype == torch.uint8 and packed.shape == ref.shape
    assert torch.equal(packed, ref)
    assert torch.equal(absmax, state.absmax)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
def test_dequantize_equals_bitsandbytes(dtype, shape):
    torch.manual_seed(1)
    w = torch.randn(shape, dtype=dtype)
    packed, absmax = Q.quantize_4bit(w, "nf4", 64)
    ref, state = bnb_quantize(w.float(), "nf4", 64)
    exact = BF.dequantize_4bit(ref, state)  # fp32
    mine = Q.dequantize_4bit(packed, absmax, shape, "nf4", 64, dtype)
    assert mine.dtype == dtype and mine.shape == shape
    # code * absmax in fp32, rounded once (bitsandbytes' CUDA kernel)
    assert torch.equal(mine, exact.to(dtype))
    if dtype != torch.float32:  # its CPU path rounds the code to bf16 first: within a bf16 step
        state.dtype = dtype
        torch.testing.assert_close(mine, BF.dequantize_4bit(ref, state), rtol=2**-7, atol=0)


@pytest.mark.parametrize("shape", SHAPES)
def test_fp4_dequantized_values_match_bitsandbytes(shape):
    # bitsandbytes' CPU kernels use the FP4 code rounded to 4 decimals (0.0052 for 1/192, 0.6667);
    # the exact code is get_4bit_type("fp4"), which its CUDA kernels use. So: the same values up to
    # that rounding, and different indices only for elements within the rounding of a midpoint.
    torch.manual_seed(2)
    w = torch.randn(shape)
    packed, absmax = Q.quantize_4bit(w, "fp4", 64)
    ref, state = bnb_quantize(w, "fp4", 64)
    assert torch.equal(absmax, state.absmax)
    mine = Q.dequantize_4bit(packed, absmax, shape, "fp4", 64)
    theirs = BF.dequantize_4bit(ref, state)
    same = Q.unpack(packed, w.numel()) == Q.unpack(ref, w.numel())
    scale = absmax.repeat_interleave(64)[: w.numel()]  # each element's block absmax
    close = (mine.reshape(-1) - theirs.reshape(-1)).abs() <= 1e-4 * scale
    assert bool(close[same].all()) and same.float().mean() > 0.99
    code = Q.code("fp4").unique()
    mids = (code[1:] + code[:-1]) / 2
    scaled = (w.reshape(-1) / scale)[~same]
    assert ((scaled.abs()[:, None] - mids.abs()).abs().amin(dim=1) < 1e-3).all()


@pytest.mark.parametrize("shape", [(64, 512), (300, 200), (17, 96)])
def test_double_quant_absmax_within_one_code_of_bitsandbytes(shape):
    torch.manual_seed(3)
    w = torch.randn(shape)
    packed, absmax = Q.quantize_4bit(w, "nf4", 64)
    codes, nested, offset = Q.quantize_absmax(absmax)
    ref, state = bnb_quantize(w, "nf4", 64, double_quant=True)
    assert torch.equal(packed, ref)
    assert offset.item() == state.offset.item()
    assert torch.equal(nested, state.state2.absmax)
    assert codes.dtype == torch.uint8 and codes.shape == state.absmax.shape
    assert (codes.int() - state.absmax.int()).abs().max() <= 1
    theirs = BF.dequantize_blockwise(state.absmax, state.state2) + state.offset
    mine = Q.dequantize_absmax(codes, nested, offset)
    step = Q.dynamic_map().diff().max() * nested.repeat_interleave(256)[: mine.numel()]
    assert ((mine - theirs).abs() <= step).all()
    assert torch.equal(Q.dequantize_4bit(packed, theirs, shape), BF.dequantize_4bit(ref, state))


def test_double_quant_by_hand():
    # mean 2, deviations -1, 0, +1, +0.5 in one block of 256: nested absmax 1
    absmax = torch.tensor([1.0, 2.0, 3.0, 2.5, 1.5])
    codes, nested, offset = Q.quantize_absmax(absmax)
    assert offset.item() == 2.0 and nested.tolist() == [1.0]
    dmap = Q.dynamic_map()
    assert dmap[codes.long()].tolist() == pytest.approx([dmap[0].item(), 0.0, 1.0, 0.5, -0.5], abs=0.01)
    assert dmap[0].item() == pytest.approx(-0.99297, abs=1e-5)  # the map's lowest value is not -1
    back = Q.dequantize_absmax(codes, nested, offset)
    assert back.tolist() == pytest.approx(absmax.tolist(), abs=0.01)


# -- the de-quantizer's fast path against the obvious computation -----------------------------
def obvious_dequantize(packed, absmax, shape, quant_type, blocksize):
    """Nibble by nibble: code[index] times its block's absmax, fp32, as the format defines it."""
    n = torch.Size(shape).numel()
    flat = packed.reshape(-1).tolist()
    indices = torch.tensor([nibble for byte in flat for nibble in (byte >> 4, byte & 0xF)][:n])
    scale = absmax.float().repeat_interleave(blocksize)[:n]
    return (Q.code(quant_type)[indices] * scale).view(shape)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b) and torch.equal(a.signbit(), b.signbit())


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("shape,blocksize", [((17, 96), 64), ((3, 50), 64), ((1, 3), 64), ((5, 7), 128),
                                             ((40, 96), 256), ((2, 4097), 4096), ((8, 64), 64)])
def test_dequantize_is_the_nibble_by_nibble_product_bit_for_bit(quant_type, shape, blocksize):
    # random bytes (every code, in both nibbles), odd element counts and partial last blocks
    gen = torch.Generator().manual_seed(blocksize)
    n = torch.Size(shape).numel()
    packed = torch.randint(0, 256, ((n + 1) // 2, 1), dtype=torch.uint8, generator=gen)
    absmax = torch.rand(-(-n // blocksize), generator=gen) * 3
    absmax[0] = 0  # an all-zero block: -1 * 0 is -0.0, as the plain product gives
    reference = obvious_dequantize(packed, absmax, shape, quant_type, blocksize)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        mine = Q.dequantize_4bit(packed, absmax, shape, quant_type, blocksize, dtype)
        assert same_bits(mine, reference.to(dtype))
        for out_dtype in (torch.float32, torch.bfloat16, torch.float16):
            # rounded once to dtype, then expressed in out_dtype (a bf16 weight multiplied in fp32)
            into = Q.dequantize_4bit(packed, absmax, shape, quant_type, blocksize, dtype, out_dtype)
            assert same_bits(into, reference.to(dtype).to(out_dtype))


def test_dequantize_absmax_is_the_plain_product_plus_offset():
    gen = torch.Generator().manual_seed(5)
    for blocks in (1, 255, 256, 700):
        codes = torch.randint(0, 256, (blocks,), dtype=torch.uint8, generator=gen)
        nested = torch.rand(-(-blocks // 256), generator=gen)
        offset = torch.tensor(0.37)
        expected = Q.dynamic_map()[codes.long()] * nested.repeat_interleave(256)[:blocks] + offset
        assert torch.equal(Q.dequantize_absmax(codes, nested, offset), expected)


def test_dequantize_refuses_bytes_that_do_not_fit_the_shape():
    packed, absmax = Q.quantize_4bit(torch.randn(4, 64))
    with pytest.raises(ValueError, match=r"^128 bytes and 4 absmax do not hold a \(4, 65\) weight in blocks of 64$"):
        Q.dequantize_4bit(packed, absmax, (4, 65))
