"""`lorakit generate`: complete prompts with a base model, one adapter, or several side by side."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HELP = "generate text from prompts with a base model and optional adapters"


def add_model_arguments(parser: argparse.ArgumentParser, *, several: bool = True) -> None:
    """--model/--adapter/--dtype/--device, shared by the commands that run a model."""
    parser.add_argument("--model", default=None,
                        help="base model: built-in name (smollm2-135m), model dir, .gguf file or hub id "
                             "(default: the adapter's base model if available here, else smollm2-135m)")
    if several:
        parser.add_argument("--adapter", action="append", default=[], metavar="PATH",
                            help="adapter directory; repeat to compare several adapters")
    else:
        parser.add_argument("--adapter", default=None, metavar="PATH", help="adapter directory")
    parser.add_argument("--dtype", default=None, choices=["auto", "float32", "bfloat16", "float16"],
                        help="weights dtype (default: bfloat16 on a CUDA GPU, float32 otherwise)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, mps (default: best available)")
    add_gguf_base_argument(parser)


def add_gguf_base_argument(parser: argparse.ArgumentParser) -> None:
    """--gguf-base, for the commands that load a model to run it."""
    parser.add_argument("--gguf-base", choices=["auto", "packed", "dense"], default="auto",
                        help="for a .gguf or built-in model: keep the file's quantized blocks as the weights "
                             "(packed: about a sixth of fp32's memory for Q4) or load its cached fp32 conversion "
                             "(dense: faster decoding); auto: packed where the architecture allows (llama, qwen2)")


def add_sampling_arguments(parser: argparse.ArgumentParser, *, chat_flag: bool = True) -> None:
    """Decoding options, shared with `lorakit chat` (which always uses the chat template)."""
    parser.add_argument("--max-new-tokens", type=int, default=128, metavar="N",
                        help="most tokens to generate per reply (default: %(default)s)")
    parser.add_argument("--temperature", type=float, default=0.0, metavar="T",
                        help="sampling temperature; 0 is greedy (default: 0)")
    parser.add_argument("--top-p", type=float, default=1.0, metavar="P",
                        help="nucleus sampling threshold (default: 1.0)")
    parser.add_argument("--seed", type=int, default=None, metavar="S", help="random seed for sampling")
    if chat_flag:
        parser.add_argument("--chat", action=argparse.BooleanOptionalAction, default=True,
                            help="wrap prompts in the tokenizer's chat template when it has one (default: on)")
    parser.add_argument("--system", default=None, metavar="TEXT", help="system message for the chat template")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", action="append", metavar="TEXT", help="a prompt; repeat for several")
    source.add_argument("--prompt-file", metavar="FILE",
                        help="one prompt per non-empty line ('-' reads stdin)")
    add_sampling_arguments(parser)
    parser.add_argument("--with-base", action="store_true",
                        help="also answer with the base model (no adapter), for comparison")
    parser.add_argument("--batch-size", type=int, default=16, metavar="N",
                        help="prompts run together (default: 16)")
    parser.add_argument("--json", action="store_true",
                        help="print one JSON object per answer: prompt, adapter, text")


def run(args: argparse.Namespace) -> int:
    from lorakit.generation import generate
    from lorakit.lora.names import adapter_names_for
    from lorakit.lora.routing import BASE
    from lorakit.models.inference import load_for_inference
    from lorakit.models.load import packed_choice

    prompts = args.prompt or read_prompts(args.prompt_file)
    model, tokenizer = load_for_inference(args.model, args.adapter, dtype=args.dtype, device=args.device,
                                          packed=packed_choice(args.gguf_base))
    variants = adapter_names_for(args.adapter) if args.adapter else [BASE]
    if args.with_base and args.adapter:
        variants = [BASE, *variants]
    rows = [(v, p) for v in variants for p in prompts]  # every variant answers every prompt
    texts = generate(
        model, tokenizer, [p for _, p in rows],
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
        chat=args.chat, seed=args.seed, system=args.system, batch_size=args.batch_size,
        adapter_names=[v for v, _ in rows] if args.adapter else None,
    )
    for (variant, prompt), text in zip(rows, texts):
        if args.json:
            label = None if variant == BASE else variant
            print(json.dumps({"prompt": prompt, "adapter": label, "text": text}, ensure_ascii=False))
        elif len(rows) == 1:
            print(text)
        else:
            shown = prompt if len(prompt) <= 60 else prompt[:57] + "..."
            print(f"[{'base' if variant == BASE else variant}] {shown}\n{text}\n")
    return 0


def read_prompts(path: str) -> list[str]:
    """Non-empty lines of `path` (stdin for '-'), each one prompt."""
    if path == "-":
        text = sys.stdin.read()
    else:
        file = Path(path)
        if not file.is_file():
            raise FileNotFoundError(f"prompt file not found: {path}")
        text = file.read_text(encoding="utf-8")
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"no prompts in {'stdin' if path == '-' else path}")
    return prompts
