"""`lorakit merge`: bake an adapter into its base model and save a plain transformers model dir,
or with ``--output FILE.gguf`` one GGUF file (llama.cpp, Ollama) and an Ollama Modelfile beside it."""

from __future__ import annotations

import argparse

HELP = "merge an adapter into its base model and save a standalone model directory"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None,
                        help="base model (default: the adapter's base model if available here, else smollm2-135m)")
    parser.add_argument("--adapter", required=True, metavar="PATH", help="adapter directory")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                        help="dtype of the saved weights (default: float32)")
    parser.add_argument("--output", "-o", required=True, metavar="DIR|FILE.gguf",
                        help="where to write the merged model: a dir (safetensors + tokenizer) or a .gguf file")
    parser.add_argument("--outtype", default=None, metavar="TYPE",
                        help="with a .gguf output: f32, f16 (default), bf16, q8_0, q4_0 or q4_1")
    parser.add_argument("--modelfile", default=None, metavar="PATH",
                        help="with a .gguf output: where the Ollama Modelfile goes (default: Modelfile beside it)")
    parser.add_argument("--no-modelfile", action="store_true", help="with a .gguf output: write no Modelfile")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output")


def run(args: argparse.Namespace) -> int:
    import time

    from lorakit.export import merge_adapter_to_dir

    start = time.perf_counter()
    if str(args.output).lower().endswith(".gguf"):
        return _run_gguf(args, start)
    if args.outtype is not None or args.modelfile is not None or args.no_modelfile:
        raise ValueError("--outtype, --modelfile and --no-modelfile apply to a .gguf --output only")
    out = merge_adapter_to_dir(args.model, args.adapter, args.output, overwrite=args.overwrite, dtype=args.dtype)
    print(f"merged {args.adapter} into its base model -> {out} ({time.perf_counter() - start:.1f} s)")
    print(f"load it with transformers.AutoModelForCausalLM.from_pretrained({str(out)!r})")
    return 0


def _run_gguf(args: argparse.Namespace, start: float) -> int:
    import time

    from lorakit.export.gguf_model import merge_adapter_to_gguf

    if args.dtype is not None:
        raise ValueError("--dtype applies to a model dir; a .gguf output takes --outtype")
    modelfile = False if args.no_modelfile else (args.modelfile or True)
    result = merge_adapter_to_gguf(args.model, args.adapter, args.output, outtype=args.outtype or "f16",
                                   overwrite=args.overwrite, modelfile=modelfile)
    print(f"merged {args.adapter} into its base model -> {result.path} ({result.outtype}, {result.tensors} tensors, "
          f"{time.perf_counter() - start:.1f} s)")
    print(f"run it with llama.cpp: llama-cli -m {result.path}")
    if result.modelfile is not None:
        print(f"Ollama Modelfile -> {result.modelfile}; ollama create NAME -f {result.modelfile}")
    return 0
