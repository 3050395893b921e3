"""`lorakit quantize`: a 16/32-bit model streamed into 4 bits and saved as a bitsandbytes-layout dir."""

from __future__ import annotations

import argparse

HELP = "store a model's linear layers in 4 bits (NF4/FP4) as a transformers + bitsandbytes model directory"

DTYPES = ("float32", "bfloat16", "float16")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, metavar="NAME|DIR|FILE.gguf",
                        help="a built-in model, a safetensors model directory, a .gguf file or a hub id")
    parser.add_argument("--output", "-o", required=True, metavar="DIR", help="where to write the 4-bit model")
    parser.add_argument("--quant", choices=("nf4", "fp4"), default="nf4", help="4-bit code (default: nf4)")
    parser.add_argument("--no-double-quant", dest="double_quant", action="store_false",
                        help="keep the block scales in fp32 (default: 8-bit, QLoRA's double quantization)")
    parser.add_argument("--blocksize", type=int, default=64, metavar="N",
                        help="elements per scale (default: 64; 64 to 4096, a power of two)")
    parser.add_argument("--compute-dtype", choices=DTYPES, default=None,
                        help="dtype of the products (default: the weights' dtype)")
    parser.add_argument("--dtype", choices=DTYPES, default=None,
                        help="dtype the 4-bit weights de-quantize to and of every other tensor "
                             "(default: the checkpoint's own, else float32)")
    parser.add_argument("--skip", metavar="A,B,…", default=None,
                        help="linear layers to keep dense besides the output head (names or name parts)")
    parser.add_argument("--overwrite", action="store_true", help="replace DIR if it is not empty")


def run(args: argparse.Namespace) -> int:
    import time
    from pathlib import Path

    from lorakit import QuantConfig
    from lorakit.export.merged import check_output_dir
    from lorakit.models.load import load_model, resolve_model_path
    from lorakit.models.quantized import save_quantized
    from lorakit.models.stream import checkpoint_bytes, checkpoint_dtype

    skip = [s.strip() for s in args.skip.split(",") if s.strip()] if args.skip else None
    config = QuantConfig(quant_type=args.quant, blocksize=args.blocksize, double_quant=args.double_quant,
                         compute_dtype=args.compute_dtype, skip_modules=skip)
    out = Path(args.output).expanduser().absolute()
    check_output_dir(out, args.overwrite)
    source = resolve_model_path(args.model)
    if Path(source).absolute() == out:
        raise ValueError(f"the output dir {out} is the model itself; choose another --output")
    dtype = args.dtype or (checkpoint_dtype(source) if Path(source).is_dir() else None) or "float32"
    start = time.perf_counter()
    model, tokenizer = load_model(args.model, dtype=dtype, device="cpu", quantization=config)
    before = checkpoint_bytes(model.config._name_or_path)
    save_quantized(model, out, tokenizer=tokenizer)
    after = sum(f.stat().st_size for f in out.iterdir() if f.suffix == ".safetensors")
    double = "double quant" if config.double_quant else "fp32 scales"
    print(f"quantized {args.model} ({_size(before)}) -> {out} ({_size(after)}, {config.quant_type}, "
          f"{double}, blocksize {config.blocksize}, {dtype}) in {time.perf_counter() - start:.1f} s")
    print(f"load it with lorakit.load_model({str(out)!r}) or transformers + bitsandbytes "
          f"AutoModelForCausalLM.from_pretrained({str(out)!r})")
    return 0


def _size(n: int) -> str:
    """Bytes as the largest decimal unit that keeps a digit before the point."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"
