"""`lorakit chat`: talk to a model (with an adapter) in the terminal, keeping the conversation."""

from __future__ import annotations

import argparse
import sys

from lorakit.commands.generate import add_model_arguments, add_sampling_arguments

HELP = "chat with a model (and an adapter) in the terminal; /reset clears history, /exit quits"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser, several=False)
    add_sampling_arguments(parser, chat_flag=False)
    parser.set_defaults(max_new_tokens=256)


def run(args: argparse.Namespace) -> int:
    from lorakit.generation import generate
    from lorakit.models.inference import load_for_inference
    from lorakit.models.load import packed_choice

    adapters = [args.adapter] if args.adapter else []
    model, tokenizer = load_for_inference(args.model, adapters, dtype=args.dtype, device=args.device,
                                          packed=packed_choice(args.gguf_base))
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("this tokenizer has no chat template; use 'lorakit generate' instead")
    interactive = sys.stdin.isatty()
    if interactive:
        print("Type a message; /reset clears the conversation, /exit (or Ctrl-D) quits.")
    history: list[dict[str, str]] = []
    while True:
        if interactive:
            print("you> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line:  # end of input
            break
        text = line.strip()
        if not text:
            continue
        if text == "/exit":
            break
        if text == "/reset":
            history.clear()
            print("(conversation cleared)", flush=True)
            continue
        history.append({"role": "user", "content": text})
        [reply] = generate(
            model, tokenizer, [history],
            max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
            seed=args.seed, system=args.system,
        )
        history.append({"role": "assistant", "content": reply})
        print(f"assistant> {reply}" if interactive else reply, flush=True)
    return 0
