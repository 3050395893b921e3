"""`lorakit estimate`: parameters, training memory, adapter size and GPU fit, from a config alone."""

from __future__ import annotations

import argparse
import json

HELP = "size a fine-tuning run from the model's config: parameters, memory, adapter size, GPU fit"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", metavar="NAME|config.json|DIR",
                        help="a preset (llama-3.1-8b, smollm2-135m, …), a config.json, or a model directory")
    parser.add_argument("--method", choices=("full", "lora", "qlora"), default="lora", help="default: lora")
    lora = parser.add_argument_group("LoRA")
    lora.add_argument("--rank", type=int, default=16, metavar="N", help="default: 16")
    lora.add_argument("--alpha", type=float, default=32, metavar="X", help="default: 32")
    lora.add_argument("--targets", metavar="A,B,…|all-linear",
                      help="layers that get adapters (default: the engine's default for the architecture)")
    qlora = parser.add_argument_group("QLoRA (--method qlora: lorakit's 4-bit base)")
    qlora.add_argument("--no-double-quant", dest="double_quant", action="store_false",
                       help="fp32 block scales instead of 8-bit ones with fp32 constants per 256")
    qlora.add_argument("--compute-dtype", choices=("bf16", "fp16", "fp32"), default=None,
                       help="dtype of the 4-bit layers' products (default: --dtype)")
    qlora.add_argument("--device", choices=("gpu", "cpu"), default="gpu",
                       help="cpu: products as lorakit runs them on this CPU (fp32 where it lacks 16-bit "
                            "matrix instructions); default: gpu")
    run_group = parser.add_argument_group("training run")
    run_group.add_argument("--batch-size", type=int, default=1, metavar="N", help="default: 1")
    run_group.add_argument("--seq-len", type=int, default=2048, metavar="N", help="default: 2048")
    run_group.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="bf16", help="default: bf16")
    run_group.add_argument("--optimizer", choices=("adamw", "adamw8bit", "sgd"), default="adamw", help="default: adamw")
    run_group.add_argument("--master-weights", choices=("fp32", "none"), default="fp32",
                           help="fp32 copy of 16-bit trainable weights in the optimizer (default: fp32)")
    run_group.add_argument("--gradient-checkpointing", action="store_true", help="recompute layers in backward")
    layer = parser.add_argument_group("per-layer view (instead of --model)")
    layer.add_argument("--layer", metavar="INxOUT", help="one linear layer, e.g. 4096x4096")
    layer.add_argument("--ranks", default="4,8,16,32,64", metavar="R,R,…", help="default: 4,8,16,32,64")
    parser.add_argument("--json", action="store_true", help="print the result as one JSON object")


def run(args: argparse.Namespace) -> int:
    from lorakit.estimate import estimate
    from lorakit.estimate.ranks import parse_layer, parse_ranks, rank_table
    from lorakit.estimate.report import format_estimate, format_rank_table

    if args.layer is not None:
        if args.model is not None:
            raise ValueError("give --model or --layer, not both")
        table = rank_table(*parse_layer(args.layer), parse_ranks(args.ranks))
        print(json.dumps(table.to_dict(), indent=2) if args.json else format_rank_table(table))
        return 0
    if args.model is None:
        raise ValueError("--model is required (a preset, a config.json or a model directory), or --layer INxOUT")
    result = estimate(
        args.model, args.method, rank=args.rank, alpha=args.alpha, targets=args.targets,
        batch_size=args.batch_size, seq_len=args.seq_len, dtype=args.dtype, optimizer=args.optimizer,
        master_weights=args.master_weights, gradient_checkpointing=args.gradient_checkpointing,
        double_quant=args.double_quant, compute_dtype=args.compute_dtype, device=args.device,
    )
    print(json.dumps(result.to_dict(), indent=2) if args.json else format_estimate(result))
    return 0
