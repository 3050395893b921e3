"""Autograd functions behind the fast path: a LoRA linear, a LoRA SwiGLU MLP, a chunked linear + cross-entropy.

Each computes exactly what the plain PyTorch expressions compute (tests compare gradients), but
saves less for backward and skips the full-size temporaries the plain expressions create:
- `lora_linear`: y = x W^T + b + s (x A^T) B^T with the scaling folded into `addmm`, saving only
  x and the small (tokens, r) product; the frozen W gets no gradient work.
- `lora_shared_input`: several LoRA linears reading one input (q, k, v) as one node: one
  A-gradient matmul for all, one input gradient accumulated in place.
- `lora_swiglu`: down(silu(gate(x)) * up(x)) with LoRA on all three projections, saving only the
  gate and up outputs (silu and the product are recomputed in backward, elementwise and cheap)
  and sharing one A-matmul between gate and up, which read the same input.
- `linear_cross_entropy`: the loss of a linear head without ever holding the (tokens, vocab)
  logits: chunk by chunk it computes the loss and, already in forward, the gradient for the
  hidden states, so backward is a multiplication. Positions without a label (prompt, padding)
  never reach the head.

The frozen weights' products (x W^T, g W, the head's) run at `lorakit.fast.precision`'s level, exact
fp32 unless a caller asks for less; the adapters' own products always run exact.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .precision import frozen_level, products


class _LoraLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, A: Tensor, B: Tensor, scaling: float,
                remake=None, source: Tensor | None = None) -> Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])  # (tokens, in)
        xa = x2.to(A.dtype) @ A.t()  # (tokens, r)
        ctx.level = frozen_level(weight)
        with products(ctx.level):
            out = x2 @ weight.t() if bias is None else torch.addmm(bias, x2, weight.t())
        out = out.addmm_(xa.to(out.dtype), B.t().to(out.dtype), alpha=scaling)
        ctx.save_for_backward(x2 if remake is None else source, xa, weight, A, B)  # see _kept_input
        ctx.remake = remake
        ctx.scaling = scaling
        ctx.shape = shape
        ctx.weight_needs_grad = weight.requires_grad
        ctx.bias_needs_grad = bias is not None and bias.requires_grad
        return out.reshape(*shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        kept, xa, weight, A, B = ctx.saved_tensors
        x2 = _kept_input(ctx, kept) if ctx.needs_input_grad[3] or ctx.weight_needs_grad else None
        s = ctx.scaling
        g = grad_out.reshape(-1, grad_out.shape[-1])  # (tokens, out)
        g_low = g.to(B.dtype)
        g_xa = (g_low @ B).mul_(s)  # (tokens, r)
        grad_A = g_xa.t() @ x2.to(A.dtype) if ctx.needs_input_grad[3] else None
        grad_B = _grad_B(g_low, xa, s) if ctx.needs_input_grad[4] else None
        grad_x = None
        if ctx.needs_input_grad[0]:
            with products(ctx.level):
                grad_x = g @ weight
            grad_x = grad_x.addmm_(g_xa.to(g.dtype), A.to(g.dtype)).reshape(ctx.shape)
        grad_w = g.t() @ x2 if ctx.weight_needs_grad else None
        grad_b = g.sum(0) if ctx.bias_needs_grad else None
        return grad_x, grad_w, grad_b, grad_A, grad_B, None, None, None


def _grad_B(grad_out: Tensor, xa: Tensor, scaling: float) -> Tensor:
    """B's gradient, scaling * grad_out^T (x A^T), as the transpose of (r, tokens) @ (tokens, out):
    on CPU that order runs about twice as fast as (out, tokens) @ (tokens, r)."""
    return (xa.t() @ grad_out).mul_(scaling).t()


def _kept_input(ctx, kept: Tensor) -> Tensor:
    """The (tokens, in) input: kept as is, or remade from what was kept instead (`remake(source)`:
    a norm's output from its input, which the norm keeps for its own backward anyway)."""
    x = kept if ctx.remake is None else ctx.remake(kept)
    return x.reshape(-1, x.shape[-1])


def lora_linear(x: Tensor, weight: Tensor, bias: Tensor | None, A: Tensor, B: Tensor, scaling: float,
                remake=None, source: Tensor | None = None) -> Tensor:
    """x W^T + b + scaling * (x A^T) B^T for W (out, in), A (r, in), B (out, r).

    With `remake` and `source` (x == remake(source)), backward keeps `source` instead of x.
    """
    if torch.is_grad_enabled() and (x.requires_grad or A.requires_grad or B.requires_grad):
        return _LoraLinear.apply(x, weight, bias, A, B, scaling, remake, source)
    # inference: as few kernel launches as possible (decoding is dominated by them)
    if x.dtype != A.dtype:
        out = F.linear(x, weight, bias)
        return out + (F.linear(F.linear(x.to(A.dtype), A), B) * scaling).to(out.dtype)
    out = F.linear(x, weight, bias)
    xa = F.linear(x, A)
    out.view(-1, out.shape[-1]).addmm_(xa.view(-1, xa.shape[-1]), B.t(), alpha=scaling)
    return out


LoraWeights = tuple[Tensor, Tensor, Tensor, float]  # (W (out, in), A (r, in), B (out, r), scaling)
LoraWeightsBias = tuple[Tensor, Tensor | None, Tensor, Tensor, float]  # (W, bias, A, B, scaling)


class _LoraShared(torch.autograd.Function):
    # Several LoRA linears reading one input (q, k and v) as one node. Forward computes each
    # exactly as `_LoraLinear` does (the same numbers as the layers apart, in training and in
    # inference); backward does one A-gradient matmul for all and accumulates the input
    # gradient in place.
    @staticmethod
    def forward(ctx, x: Tensor, remake, source: Tensor | None, *params) -> tuple[Tensor, ...]:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])  # (tokens, in)
        layers = [params[i : i + 5] for i in range(0, len(params), 5)]  # (W, bias, A, B, scaling) each
        ctx.level = frozen_level(*(layer[0] for layer in layers))
        outs, xas = [], []
        for W, bias, A, B, s in layers:
            xa = x2.to(A.dtype) @ A.t()  # (tokens, r)
            with products(ctx.level):
                out = x2 @ W.t() if bias is None else torch.addmm(bias, x2, W.t())
            outs.append(out.addmm_(xa.to(out.dtype), B.t().to(out.dtype), alpha=s).reshape(*shape[:-1], -1))
            xas.append(xa)
        weights = [t for W, _, A, B, _ in layers for t in (W, A, B)]
        ctx.save_for_backward(x2 if remake is None else source, *xas, *weights)
        ctx.remake, ctx.shape, ctx.n = remake, shape, len(layers)
        ctx.scalings = [layer[4] for layer in layers]
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grads: Tensor):
        kept, *rest = ctx.saved_tensors
        n = ctx.n
        xas, Ws, As, Bs = rest[:n], rest[n::3], rest[n + 1 :: 3], rest[n + 2 :: 3]
        lo = As[0].dtype
        wants = [ctx.needs_input_grad[3 + 5 * i : 3 + 5 * i + 5] for i in range(n)]  # per layer
        gs = [g.reshape(-1, g.shape[-1]) for g in grads]  # (tokens, out) each
        g_los = [g.to(lo) for g in gs]
        g_xa_all = torch.cat([(g @ B).mul_(s) for g, B, s in zip(g_los, Bs, ctx.scalings)], dim=1)  # (tokens, sum r)
        ranks = [A.shape[0] for A in As]
        grad_As: list[Tensor | None] = [None] * n
        if any(want[2] for want in wants):
            grad_As = list((g_xa_all.t() @ _kept_input(ctx, kept).to(lo)).split(ranks))
        grad_x = None
        if ctx.needs_input_grad[0]:
            with products(ctx.level):
                grad_x = gs[0] @ Ws[0]
                for g, W in zip(gs[1:], Ws[1:]):
                    grad_x.addmm_(g, W)
            a_all = torch.cat(As).to(grad_x.dtype)  # (sum r, in)
            grad_x = grad_x.addmm_(g_xa_all.to(grad_x.dtype), a_all).reshape(ctx.shape)
        out: list[Tensor | None] = [grad_x, None, None]
        for g, xa, grad_A, s, want in zip(g_los, xas, grad_As, ctx.scalings, wants):
            grad_B = _grad_B(g, xa, s) if want[3] else None
            out += [None, None, grad_A if want[2] else None, grad_B, None]
        return tuple(out)


def lora_shared_input(x: Tensor, layers: Sequence[LoraWeightsBias], remake=None,
                      source: Tensor | None = None) -> tuple[Tensor, ...]:
    """`lora_linear(x, W, bias, A, B, scaling)` for each of several layers reading the same x, in one
    autograd node (training only: base weights and biases frozen).

    With `remake` and `source` (x == remake(source)), backward keeps `source` instead of x.
    """
    return _LoraShared.apply(x, remake, source, *(t for layer in layers for t in layer))


class _LoraSwiGLU(torch.autograd.Function):
    # The base runs in x's dtype; the low-rank products in the adapters' (fp32 beside a bf16 base),
    # cast the way `_LoraLinear` casts them.
    @staticmethod
    def forward(ctx, x, wg, ag, bg, sg, wu, au, bu, su, wd, ad, bd, sd, remake=None, source=None) -> Tensor:  # noqa: PLR0913
        shape, dt, lo = x.shape, x.dtype, ag.dtype
        x2 = x.reshape(-1, shape[-1])  # (tokens, in)
        a_gu = torch.cat([ag, au])  # (rg + ru, in): one A-matmul for both projections
        xa_gu = x2.to(lo) @ a_gu.t()  # (tokens, rg + ru)
        xa_g, xa_u = xa_gu.split([ag.shape[0], au.shape[0]], dim=1)
        ctx.level = frozen_level(wg, wu, wd)
        with products(ctx.level):
            g, u = x2 @ wg.t(), x2 @ wu.t()  # (tokens, inter) each
        g = g.addmm_(xa_g.to(dt), bg.t().to(dt), alpha=sg)
        u = u.addmm_(xa_u.to(dt), bu.t().to(dt), alpha=su)
        h = F.silu(g).mul_(u)
        xa_d = h.to(lo) @ ad.t()  # (tokens, rd)
        with products(ctx.level):
            out = h @ wd.t()
        out = out.addmm_(xa_d.to(dt), bd.t().to(dt), alpha=sd)
        ctx.save_for_backward(x2 if remake is None else source, xa_gu, g, u, xa_d, wg, wu, wd, a_gu, bg, bu, ad, bd)
        ctx.remake = remake
        ctx.scalings = (sg, su, sd)
        ctx.shape = shape
        return out.reshape(*shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        kept, xa_gu, g, u, xa_d, wg, wu, wd, a_gu, bg, bu, ad, bd = ctx.saved_tensors
        sg, su, sd = ctx.scalings
        dt, lo = g.dtype, a_gu.dtype
        go = grad_out.reshape(-1, grad_out.shape[-1])  # (tokens, hidden)
        silu = F.silu(g)
        h = silu * u
        # down projection
        go_lo = go.to(lo)
        g_xa_d = (go_lo @ bd).mul_(sd)
        grad_ad = g_xa_d.t() @ h.to(lo)
        grad_bd = _grad_B(go_lo, xa_d, sd)
        del h, go_lo
        with products(ctx.level):
            g_h = go @ wd  # (tokens, inter)
        g_h = g_h.addmm_(g_xa_d.to(dt), ad.to(dt))
        g_u = g_h * silu
        del silu
        g_g = torch.ops.aten.silu_backward(g_h.mul_(u), g)
        # gate and up projections, sharing one A-matmul
        rg = bg.shape[1]
        xa_g, xa_u = xa_gu.split([rg, bu.shape[1]], dim=1)
        g_g_lo, g_u_lo = g_g.to(lo), g_u.to(lo)
        g_xa_gu = torch.cat([(g_g_lo @ bg).mul_(sg), (g_u_lo @ bu).mul_(su)], dim=1)  # (tokens, rg + ru)
        grad_a_gu = g_xa_gu.t() @ _kept_input(ctx, kept).to(lo)
        grad_bg = _grad_B(g_g_lo, xa_g, sg)
        grad_bu = _grad_B(g_u_lo, xa_u, su)
        with products(ctx.level):
            grad_x = (g_g @ wg).addmm_(g_u, wu)
        grad_x = grad_x.addmm_(g_xa_gu.to(dt), a_gu.to(dt)).reshape(ctx.shape)
        grad_ag, grad_au = grad_a_gu.split([rg, grad_a_gu.shape[0] - rg])
        return grad_x, None, grad_ag, grad_bg, None, None, grad_au, grad_bu, None, None, grad_ad, grad_bd, None, None, None


def lora_swiglu(x: Tensor, gate: LoraWeights, up: LoraWeights, down: LoraWeights, remake=None,
                source: Tensor | None = None) -> Tensor:
    """down(silu(gate(x)) * up(x)) where each projection is a LoRA linear without bias, base weights frozen.

    With `remake` and `source` (x == remake(source)), backward keeps `source` instead of x.
    """
    if torch.is_grad_enabled() and (x.requires_grad or any(t.requires_grad for p in (gate, up, down) for t in p[1:3])):
        return _LoraSwiGLU.apply(x, *gate, *up, *down, remake, source)
    # inference: `lora_linear`'s own few-kernel path, so the numbers equal the unfused layers'
    h = F.silu(lora_linear(x, gate[0], None, *gate[1:])).mul_(lora_linear(x, up[0], None, *up[1:]))
    return lora_linear(h, down[0], None, *down[1:])


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, labels: Tensor, chunk: int, level: str) -> Tensor:
        # hidden (tokens, dim), weight (vocab, dim), labels (tokens,): every label a class index
        total = hidden.new_zeros((), dtype=torch.float32)
        grad_hidden = torch.zeros_like(hidden) if hidden.requires_grad else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if weight.requires_grad else None
        # One logits buffer for every chunk, worked on in place: a (chunk, vocab) tensor is above
        # malloc's mmap threshold, so each fresh one would be mapped and page-faulted in anew.
        buffer = hidden.new_empty((min(chunk, hidden.shape[0]), weight.shape[0]))
        for start in range(0, hidden.shape[0], chunk):
            h = hidden[start : start + chunk]
            y = labels[start : start + chunk]
            rows = torch.arange(len(y), device=y.device)
            with products(level):
                logits = torch.mm(h, weight.t(), out=buffer[: len(h)]).float()  # (chunk, vocab)
            target = logits[rows, y]
            # log-sum-exp by hand, so that exp(logits - max) is computed once, in place, and is
            # also the softmax the gradient needs
            peak = logits.amax(dim=1, keepdim=True)
            exps = logits.sub_(peak).exp_()
            sums = exps.sum(dim=1, keepdim=True)
            total += (peak.squeeze(1) + sums.log().squeeze(1) - target).sum()
            if grad_hidden is None and grad_weight is None:
                continue
            probs = exps.div_(sums)  # d loss / d logits = softmax - onehot
            probs[rows, y] -= 1
            probs = probs.to(hidden.dtype)
            if grad_hidden is not None:
                with products(level):
                    grad_hidden[start : start + chunk] = probs @ weight
            if grad_weight is not None:
                grad_weight += (probs.t() @ h).float()
            del logits, exps, probs
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        grad_hidden, grad_weight = ctx.saved_tensors
        gh = grad_hidden * grad_out.to(grad_hidden.dtype) if grad_hidden is not None else None
        gw = (grad_weight * grad_out).to(ctx.weight_dtype) if grad_weight is not None else None
        return gh, gw, None, None, None


def linear_cross_entropy(hidden: Tensor, weight: Tensor, labels: Tensor, chunk: int = 1024) -> Tensor:
    """Sum over non-ignored tokens of cross-entropy(hidden @ weight^T, labels), logits never held whole.

    hidden (..., dim) and labels (...) are already aligned (shifted) by the caller. Only the
    positions with a label go through the head: in instruction tuning the prompt's tokens (and any
    padding) are ignored, and the head's (tokens, vocab) products are a fifth of a small model's
    step. Finding them costs one device synchronisation on a GPU.
    """
    hidden = hidden.reshape(-1, hidden.shape[-1])
    labels = labels.reshape(-1)
    scored = (labels != -100).nonzero().squeeze(1)
    if len(scored) < len(labels):  # the kernel sees class indices only
        hidden, labels = hidden.index_select(0, scored), labels.index_select(0, scored)
    # reduced products only in training (evaluation compares runs: keep it exact)
    level = frozen_level(weight) if hidden.requires_grad and torch.is_grad_enabled() else "highest"
    return _LinearCrossEntropy.apply(hidden, weight, labels, chunk, level)
