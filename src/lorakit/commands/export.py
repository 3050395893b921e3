"""`lorakit export`: an adapter as a file another runtime loads (today: llama.cpp's LoRA adapter GGUF)."""

from __future__ import annotations

import argparse

HELP = "export an adapter for another runtime: llama.cpp / Ollama LoRA adapter GGUF"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("adapter", metavar="ADAPTER", help="adapter directory")
    parser.add_argument("--format", default="gguf", choices=["gguf"], help="file format (default: gguf)")
    parser.add_argument("--output", "-o", required=True, metavar="FILE", help="where to write, e.g. adapter.gguf")
    parser.add_argument("--model", default=None,
                        help="base model: built-in name, .gguf file, model dir or hub id "
                             "(default: the adapter's recorded base); a .gguf base checks every tensor against it")
    parser.add_argument("--outtype", default="f32", choices=["f32", "f16", "bf16", "q8_0"],
                        help="tensor type (default: f32; q8_0 keeps rows that are not whole 32-value blocks in f16)")
    parser.add_argument("--modelfile", action="store_true",
                        help="also write an Ollama Modelfile (FROM the base, ADAPTER the file) beside FILE")
    parser.add_argument("--overwrite", action="store_true", help="replace FILE (and the Modelfile) if they exist")


def run(args: argparse.Namespace) -> int:
    from lorakit.export import export_gguf_adapter, inspect_adapter

    out = export_gguf_adapter(args.adapter, args.output, base=args.model, outtype=args.outtype,
                              overwrite=args.overwrite, modelfile=args.modelfile)
    info = inspect_adapter(out)
    print(f"wrote {out}: {info['n_modules']} modules, rank {', '.join(map(str, info['ranks']))}, "
          f"alpha {info['lora_alpha']:g}, {info['architecture']}, {', '.join(info['dtypes'])}")
    print(f"llama.cpp: llama-cli -m BASE.gguf --lora {out}")
    if args.modelfile:
        print(f"Ollama: ollama create NAME -f {out.parent / 'Modelfile'}")
    return 0
