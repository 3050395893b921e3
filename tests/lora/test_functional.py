"""The pure math, against dense references and small integer matrices."""

import math

import torch

from lorakit.lora import functional as LF


def test_scaling():
    assert LF.lora_scaling(32, 16) == 2.0
    assert LF.lora_scaling(16, 16) == 1.0
    assert LF.lora_scaling(8, 16) == 0.5
    assert LF.lora_scaling(32, 16, use_rslora=True) == 8.0


def test_delta_weight_small_integers():
    A = torch.tensor([[1.0, 2.0, 0.0]])  # (r=1, in=3)
    B = torch.tensor([[1.0], [3.0]])  # (out=2, r=1)
    expected = torch.tensor([[2.0, 4.0, 0.0], [6.0, 12.0, 0.0]])  # 2 * B @ A
    assert torch.equal(LF.delta_weight(A, B, 2.0), expected)
    assert torch.equal(LF.delta_weight(A, B, 2.0, fan_in_fan_out=True), expected.T)


def test_layer_output_matches_dense_weight():
    torch.manual_seed(0)
    W, A, B, x = torch.randn(5, 4), torch.randn(3, 4), torch.randn(5, 3), torch.randn(2, 4)
    dense = x @ (W + LF.delta_weight(A, B, 0.5)).T
    lora = x @ W.T + 0.5 * (x @ A.T) @ B.T
    torch.testing.assert_close(lora, dense)
    torch.testing.assert_close(LF.unmerge(LF.merge(W, LF.delta_weight(A, B, 0.5)), LF.delta_weight(A, B, 0.5)), W)


def test_dora_merge_and_unmerge():
    torch.manual_seed(0)
    W, delta = torch.randn(5, 4), torch.randn(5, 4) * 0.1
    magnitude = torch.rand(5) + 0.5
    merged, norm = LF.dora_merge(W, delta, magnitude)
    # each output row has the magnitude as its norm and the direction of W + delta
    torch.testing.assert_close(torch.linalg.vector_norm(merged, dim=1), magnitude)
    direction = (W + delta) / torch.linalg.vector_norm(W + delta, dim=1, keepdim=True)
    torch.testing.assert_close(merged / magnitude.unsqueeze(1), direction)
    torch.testing.assert_close(LF.dora_unmerge(merged, delta, magnitude, norm), W)


def test_combine_cat_is_exact_weighted_sum():
    torch.manual_seed(0)
    As = [torch.randn(2, 6), torch.randn(3, 6)]
    Bs = [torch.randn(4, 2), torch.randn(4, 3)]
    weights, scalings = [0.7, -1.5], [2.0, 0.5]
    A, B = LF.combine_cat(As, Bs, weights, scalings)
    dense = sum(w * s * b @ a for a, b, w, s in zip(As, Bs, weights, scalings))
    torch.testing.assert_close(B @ A, dense)
    assert A.shape == (5, 6)


def test_combine_linear_follows_sqrt_weights():
    A1, B1 = torch.ones(1, 2), torch.ones(2, 1)
    A2, B2 = 2 * torch.ones(1, 2), 3 * torch.ones(2, 1)
    A, B = LF.combine_linear([A1, A2], [B1, B2], [4.0, 1.0], [1.0, -1.0])
    # A = sqrt(4)*A1 - sqrt(1)*A2 = 0 ; B = 2*B1 + 1*B2 = 5
    assert torch.equal(A, torch.zeros(1, 2)) and torch.equal(B, 5 * torch.ones(2, 1))
    assert math.isclose(float(B[0, 0]), 5.0)


def test_combine_svd_recovers_low_rank_sum():
    torch.manual_seed(0)
    deltas = [torch.randn(6, 1) @ torch.randn(1, 5), torch.randn(6, 1) @ torch.randn(1, 5)]
    A, B = LF.combine_svd(deltas, [1.0, 0.5], rank=2)
    torch.testing.assert_close(B @ A, deltas[0] + 0.5 * deltas[1], rtol=1e-4, atol=1e-5)
    A1, B1 = LF.combine_svd(deltas, [1.0, 0.5], rank=1)
    assert torch.linalg.matrix_rank(B1 @ A1) == 1
