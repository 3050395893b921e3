"""`lorakit demo` (what `make demo` runs): fine-tune SmolLM2-135M on a small task, offline, and compare."""

from __future__ import annotations

import argparse

HELP = "fine-tune the built-in SmolLM2 on a booking->JSON task and show held-out scores before/after"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-dir", default=None, metavar="DIR",
                        help="folder with recipe.yaml, train.jsonl and heldout.jsonl (default: examples/demo "
                             "of the lorakit checkout; an installed wheel does not include it)")
    parser.add_argument("--output-dir", default="runs/demo", metavar="DIR",
                        help="where the adapter goes; replaced on every run (default: runs/demo)")
    parser.add_argument("--model", default=None, help="base model (default: the recipe's, smollm2-135m)")
    parser.add_argument("--max-steps", type=int, default=None, metavar="N",
                        help="stop the fine-tune after N steps (default: the recipe's)")
    parser.add_argument("--frozen-matmul-precision", choices=["highest", "high", "medium"], default="highest",
                        help="precision of the frozen base weights' products while fine-tuning (medium: "
                             "bf16 operands on CPUs with AMX, TF32 on NVIDIA GPUs; default: highest)")
    parser.add_argument("--quantize", choices=["nf4", "fp4", "none"], default="none",
                        help="QLoRA: store the base's linear layers in 4 bits (nf4 or fp4) before scoring and "
                             "fine-tuning, and report the memory its weights take (default: none)")
    parser.add_argument("--gguf-base", choices=["auto", "packed", "dense"], default="auto",
                        help="train on the GGUF file's own quantized blocks (packed) or its fp32 conversion "
                             "(dense); auto: packed for the built-in model (docs/gguf.md; default: auto)")
    parser.add_argument("--examples", type=int, default=3, metavar="N",
                        help="before/after answers to show (default: 3)")


def run(args: argparse.Namespace) -> int:
    from lorakit.demo.run import format_report, run_demo

    result = run_demo(data_dir=args.data_dir, output_dir=args.output_dir, model=args.model,
                      max_steps=args.max_steps, frozen_matmul_precision=args.frozen_matmul_precision,
                      quantize=args.quantize, gguf_base=args.gguf_base,
                      log=lambda line: print(line, flush=True))
    print(format_report(result, args.examples))
    return 0
