"""The fused head + loss: the plain cross-entropy's values and gradients, the head on labelled rows only."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lorakit import LoraConfig, get_peft_model
from lorakit.fast.loss import linear_cross_entropy
from tinymodels import tiny_gpt2, tiny_llama


@pytest.mark.parametrize("chunk", [3, 64])
@pytest.mark.parametrize("head_grad", [False, True])
def test_linear_cross_entropy_matches_plain(chunk, head_grad):
    torch.manual_seed(0)
    h = torch.randn(10, 8, dtype=torch.float64, requires_grad=True)
    W = torch.randn(13, 8, dtype=torch.float64, requires_grad=head_grad)
    y = torch.randint(0, 13, (10,))
    y[[1, 4]] = -100
    fast = linear_cross_entropy(h, W, y, chunk=chunk)
    plain = F.cross_entropy(h @ W.T, y, ignore_index=-100, reduction="sum")
    torch.testing.assert_close(fast, plain.float())
    inputs = [h, W] if head_grad else [h]
    for a, b in zip(torch.autograd.grad(fast * 0.3, inputs), torch.autograd.grad(plain * 0.3, inputs)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_linear_cross_entropy_large_logits_and_an_all_ignored_chunk():
    # logits in the hundreds overflow a naive exp; a chunk with every label ignored adds nothing
    torch.manual_seed(0)
    h = (torch.randn(12, 8) * 30).requires_grad_(True)
    W = torch.randn(50, 8)
    y = torch.randint(0, 50, (12,))
    y[4:8] = -100
    fast = linear_cross_entropy(h, W, y, chunk=4)
    plain = F.cross_entropy(h @ W.T, y, ignore_index=-100, reduction="sum")
    assert torch.isfinite(fast)
    torch.testing.assert_close(fast, plain, rtol=1e-5, atol=1e-3)
    fast_grad, = torch.autograd.grad(fast, h)
    plain_grad, = torch.autograd.grad(plain, h)
    torch.testing.assert_close(fast_grad, plain_grad, rtol=1e-5, atol=1e-4)
    assert fast_grad[4:8].abs().sum() == 0


def test_linear_cross_entropy_runs_the_head_on_labelled_positions_only(monkeypatch):
    import lorakit.fast.loss as kernels

    rows = []
    real = kernels._LinearCrossEntropy.apply
    monkeypatch.setattr(kernels._LinearCrossEntropy, "apply", lambda h, *rest: rows.append(len(h)) or real(h, *rest))
    torch.manual_seed(0)
    h = torch.randn(2, 6, 8, requires_grad=True)
    W = torch.randn(20, 8)
    y = torch.randint(0, 20, (2, 6))
    y[0, :4] = -100  # a prompt
    y[1, 5] = -100  # padding
    fast = linear_cross_entropy(h, W, y, chunk=4)
    plain = F.cross_entropy((h @ W.T).reshape(-1, 20), y.reshape(-1), ignore_index=-100, reduction="sum")
    torch.testing.assert_close(fast, plain)
    torch.testing.assert_close(torch.autograd.grad(fast, h)[0], torch.autograd.grad(plain, h)[0])
    assert rows == [7]
    nothing = linear_cross_entropy(h, W, torch.full_like(y, -100))
    assert nothing.item() == 0 and torch.autograd.grad(nothing, h)[0].abs().sum() == 0


@pytest.mark.parametrize("make, targets", [(tiny_llama, ["q_proj", "down_proj"]), (tiny_gpt2, ["c_attn"])])
def test_causal_lm_loss_matches_transformers(make, targets):
    from lorakit.fast.loss import causal_lm_loss

    torch.manual_seed(0)
    model = get_peft_model(make(), LoraConfig(r=4, target_modules=targets, init_lora_weights=False)).eval()  # no GPT-2 dropout
    ids = torch.randint(0, 100, (3, 8), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[0, :3] = -100
    mask = torch.ones_like(ids)
    mask[2, 6:] = 0
    labels[2, 6:] = -100
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    total, n = causal_lm_loss(model, batch)
    reference = model(**batch).loss  # transformers' mean over target tokens
    assert n == int((labels[:, 1:] != -100).sum())
    torch.testing.assert_close(total / n, reference, rtol=1e-5, atol=1e-6)
    params = [p for p in model.parameters() if p.requires_grad]
    fused = torch.autograd.grad(total / n, params)
    plain = torch.autograd.grad(model(**batch).loss, params)
    for a, b in zip(fused, plain):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
