"""Estimates as text: the table `lorakit estimate` prints."""

from __future__ import annotations

from .api import Estimate
from .memory import DTYPE_BYTES
from .ranks import RankTable

GiB = 1024**3
MiB = 1024**2


def format_estimate(e: Estimate) -> str:
    """Parameters, memory by component, adapter file size and GPU fits, one fact per line."""
    if e.method == "full":
        method = "full fine-tuning"
    else:
        kind = "QLoRA" if e.method == "qlora" else "LoRA"
        method = f"{kind} r={e.rank}, alpha={e.alpha:g} on {', '.join(e.adapted_modules)}"
    optimizer = {"adamw": "AdamW", "adamw8bit": "8-bit AdamW", "sgd": "SGD"}[e.optimizer]
    checkpointing = "gradient checkpointing" if e.gradient_checkpointing else "no gradient checkpointing"
    lines = [
        f"model        {e.model} ({e.model_type})",
        f"method       {method}",
        f"run          batch {e.batch_size} x seq {e.seq_len}, {e.dtype}, {optimizer}, {checkpointing}",
        f"parameters   {e.params.line()}",
        "",
        f"{'memory':<20}{'GiB':>8}",
    ]
    m = e.memory
    for label, value in (("weights", m.weights), ("gradients", m.gradients), ("optimizer states", m.optimizer_states),
                         ("activations", m.activations), ("logits/loss", m.logits_loss), ("total (peak)", m.total)):
        lines.append(f"  {label:<18}{value / GiB:>8.2f}")
    lines += [f"assumes: {e.assumptions}", "", f"adapter file {_adapter_file(e)}", "fits on"]
    for fit in e.fits:
        verdict = "yes" if fit.fits else "no "
        lines.append(f"  {fit.gpu:<7}{verdict}  ({fit.used_percent:.0f} % of it)")
    return "\n".join(lines)


def _adapter_file(e: Estimate) -> str:
    if e.adapter_file_bytes is None:
        model_file = e.params.total * DTYPE_BYTES[e.dtype]
        return f"none: full fine-tuning saves the whole model ({model_file / GiB:.2f} GiB in {e.dtype})"
    return f"{e.adapter_file_bytes / MiB:.1f} MiB ({e.adapter_file_bytes:,d} bytes, safetensors, fp32)"


def format_rank_table(table: RankTable) -> str:
    """The seed's table: the layer's own size, then LoRA's parameters and share at each rank."""
    lines = [
        f"layer {table.in_features} x {table.out_features}: {table.layer_params:,d} parameters "
        f"= {table.layer_params / 1e6:.1f}M (full fine-tuning)",
        f"{'rank':>6}  {'LoRA params':>12}  of the layer",
    ]
    for row in table.rows:
        lines.append(f"{row.rank:>6}  {row.params:>12,d}  {row.percent:.2f} %")
    return "\n".join(lines)
