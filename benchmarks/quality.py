"""LoRA against full fine-tuning on the demo task, with the same data and number of steps.

Trains the demo recipe (`examples/demo/recipe.yaml`) twice through the trainer: LoRA as written;
full fine-tuning with the same steps, batch and schedule, at a learning rate suited to updating
every weight. Scores both on the held-out split and prints both scores and their ratio.

    python benchmarks/quality.py [--full-lr 5e-5] [--max-steps N]
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full-lr", type=float, default=5e-5, help="learning rate for full fine-tuning")
    parser.add_argument("--max-steps", type=int, default=None, help="override the recipe's steps (both runs)")
    args = parser.parse_args()

    from lorakit.demo.run import demo_train_config, evaluate, find_data_dir, read_heldout
    from lorakit.models.inference import load_for_inference
    from lorakit.train import train

    data = find_data_dir()
    prompts, references = read_heldout(data / "heldout.jsonl")
    _, tokenizer = load_for_inference("smollm2-135m", [])
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        lora = demo_train_config(data, Path(tmp) / "lora", max_steps=args.max_steps, quiet=True)
        full = dataclasses.replace(lora, method="full", lr=args.full_lr, output_dir=str(Path(tmp) / "full"))
        for label, config in (("LoRA", lora), ("full fine-tuning", full)):
            start = time.perf_counter()
            result = train(config)
            seconds = time.perf_counter() - start
            score, _ = evaluate(result.model.eval(), tokenizer, prompts, references)
            rows.append((label, config.lr, result.steps, seconds, score))
            result.model = None
    print("| method | lr | steps | train time (s) | held-out exact match |")
    print("|---|---:|---:|---:|---:|")
    for label, lr, steps, seconds, score in rows:
        print(f"| {label} | {lr:g} | {steps} | {seconds:.0f} | {score:.1%} |")
    lora_score, full_score = rows[0][4], rows[1][4]
    ratio = lora_score / full_score if full_score else float("inf")
    print(f"lora_score={lora_score:.3f} full_score={full_score:.3f} ratio={ratio:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
