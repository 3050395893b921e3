"""Where a QLoRA adapter starts: the demo task's held-out answer loss before any fine-tuning.

Rows: the embedded SmolLM2 as the LoRA runs see it (fp32), its NF4 copy (double quantization, what
plain QLoRA starts from) and NF4 with a LoftQ start (`init_lora_weights="loftq"`, the demo
recipe's r=16, alpha=32 on the seven projections) for each `--iters` value: the teacher-forced
loss of the held-out answers (the tokens the demo trains on), in nats per token, and how long
the LoftQ start took. Lower is nearer the dense model.

    python benchmarks/loftq_start.py [--iters 1,5,10]
"""

from __future__ import annotations

import argparse
import time

import torch

SEVEN = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iters", default="1,5,10", help="comma list of LoftQ rounds, one row each")
    args = parser.parse_args()

    from lorakit import LoftQConfig, LoraConfig, get_peft_model, load_model
    from lorakit.data import load_records, tokenize_records
    from lorakit.demo.run import find_data_dir
    from lorakit.train import evaluate_loss

    def answer_loss(model, examples) -> float:  # the trainer's held-out loss, one example a batch (no padding)
        return evaluate_loss(model, examples, 1, tokenizer.pad_token_id, torch.device("cpu"))

    dense, tokenizer = load_model("smollm2-135m", packed=False)
    examples = tokenize_records(load_records(find_data_dir() / "heldout.jsonl"), tokenizer, 96).examples
    rows = [("fp32 (the LoRA runs' base)", answer_loss(dense, examples), None)]
    del dense
    rows.append(("NF4, double quant (plain QLoRA)", answer_loss(load_model("smollm2-135m", quantization="nf4")[0],
                                                                examples), None))
    for iters in [int(v) for v in args.iters.split(",")]:
        model, _ = load_model("smollm2-135m", quantization="nf4")
        start = time.perf_counter()
        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=SEVEN, init_lora_weights="loftq",
                                                 loftq_config=LoftQConfig(loftq_iter=iters)))
        seconds = time.perf_counter() - start
        rows.append((f"NF4 + LoftQ start, {iters} round(s)", answer_loss(model.eval(), examples), seconds))
    print("| base | held-out answer loss (nats/token) | LoftQ start (s) |")
    print("|---|---:|---:|")
    for label, loss, seconds in rows:
        print(f"| {label} | {loss:.4f} | {'' if seconds is None else f'{seconds:.0f}'} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
