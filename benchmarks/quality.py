"""LoRA against full fine-tuning and QLoRA on the demo task, with the same data and number of steps.

Trains the demo recipe (`examples/demo/recipe.yaml`) through the trainer: LoRA as written;
full fine-tuning with the same steps, batch and schedule, at a learning rate suited to updating
every weight; QLoRA, the LoRA recipe on the base stored in NF4 (double quantization, `quantize:
nf4`); QLoRA with a LoftQ start (`init_lora_weights: loftq`, `--loftq-iter` alternations, the
base rewritten by them). Scores each on the held-out split (QLoRA on its 4-bit base) and prints
the scores, LoRA's ratio to full fine-tuning and each QLoRA row's difference from LoRA in points
(goal: within 3).

    python benchmarks/quality.py [--full-lr 5e-5] [--max-steps N] [--methods lora,full,qlora,qlora-loftq]
    python benchmarks/quality.py --methods lora,qlora,qlora-loftq --seeds 0,1,2   # rows per seed, and means

The held-out split has 64 requests, so one answer is 1.6 points and a single run's score moves by
a few points with the seed (the adapter's initialisation and the data order): compare means.
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
    parser.add_argument("--max-steps", type=int, default=None, help="override the recipe's steps (every run)")
    parser.add_argument("--methods", default="lora,full,qlora,qlora-loftq", help="comma list of the rows to run")
    parser.add_argument("--loftq-iter", type=int, default=5, help="LoftQ alternations of the qlora-loftq row")
    parser.add_argument("--seeds", default=None, help="comma list of seeds, each method run once per seed "
                                                      "(default: the recipe's seed)")
    args = parser.parse_args()
    wanted = args.methods.split(",")

    from lorakit.demo.run import demo_train_config, evaluate, find_data_dir, read_heldout
    from lorakit.models.inference import load_for_inference
    from lorakit.train import train

    data = find_data_dir()
    prompts, references = read_heldout(data / "heldout.jsonl")
    _, tokenizer = load_for_inference("smollm2-135m", [])
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        lora = demo_train_config(data, Path(tmp) / "lora", max_steps=args.max_steps, quiet=True)
        runs = {
            "lora": ("LoRA", lora),
            "full": ("full fine-tuning",
                     dataclasses.replace(lora, method="full", lr=args.full_lr, output_dir=str(Path(tmp) / "full"))),
            "qlora": ("QLoRA (NF4 base)",
                      dataclasses.replace(lora, quantize="nf4", output_dir=str(Path(tmp) / "qlora"))),
            "qlora-loftq": (f"QLoRA, LoftQ start ({args.loftq_iter} iterations)",
                            dataclasses.replace(lora, quantize="nf4", init_lora_weights="loftq",
                                                loftq_config={"loftq_iter": args.loftq_iter},
                                                output_dir=str(Path(tmp) / "qlora-loftq"))),
        }
        seeds = [int(x) for x in args.seeds.split(",")] if args.seeds else [lora.seed]
        for seed in seeds:
            for name in wanted:
                label, config = runs[name]
                config = dataclasses.replace(config, seed=seed)
                start = time.perf_counter()
                result = train(config)
                seconds = time.perf_counter() - start
                score, _ = evaluate(result.model.eval(), tokenizer, prompts, references)
                rows.append((name, label, seed, config.lr, result.steps, seconds, score))
                result.model = None
    scores = {name: sum(r[6] for r in rows if r[0] == name) / len(seeds) for name in wanted}  # means over seeds
    print("| method | seed | lr | steps | train time (s) | held-out exact match |")
    print("|---|---:|---:|---:|---:|---:|")
    for _, label, seed, lr, steps, seconds, score in rows:
        print(f"| {label} | {seed} | {lr:g} | {steps} | {seconds:.0f} | {score:.1%} |")
    if len(seeds) > 1:
        print("means over seeds " + ", ".join(map(str, seeds)) + ": "
              + " ".join(f"{name}={scores[name]:.3f}" for name in wanted))
    if "lora" in scores and "full" in scores:
        lora_score, full_score = scores["lora"], scores["full"]
        ratio = lora_score / full_score if full_score else float("inf")
        print(f"lora_score={lora_score:.3f} full_score={full_score:.3f} ratio={ratio:.2f}")
    for name in ("qlora", "qlora-loftq"):
        if "lora" in scores and name in scores:
            key = name.replace("-", "_")
            print(f"{key}_score={scores[name]:.3f} {key}_minus_lora_points={100 * (scores[name] - scores['lora']):+.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
