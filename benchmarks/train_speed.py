"""Training step speed and memory: lorakit against PEFT + transformers, side by side.

Wall-clock figures on a shared machine move with its load; the CPU seconds of each step
(process time, all threads) are the steadier comparison and are printed beside them.

Each contender runs in its own fresh process (so each peak RSS is its own) on the same data,
seed and initial adapter weights: SmolLM2-135M (the embedded model) in fp32, r=16, alpha=32 on
all seven projections, dropout 0, batch 4 x 256 tokens, AdamW, 2 warm-up steps then the median
of the timed steps.

    python benchmarks/train_speed.py            # all contenders, prints the markdown table
    python benchmarks/train_speed.py --steps 5  # timed steps per contender (default 5)
    python benchmarks/train_speed.py --rounds 3 # each contender 3 times, alternating; medians
    python benchmarks/train_speed.py --prompt-share 0.65  # instruction tuning: no loss on the
                                                          # first 65 % of each row (a prompt)

`lorakit-medium` is lorakit with the frozen base weights' products at torch's matmul precision
"medium" (`lorakit.frozen_matmul_precision`: bf16 operands, fp32 accumulation, on CPUs with AMX;
TF32 on NVIDIA GPUs); `--matmul-precision` instead sets torch's own process-wide precision for
every contender.

By default every position has a label (the workload of issue #4). With --prompt-share, as in
instruction tuning with the prompt masked out (the demo's data: 35 % of tokens are answers),
the first part of each row has label -100 for every contender.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

CONTENDERS = {
    "peft": "PEFT 0.21 + transformers (reference)",
    "lorakit": "lorakit default",
    "lorakit-memory": "lorakit memory mode (checkpointing + chunked loss)",
    "lorakit-medium": "lorakit, frozen products at matmul precision medium (bf16 on AMX)",
    "peft-gc": "PEFT + transformers gradient checkpointing",
    "full": "full fine-tuning (transformers)",
    "floor": "floor: frozen base forward + backward to inputs",
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
BATCH, SEQ, WARMUP = 4, 256, 2


def _batch(vocab: int, prompt_share: float = 0.0):
    import torch

    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (BATCH, SEQ), generator=gen)
    labels = ids.clone()
    labels[:, : round(prompt_share * SEQ)] = -100  # the prompt: no loss there
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def _make_initial_adapter(directory: str) -> None:
    """The adapter every LoRA contender starts from (lorakit's init, saved in PEFT's format)."""
    import torch

    from lorakit import LoraConfig, get_peft_model
    from lorakit.models import load_model

    model, _ = load_model("smollm2-135m", dtype="float32", device="cpu")
    torch.manual_seed(0)
    config = LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS, lora_dropout=0.0)
    get_peft_model(model, config).save_pretrained(directory)


def _run(name: str, adapter_dir: str, steps: int, prompt_share: float = 0.0, precision: str = "highest") -> dict:
    import torch

    from lorakit.models import load_model

    torch.set_float32_matmul_precision(precision)  # the same for every contender
    torch.manual_seed(0)
    model, _ = load_model("smollm2-135m", dtype="float32", device="cpu")
    model.train()
    batch = _batch(model.config.vocab_size, prompt_share)
    n_target = int((batch["labels"][:, 1:] != -100).sum())

    if name in ("peft", "peft-gc"):
        import peft

        if name == "peft-gc":
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()
        model = peft.PeftModel.from_pretrained(model, adapter_dir, is_trainable=True)
        step_loss = lambda: model(**batch).loss  # noqa: E731
    elif name in ("lorakit", "lorakit-memory", "lorakit-medium"):
        from lorakit import PeftModel, frozen_matmul_precision
        from lorakit.fast.allocator import prepare_cpu_training
        from lorakit.fast.loss import causal_lm_loss

        prepare_cpu_training(gradient_checkpointing=name == "lorakit-memory")  # as lorakit's trainer does
        if name == "lorakit-memory":
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model = PeftModel.from_pretrained(model, adapter_dir, is_trainable=True)
        level = "medium" if name == "lorakit-medium" else "highest"

        def step_loss():
            with frozen_matmul_precision(level):  # backward keeps the level its forward ran at
                return causal_lm_loss(model, batch, chunk=256)[0] / n_target
    elif name == "full":
        step_loss = lambda: model(**batch).loss  # noqa: E731
    elif name == "floor":
        for p in model.parameters():
            p.requires_grad_(False)
        embed = model.get_input_embeddings()
        inputs = {k: v for k, v in batch.items() if k != "input_ids"}

        def step_loss():
            embeds = embed(batch["input_ids"]).detach().requires_grad_(True)
            return model(inputs_embeds=embeds, **inputs).loss
    else:
        raise ValueError(f"unknown contender {name!r}; choose from {', '.join(CONTENDERS)}")

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=2e-4) if params else None
    times, cpu_times, losses = [], [], []
    for step in range(WARMUP + steps):
        start, cpu_start = time.perf_counter(), time.process_time()
        loss = step_loss()
        loss.backward()
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        value = float(loss)
        elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
        losses.append(value)
        if step >= WARMUP:
            times.append(elapsed)
            cpu_times.append(cpu)
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    step_s = statistics.median(times)
    return {
        "name": name,
        "step_s": step_s,
        "cpu_s": statistics.median(cpu_times),
        "tokens_per_s": BATCH * SEQ / step_s,
        "peak_rss_gb": peak_kb / 1024**2,
        "losses": losses,
    }


def _median_run(runs: list[dict]) -> dict:
    """One contender over several rounds: the median of each figure, the first round's losses."""
    merged = dict(runs[0])
    for key in ("step_s", "cpu_s", "tokens_per_s", "peak_rss_gb"):
        merged[key] = statistics.median(r[key] for r in runs)
    return merged


def _table(results: dict[str, dict]) -> str:
    lines = [
        "| contender | tokens/s | step (s) | CPU s/step | peak RSS (GB) | losses (warm-up, then timed) |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for name, r in results.items():
        losses = " ".join(f"{x:.4f}" for x in r["losses"])
        lines.append(
            f"| {CONTENDERS[name]} | {r['tokens_per_s']:.0f} | {r['step_s']:.2f} | {r['cpu_s']:.2f} "
            f"| {r['peak_rss_gb']:.2f} | {losses} |"
        )
    return "\n".join(lines)


def _summary(results: dict[str, dict]) -> str:
    peft, ours, floor = results["peft"], results["lorakit"], results["floor"]
    n = min(len(peft["losses"]), len(ours["losses"]))
    rel = max(abs(a - b) / abs(a) for a, b in zip(peft["losses"][:n], ours["losses"][:n]))
    parts = [
        f"speed_vs_peft={ours['tokens_per_s'] / peft['tokens_per_s']:.2f}",
        f"memory_vs_peft={ours['peak_rss_gb'] / peft['peak_rss_gb']:.2f}",
        f"floor_ratio={ours['step_s'] / floor['step_s']:.2f}",
        f"loss_rel_diff={rel:.1e}",
        f"cpu_speed_vs_peft={peft['cpu_s'] / ours['cpu_s']:.2f}",
        f"cpu_floor_ratio={ours['cpu_s'] / floor['cpu_s']:.2f}",
    ]
    if "lorakit-medium" in results:
        medium = results["lorakit-medium"]
        diff = max(abs(a - b) / abs(a) for a, b in zip(peft["losses"][:n], medium["losses"][:n]))
        parts += [f"medium_speed_vs_peft={medium['tokens_per_s'] / peft['tokens_per_s']:.2f}",
                  f"medium_loss_rel_diff={diff:.1e}"]
    if "lorakit-memory" in results:
        mem = results["lorakit-memory"]
        parts.append(f"memory_mode_vs_peft={mem['peak_rss_gb'] / peft['peak_rss_gb']:.2f}")
        if "peft-gc" in results:
            parts.append(f"memory_mode_speed_vs_peft_gc={mem['tokens_per_s'] / results['peft-gc']['tokens_per_s']:.2f}")
    return " ".join(parts)


def main() -> int:
    from lorakit.fast.precision import LEVELS

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per contender")
    parser.add_argument("--only", nargs="*", choices=list(CONTENDERS), help="run only these contenders")
    parser.add_argument("--rounds", type=int, default=1,
                        help="run every contender this many times, alternating, and report the medians")
    parser.add_argument("--prompt-share", type=float, default=0.0,
                        help="share of each row (from its start) without labels, as a masked prompt")
    parser.add_argument("--matmul-precision", choices=LEVELS, default="highest",
                        help="torch.set_float32_matmul_precision for every contender (medium: bf16 products "
                             "on CPUs with AMX, TF32 on NVIDIA GPUs)")
    parser.add_argument("--contender", help=argparse.SUPPRESS)  # internal: run one, print JSON
    parser.add_argument("--adapter-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if not 0 <= args.prompt_share < 1:
        parser.error(f"--prompt-share {args.prompt_share}: must be at least 0 and below 1 (some positions need labels)")

    if args.contender:
        print(json.dumps(_run(args.contender, args.adapter_dir, args.steps, args.prompt_share, args.matmul_precision)))
        return 0

    names = args.only or list(CONTENDERS)
    runs: dict[str, list[dict]] = {name: [] for name in names}
    with tempfile.TemporaryDirectory() as tmp:
        _make_initial_adapter(tmp)
        for round_ in range(args.rounds):
            for name in names:
                print(f"round {round_ + 1}/{args.rounds}: running {name} …", file=sys.stderr, flush=True)
                out = subprocess.run(
                    [sys.executable, __file__, "--contender", name, "--adapter-dir", tmp, "--steps", str(args.steps),
                     "--prompt-share", str(args.prompt_share), "--matmul-precision", args.matmul_precision],
                    capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"},
                )
                if out.returncode != 0:
                    print(out.stderr, file=sys.stderr)
                    raise SystemExit(f"contender {name} failed")
                runs[name].append(json.loads(out.stdout.strip().splitlines()[-1]))
    results = {name: _median_run(rs) for name, rs in runs.items()}
    print(_table(results))
    if {"peft", "lorakit", "floor"} <= results.keys():
        print(_summary(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
