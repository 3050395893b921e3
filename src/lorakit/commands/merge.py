"""`lorakit merge`: bake an adapter into its base model and save a plain transformers model dir."""

from __future__ import annotations

import argparse

HELP = "merge an adapter into its base model and save a standalone model directory"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None,
                        help="base model (default: the adapter's base model if available here, else smollm2-135m)")
    parser.add_argument("--adapter", required=True, metavar="PATH", help="adapter directory")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                        help="dtype of the saved weights (default: float32)")
    parser.add_argument("--output", "-o", required=True, metavar="DIR",
                        help="where to write the merged model (safetensors + tokenizer)")
    parser.add_argument("--overwrite", action="store_true", help="replace DIR if it is not empty")


def run(args: argparse.Namespace) -> int:
    import time

    from lorakit.export import merge_adapter_to_dir

    start = time.perf_counter()
    out = merge_adapter_to_dir(args.model, args.adapter, args.output, overwrite=args.overwrite, dtype=args.dtype)
    print(f"merged {args.adapter} into its base model -> {out} ({time.perf_counter() - start:.1f} s)")
    print(f"load it with transformers.AutoModelForCausalLM.from_pretrained({str(out)!r})")
    return 0
