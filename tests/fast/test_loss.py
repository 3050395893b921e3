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


@pytest.mark.parametrize("make, targets", [(tiny_llama, "all-linear"), (tiny_gpt2, ["c_attn"])])
def test_plain_api_training_call_takes_the_fused_loss(make, targets, monkeypatch):
    """`model(input_ids, labels=...)` in training: transformers' loss and gradients, without logits."""
    import lorakit.fast.loss as loss_module

    calls = []
    real = loss_module.linear_cross_entropy
    monkeypatch.setattr(loss_module, "linear_cross_entropy", lambda *a, **k: calls.append(1) or real(*a, **k))
    torch.manual_seed(0)
    model = get_peft_model(make(), LoraConfig(r=4, target_modules=targets, init_lora_weights=False, lora_dropout=0.0))
    model.train()
    if make is tiny_gpt2:
        model.base_model.model.config.resid_pdrop = 0  # no dropout: both calls see the same network
        for m in model.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0
    ids = torch.randint(0, 100, (2, 8), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[0, :3] = -100
    params = [p for p in model.parameters() if p.requires_grad]
    out = model(ids, labels=labels)
    assert out.logits is None and calls == [1]
    fused = torch.autograd.grad(out.loss, params)
    model.fused_loss = False
    plain_out = model(ids, labels=labels)
    assert plain_out.logits is not None and calls == [1]
    torch.testing.assert_close(out.loss, plain_out.loss, rtol=1e-5, atol=1e-6)
    for a, b in zip(fused, torch.autograd.grad(plain_out.loss, params)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    model.fused_loss = True
    # Trainer's gradient accumulation divides by the items of the whole step
    torch.testing.assert_close(model(input_ids=ids, labels=labels, num_items_in_batch=torch.tensor(100)).loss,
                               plain_out.loss * (labels[:, 1:] != -100).sum() / 100, rtol=1e-5, atol=1e-6)
    # other arguments, evaluation or no labels: transformers' own forward, logits and all
    assert model(input_ids=ids, labels=labels, output_hidden_states=True).logits is not None
    model.eval()
    assert model(input_ids=ids, labels=labels).logits is not None
    assert len(calls) == 2
