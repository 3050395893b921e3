"""`lorakit estimate` against measurement: peak memory of real training steps on CPU.

For each case a fresh Python process builds the model from its config (random weights: memory
does not depend on their values), runs two training steps (forward with labels, backward,
fused AdamW step, `zero_grad(set_to_none=True)`) and reports its peak resident memory minus
its resident memory just before building the model. The same process first runs the same
step on a miniature of the model, so that code pages and thread pools are already resident,
and resets the kernel's peak counter (/proc/self/clear_refs) after that warm-up.

glibc's malloc is told to hand every block of 64 KiB or more straight back to the system
(MALLOC_MMAP_THRESHOLD_), so resident memory follows the live tensors, as a GPU allocator's
`max_memory_allocated` does, rather than what the heap kept after frees.

QLoRA rows quantize the built model with lorakit (`quantize_model`, NF4 + double quantization)
before the peak counter is reset: they measure the training steps on the 4-bit base, not the
load (the fp32 model exists while it is quantized; `lorakit.load_model` streams instead).

    .venv/bin/python benchmarks/estimate_vs_measured.py            # the table in docs/estimate.md
    .venv/bin/python benchmarks/estimate_vs_measured.py --quick    # the two tiny models only
    .venv/bin/python benchmarks/estimate_vs_measured.py --methods qlora    # the QLoRA rows only
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any

TINY_LLAMA = {
    "model_type": "llama", "hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 4,
    "num_attention_heads": 8, "num_key_value_heads": 4, "vocab_size": 8192, "tie_word_embeddings": False,
}
TINY_QWEN2 = {
    "model_type": "qwen2", "hidden_size": 384, "intermediate_size": 1024, "num_hidden_layers": 6,
    "num_attention_heads": 6, "num_key_value_heads": 2, "vocab_size": 16384, "tie_word_embeddings": True,
}


@dataclass(frozen=True)
class Case:
    label: str
    model: Any  # preset name or config dict
    method: str
    checkpointing: bool
    batch: int
    seq: int
    targets: str | None = None
    rank: int = 16


def cases(quick: bool) -> list[Case]:
    models = [
        ("tiny-llama", TINY_LLAMA, 4, 256, "q_proj,v_proj", 8),
        ("tiny-qwen2", TINY_QWEN2, 4, 256, "q_proj,k_proj,v_proj,o_proj", 16),
    ]
    if not quick:
        models.append(("smollm2-135m", "smollm2-135m", 2, 512, "all-linear", 16))
    return [
        Case(label, model, method, ckpt, batch, seq, targets if method != "full" else None, rank)
        for label, model, batch, seq, targets, rank in models
        for method in ("full", "lora", "qlora")
        for ckpt in (False, True)
    ]


# -- the measured process ----------------------------------------------------------------------
def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _build(config: dict[str, Any], case: Case):
    """The model in fp32 from its config; QLoRA: its linear layers (not the head) then stored in NF4."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    fields = {k: v for k, v in config.items() if k != "model_type"}
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(config["model_type"], **fields), dtype=torch.float32)
    if case.method == "qlora":
        from lorakit import QuantConfig, quantize_model

        quantize_model(model, QuantConfig("nf4", double_quant=True))
    return model


def _train_steps(config: dict[str, Any], case: Case, batch: int, seq: int, steps: int = 2, model: Any = None) -> None:
    """lorakit's training step (as lorakit.train runs it on a GPU): summed-token loss through
    lorakit.fast.loss.causal_lm_loss, backward, gradient clipping, fused AdamW, set_to_none."""
    import torch

    from lorakit import LoraConfig, get_peft_model
    from lorakit.fast.loss import causal_lm_loss

    model = _build(config, case) if model is None else model
    model.train()
    if case.checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if case.method != "full":
        targets = case.targets if case.targets == "all-linear" else case.targets.split(",")
        model = get_peft_model(model, LoraConfig(r=case.rank, lora_alpha=2 * case.rank, target_modules=targets))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5, fused=True)
    ids = torch.randint(0, config["vocab_size"], (batch, seq))
    for _ in range(steps):
        loss_sum, n_targets = causal_lm_loss(model, {"input_ids": ids, "labels": ids})
        (loss_sum / n_targets).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def _miniature(config: dict[str, Any]) -> dict[str, Any]:
    ratio = config["num_attention_heads"] // config.get("num_key_value_heads", config["num_attention_heads"])
    return {**config, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": max(1, 4 // ratio), "head_dim": 16, "vocab_size": 512}


def measure(case: Case) -> int:
    """Peak resident bytes a training step adds (call in a fresh process)."""
    import gc

    import torch

    from lorakit.estimate.presets import load_config_dict

    config = load_config_dict(case.model)[1] if isinstance(case.model, str) else case.model
    torch.manual_seed(0)
    _train_steps(_miniature(config), case, 2, 32)
    gc.collect()
    before = _rss_kib("VmRSS")
    model = None
    if case.method == "qlora":  # the 4-bit base resident, its quantization's transients gone
        model = _build(config, case)
        gc.collect()
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")  # reset VmHWM, the peak resident size, to the current size
    _train_steps(config, case, case.batch, case.seq, model=model)
    return (_rss_kib("VmHWM") - before) * 1024


# -- the driver --------------------------------------------------------------------------------
def estimated(case: Case):
    from lorakit.estimate import estimate

    return estimate(case.model, case.method, rank=case.rank, alpha=2 * case.rank, targets=case.targets,
                    batch_size=case.batch, seq_len=case.seq, dtype="fp32", optimizer="adamw",
                    gradient_checkpointing=case.checkpointing, device="cpu")


def run_child(case: Case) -> int:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MKL_DISABLE_FAST_MM": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    out = subprocess.run(
        [sys.executable, __file__, "--child", json.dumps(asdict(case))],
        env=env, capture_output=True, text=True, check=False,
    )
    if out.returncode != 0:
        raise RuntimeError(f"{case.label} {case.method}: child failed:\n{out.stderr[-2000:]}")
    return int(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the two tiny models only")
    parser.add_argument("--methods", default="full,lora,qlora", help="comma list of the methods to run")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--json", action="store_true", help="also print the rows as JSON")
    args = parser.parse_args()
    if args.child:
        print(measure(Case(**json.loads(args.child))))
        return
    mib = 1024**2
    header = ("| model | method | grad. ckpt | batch x seq | estimate MiB | of which act. + loss | "
              "measured MiB | error | time s |")
    print(header)
    print("|" + "---|" * 9)
    rows = []
    methods = set(args.methods.split(","))
    for case in [c for c in cases(args.quick) if c.method in methods]:
        est = estimated(case)
        start = time.perf_counter()
        peak = run_child(case)
        seconds = time.perf_counter() - start
        error = 100 * (est.memory.total - peak) / peak
        rows.append({"case": asdict(case), "estimate": est.memory.total, "measured": peak, "error_percent": error})
        print(f"| {case.label} | {case.method} | {'yes' if case.checkpointing else 'no'} | "
              f"{case.batch} x {case.seq} | {est.memory.total / mib:,.0f} | "
              f"{(est.memory.activations + est.memory.logits_loss) / mib:,.0f} | {peak / mib:,.0f} | "
              f"{error:+.1f} % | {seconds:.0f} |", flush=True)
    if args.json:
        print(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
