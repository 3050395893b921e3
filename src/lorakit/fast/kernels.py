"""Autograd functions behind the fast path: a LoRA linear, q/k/v on one input, a LoRA SwiGLU MLP.

Each computes exactly what the plain PyTorch expressions compute (tests compare gradients), but
saves less for backward and skips the full-size temporaries the plain expressions create. The
frozen base is a `bases.FrozenBase`: the kernels call its `linear` and `input_grad` and never
look at how it stores its weight (dense, transposed, 16-bit, later 4-bit or GGUF blocks).
- `lora_linear`: y = base(x) + s (x A^T) B^T with the scaling folded into `addmm`, saving only
  x and the small (tokens, r) product; the frozen base gets no gradient work.
- `lora_shared_input`: several LoRA linears reading one input (q, k, v) as one node: one
  A-gradient matmul for all, one input gradient accumulated in place.
- `lora_swiglu`: down(silu(gate(x)) * up(x)) with LoRA on all three projections, saving only the
  gate and up outputs (silu and the product are recomputed in backward, elementwise and cheap)
  and sharing one A-matmul between gate and up, which read the same input.
The head's fused loss is `fast.loss.linear_cross_entropy`.

Dtypes: products run in the base's compute dtype (`work`: the weight's own, or fp32 for a 16-bit
weight on a CPU that only emulates 16-bit products), activations stay in the model's dtype (x's),
and the adapters' low-rank products run in the adapters' dtype (fp32 beside a 16-bit base, as
PEFT's autocast_adapter_dtype). For an fp32 model every cast below is a no-op. The frozen
products run at `fast.precision`'s level, exact unless a caller asks for less.

What backward keeps: x (or, with `keep`, the norm input it is remade from), the (tokens, r)
products, A and B; the base object itself (not a copy of its weight).

Under torch.autocast each kernel runs with autocast off, its input and frozen products in the
autocast dtype as autocast would run a linear layer (`fast.amp`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ..bases import FrozenBase
from .amp import autocast_dtype, autocast_off, base_under_autocast, exact_backward, kept_under_autocast
from .precision import frozen_level, products
from .recompute import Kept


@dataclass(frozen=True)
class Adapted:
    """One adapted projection on the fast path: base(x) + scaling * (x A^T) B^T."""

    base: FrozenBase
    A: Tensor  # (r, in)
    B: Tensor  # (out, r)
    scaling: float


def _kept_input(ctx, kept: Tensor) -> Tensor:
    """The (tokens, in) input: kept as is, or remade from the norm input kept instead."""
    x = kept if ctx.remake is None else ctx.remake(kept)
    return x.reshape(-1, x.shape[-1])


def _under_autocast(ops: Sequence[Adapted], dtype: torch.dtype) -> tuple[Adapted, ...]:
    """The ops with their bases as autocast to `dtype` runs them (`fast.amp`)."""
    return tuple(Adapted(base_under_autocast(op.base, dtype), op.A, op.B, op.scaling) for op in ops)


def _grad_B(grad_out: Tensor, xa: Tensor, scaling: float) -> Tensor:
    """B's gradient, scaling * grad_out^T (x A^T), as the transpose of (r, tokens) @ (tokens, out):
    on CPU that order runs about twice as fast as (out, tokens) @ (tokens, r)."""
    return (xa.t() @ grad_out).mul_(scaling).t()


def _forward_one(op: Adapted, xw: Tensor, A: Tensor, B: Tensor, level: str) -> tuple[Tensor, Tensor]:
    """(base(x) + s (x A^T) B^T in the work dtype, x A^T) for x already in the work dtype."""
    xa = xw.to(A.dtype) @ A.t()  # (tokens, r)
    with products(level):
        out = op.base.linear(xw)
    return out.addmm_(xa.to(out.dtype), B.t().to(out.dtype), alpha=op.scaling), xa


class _LoraLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, A: Tensor, B: Tensor, op: Adapted, keep: Kept | None) -> Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])  # (tokens, in)
        work = op.base.compute_dtype()
        ctx.level = frozen_level(work)
        out, xa = _forward_one(op, x2.to(work), A, B, ctx.level)
        ctx.save_for_backward(x2 if keep is None else keep.source, xa, A, B)
        ctx.remake = None if keep is None else keep.remake
        ctx.op, ctx.shape, ctx.work = op, shape, work
        return out.to(x.dtype).reshape(*shape[:-1], out.shape[-1])

    @staticmethod
    @exact_backward
    def backward(ctx, grad_out: Tensor):
        kept, xa, A, B = ctx.saved_tensors
        op, s, lo = ctx.op, ctx.op.scaling, A.dtype
        g = grad_out.reshape(-1, grad_out.shape[-1]).to(ctx.work)  # (tokens, out)
        g_low = g.to(lo)
        g_xa = (g_low @ B).mul_(s)  # (tokens, r)
        grad_A = g_xa.t() @ _kept_input(ctx, kept).to(lo) if ctx.needs_input_grad[1] else None
        grad_B = _grad_B(g_low, xa, s) if ctx.needs_input_grad[2] else None
        grad_x = None
        if ctx.needs_input_grad[0]:
            with products(ctx.level):
                grad_x = op.base.input_grad(g)
            grad_x = grad_x.addmm_(g_xa.to(g.dtype), A.to(g.dtype)).to(grad_out.dtype).reshape(ctx.shape)
        return grad_x, grad_A, grad_B, None, None


def lora_linear(x: Tensor, op: Adapted, keep: Kept | None = None) -> Tensor:
    """base(x) + scaling * (x A^T) B^T, the base frozen.

    With `keep` (x == keep.remake(keep.source)), backward keeps the source instead of x.
    """
    amp = autocast_dtype(x.device)
    if amp is not None:
        with autocast_off(x.device):
            return lora_linear(x.to(amp), _under_autocast([op], amp)[0], kept_under_autocast(keep, amp))
    A, B = op.A, op.B
    if torch.is_grad_enabled() and (x.requires_grad or A.requires_grad or B.requires_grad):
        return _LoraLinear.apply(x, A, B, op, keep)
    # inference: as few kernel launches as possible (decoding is dominated by them)
    work = op.base.compute_dtype()
    if work == x.dtype == A.dtype:
        out = op.base.linear(x)
        xa = F.linear(x, A)
        out.view(-1, out.shape[-1]).addmm_(xa.view(-1, xa.shape[-1]), B.t(), alpha=op.scaling)
        return out
    xw = x.to(work)
    out = op.base.linear(xw)
    return (out + (F.linear(F.linear(xw.to(A.dtype), A), B) * op.scaling).to(work)).to(x.dtype)


def common_work_dtype(ops: Sequence[Adapted]) -> torch.dtype | None:
    """The one compute dtype of several bases (a fused node needs one), else None."""
    dtypes = {op.base.compute_dtype() for op in ops}
    return dtypes.pop() if len(dtypes) == 1 else None


def _flat(ops: Sequence[Adapted]) -> list[Tensor]:
    return [t for op in ops for t in (op.A, op.B)]


class _LoraShared(torch.autograd.Function):
    # Several LoRA linears reading one input (q, k and v) as one node. Forward computes each
    # exactly as `_LoraLinear` does (the same numbers as the layers apart, in training and in
    # inference); backward does one A-gradient matmul for all and accumulates the input
    # gradient in place.
    @staticmethod
    def forward(ctx, x: Tensor, ops: tuple[Adapted, ...], keep: Kept | None, *adapters: Tensor) -> tuple[Tensor, ...]:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])  # (tokens, in)
        work = common_work_dtype(ops)
        ctx.level = frozen_level(work)
        xw = x2.to(work)
        outs, xas = [], []
        for op, A, B in zip(ops, adapters[0::2], adapters[1::2]):
            out, xa = _forward_one(op, xw, A, B, ctx.level)
            outs.append(out.to(x.dtype).reshape(*shape[:-1], -1))
            xas.append(xa)
        ctx.save_for_backward(x2 if keep is None else keep.source, *xas, *adapters)
        ctx.remake = None if keep is None else keep.remake
        ctx.ops, ctx.shape, ctx.work = ops, shape, work
        return tuple(outs)

    @staticmethod
    @exact_backward
    def backward(ctx, *grads: Tensor):
        kept, *rest = ctx.saved_tensors
        ops, n = ctx.ops, len(ctx.ops)
        xas, As, Bs = rest[:n], rest[n::2], rest[n + 1 :: 2]
        lo = As[0].dtype
        gs = [g.reshape(-1, g.shape[-1]).to(ctx.work) for g in grads]  # (tokens, out) each
        g_los = [g.to(lo) for g in gs]
        g_xa_all = torch.cat([(g @ B).mul_(op.scaling) for g, B, op in zip(g_los, Bs, ops)], dim=1)  # (tokens, sum r)
        wants_A = ctx.needs_input_grad[3::2]
        wants_B = ctx.needs_input_grad[4::2]
        grad_As: list[Tensor | None] = [None] * n
        if any(wants_A):
            grad_As = list((g_xa_all.t() @ _kept_input(ctx, kept).to(lo)).split([A.shape[0] for A in As]))
        grad_x = None
        if ctx.needs_input_grad[0]:
            with products(ctx.level):
                grad_x = ops[0].base.input_grad(gs[0])
                for g, op in zip(gs[1:], ops[1:]):
                    op.base.input_grad(g, into=grad_x)
            a_all = torch.cat(As).to(grad_x.dtype)  # (sum r, in)
            grad_x = grad_x.addmm_(g_xa_all.to(grad_x.dtype), a_all).to(grads[0].dtype).reshape(ctx.shape)
        out: list[Tensor | None] = [grad_x, None, None]
        for g, xa, grad_A, op, want_A, want_B in zip(g_los, xas, grad_As, ops, wants_A, wants_B):
            out += [grad_A if want_A else None, _grad_B(g, xa, op.scaling) if want_B else None]
        return tuple(out)


def lora_shared_input(x: Tensor, ops: Sequence[Adapted], keep: Kept | None = None) -> tuple[Tensor, ...]:
    """`lora_linear(x, op)` for each of several layers reading the same x, in one autograd node
    (training only; the bases must share one compute dtype, see `common_work_dtype`).

    With `keep` (x == keep.remake(keep.source)), backward keeps the source instead of x.
    """
    ops = tuple(ops)
    amp = autocast_dtype(x.device)
    if amp is not None:
        with autocast_off(x.device):
            return lora_shared_input(x.to(amp), _under_autocast(ops, amp), kept_under_autocast(keep, amp))
    return _LoraShared.apply(x, ops, keep, *_flat(ops))


class _LoraSwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, ops: tuple[Adapted, Adapted, Adapted], keep: Kept | None,
                ag: Tensor, bg: Tensor, au: Tensor, bu: Tensor, ad: Tensor, bd: Tensor) -> Tensor:
        gate, up, down = ops
        shape, dt, lo = x.shape, x.dtype, ag.dtype
        work = common_work_dtype(ops)
        ctx.level = level = frozen_level(work)
        x2 = x.reshape(-1, shape[-1])  # (tokens, in)
        xw = x2.to(work)
        a_gu = torch.cat([ag, au])  # (rg + ru, in): one A-matmul for both projections
        xa_gu = xw.to(lo) @ a_gu.t()  # (tokens, rg + ru)
        xa_g, xa_u = xa_gu.split([ag.shape[0], au.shape[0]], dim=1)
        with products(level):
            g, u = gate.base.linear(xw), up.base.linear(xw)  # (tokens, inter) each
        g = g.addmm_(xa_g.to(work), bg.t().to(work), alpha=gate.scaling).to(dt)
        u = u.addmm_(xa_u.to(work), bu.t().to(work), alpha=up.scaling).to(dt)
        h = F.silu(g).mul_(u).to(work)
        xa_d = h.to(lo) @ ad.t()  # (tokens, rd)
        with products(level):
            out = down.base.linear(h)
        out = out.addmm_(xa_d.to(work), bd.t().to(work), alpha=down.scaling)
        ctx.save_for_backward(x2 if keep is None else keep.source, xa_gu, g, u, xa_d, a_gu, bg, bu, ad, bd)
        ctx.remake = None if keep is None else keep.remake
        ctx.ops, ctx.shape, ctx.work = ops, shape, work
        return out.to(dt).reshape(*shape[:-1], out.shape[-1])

    @staticmethod
    @exact_backward
    def backward(ctx, grad_out: Tensor):
        kept, xa_gu, g, u, xa_d, a_gu, bg, bu, ad, bd = ctx.saved_tensors
        gate, up, down = ctx.ops
        sg, su, sd = gate.scaling, up.scaling, down.scaling
        dt, lo, work = g.dtype, a_gu.dtype, ctx.work
        go = grad_out.reshape(-1, grad_out.shape[-1]).to(work)  # (tokens, hidden)
        silu = F.silu(g)
        h = silu * u
        # down projection
        go_lo = go.to(lo)
        g_xa_d = (go_lo @ bd).mul_(sd)
        grad_ad = g_xa_d.t() @ h.to(lo)
        grad_bd = _grad_B(go_lo, xa_d, sd)
        del h, go_lo
        with products(ctx.level):
            g_h = down.base.input_grad(go)  # (tokens, inter)
        g_h = g_h.addmm_(g_xa_d.to(work), ad.to(work)).to(dt)
        g_u = g_h * silu
        del silu
        g_g = torch.ops.aten.silu_backward(g_h.mul_(u), g)
        # gate and up projections, sharing one A-matmul
        rg = bg.shape[1]
        xa_g, xa_u = xa_gu.split([rg, bu.shape[1]], dim=1)
        g_g, g_u = g_g.to(work), g_u.to(work)
        g_g_lo, g_u_lo = g_g.to(lo), g_u.to(lo)
        g_xa_gu = torch.cat([(g_g_lo @ bg).mul_(sg), (g_u_lo @ bu).mul_(su)], dim=1)  # (tokens, rg + ru)
        grad_a_gu = g_xa_gu.t() @ _kept_input(ctx, kept).to(lo)
        grad_bg = _grad_B(g_g_lo, xa_g, sg)
        grad_bu = _grad_B(g_u_lo, xa_u, su)
        with products(ctx.level):
            grad_x = up.base.input_grad(g_u, into=gate.base.input_grad(g_g))
        grad_x = grad_x.addmm_(g_xa_gu.to(work), a_gu.to(work)).to(grad_out.dtype).reshape(ctx.shape)
        grad_ag, grad_au = grad_a_gu.split([rg, grad_a_gu.shape[0] - rg])
        return grad_x, None, None, grad_ag, grad_bg, grad_au, grad_bu, grad_ad, grad_bd


def lora_swiglu(x: Tensor, gate: Adapted, up: Adapted, down: Adapted, keep: Kept | None = None) -> Tensor:
    """down(silu(gate(x)) * up(x)) where each projection is a LoRA linear, bases frozen and
    sharing one compute dtype.

    With `keep` (x == keep.remake(keep.source)), backward keeps the source instead of x.
    """
    amp = autocast_dtype(x.device)
    if amp is not None:
        with autocast_off(x.device):
            return lora_swiglu(x.to(amp), *_under_autocast((gate, up, down), amp), keep=kept_under_autocast(keep, amp))
    ops = (gate, up, down)
    if torch.is_grad_enabled() and (x.requires_grad or any(t.requires_grad for t in _flat(ops))):
        return _LoraSwiGLU.apply(x, ops, keep, *_flat(ops))
    # inference: `lora_linear`'s own few-kernel path, so the numbers equal the unfused layers'
    h = F.silu(lora_linear(x, gate)).mul_(lora_linear(x, up))
    return lora_linear(h, down)
