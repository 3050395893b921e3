"""`lorakit merge`: bake an adapter into its base model and save a plain transformers model dir,
or with ``--output FILE.gguf`` one GGUF file (llama.cpp, Ollama) and an Ollama Modelfile beside it.

A 4-bit base (a 4-bit directory as --model, or --quantize: the base quantized as the QLoRA run
that trained the adapter did) is merged onto its de-quantized weights; --requantize writes a
4-bit directory again and prints the rounding that caused.
"""

from __future__ import annotations

import argparse

HELP = "merge an adapter into its base model and save a standalone model directory or GGUF file"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None,
                        help="base model (default: the adapter's base model if available here, else smollm2-135m)")
    parser.add_argument("--adapter", required=True, metavar="PATH", help="adapter directory")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                        help="dtype of the saved weights (default: float32)")
    parser.add_argument("--quantize", default=None, choices=["nf4", "fp4"],
                        help="quantize the base to 4 bits first, as the QLoRA run that trained the adapter did, "
                             "and merge onto the de-quantized weights (a 4-bit --model dir needs no flag)")
    parser.add_argument("--no-double-quant", dest="double_quant", action="store_false",
                        help="with --quantize: no double quantization of the scales (as the run had)")
    parser.add_argument("--requantize", action="store_true",
                        help="4-bit base: quantize the merged weights again and write a 4-bit directory "
                             "(bitsandbytes' layout); prints the rounding it caused")
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

    quantization = None
    if args.quantize is not None:
        from lorakit.bases.quant_config import QuantConfig

        quantization = QuantConfig(quant_type=args.quantize, double_quant=args.double_quant)
    elif not args.double_quant:
        raise ValueError("--no-double-quant applies with --quantize only")
    start = time.perf_counter()
    if str(args.output).lower().endswith(".gguf"):
        return _run_gguf(args, quantization, start)
    if args.outtype is not None or args.modelfile is not None or args.no_modelfile:
        raise ValueError("--outtype, --modelfile and --no-modelfile apply to a .gguf --output only")
    from lorakit.export.merged import write_merged

    result = write_merged(args.model, args.adapter, args.output, overwrite=args.overwrite, dtype=args.dtype,
                          quantization=quantization, requantize=args.requantize)
    onto = " (onto its de-quantized 4-bit weights)" if result.quantized else ""
    print(f"merged {args.adapter} into its base model{onto} -> {result.path} ({time.perf_counter() - start:.1f} s)")
    if result.report is not None:
        print(result.report.line())
        print(f"load it with lorakit.load_model({str(result.path)!r}) or transformers with bitsandbytes")
    else:
        print(f"load it with transformers.AutoModelForCausalLM.from_pretrained({str(result.path)!r})")
    return 0


def _run_gguf(args: argparse.Namespace, quantization, start: float) -> int:
    import time

    from lorakit.export.gguf_model import merge_adapter_to_gguf

    if args.dtype is not None:
        raise ValueError("--dtype applies to a model dir; a .gguf output takes --outtype")
    if args.requantize:
        raise ValueError("--requantize writes a 4-bit directory; a .gguf output takes --outtype (q4_0, q4_1, q8_0, ...)")
    modelfile = False if args.no_modelfile else (args.modelfile or True)
    result = merge_adapter_to_gguf(args.model, args.adapter, args.output, outtype=args.outtype or "f16",
                                   overwrite=args.overwrite, modelfile=modelfile, quantization=quantization)
    print(f"merged {args.adapter} into its base model -> {result.path} ({result.outtype}, {result.tensors} tensors, "
          f"{time.perf_counter() - start:.1f} s)")
    print(f"run it with llama.cpp: llama-cli -m {result.path}")
    if result.modelfile is not None:
        print(f"Ollama Modelfile -> {result.modelfile}; ollama create NAME -f {result.modelfile}")
    return 0
